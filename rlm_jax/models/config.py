"""Model configuration: one frozen dataclass for the Llama / Qwen2 / Qwen3 family."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ROPE_TYPES = ("default", "llama3")
# The projections LoRA can adapt ("all-linear" in PEFT's terms): attention's q, k, v, o and the SwiGLU MLP's three.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer hyper-parameters.

    Covers Llama (no qkv bias, untied or tied embeddings), Qwen2 (qkv bias) and Qwen3 (`qk_norm`: an
    RMSNorm over head_dim on every q and k head, before RoPE). `head_dim` defaults to
    `d_model // num_heads` (Qwen3 often sets it apart). `param_dtype` is the storage dtype, `dtype` the
    compute dtype (matmuls); norms, softmax and the final logits are computed in float32.

    RoPE: `rope_type="default"` is plain RoPE with base `rope_theta`. `rope_type="llama3"` (Llama 3.1+)
    rescales the inverse frequencies as transformers' `_compute_llama3_parameters` does: wavelengths
    above `rope_original_max_len / rope_low_freq_factor` are divided by `rope_factor`, those below
    `rope_original_max_len / rope_high_freq_factor` are kept, and those between are interpolated. The
    `rope_factor` / `*_freq_factor` / `rope_original_max_len` fields are read only for "llama3".

    LoRA (`lora_rank` > 0): every projection named in `lora_targets` (comma-separated, from LORA_TARGETS)
    gets two adapter weights beside it, `<name>_lora_a [*in, rank]` and `<name>_lora_b [rank, *out]` (B starts
    at zero, so an adapted model starts as its base), and computes `x W + (lora_alpha / rank) (x A) B`.
    Training then updates only the adapters (and a value model's head): the base is frozen
    (`rlm_jax.models.lora`).
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    mlp_dim: int
    head_dim: int | None = None
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    tie_embeddings: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"
    init_std: float = 0.02
    qk_norm: bool = False
    rope_type: str = "default"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = ",".join(LORA_TARGETS)

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
                     "max_seq_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(
                    f"ModelConfig: num_heads={self.num_heads} does not divide d_model={self.d_model}; "
                    "choose num_heads dividing d_model or set head_dim explicitly")
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig: num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads} "
                "(grouped-query attention shares each kv head among num_heads/num_kv_heads query heads)")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"ModelConfig.rope_type={self.rope_type!r} unknown; use one of {list(ROPE_TYPES)}")
        if self.rope_type == "llama3":
            if not (self.rope_factor > 0 and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor
                    and self.rope_original_max_len >= 1):
                raise ValueError(
                    "ModelConfig: llama3 RoPE needs rope_factor > 0, 0 < rope_low_freq_factor < "
                    f"rope_high_freq_factor and rope_original_max_len >= 1; got rope_factor={self.rope_factor}, "
                    f"rope_low_freq_factor={self.rope_low_freq_factor}, rope_high_freq_factor="
                    f"{self.rope_high_freq_factor}, rope_original_max_len={self.rope_original_max_len}")
        if self.lora_rank < 0:
            raise ValueError(f"ModelConfig.lora_rank must be >= 0 (0: no adapters), got {self.lora_rank}")
        if self.lora_rank:
            unknown = sorted(set(self.lora_target_names) - set(LORA_TARGETS))
            if unknown or not self.lora_target_names:
                raise ValueError(f"ModelConfig.lora_targets={self.lora_targets!r}: name projections among "
                                 f"{','.join(LORA_TARGETS)} (comma-separated); unknown: {unknown}")
            if not self.lora_alpha > 0:
                raise ValueError(f"ModelConfig.lora_alpha must be > 0, got {self.lora_alpha}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} unknown; use one of {sorted(_DTYPES)}")

    @property
    def lora_target_names(self) -> tuple[str, ...]:
        """The adapted projections (empty without LoRA)."""
        if not self.lora_rank:
            return ()
        return tuple(n.strip() for n in self.lora_targets.split(",") if n.strip())

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self):
        return _DTYPES[self.param_dtype]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Builds a config from a mapping; unknown keys are an error (typos must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> "ModelConfig":
        return self.from_dict({**self.to_dict(), **kw})

    def num_params(self) -> int:
        e, h, k, d, m = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim
        attn = e * h * d * 2 + e * k * d * 2 + (h * d + 2 * k * d if self.qkv_bias else 0)
        attn += 2 * d if self.qk_norm else 0
        block = attn + 3 * e * m + 2 * e
        head = 0 if self.tie_embeddings else e * self.vocab_size
        return self.vocab_size * e + self.num_layers * block + e + head
