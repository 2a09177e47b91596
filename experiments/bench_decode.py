"""Benchmark: our jitted decode vs transformers' `generate` (PyTorch CPU) on the same weights.

    python experiments/bench_decode.py [--batch_sizes=1,8,32] [--prompt_len=64] [--new_tokens=128]

A ~10M-parameter Llama-style model with random weights is exported to an HF folder; transformers
loads that folder, so both sides run identical weights. Both decode greedily for exactly
`new_tokens` tokens (no stop token). Runs alternate (ours, theirs, ours, ...) so machine noise hits
both; compilation is timed separately and excluded. Prints tokens/s and the ratio per batch size.
"""
from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags

flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "Batch sizes to time.")
flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per sequence.")
flags.DEFINE_integer("new_tokens", 128, "Generated tokens per sequence.")
flags.DEFINE_integer("repeats", 3, "Timed runs per side and batch size (alternating).")
flags.DEFINE_integer("threads", 0, "torch intra-op threads (0: torch's default).")
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

    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    cfg = bench_config()
    params = transformer.init_params(cfg, jax.random.key(0))
    folder = tempfile.mkdtemp(prefix="bench_decode_")
    hf.export_hf(cfg, params, folder)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    print(f"model: {transformer.count_params(params) / 1e6:.1f}M params, jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"prompt {FLAGS.prompt_len}, new tokens {FLAGS.new_tokens}")

    rows = []
    for b in [int(x) for x in FLAGS.batch_sizes]:
        rng = np.random.default_rng(b)
        tokens = rng.integers(1, cfg.vocab_size, size=(b, FLAGS.prompt_len)).astype(np.int32)
        mask = np.ones_like(tokens, bool)

        def ours():
            out = decoding.generate_jit(cfg, params, tokens, mask, jax.random.key(0),
                                        max_new_tokens=FLAGS.new_tokens)
            return jax.block_until_ready(out.tokens)

        def theirs():
            with torch.inference_mode():
                return torch_model.generate(
                    torch.as_tensor(tokens, dtype=torch.long), attention_mask=torch.ones(tokens.shape, dtype=torch.long),
                    do_sample=False, max_new_tokens=FLAGS.new_tokens, min_new_tokens=FLAGS.new_tokens,
                    eos_token_id=None, pad_token_id=0)

        t0 = time.perf_counter()
        first = ours()
        compile_s = time.perf_counter() - t0
        ref = theirs()[:, FLAGS.prompt_len:].numpy()
        agree = float((np.asarray(first) == ref).mean())
        ours_t, theirs_t = [], []
        for _ in range(FLAGS.repeats):
            t0 = time.perf_counter(); ours(); ours_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); theirs(); theirs_t.append(time.perf_counter() - t0)
        n = b * FLAGS.new_tokens
        o, t = n / min(ours_t), n / min(theirs_t)
        rows.append((b, o, t, o / t, compile_s, agree))
        print(f"batch {b}: ours {o:.0f} tok/s, transformers {t:.0f} tok/s", flush=True)

    print("\n| batch | rlm_jax tok/s | transformers tok/s | ratio | our compile s | greedy token agreement |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b, o, t, r, c, a in rows:
        print(f"| {b} | {o:,.0f} | {t:,.0f} | {r:.2f}x | {c:.1f} | {a:.3f} |")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    app.run(main)
