"""Diverse Beam Search proposals (x1's decoding) against a float64 re-implementation without a KV cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlm_jax import decoding
from rlm_jax.models import transformer
from rlm_jax.models.config import ModelConfig
from rlm_jax.search import operators as ops
from rlm_jax.search.base import LMSpec

CFG = ModelConfig(vocab_size=7, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=32,
                  init_std=0.4, max_seq_len=32)
STOP, NEW = 6, 5


@pytest.fixture(scope="module")
def params():
    return transformer.init_params(CFG, jax.random.key(21))


_forward = jax.jit(lambda params, tokens: transformer.forward(CFG, params, tokens)[0])  # a program per length


def _decode(params, tokens, **kw):
    """decoding.decode after a prefill of tokens [n, T], as one program."""
    def run(params, tokens):
        cache, logits = decoding.prefill(CFG, params, tokens, jnp.ones(tokens.shape, bool), NEW)
        return decoding.decode(CFG, params, cache, logits, jax.random.key(0), max_new_tokens=NEW, stop_tokens=(STOP,),
                               **kw).out
    return jax.device_get(jax.jit(run)(params, tokens))


def _reference(params, prompt, k, penalty):
    """Group j of k: at each position the argmax of log p (float64, a fresh forward of the whole sequence)
    minus penalty x (live groups < j that chose the token at this position); a group ends at STOP."""
    seqs, done = [[] for _ in range(k)], [False] * k
    for _ in range(NEW):
        counts = np.zeros(CFG.vocab_size)
        for j in range(k):
            if done[j]:
                continue
            logits = np.asarray(_forward(params, jnp.asarray([prompt + seqs[j]])), np.float64)[0, -1]
            lp = logits - np.logaddexp.reduce(logits)
            tok = int(np.argmax(lp - penalty * counts))
            counts[tok] += 1
            seqs[j].append(tok)
            done[j] = tok == STOP
    return [tuple(s) for s in seqs]


@pytest.mark.parametrize("k,penalty", [pytest.param(3, 1.0, marks=pytest.mark.slow), (4, 50.0)])
def test_diverse_decode_matches_a_cacheless_float64_reference(params, k, penalty):
    rng = np.random.default_rng(k)
    prompts = [list(rng.integers(0, STOP, size=4)) for _ in range(3)]
    tokens = jnp.asarray(np.repeat(prompts, k, axis=0))
    out = _decode(params, tokens, diverse=k, diversity_penalty=penalty)
    got = [tuple(int(t) for t in row[:n]) for row, n in zip(out.tokens, out.lengths)]
    for i, prompt in enumerate(prompts):
        assert got[i * k:(i + 1) * k] == _reference(params, prompt, k, penalty)
    # the penalty does what it is for: slot 0 is greedy; a penalty above any log-prob gap makes the groups'
    # first tokens all differ
    greedy = _decode(params, tokens[::k])
    np.testing.assert_array_equal(out.tokens[::k], greedy.tokens)
    if penalty >= 50:
        assert all(len({g[0] for g in got[i * k:(i + 1) * k]}) == k for i in range(3))


def test_diverse_decode_refuses_split_groups(params):
    tokens = jnp.asarray([[1, 2, 3]] * 5)
    cache, logits = decoding.prefill(CFG, params, tokens, jnp.ones(tokens.shape, bool), NEW)
    with pytest.raises(ValueError, match="whole groups of 2"):
        decoding.decode(CFG, params, cache, logits, jax.random.key(0), max_new_tokens=NEW, diverse=2)


def test_diverse_proposals_are_deterministic_and_counted(params):
    """operators.generate_steps with proposals="diverse": the same K steps whatever the key, every token counted."""
    spec = LMSpec(policy=CFG, step_id=5, eos_id=STOP, pad_id=0, num_slots=3, step_len=NEW, max_depth=2,
                  proposals="diverse")
    ctx = jnp.asarray([[1, 2, 3, 4], [4, 3, 2, 1]])
    a, b = (ops.generate_steps(spec, params, ctx, jnp.ones(ctx.shape, bool), jax.random.key(s), 3) for s in (1, 2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert int(a.length.sum()) > 0 and bool(jnp.all(a.length <= NEW))
    with pytest.raises(ValueError, match="proposals must be one of"):
        LMSpec(policy=CFG, step_id=5, eos_id=STOP, pad_id=0, proposals="beam")
