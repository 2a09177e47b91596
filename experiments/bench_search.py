"""Benchmark of the search core: rlm_jax.search.mcts vs mctx on the same toy environment.

    python experiments/bench_search.py [--batch 64] [--branching 8] [--simulations 64,256] [--repeats 5]

Section "toy": our `mcts` and mctx with identical settings on the deterministic random tree env
(rlm_jax.search.toy_env), so both build the same trees: the `muzero()` preset vs `mctx.muzero_policy`
and the `gumbel_muzero()` preset vs `mctx.gumbel_muzero_policy` (defaults of both). Runs alternate
(ours, mctx, ours, ...) so machine load hits both alike; compile time (first call) is reported apart.
Throughput is simulations per second summed over the batch: B * num_simulations / seconds per search.
Further sections (e.g. an LM on countdown) register in SECTIONS.
"""
from __future__ import annotations

import statistics
import time

import jax
from absl import app, flags

from rlm_jax.search import mcts as search
from rlm_jax.search.toy_env import ToyEnv

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 64, "problems searched together")
flags.DEFINE_integer("branching", 8, "child slots K per node")
flags.DEFINE_list("simulations", ["64", "256"], "simulation counts")
flags.DEFINE_integer("repeats", 5, "timed runs per contestant (after the compile run)")
flags.DEFINE_list("policies", ["muzero", "gumbel"], "toy section: muzero and/or gumbel")
flags.DEFINE_list("sections", ["toy"], "sections to run")


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


SECTIONS = {"toy": toy_section}


def main(argv):
    del argv
    for name in FLAGS.sections:
        SECTIONS[name]()


if __name__ == "__main__":
    app.run(main)
