"""A tiny random policy and value model for search tests (test_got.py, test_sr_mcts.py): random weights with
init_std 1.0, so sampled steps vary in content and length, some end with EOS and some run past L.

    policy, value = tiny_models()
    out = strategy(tiny_spec(temperature=1.0), tiny_inputs(policy, value, seed, batch), key, ...)
"""
from __future__ import annotations

import jax
import numpy as np

from rlm_jax import decoding
from rlm_jax.models import heads, transformer
from rlm_jax.models.config import ModelConfig
from rlm_jax.search import lm
from rlm_jax.search.base import LMSpec

PAD, STEP, EOS = 0, 1, 2
CFG = ModelConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32,
                  max_seq_len=64, init_std=1.0)
HEAD = heads.HeadConfig(kind="value", hidden=(8,))
D, L, P = 4, 5, 8  # step slots, tokens per step, prompt length


def tiny_models():
    """(policy params, value params: a value head on a copy of the policy's trunk)."""
    policy = jax.jit(transformer.init_params, static_argnums=0)(CFG, jax.random.key(1))
    return policy, heads.init_value_params(CFG, HEAD, jax.random.key(2), trunk=policy)


def tiny_spec(**kw) -> LMSpec:
    """The LMSpec over the tiny models: 2 proposal slots, D x L steps, re-prefill; kw overrides fields."""
    return LMSpec(**{**dict(policy=CFG, step_id=STEP, eos_id=EOS, pad_id=PAD, num_slots=2, step_len=L, max_depth=D,
                            value=CFG, head=HEAD, kv_cache=False), **kw})


def tiny_inputs(policy, value, seed: int, batch: int) -> dict:
    """`lm.search_inputs` for `batch` random prompts of 1..P-1 tokens drawn with `seed`."""
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(3, CFG.vocab_size, size=rng.integers(1, P))) for _ in range(batch)]
    t, m = decoding.pad_prompts(prompts, PAD, length=P)
    return lm.search_inputs(policy, value, t, m)


class WordTokenizer:
    """Decodes ids as space-separated numbers (what `evaluation.run_strategy` needs of a tokenizer)."""

    step_id, eos_id, pad_id, step_delimiter = STEP, EOS, PAD, "|"

    def decode(self, ids):
        return " ".join(map(str, ids))


def path_steps(steps, mask) -> list[tuple]:
    """One path's step slots [D, L] and mask -> its non-empty steps as tuples of token ids."""
    return [tuple(s[m].tolist()) for s, m in zip(np.asarray(steps), np.asarray(mask)) if m.any()]
