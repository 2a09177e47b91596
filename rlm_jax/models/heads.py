"""Value models: a scalar head on the transformer trunk.

Four kinds, one architecture (trunk hidden state -> MLP -> one logit per position); they differ in
the output range and in where the sequence is read:

| kind    | meaning                                 | output            | read at                          |
|---------|-----------------------------------------|-------------------|----------------------------------|
| `value` | V(s): expected outcome from state s     | 2*sigmoid-1 [-1,1]| last real token of the state     |
| `q`     | Q(s, a): value of taking step a from s   | 2*sigmoid-1 [-1,1]| last token of the step a         |
| `prm`   | process reward: P(step is correct)       | sigmoid [0, 1]    | every step-delimiter token       |
| `orm`   | outcome reward: P(solution is correct)   | sigmoid [0, 1]    | last real token (EOS) of the end |

The blueprint's (and x1's) value/Q head is the shifted, rescaled sigmoid 2*sigmoid(x)-1: tanh and
clipped-linear heads were reported unstable. x1 reads three tokens before the end of the step; we read
the last token, which sees the whole step (a config knob would be `read_offset`).

Params: `{"trunk": <transformer params>, "head": <MLP params>}`, a plain nested dict.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from rlm_jax.models import transformer
from rlm_jax.models.config import ModelConfig

KINDS = ("value", "q", "prm", "orm")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    kind: str = "value"
    hidden: tuple[int, ...] = (256,)  # MLP widths between the trunk and the scalar (x1: 1024, 256)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"HeadConfig.kind={self.kind!r} unknown; use one of {KINDS}")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))

    @property
    def signed(self) -> bool:
        """value and q live in [-1, 1]; prm and orm are probabilities in [0, 1]."""
        return self.kind in ("value", "q")


class ScalarHead(nnx.Module):
    """MLP embed -> hidden... -> 1, ReLU between layers."""

    def __init__(self, d_model: int, hidden: tuple[int, ...], rngs: nnx.Rngs):
        widths = (d_model,) + hidden + (1,)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])

    def __call__(self, h):
        """h: [..., embed] -> [...] float32 logits."""
        h = h.astype(jnp.float32)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = jax.nn.relu(h)
        return h[..., 0]


def _head_graph(cfg: ModelConfig, head_cfg: HeadConfig):
    model = nnx.eval_shape(lambda: ScalarHead(cfg.d_model, head_cfg.hidden, nnx.Rngs(0)))
    return nnx.split(model, nnx.Param)


def init_value_params(cfg: ModelConfig, head_cfg: HeadConfig, key, trunk=None) -> dict:
    """{"trunk", "head"}; `trunk` reuses given transformer params (e.g. the SFT policy's)."""
    k_trunk, k_head = jax.random.split(key)
    if trunk is None:
        trunk = transformer.init_params(cfg, k_trunk)
    head = ScalarHead(cfg.d_model, head_cfg.hidden, nnx.Rngs(params=k_head))
    return {"trunk": trunk, "head": nnx.state(head, nnx.Param).to_pure_dict()}


def head_logits(cfg: ModelConfig, head_cfg: HeadConfig, params: dict, tokens, mask):
    """Raw logits at every position. tokens, mask: [B, T] (left-padded) -> [B, T] float32."""
    _, hidden, _ = transformer.forward(cfg, params["trunk"], tokens, mask=mask, compute_logits=False)
    return apply_head(cfg, head_cfg, params["head"], hidden)


def apply_head(cfg: ModelConfig, head_cfg: HeadConfig, head_params: dict, hidden):
    """The head's raw logits of trunk hidden states (after the final norm): [..., embed] -> [...]."""
    graphdef, abstract = _head_graph(cfg, head_cfg)
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, head_params)
    return nnx.merge(graphdef, state)(hidden)


def squash(head_cfg: HeadConfig, logits):
    """Logits -> the kind's range: 2*sigmoid-1 for value/q, sigmoid for prm/orm."""
    p = jax.nn.sigmoid(logits)
    return 2.0 * p - 1.0 if head_cfg.signed else p


def read_last(values, mask):
    """values [B, T] -> [B]: at the last real token (prompts are left-padded, so index T-1
    unless trailing positions are masked)."""
    t = values.shape[1]
    last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    return jnp.take_along_axis(values, last[:, None], axis=1)[:, 0]


def sequence_score(cfg: ModelConfig, head_cfg: HeadConfig, params: dict, tokens, mask):
    """The kind's score of each whole sequence (value, q, orm): [B] in the kind's range."""
    return squash(head_cfg, read_last(head_logits(cfg, head_cfg, params, tokens, mask), mask))


def step_scores(cfg: ModelConfig, head_cfg: HeadConfig, params: dict, tokens, mask, step_id: int):
    """PRM-style scores at every step-delimiter token: ([B, T] scores, [B, T] bool where read)."""
    at = mask & (tokens == step_id)
    return squash(head_cfg, head_logits(cfg, head_cfg, params, tokens, mask)), at
