"""Benchmark of the search core: rlm_jax.search.mcts vs mctx on the same toy environment.

    python experiments/bench_search.py [--batch 64] [--branching 8] [--simulations 64,256] [--repeats 5]

Section "toy": our `mcts` (muzero preset) and `mctx.muzero_policy` with identical settings on the
deterministic random tree env (rlm_jax.search.toy_env), so both build the same trees. Runs alternate
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


def _mctx_policy(env, num_simulations):
    import mctx  # test dependency, only needed for the comparison

    def recurrent_fn(params, key, action, state):
        nxt, reward, discount, logits, value, _ = env.step(state, action)
        return mctx.RecurrentFnOutput(reward=reward, discount=discount, prior_logits=logits, value=value), nxt

    @jax.jit
    def run(key, root):
        root = mctx.RootFnOutput(prior_logits=root.prior_logits, value=root.value, embedding=root.embedding)
        return mctx.muzero_policy(None, key, root, recurrent_fn, num_simulations)
    return run


def toy_section():
    batch, k = FLAGS.batch, FLAGS.branching
    env = ToyEnv(num_actions=k)
    root, key = env.root(batch), jax.random.PRNGKey(0)
    print(f"\n## toy env: B={batch}, K={k}, muzero settings (PUCT, Dirichlet root noise), "
          f"{jax.devices()[0].platform}")
    print("| sims | ours sims/s | mctx sims/s | ratio | ours ms | mctx ms | ours compile s | mctx compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for sims in map(int, FLAGS.simulations):
        config = search.muzero()
        contestants = {
            "ours": jax.jit(lambda key, root: search.mcts(None, key, root, env, sims, config).root_visits),
            "mctx": (lambda f: jax.jit(lambda key, root: f(key, root).search_tree.children_visits[:, 0]))(
                _mctx_policy(env, sims)),
        }
        compile_s, run_s = _contest(contestants, (key, root), FLAGS.repeats)
        rate = {name: batch * sims / s for name, s in run_s.items()}
        print(f"| {sims} | {rate['ours']:,.0f} | {rate['mctx']:,.0f} | {rate['ours'] / rate['mctx']:.2f}x | "
              f"{run_s['ours'] * 1e3:.1f} | {run_s['mctx'] * 1e3:.1f} | "
              f"{compile_s['ours']:.1f} | {compile_s['mctx']:.1f} |", flush=True)


SECTIONS = {"toy": toy_section}


def main(argv):
    del argv
    for name in FLAGS.sections:
        SECTIONS[name]()


if __name__ == "__main__":
    app.run(main)
