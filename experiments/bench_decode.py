"""Benchmark: our jitted decode vs transformers' `generate` (PyTorch CPU) on the same weights.

    python experiments/bench_decode.py [--batch_sizes=1,8,32] [--prompt_len=64] [--new_tokens=128] \
        [--torch_threads=1,2]

A ~10M-parameter Llama-style model with random weights is exported to an HF folder; transformers
loads that folder, so both sides run identical weights. Both decode greedily for exactly
`new_tokens` tokens (no stop token). Our program is compiled ahead of time
(`generate_jit.lower(...).compile()`, timed on its own, no decoding in it); transformers runs eager
PyTorch, whose first call (lazy initialisation, the nearest thing it has to compilation) is an untimed
warm-up, as ours is. torch gets its best setting for a model this small: one intra-op thread by
default (`torch.set_num_threads(1)`; on a small shared machine more threads are slower, by 6-17x
measured on 2 cores); `--torch_threads=1,2` times each thread count and prints a row for each. Then
`repeats` timed runs alternating (ours, theirs at each thread count, ours, ...) so machine noise hits
every side. Prints median tokens/s per side, the ratio, the compile seconds and the greedy token
agreement per batch size and torch thread count.
"""
from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags

flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "Batch sizes to time.")
flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per sequence.")
flags.DEFINE_integer("new_tokens", 128, "Generated tokens per sequence.")
flags.DEFINE_integer("repeats", 5, "Timed runs per side and batch size (alternating; the median is reported).")
flags.DEFINE_list("torch_threads", ["1"], "torch intra-op thread counts to time, one row each (0: every core this "
                  "process may use, as XLA does).")
FLAGS = flags.FLAGS


def bench_config():
    from rlm_jax.models.config import ModelConfig
    return ModelConfig(vocab_size=8192, d_model=256, num_layers=6, num_heads=8, num_kv_heads=4,
                       mlp_dim=768, max_seq_len=512, tie_embeddings=False, init_std=0.05)


def main(_):
    import jax
    import numpy as np
    import torch
    import transformers

    from rlm_jax import decoding
    from rlm_jax.models import hf, transformer

    if FLAGS.repeats < 1:
        raise app.UsageError(f"--repeats must be >= 1 (5 or more for a stable median), got {FLAGS.repeats}")
    cores = len(os.sched_getaffinity(0))
    threads = [int(x) or cores for x in FLAGS.torch_threads]
    if not threads or min(threads) < 1:
        raise app.UsageError(f"--torch_threads must list thread counts >= 0, got {FLAGS.torch_threads}")
    cfg = bench_config()
    params = transformer.init_params(cfg, jax.random.key(0))
    folder = tempfile.mkdtemp(prefix="bench_decode_")
    hf.export_hf(cfg, params, folder)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    new = FLAGS.new_tokens
    print(f"model: {transformer.count_params(params) / 1e6:.1f}M params, jax {jax.__version__} on "
          f"{jax.devices()[0].platform} ({cores} cores usable, XLA uses all), torch {torch.__version__} "
          f"(threads {', '.join(map(str, threads))}), prompt {FLAGS.prompt_len}, new tokens {new}, "
          f"median of {FLAGS.repeats} alternating runs", flush=True)

    rows = []
    for b in [int(x) for x in FLAGS.batch_sizes]:
        rng = np.random.default_rng(b)
        tokens = rng.integers(1, cfg.vocab_size, size=(b, FLAGS.prompt_len)).astype(np.int32)
        mask = np.ones_like(tokens, bool)
        key = jax.random.key(0)

        t0 = time.perf_counter()
        compiled = decoding.generate_jit.lower(cfg, params, tokens, mask, key, max_new_tokens=new).compile()
        compile_s = time.perf_counter() - t0

        def ours():
            return np.asarray(jax.block_until_ready(compiled(params, tokens, mask, key).tokens))

        def theirs(n_threads):
            torch.set_num_threads(n_threads)
            with torch.inference_mode():
                out = torch_model.generate(
                    torch.as_tensor(tokens, dtype=torch.long), attention_mask=torch.as_tensor(mask, dtype=torch.long),
                    do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0)
            return out[:, FLAGS.prompt_len:].numpy()

        sides = [("ours", ours)] + [(n, lambda n=n: theirs(n)) for n in threads]
        warm = {name: side() for name, side in sides}  # warm-up runs, untimed (also the token agreement)
        times = {name: [] for name, _ in sides}
        for _ in range(FLAGS.repeats):
            for name, side in sides:
                t0 = time.perf_counter()
                side()
                times[name].append(time.perf_counter() - t0)
        o = b * new / float(np.median(times["ours"]))
        for n in threads:
            t = b * new / float(np.median(times[n]))
            agree = float((warm["ours"] == warm[n]).mean())
            rows.append((b, n, o, t, o / t, compile_s, agree))
            print(f"batch {b}, torch threads {n}: ours {o:,.0f} tok/s, transformers {t:,.0f} tok/s, ratio "
                  f"{o / t:.2f}x, compile {compile_s:.1f} s, agreement {agree:.3f}", flush=True)

    print("\n| batch | torch threads | rlm_jax tok/s | transformers tok/s | ratio | our compile s (excluded) "
          "| greedy token agreement |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for b, n, o, t, r, c, a in rows:
        print(f"| {b} | {n} | {o:,.0f} | {t:,.0f} | {r:.2f}x | {c:.1f} | {a:.3f} |")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    app.run(main)
