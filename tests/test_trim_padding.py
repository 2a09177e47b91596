"""Training batches lose their unused left padding (`trainer.trim_padding`): the losses are the same."""
import jax
import numpy as np
import pytest

from rlm_jax.models import heads, transformer
from rlm_jax.models.config import ModelConfig
from rlm_jax.training import rl, steps, trainer, value

CFG = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=32, max_seq_len=64)
HEAD = heads.HeadConfig(kind="value", hidden=(8,))
B, T = 6, 48


def _batch(rng, longest):
    """Left-padded rows of random lengths up to `longest`, with per-token and per-sample fields."""
    lengths = rng.integers(3, longest + 1, size=B)
    lengths[0] = longest
    mask = np.arange(T)[None, :] >= T - lengths[:, None]
    tokens = np.where(mask, rng.integers(1, CFG.vocab_size, size=(B, T)), 0).astype(np.int32)
    loss_mask = mask & (np.arange(T)[None, :] >= T - lengths[:, None] // 2)
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask,
            "old_logprobs": rng.normal(-2.0, 0.3, size=(B, T - 1)).astype(np.float32),
            "ref_logprobs": rng.normal(-2.0, 0.3, size=(B, T - 1)).astype(np.float32),
            "advantage": rng.normal(size=B).astype(np.float32), "q": rng.uniform(-1, 1, size=B).astype(np.float32)}


@pytest.mark.parametrize("longest,width", [(13, 16), (16, 16), (29, 32), (48, 48)])
def test_trimmed_batches_give_the_same_losses(longest, width):
    rng = np.random.default_rng(longest)
    batch = _batch(rng, longest)
    narrow = trainer.trim_padding(batch)
    assert narrow["tokens"].shape == (B, width) and narrow["old_logprobs"].shape == (B, width - 1)
    assert narrow["q"].shape == (B,) and narrow["mask"].sum() == batch["mask"].sum()
    policy = transformer.init_params(CFG, jax.random.key(longest))
    vparams = heads.init_value_params(CFG, HEAD, jax.random.key(1), trunk=policy)
    losses = [
        lambda b: steps.next_token_loss(CFG, policy, b),
        lambda b: rl.ppo_loss(CFG, policy, b),
        lambda b: value.value_regression_loss(CFG, HEAD, vparams, b),
    ]
    for loss in losses:
        (full, m_full), (cut, m_cut) = loss(batch), loss(narrow)
        np.testing.assert_allclose(float(cut), float(full), rtol=1e-5, atol=1e-6)
        for name in m_full:
            np.testing.assert_allclose(np.asarray(m_cut[name]), np.asarray(m_full[name]), rtol=1e-4, atol=1e-5)
    # rehearsal batches: each part is trimmed on its own
    both = trainer.trim_padding({"rl": batch, "sft": _batch(rng, 7)})
    assert both["rl"]["tokens"].shape[1] == width and both["sft"]["tokens"].shape[1] == 8
