"""Benchmark of the search core: rlm_jax.search.mcts vs mctx on the same toy environment.

    python experiments/bench_search.py [--batch 64] [--branching 8] [--simulations 64,256] [--repeats 5]
    python experiments/bench_search.py --sections=lm [--lm_prompts 32,256,1024] [--lm_depths 3,8] [--lm_batch 8]

Section "toy": our `mcts` and mctx with identical settings on the deterministic random tree env
(tests/fixtures/toy_env.py), so both build the same trees: the `muzero()` preset vs `mctx.muzero_policy`
and the `gumbel_muzero()` preset vs `mctx.gumbel_muzero_policy` (defaults of both). Runs alternate
(ours, mctx, ours, ...) so machine load hits both alike; compile time (first call) is reported apart.
Throughput is simulations per second summed over the batch: B * num_simulations / seconds per search.

Section "lm" (`--sections=lm`): MCTS over countdown-shaped prompts, the re-prefill baseline
(`LMSpec.kv_cache=False`: every expansion re-reads each node's whole context, K times, and the value
model re-reads it too) against the paged KV cache (`search/paged.py`: the tree is the cache), side by
side in one run with the same keys, so both build the same trees. A random-weight policy and a value
model of the same shape (`--lm_d_model` 128, `--lm_layers` 4, vocab 300; K=4 proposals of at most
L=12 tokens), B=8 problems, `--lm_simulations` 8 leaves each, at every prompt length in `--lm_prompts`
(real tokens: random filler before the problem's text, one character per id) and every depth in
`--lm_depths`. The STEP/EOS output columns are rescaled so that, as with a trained model, most steps
end within L tokens and the tree grows. Positions/token: token positions the policy and value model
computed (`SearchOutput.cost`: every row of every forward call, padding and finished rows included)
per generated token (`evaluation.mcts_tokens`: every proposal sampled). KV MiB/problem: the pool the
cached search holds (`paged.kv_bytes`). Compilation (AOT `lower().compile()`) is timed apart. The
last lines repeat each setting in one line for tools:
`lm-search prompt=256 depth=8: cached 1.31 positions/token, baseline 97.4, speedup 6.2x`.
Section "hf" (`--sections=hf`): MCTS (the paged KV cache, a value head on the policy's trunk) with a
Qwen2-0.5B-shaped random model (its real config.json, random weights, float32) at `--hf_prompt` (256)
tokens of a ChatML prompt in the cl100k BPE; steps end at "\\n\\n" and the tokens it is merged into.
Problems/s and generated tokens/s (every proposal sampled) of `--hf_batch` problems.
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
flags.DEFINE_list("sections", ["toy"], "sections to run: toy, lm, hf")
flags.DEFINE_integer("lm_batch", 8, "lm section: problems searched together")
flags.DEFINE_integer("lm_simulations", 8, "lm section: leaves per problem")
flags.DEFINE_list("lm_prompts", ["32", "256", "1024"], "lm section: prompt lengths (real tokens)")
flags.DEFINE_list("lm_depths", ["3", "8"], "lm section: max_depth D (steps per solution)")
flags.DEFINE_integer("lm_d_model", 128, "lm section: model width (8 heads, 4 kv heads)")
flags.DEFINE_integer("lm_layers", 4, "lm section: model layers")
flags.DEFINE_integer("lm_repeats", 2, "lm section: timed runs per setting")
flags.DEFINE_string("lm_preset", "puct", "lm section: MCTS preset (puct, muzero, x1, uct, gumbel)")
flags.DEFINE_integer("lm_parallel", 1, "lm section: W leaves per iteration (num_parallel): "
                     "lm_simulations / W iterations")
flags.DEFINE_integer("hf_batch", 2, "hf section: problems searched together")
flags.DEFINE_integer("hf_prompt", 256, "hf section: chat prompt length (cl100k tokens)")
flags.DEFINE_integer("hf_simulations", 8, "hf section: simulations per problem")
flags.DEFINE_integer("hf_step_len", 16, "hf section: L, the most tokens of a step")
flags.DEFINE_integer("hf_depth", 4, "hf section: D, the most steps of a solution")
flags.DEFINE_integer("lm_rollouts", 0, "lm section: x1's rollouts, R per new node (search.num_rollouts; "
                     "with --lm_preset=x1)")
flags.DEFINE_bool("lm_value", True, "lm section: evaluate nodes with a value model (as evaluation does)")
flags.DEFINE_bool("lm_shared_trunk", False, "lm section: the value model is a head on the policy's trunk (x1's "
                  "shared base) instead of a model of its own")


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


def _lm_setup(batch: int, prompt_len: int, depth: int, kv_cache: bool):
    """(spec, inputs, policy params count, all params count) for the LM section: prompts of exactly
    `prompt_len` real tokens (the countdown problem's text, one character per id, after random filler)."""
    from rlm_jax import decoding
    from rlm_jax.models import heads, transformer
    from rlm_jax.models.config import ModelConfig
    from rlm_jax.search import lm
    from rlm_jax.search.base import LMSpec
    from rlm_jax.tasks.countdown import CountdownTask

    import numpy as np

    pad, step, eos = 0, 1, 2
    l = 12
    cfg = ModelConfig(vocab_size=300, d_model=FLAGS.lm_d_model, num_layers=FLAGS.lm_layers, num_heads=8,
                      num_kv_heads=4, mlp_dim=FLAGS.lm_d_model * 7 // 2, max_seq_len=prompt_len + (depth + 1) * l)
    policy = jax.jit(transformer.init_params, static_argnums=0)(cfg, jax.random.key(0))
    # Random weights give near-uniform next tokens (P(STEP) ~ 1/300): widen the STEP logit's spread and
    # make EOS follow it, so proposals end after ~5 tokens (~60% STEP, ~20% EOS, ~20% cut at L).
    step_col = 12.0 * policy["lm_head"][:, step]
    policy["lm_head"] = policy["lm_head"].at[:, step].set(step_col).at[:, eos].set(0.8 * step_col)
    head_cfg = heads.HeadConfig(kind="value", hidden=(256,))
    value = heads.init_value_params(cfg, head_cfg, jax.random.key(1)) if FLAGS.lm_value else None
    shared = FLAGS.lm_value and FLAGS.lm_shared_trunk
    if shared:  # a value head on the policy's trunk: {"head"} only
        value = {"head": value["head"]}
    spec = LMSpec(policy=cfg, step_id=step, eos_id=eos, pad_id=pad, num_slots=4, step_len=l, max_depth=depth,
                  value=cfg if FLAGS.lm_value else None, head=head_cfg if FLAGS.lm_value else None,
                  kv_cache=kv_cache, shared_trunk=shared, num_rollouts=FLAGS.lm_rollouts)
    task = CountdownTask(pool=1)
    rng = np.random.default_rng(0)
    prompts = []
    for i in range(batch):
        text = [3 + ord(ch) % 297 for ch in task.generate(seed=i, difficulty=0.5)["problem"]] + [step]
        filler = list(rng.integers(3, 300, size=max(0, prompt_len - len(text))))
        prompts.append((filler + text)[-prompt_len:])
    t, m = decoding.pad_prompts(prompts, pad, bucket=False)
    n_params = transformer.count_params(policy) + (transformer.count_params(value) if value else 0)
    return spec, lm.search_inputs(policy, value, t, m), transformer.count_params(policy), n_params


def _lm_run(spec, inputs, sims: int, config):
    """Compiles and runs one search: (seconds per search (median), positions computed and generated tokens
    (batch totals, mean over runs), nodes per problem, compile seconds)."""
    import numpy as np

    from rlm_jax import evaluation
    from rlm_jax.search import lm

    key = jax.random.key(0)
    start = time.perf_counter()
    compiled = jax.jit(lm.lm_mcts, static_argnames=("spec", "num_simulations", "config")).lower(
        spec, inputs, key, sims, config).compile()
    compile_s = time.perf_counter() - start
    runs, cost, tokens, nodes = [], [], [], []
    for r in range(FLAGS.lm_repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(inputs, jax.random.fold_in(key, r)))
        runs.append(time.perf_counter() - start)
        cost.append(float(np.sum(out.cost)))
        tokens.append(float(np.sum(evaluation.mcts_tokens(out))))
        nodes.append(float(np.mean(np.asarray(out.tree.num_nodes))))
    return statistics.median(runs), statistics.mean(cost), statistics.mean(tokens), statistics.mean(nodes), compile_s


def lm_section():
    """The re-prefill baseline against the paged KV cache, side by side in one run, per prompt length and
    depth (same keys: both build the same trees)."""
    from rlm_jax.search import paged

    batch, sims = FLAGS.lm_batch, FLAGS.lm_simulations
    config = search.preset(FLAGS.lm_preset, num_parallel=FLAGS.lm_parallel)
    iterations = -(-sims // FLAGS.lm_parallel)
    rows, lines = [], []
    for prompt_len in map(int, FLAGS.lm_prompts):
        for depth in map(int, FLAGS.lm_depths):
            res = {}
            for kv in (False, True):
                spec, inputs, n_policy, n_all = _lm_setup(batch, prompt_len, depth, kv)
                res[kv] = _lm_run(spec, inputs, iterations, config)
            (sec0, cost0, tok0, _, comp0), (sec1, cost1, tok1, nodes1, comp1) = res[False], res[True]
            capacity = config.capacity or 1 + iterations * FLAGS.lm_parallel * (spec.num_slots if config.expand_all else 1)
            kv_mib = paged.kv_bytes(spec, capacity, prompt_len) / 2 ** 20
            # The cached search reads each prompt once per model (the baseline re-reads it in every context):
            # per generated token, the search proper costs the rest.
            models = 1 + (spec.value is not None and not spec.shared_trunk)
            search1 = (cost1 - batch * models * prompt_len) / tok1
            rows.append(f"| {prompt_len} | {depth} | {cost0 / tok0:.1f} | {cost1 / tok1:.2f} | {search1:.2f} | "
                        f"{batch / sec0:.2f} | "
                        f"{batch / sec1:.2f} | {sec0 / sec1:.1f}x | {tok1 / sec1:,.0f} | {tok1 / batch:.0f} | "
                        f"{nodes1:.1f} | {kv_mib:.2f} | {comp0:.1f} / {comp1:.1f} |")
            lines.append(f"lm-search prompt={prompt_len} depth={depth}: cached {cost1 / tok1:.2f} positions/token "
                         f"({search1:.2f} after the prompt), baseline {cost0 / tok0:.1f}, speedup {sec0 / sec1:.1f}x")
            if tok0 != tok1:
                lines.append(f"  note: the two searches sampled different tokens ({tok0:.0f} vs {tok1:.0f})")
            print(lines[-1], flush=True)
    print(f"\n## LM MCTS on countdown-shaped prompts: policy {n_policy / 1e6:.1f}M params"
          f"{f' + value model ({n_all / 1e6:.1f}M in all)' if FLAGS.lm_value else ''}"
          f"{' (a head on the policy trunk)' if FLAGS.lm_value and FLAGS.lm_shared_trunk else ''}, B={batch}, "
          f"K={spec.num_slots}, L={spec.step_len}, {sims} simulations (W={FLAGS.lm_parallel}), preset "
          f"{FLAGS.lm_preset}{f', {FLAGS.lm_rollouts} rollouts per node' if FLAGS.lm_rollouts else ''}, {jax.devices()[0].platform}, median of {FLAGS.lm_repeats} runs, compile excluded")
    print("| prompt | depth | baseline positions/token | cached positions/token | cached, after the prompt | "
          "baseline problems/s | "
          "cached problems/s | speedup | cached tokens/s | tokens/problem | nodes/problem | KV MiB/problem | "
          "compile s (base / cached) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n".join(lines))


# Qwen2-0.5B's config.json (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, vocab 151936, tied).
QWEN2_05B = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=896,
                 intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                 hidden_act="silu", use_sliding_window=False)


def _chat_prompts(batch: int, prompt_len: int):
    """`batch` ChatML prompts of exactly `prompt_len` tokens of the cl100k BPE (a system prompt, one worked
    GSM8K-style example written 8 times, a question; cut from the left), the "\\n\\n" step tokenizer, and the
    ChatML EOS."""
    import tempfile

    from helpers_hf import save_cl100k_tokenizer  # tests/: the offline cl100k BPE with a ChatML template
    from rlm_jax import prompting
    from rlm_jax.tokenizer import HFTokenizer
    from transformers import AutoTokenizer

    folder = save_cl100k_tokenizer(Path(tempfile.mkdtemp()) / "tok")
    hf_tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    example = ("Natalia sold 48 clips in April and half as many in May. How many did she sell in all?",
               "In May she sold 48 / 2 = 24 clips.\n\nIn all she sold 48 + 24 = 72 clips.\n\n#### 72")
    fmt = prompting.PromptFormat(fewshot=(example,) * 8)  # ~600 tokens: prompts of up to that length are cut from it
    prompts = []
    for i in range(batch):
        ids = prompting.prompt_ids(hf_tok, fmt, f"A shop sells {3 + i} pens for ${7 * (i + 2)}. What do "
                                               f"{11 + 2 * i} pens cost?")
        if len(ids) < prompt_len:
            raise ValueError(f"--hf_prompt={prompt_len} is longer than the {len(ids)}-token chat prompt")
        prompts.append(ids[-prompt_len:])
    return prompts, HFTokenizer(hf_tok, "\n\n"), prompting.primary_stop(hf_tok, fmt)


def hf_section():
    """MCTS with a Qwen2-0.5B-shaped random model (the real config, random weights) at a chat prompt."""
    import dataclasses

    from rlm_jax import decoding
    from rlm_jax.models import heads, hf_config, transformer
    from rlm_jax.search.base import LMSpec
    from rlm_jax.search import lm

    batch, prompt_len, sims = FLAGS.hf_batch, FLAGS.hf_prompt, FLAGS.hf_simulations
    prompts, tok, stop = _chat_prompts(batch, prompt_len)
    l, depth = FLAGS.hf_step_len, FLAGS.hf_depth
    cfg = dataclasses.replace(hf_config.config_from_hf(QWEN2_05B), max_seq_len=prompt_len + (depth + 1) * l)
    params = jax.jit(transformer.init_params, static_argnums=0)(cfg, jax.random.key(0))
    # Random weights almost never write a step end among 151,936 tokens: widen the "\n\n" token's logit
    # spread (tied embeddings: its row) so proposals end after a few tokens and the tree grows, as with a
    # trained model.
    params["embed"] = params["embed"].at[tok.step_id].multiply(40.0)
    head_cfg = heads.HeadConfig(kind="value", hidden=(256,))
    value = {"head": heads.init_value_params(cfg, head_cfg, jax.random.key(1), trunk=params)["head"]}
    spec = LMSpec(policy=cfg, step_id=tok.step_id, eos_id=stop, pad_id=tok.pad_id, num_slots=4, step_len=l,
                  max_depth=depth, value=cfg, head=head_cfg, shared_trunk=True, temperature=1.0,
                  step_ends=tuple(i for i in tok.step_end_ids if i != stop))
    t, m = decoding.pad_prompts(prompts, tok.pad_id, bucket=False)
    inputs = lm.search_inputs(params, value, t, m)
    sec, cost, tokens, nodes, compile_s = _lm_run(spec, inputs, sims, search.preset(FLAGS.lm_preset))
    n = transformer.count_params(params)
    print(f"\n## MCTS with a Qwen2-0.5B-shaped random model ({n / 1e6:.0f}M params, float32, a value head on its "
          f"trunk), ChatML prompts of {prompt_len} cl100k tokens, B={batch}, K={spec.num_slots}, L={l}, D={depth}, "
          f"{sims} simulations, preset {FLAGS.lm_preset}, {jax.devices()[0].platform}, median of {FLAGS.lm_repeats} "
          f"runs, compile excluded")
    print("| problems/s | generated tokens/s | tokens/problem | nodes/problem | positions/token | compile s |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {batch / sec:.3f} | {tokens / sec:.1f} | {tokens / batch:.0f} | {nodes:.1f} | {cost / tokens:.2f} | "
          f"{compile_s:.0f} |")
    print(f"hf-search qwen2-0.5b prompt={prompt_len}: {batch / sec:.3f} problems/s, {tokens / sec:.1f} tokens/s",
          flush=True)


SECTIONS = {"toy": toy_section, "lm": lm_section, "hf": hf_section}


def main(argv):
    del argv
    unknown = [name for name in FLAGS.sections if name not in SECTIONS]
    if unknown:
        raise app.UsageError(f"unknown section(s) {unknown}; valid: {', '.join(SECTIONS)}")
    for name in FLAGS.sections:
        SECTIONS[name]()


if __name__ == "__main__":
    app.run(main)
