"""Search-free GRPO data (training/group_samples.py): G completions per prompt, verifier rewards, groups.

References: the sampler's rows against decoding.generate on the prompts repeated G times (the same key draws
the same noise, so row b*G + j must be sample j of problem b); the rewards against the task's verdict on the
decoded text; the advantages against a float64 group normalisation.
"""
import jax
import numpy as np

from rlm_jax import decoding
from rlm_jax.models import transformer
from rlm_jax.models.config import ModelConfig
from rlm_jax.search import lm
from rlm_jax.search.base import LMSpec
from rlm_jax.tasks.base import Score
from rlm_jax.training import group_samples, search_rl

PAD, STEP, EOS = 0, 1, 2
CFG = ModelConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32,
                  max_seq_len=64, init_std=1.0)
L, D, G = 4, 3, 5


class DigitTokenizer:
    """Ids 3..15 are the letters a..m; STEP ends a step, EOS the solution."""
    step_id, eos_id, pad_id, bos_id, step_delimiter = STEP, EOS, PAD, None, "\n"

    def decode(self, ids):
        return "".join(chr(ord("a") + i - 3) for i in ids if i >= 3)


class FirstLetterTask:
    """Solved when the solution's first step starts with the problem's letter (a rule the test recomputes)."""

    def verify(self, problem, text):
        return Score.SOLVED if text and text[0] == problem["letter"] else Score.INCORRECT


def first_step_letter(tok, action):
    """The reference: the first letter of the first step (up to its STEP or EOS), or None."""
    for t in action:
        if t in (STEP, EOS):
            return None
        if t >= 3:
            return tok.decode([t])
    return None


def _spec(kv_cache):
    return LMSpec(policy=CFG, num_slots=2, step_len=L, max_depth=D, step_id=STEP, eos_id=EOS, pad_id=PAD, temperature=1.0, kv_cache=kv_cache)


def test_rows_are_g_samples_of_each_prompt_and_rewards_are_the_verdicts():
    params = transformer.init_params(CFG, jax.random.key(0))
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, 16, size=n).tolist() for n in (3, 6, 5)]
    tokens, mask = decoding.pad_prompts(prompts, PAD, length=8)
    key = jax.random.key(9)
    for kv_cache in (True, False):
        out = group_samples.sample_groups_jit(_spec(kv_cache), lm.search_inputs(params, params, tokens, mask), key,
                                              group_size=G)
        ref = decoding.generate(CFG, params, np.repeat(tokens, G, 0), np.repeat(mask, G, 0), key,
                                max_new_tokens=L * D, temperature=1.0, stop_tokens=(EOS,), pad_id=PAD)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
        np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(ref.lengths))
    tok = DigitTokenizer()
    toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
    # Two problems one of their samples solves, one no sample can ("z" is not a token).
    problems = [{"letter": first_step_letter(tok, toks[b * G, :lens[b * G]].tolist()) or "a"} for b in range(2)]
    problems.append({"letter": "z"})
    samples, solutions, ntok = group_samples.extract_samples(out, G, prompts, problems, FirstLetterTask(), tok,
                                                             first_row=10)
    assert ntok == lens.sum() and len(samples) == 3 * G
    for row, s in enumerate(samples):
        b = row // G
        action = toks[row, :lens[row]].tolist()
        want = first_step_letter(tok, action) == problems[b]["letter"]
        assert s["state"] == prompts[b] and s["action"] == action and s["group"] == 10 + b
        assert s["q"] == (1.0 if want else -1.0), (row, action, problems[b])
        assert ((prompts[b], action) in solutions) == want
    assert solutions and all(s["q"] == -1.0 for s in samples[2 * G:])  # solved samples exist; "z" solves none

    arr = search_rl.policy_arrays(CFG, "grpo_sampled", samples, solutions, params, params, PAD, 32)
    for g in set(arr["group"].tolist()):
        q = arr["q"][arr["group"] == g].astype(np.float64)
        want = (q - q.mean()) / (q.std(ddof=1) + 1e-6) if len(set(q)) > 1 else np.zeros_like(q)
        np.testing.assert_allclose(arr["advantage"][arr["group"] == g], want, rtol=1e-4, atol=1e-5)
