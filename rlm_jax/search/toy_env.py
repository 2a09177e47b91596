"""A deterministic random tree environment for testing and benchmarking the search without a model.

A state is a uint32 id; everything about it (the K prior logits, its value, the reward into it, whether
it is terminal) is a fixed hash of the id, and a child's id is a hash of (parent id, slot). So the same
(state, action) always gives the same outcome, whichever search asks: our `mcts` (through
`expand_fn`) and mctx (through `recurrent_fn`) see the same environment.
Terminal states follow mctx's convention: the outcome is the edge reward (in [-1, 1]), value 0,
discount 0. Non-terminal edges carry a reward in [-reward_scale, reward_scale] and values lie in [-1, 1].
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rlm_jax.search.tree import ExpandOutput, RootInput, Tree

_GOLDEN = 0x9E3779B9


def _hash(x):
    """lowbias32: a cheap, well-mixed uint32 -> uint32 hash."""
    x = jnp.asarray(x, jnp.uint32)
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _unit(h):
    """uint32 -> float32 uniform in [0, 1)."""
    return (h >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


@dataclasses.dataclass(frozen=True)
class ToyEnv:
    """K slots per state. The knobs below are defaults; `expand_fn`'s `params` may override any of them
    with traced values (a dict), so tests can vary them without recompiling the search."""

    num_actions: int
    discount: float = 0.97
    reward_scale: float = 0.3
    terminal_prob: float = 0.0
    invalid_prob: float = 0.0  # each slot of a state is invalid (-inf logit) with this probability
    logit_scale: float = 2.0

    def _knob(self, params, name):
        return params[name] if isinstance(params, dict) and name in params else getattr(self, name)

    def evaluate(self, state, params=None):
        """state [...] -> (prior_logits [..., K], value [...])."""
        salt = jnp.uint32(_GOLDEN) * (jnp.arange(self.num_actions, dtype=jnp.uint32) + 1)
        u = _unit(_hash(state[..., None] ^ salt))
        logits = self._knob(params, "logit_scale") * (2.0 * u - 1.0)
        invalid = _unit(_hash(_hash(state[..., None]) ^ salt)) < self._knob(params, "invalid_prob")
        value = 2.0 * _unit(_hash(state ^ jnp.uint32(0xA5A5A5A5))) - 1.0
        return jnp.where(invalid, -jnp.inf, logits), value

    def root(self, batch: int, seed: int = 0, params=None) -> RootInput:
        """B root states; the seed picks them (the env itself has no seed, so one compiled search
        serves every seed)."""
        first = jnp.asarray(seed, jnp.uint32) * jnp.uint32(1000003)
        state = _hash(_hash(first) + jnp.arange(batch, dtype=jnp.uint32))
        logits, value = self.evaluate(state, params)
        return RootInput(prior_logits=logits, value=value, embedding=state)

    def step(self, state, action, params=None):
        """(state [...], action [...]) -> next_state, reward, discount, prior_logits [..., K], value,
        terminal."""
        nxt = _hash(_hash(state) + jnp.asarray(action, jnp.uint32) + jnp.uint32(1))
        terminal = _unit(_hash(nxt ^ jnp.uint32(0x3C3C3C3C))) < self._knob(params, "terminal_prob")
        noise = 2.0 * _unit(_hash(nxt ^ jnp.uint32(0x5F5F5F5F))) - 1.0
        logits, value = self.evaluate(nxt, params)
        reward = jnp.where(terminal, noise, self._knob(params, "reward_scale") * noise)
        discount = jnp.where(terminal, 0.0, self._knob(params, "discount"))
        value = jnp.where(terminal, 0.0, value)
        return nxt, reward, discount, logits, value, terminal

    def __call__(self, params, key, tree: Tree, parent_index, action) -> ExpandOutput:
        """The env is the search's expand_fn: parent_index, action [B, M]; params: None or a dict of
        knobs. Pass the env itself (not a bound method: those compare by identity), so equal envs
        share one compilation of the search."""
        del key
        rows = jnp.arange(parent_index.shape[0])[:, None]
        nxt, reward, discount, logits, value, terminal = self.step(
            tree.embedding[rows, parent_index], action, params)
        return ExpandOutput(embedding=nxt, reward=reward, discount=discount, prior_logits=logits,
                            value=value, terminal=terminal)
