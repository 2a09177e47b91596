"""Model configuration: one frozen dataclass for the Llama / Qwen2 family."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer hyper-parameters.

    Covers Llama (no qkv bias, untied or tied embeddings) and Qwen2 (qkv bias). `head_dim` defaults to
    `d_model // num_heads`. `param_dtype` is the storage dtype, `dtype` the compute dtype (matmuls);
    norms, softmax and the final logits are computed in float32.
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
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} unknown; use one of {sorted(_DTYPES)}")

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
        block = attn + 3 * e * m + 2 * e
        head = 0 if self.tie_embeddings else e * self.vocab_size
        return self.vocab_size * e + self.num_layers * block + e + head
