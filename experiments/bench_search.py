"""Benchmark of the search core: rlm_jax.search.mcts vs mctx on the same toy environment.

    python experiments/bench_search.py [--batch 64] [--branching 8] [--simulations 64,256] [--repeats 5]
    python experiments/bench_search.py --sections=lm [--lm_simulations 8,16] [--lm_batch 16] [--lm_parallel 1,4]

Section "toy": our `mcts` and mctx with identical settings on the deterministic random tree env
(tests/fixtures/toy_env.py), so both build the same trees: the `muzero()` preset vs `mctx.muzero_policy`
and the `gumbel_muzero()` preset vs `mctx.gumbel_muzero_policy` (defaults of both). Runs alternate
(ours, mctx, ours, ...) so machine load hits both alike; compile time (first call) is reported apart.
Throughput is simulations per second summed over the batch: B * num_simulations / seconds per search.

Section "lm" (`--sections=lm`): MCTS over countdown with a ~10M-parameter policy and a value model of
the same size (random weights; d_model 256, 6 layers, vocab 300; K=4 proposals of at most L=12
tokens, depth D=3), B=16 problems, `--lm_simulations` (8, 16) leaves per problem, searched with W
leaves per iteration for each W in `--lm_parallel` (1, 4): S / W iterations (virtual loss spreads the
W descents; the model sees W times bigger batches per call). Prompts are the task's problem texts
encoded one character per id. The STEP/EOS output columns are rescaled so that, as with a trained
model, most steps end within L tokens and the tree grows (with plain random weights nearly every
proposal would be cut at L tokens, an invalid slot). Compilation (AOT `lower().compile()`) is timed apart; runs are
timed on the compiled program. Each iteration runs the policy on B*K contexts of P + D*L tokens (the
whole path is re-read: no KV cache in the tree) and the value model on B, void simulations included
(fixed shapes), so time grows with simulations, not with the nodes created. Generated tokens: all tokens sampled for the proposals of every
created node (root included), as `evaluation.mcts_tokens` counts them.
Further sections register in SECTIONS.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import jax
from absl import app, flags

# The toy env is a test fixture (tests/fixtures/), shared with tests/test_mcts_vs_mctx.py so that the
# benchmark times the very trees that test checks against mctx; one copy, imported from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures.toy_env import ToyEnv  # noqa: E402
from rlm_jax.search import mcts as search  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 64, "problems searched together")
flags.DEFINE_integer("branching", 8, "child slots K per node")
flags.DEFINE_list("simulations", ["64", "256"], "simulation counts")
flags.DEFINE_integer("repeats", 5, "timed runs per contestant (after the compile run)")
flags.DEFINE_list("policies", ["muzero", "gumbel"], "toy section: muzero and/or gumbel")
flags.DEFINE_list("sections", ["toy"], "sections to run: toy, lm")
flags.DEFINE_integer("lm_batch", 16, "lm section: problems searched together")
flags.DEFINE_list("lm_simulations", ["8", "16"], "lm section: simulation counts")
flags.DEFINE_integer("lm_repeats", 2, "lm section: timed runs per simulation count")
flags.DEFINE_string("lm_preset", "puct", "lm section: MCTS preset (puct, muzero, x1, uct, gumbel)")
flags.DEFINE_list("lm_parallel", ["1", "4"], "lm section: W leaves per iteration (num_parallel); "
                  "each W runs lm_simulations / W iterations")
flags.DEFINE_bool("lm_value", True, "lm section: evaluate nodes with a value model (as evaluation does)")


def _time(fn, *args):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def _contest(contestants: dict, args, repeats: int):
    """{name: fn}: compile seconds and median run seconds per name, runs interleaved."""
    compile_s = {name: _time(fn, *args) for name, fn in contestants.items()}
    runs = {name: [] for name in contestants}
    for _ in range(repeats):
        for name, fn in contestants.items():
            runs[name].append(_time(fn, *args))
    return compile_s, {name: statistics.median(r) for name, r in runs.items()}


def _mctx_policy(env, policy, num_simulations):
    import mctx  # test dependency, only needed for the comparison

    def recurrent_fn(params, key, action, state):
        nxt, reward, discount, logits, value, _ = env.step(state, action)
        return mctx.RecurrentFnOutput(reward=reward, discount=discount, prior_logits=logits, value=value), nxt

    fn = {"muzero": mctx.muzero_policy, "gumbel": mctx.gumbel_muzero_policy}[policy]

    @jax.jit
    def run(key, root):
        root = mctx.RootFnOutput(prior_logits=root.prior_logits, value=root.value, embedding=root.embedding)
        return fn(None, key, root, recurrent_fn, num_simulations).search_tree.children_visits[:, 0]
    return run


def toy_section():
    batch, k = FLAGS.batch, FLAGS.branching
    env = ToyEnv(num_actions=k)
    root, key = env.root(batch), jax.random.PRNGKey(0)
    print(f"\n## toy env: B={batch}, K={k}, {jax.devices()[0].platform}, median of {FLAGS.repeats} runs")
    print("| policy | sims | ours sims/s | mctx sims/s | ratio | ours ms | mctx ms | ours compile s | mctx compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    presets = {"muzero": search.muzero, "gumbel": search.gumbel_muzero}
    for policy in FLAGS.policies:
        for sims in map(int, FLAGS.simulations):
            config = presets[policy]()
            ours = jax.jit(lambda key, root: search.mcts(None, key, root, env, sims, config).root_visits)
            mctx_run = _mctx_policy(env, policy, sims)
            compile_s, run_s = _contest({"ours": ours, "mctx": mctx_run}, (key, root), FLAGS.repeats)
            rate = {name: batch * sims / s for name, s in run_s.items()}
            print(f"| {policy} | {sims} | {rate['ours']:,.0f} | {rate['mctx']:,.0f} | "
                  f"{rate['ours'] / rate['mctx']:.2f}x | {run_s['ours'] * 1e3:.1f} | {run_s['mctx'] * 1e3:.1f} | "
                  f"{compile_s['ours']:.1f} | {compile_s['mctx']:.1f} |", flush=True)


def _lm_setup(batch: int):
    """(spec, inputs, policy params, all params) for the LM section."""
    from rlm_jax import decoding
    from rlm_jax.models import heads, transformer
    from rlm_jax.models.config import ModelConfig
    from rlm_jax.search import lm
    from rlm_jax.search.base import LMSpec
    from rlm_jax.tasks.countdown import CountdownTask

    pad, step, eos = 0, 1, 2
    cfg = ModelConfig(vocab_size=300, d_model=256, num_layers=6, num_heads=8, num_kv_heads=4, mlp_dim=1792,
                      max_seq_len=128)
    policy = jax.jit(transformer.init_params, static_argnums=0)(cfg, jax.random.key(0))
    # Random weights give near-uniform next tokens (P(STEP) ~ 1/300): widen the STEP logit's spread and
    # make EOS follow it, so proposals end after ~5 tokens (~60% STEP, ~20% EOS, ~20% cut at L).
    step_col = 12.0 * policy["lm_head"][:, step]
    policy["lm_head"] = policy["lm_head"].at[:, step].set(step_col).at[:, eos].set(0.8 * step_col)
    head_cfg = heads.HeadConfig(kind="value", hidden=(256,))
    value = heads.init_value_params(cfg, head_cfg, jax.random.key(1)) if FLAGS.lm_value else None
    spec = LMSpec(policy=cfg, step_id=step, eos_id=eos, pad_id=pad, num_slots=4, step_len=12, max_depth=3,
                  value=cfg if FLAGS.lm_value else None, head=head_cfg if FLAGS.lm_value else None)
    task = CountdownTask(pool=1)
    texts = [task.generate(seed=i, difficulty=0.5)["problem"] for i in range(batch)]
    prompts = [[3 + ord(ch) % 297 for ch in t] + [step] for t in texts]
    t, m = decoding.pad_prompts(prompts, pad)
    n_params = transformer.count_params(policy) + (transformer.count_params(value) if value else 0)
    return spec, lm.search_inputs(policy, value, t, m), transformer.count_params(policy), n_params


def lm_section():
    import numpy as np

    from rlm_jax import evaluation
    from rlm_jax.search import lm

    batch = FLAGS.lm_batch
    spec, inputs, n_policy, n_all = _lm_setup(batch)
    key = jax.random.key(0)
    print(f"\n## LM MCTS on countdown: policy {n_policy / 1e6:.1f}M params"
          f"{f' + value model ({n_all / 1e6:.1f}M in all)' if FLAGS.lm_value else ''}, B={batch}, "
          f"K={spec.num_slots}, L={spec.step_len}, D={spec.max_depth}, prompt {inputs['prompt'].shape[1]} tokens, "
          f"preset {FLAGS.lm_preset}, {jax.devices()[0].platform}, median of {FLAGS.lm_repeats} runs")
    print("| leaves | W | iterations | problems/s | generated tokens/s | tokens/problem | nodes/problem | ms/search "
          "| compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for sims, w in [(s, w) for s in map(int, FLAGS.lm_simulations) for w in map(int, FLAGS.lm_parallel)]:
        iterations = -(-sims // w)
        config = search.preset(FLAGS.lm_preset, num_parallel=w)
        start = time.perf_counter()
        compiled = jax.jit(lm.lm_mcts, static_argnames=("spec", "num_simulations", "config")).lower(
            spec, inputs, key, iterations, config).compile()
        compile_s = time.perf_counter() - start
        runs, tokens, nodes = [], [], []
        for r in range(FLAGS.lm_repeats):
            k = jax.random.fold_in(key, r)
            start = time.perf_counter()
            out = jax.block_until_ready(compiled(inputs, k))
            runs.append(time.perf_counter() - start)
            tokens.append(float(np.sum(evaluation.mcts_tokens(out))))
            nodes.append(float(np.mean(np.asarray(out.tree.num_nodes))))
        sec = statistics.median(runs)
        tok = statistics.mean(tokens)
        print(f"| {iterations * w} | {w} | {iterations} | {batch / sec:.2f} | {tok / sec:,.0f} | {tok / batch:.0f} | "
              f"{statistics.mean(nodes):.1f} | {sec * 1e3:,.0f} | {compile_s:.1f} |", flush=True)


SECTIONS = {"toy": toy_section, "lm": lm_section}


def main(argv):
    del argv
    unknown = [name for name in FLAGS.sections if name not in SECTIONS]
    if unknown:
        raise app.UsageError(f"unknown section(s) {unknown}; valid: {', '.join(SECTIONS)}")
    for name in FLAGS.sections:
        SECTIONS[name]()


if __name__ == "__main__":
    app.run(main)
