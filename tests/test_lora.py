"""LoRA adapters (`models/lora.py`): the adapted model against PEFT's LoRA on transformers' model, folding the
adapters into the weights, and training that moves only the adapters."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlm_jax.models import hf, lora, transformer
from rlm_jax.models.config import LORA_TARGETS
from rlm_jax.training import steps

from helpers_hf import load_torch_model, make_tiny_hf_checkpoint, torch_logits


def _random_adapters(cfg, params, seed):
    """Every adapter weight drawn at random (a fresh B is zero, which would hide a wrong B or scale)."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        return jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype) if "_lora_" in name else x

    return jax.tree_util.tree_map_with_path(draw, params)


def _peft_model(folder, cfg, params):
    """transformers' model under PEFT's LoRA (same rank, alpha and targets) carrying our adapter weights."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_torch_model(folder), LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=list(cfg.lora_target_names)))
    blocks = params["blocks"]
    with torch.no_grad():
        for name, module in model.named_modules():
            proj = name.rsplit(".", 1)[-1]
            if proj not in cfg.lora_target_names or not hasattr(module, "lora_A"):
                continue
            layer = int(name.split("layers.")[1].split(".")[0])
            part = blocks["attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"]
            a = np.asarray(part[f"{proj}_lora_a"][layer], np.float32)  # [*in, r]
            b = np.asarray(part[f"{proj}_lora_b"][layer], np.float32)  # [r, *out]
            module.lora_A["default"].weight.copy_(torch.from_numpy(a.reshape(-1, cfg.lora_rank).T.copy()))
            module.lora_B["default"].weight.copy_(torch.from_numpy(b.reshape(cfg.lora_rank, -1).T.copy()))
    return model.eval()


@pytest.mark.parametrize("arch, targets", [("qwen2", ",".join(LORA_TARGETS)), ("llama", "q_proj,v_proj,down_proj")])
def test_adapted_logits_match_peft_and_fold_into_the_weights(tmp_path, arch, targets):
    folder = make_tiny_hf_checkpoint(tmp_path / arch, arch, num_kv_heads=2, seed=11, init_std=0.05)
    base_cfg, base = hf.load_hf(folder)
    cfg = base_cfg.replace(lora_rank=4, lora_alpha=8.0, lora_targets=targets)
    fresh = lora.add_adapters(cfg, base, jax.random.key(0))
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, cfg.vocab_size, size=(3, 17)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    mask[0, :6] = False  # left padding

    # fresh adapters change nothing (B = 0)
    start, _, _ = transformer.forward(cfg, fresh, tokens, mask=mask)
    np.testing.assert_allclose(np.asarray(start), torch_logits(folder, tokens, mask), atol=1e-4, rtol=1e-4)

    params = _random_adapters(cfg, fresh, seed=1)
    ours, _, _ = transformer.forward(cfg, params, tokens, mask=mask)
    theirs = torch_logits(_peft_model(folder, cfg, params), tokens, mask)
    assert np.abs(theirs - torch_logits(folder, tokens, mask)).max() > 0.1  # the adapters matter
    real = mask
    np.testing.assert_allclose(np.asarray(ours)[real], theirs[real], atol=1e-4, rtol=1e-4)

    merged_cfg, merged = lora.merged(cfg, params)
    assert merged_cfg.lora_rank == 0 and jax.tree.structure(merged) == jax.tree.structure(base)
    folded, _, _ = transformer.forward(merged_cfg, merged, tokens, mask=mask)
    np.testing.assert_allclose(np.asarray(folded)[real], np.asarray(ours)[real], atol=1e-5, rtol=1e-5)
    hf.export_hf(merged_cfg, merged, tmp_path / "exported")
    np.testing.assert_allclose(torch_logits(tmp_path / "exported", tokens, mask)[real], theirs[real],
                               atol=1e-4, rtol=1e-4)


def test_training_moves_only_the_adapters_and_keeps_no_base_optimizer_state():
    from rlm_jax.models.config import ModelConfig

    cfg = ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                      qkv_bias=True, lora_rank=2)
    params = transformer.init_params(cfg, jax.random.key(3))
    base_before = jax.tree.map(np.asarray, lora.base_params(params))
    optimizer = lora.freeze_base(optax.adam(1e-2))
    opt_state = optimizer.init(params)
    adapter_size = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if lora.is_trainable(p))
    state_size = sum(x.size for x in jax.tree.leaves(opt_state))
    assert state_size <= 2 * adapter_size + 8  # adam's two moments of the adapters (and step counts), no base copy

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=(8, 12)).astype(np.int32)
    batch = {"tokens": tokens, "mask": np.ones_like(tokens, bool), "loss_mask": np.ones_like(tokens, bool)}
    step = steps.make_train_step(cfg, optimizer)
    losses = []
    for _ in range(30):
        params, opt_state, metrics = step(params, opt_state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1  # the adapters alone fit the batch
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, lora.base_params(params)), base_before)
    b = params["blocks"]["attn"]["q_proj_lora_b"]
    assert float(jnp.abs(b).max()) > 0  # B left zero would mean the adapters never trained


def test_lora_needs_a_pretrained_folder_and_valid_targets():
    from rlm_jax import config
    from rlm_jax.config_utils import load_config
    from rlm_jax.models.config import ModelConfig

    cd = load_config("configs/tiny.py")
    cd.model.lora_rank = 4
    with pytest.raises(ValueError, match="model.lora_rank=4.*model.init=hf:"):
        config.from_configdict(cd)
    with pytest.raises(ValueError, match="lora_targets='q_proj,w_in'.*unknown: \\['w_in'\\]"):
        ModelConfig(vocab_size=8, d_model=8, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=8, lora_rank=2,
                    lora_targets="q_proj,w_in")


def test_policy_and_value_share_one_frozen_base():
    """x1's design: one base under the policy's adapters and the value model's. After share_base the value
    trunk's base leaves are the policy's own arrays (one copy in memory), its adapters and head its own, and
    its outputs are unchanged."""
    from rlm_jax.models import heads
    from rlm_jax.models.config import ModelConfig

    cfg = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, lora_rank=2)
    head = heads.HeadConfig(kind="value", hidden=(8,))
    policy = _random_adapters(cfg, transformer.init_params(cfg, jax.random.key(0)), seed=2)
    trunk = jax.tree.map(jnp.copy, _random_adapters(cfg, policy, seed=3))  # a copy: its own buffers, other adapters
    value = heads.init_value_params(cfg, head, jax.random.key(1), trunk=trunk)
    shared = lora.share_base(value, policy)
    for a, b in zip(jax.tree.leaves(lora.base_params(shared["trunk"])), jax.tree.leaves(lora.base_params(policy))):
        assert a is b
    unique = lambda *trees: len({id(x) for t in trees for x in jax.tree.leaves(t)})  # noqa: E731
    assert unique(policy, shared) == unique(policy, value) - len(jax.tree.leaves(lora.base_params(policy)))
    assert shared["head"] is value["head"]
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 9)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    np.testing.assert_array_equal(np.asarray(heads.head_logits(cfg, head, shared, tokens, mask)),
                                  np.asarray(heads.head_logits(cfg, head, value, tokens, mask)))
    # a value model over another base keeps its own
    other = dict(value, trunk=jax.tree.map(lambda x: x + 1.0, value["trunk"]))
    assert lora.share_base(other, policy) is other
