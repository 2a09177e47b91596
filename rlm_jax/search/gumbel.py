"""Gumbel MuZero (Danihelka et al., "Policy improvement by planning with Gumbel", ICLR 2022).

Same semantics as mctx's `gumbel_muzero_policy`:
- Root: Sequential Halving with Gumbel. Of the valid slots, the `m` with the highest
  `g + logits + sigma(completed Q)` are visited in rounds; each round halves the candidates. A fixed
  schedule (`considered_visits_table`) says which visit count a slot must have to be chosen next.
- Interior: deterministic `argmax(softmax(logits + sigma(completed Q)) - N(c) / (1 + sum N))`, so the
  visit frequencies follow the improved policy.
- Output: the action is the best `g + logits + sigma(Q)` among the most-visited slots; the policy
  target (`action_weights`) is the improved policy `softmax(logits + sigma(completed Q))`.
`sigma(completed Q)`: Q of unvisited slots is completed with the mixed value (Appendix D), min-max
rescaled to [0, 1], times `(maxvisit_init + max N(c)) * value_scale`.
`mcts.gumbel_muzero()` puts them together: `GumbelRoot` (a `base.RootRule`), `GumbelInterior` (a
`base.ScoreFn`), both reading one `CompletedQ`.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax.search.base import ChildStats, RootInput, ScoreFn


def considered_visits(m: int, num_simulations: int) -> tuple[int, ...]:
    """Sequential Halving schedule: the visit count the next root visit must have, per simulation.

    Rounds: each of the `c` candidates (c = m, then halved, never below 2) gets
    `max(1, floor(n / (ceil(log2 m) * c)))` more visits, one pass over the candidates at a time.
    """
    if m <= 1:
        return tuple(range(num_simulations))
    rounds = math.ceil(math.log2(m))
    schedule, visits, c = [], [0] * m, m
    while len(schedule) < num_simulations:
        for _ in range(max(1, int(num_simulations / (rounds * c)))):
            schedule += visits[:c]
            visits[:c] = [v + 1 for v in visits[:c]]
        c = max(2, c // 2)
    return tuple(schedule[:num_simulations])


def considered_visits_table(m: int, num_simulations: int) -> np.ndarray:
    """[m + 1, num_simulations] int32: row j is the schedule when only j slots are valid."""
    return np.array([considered_visits(j, num_simulations) for j in range(m + 1)], np.int32)


@dataclasses.dataclass(frozen=True)
class CompletedQ:
    """sigma(completed Q) of one node's slots [K] (mctx's `qtransform_completed_by_mix_value`)."""

    value_scale: float = 0.1
    maxvisit_init: float = 50.0
    rescale_values: bool = True
    use_mixed_value: bool = True
    epsilon: float = 1e-8

    def __call__(self, stats: ChildStats) -> chex.Array:
        visited = stats.visits > 0
        if self.use_mixed_value:
            # Mixed value: (raw V + sum N * prior-weighted mean of visited Q) / (sum N + 1).
            probs = jnp.maximum(jax.nn.softmax(stats.prior_logits), jnp.finfo(jnp.float32).tiny)
            sum_n = jnp.sum(stats.visits)
            visited_mass = jnp.sum(jnp.where(visited, probs, 0.0))
            weighted_q = jnp.sum(jnp.where(visited, probs * stats.qvalues / jnp.where(visited, visited_mass, 1.0),
                                           0.0))
            fill = (stats.raw_value + sum_n * weighted_q) / (sum_n + 1)
        else:
            fill = stats.raw_value
        q = jnp.where(visited, stats.qvalues, fill)
        if self.rescale_values:
            q = (q - jnp.min(q)) / jnp.maximum(jnp.max(q) - jnp.min(q), self.epsilon)
        return (self.maxvisit_init + jnp.max(stats.visits)) * self.value_scale * q


def score_considered(considered_visit, gumbel, logits, sigma_q, visits):
    """`g + logits + sigma(Q)` on slots with exactly `considered_visit` visits, -inf elsewhere. [..., K]"""
    logits = logits - jnp.max(logits, axis=-1, keepdims=True)
    penalty = jnp.where(visits == considered_visit, 0.0, -jnp.inf)
    return jnp.maximum(-1e9, gumbel + logits + sigma_q) + penalty


def _root_scores(stats, depth, gumbel, *, table, max_considered, qvalues):
    """Sequential Halving at the root. `gumbel`: this problem's root noise [K]; `table` from
    `considered_visits_table(max_considered, total_simulations)`."""
    del depth
    table = jnp.asarray(table)
    num_considered = jnp.minimum(max_considered, jnp.sum(stats.valid))
    sim = jnp.minimum(jnp.sum(stats.visits), table.shape[1] - 1)  # root visits so far = simulation index
    considered = table[num_considered, sim]
    return score_considered(considered, gumbel, stats.prior_logits, qvalues(stats), stats.visits)


@dataclasses.dataclass(frozen=True)
class GumbelInterior:
    """The interior rule: argmax of softmax(logits + sigma(completed Q)) - N(c) / (1 + sum N)."""

    qvalues: CompletedQ = CompletedQ()

    def __call__(self, stats, depth, extra):
        del depth, extra
        probs = jax.nn.softmax(stats.prior_logits + self.qvalues(stats))
        return probs - stats.visits / (1 + jnp.sum(stats.visits))


@dataclasses.dataclass(frozen=True)
class GumbelRoot:
    """The root (a `base.RootRule`): Gumbel noise g = gumbel_scale * Gumbel(0, 1) [B, K] on the logits,
    Sequential Halving over `max_num_considered_actions` slots, and the action / improved policy of
    `root_policy`."""

    max_num_considered_actions: int = 16
    gumbel_scale: float = 1.0
    qvalues: CompletedQ = CompletedQ()

    def prepare(self, key, root: RootInput):
        key, gumbel_key = jax.random.split(key)  # as mctx.gumbel_muzero_policy
        logits = root.prior_logits
        return key, key, root, self.gumbel_scale * jax.random.gumbel(gumbel_key, logits.shape, logits.dtype)

    def scores(self, interior: ScoreFn, num_simulations: int) -> ScoreFn:
        del interior
        table = considered_visits_table(self.max_num_considered_actions, num_simulations)
        return functools.partial(_root_scores, table=table, max_considered=self.max_num_considered_actions,
                                 qvalues=self.qvalues)

    def act(self, key, stats: ChildStats, extra):
        del key
        return jax.vmap(functools.partial(root_policy, qvalues=self.qvalues))(stats, extra)


def root_policy(stats: ChildStats, gumbel: chex.Array, *, qvalues: CompletedQ) -> tuple[chex.Array, chex.Array]:
    """(action [], improved policy [K]) for one root after the search."""
    sigma_q = qvalues(stats)
    score = score_considered(jnp.max(stats.visits), gumbel, stats.prior_logits, sigma_q, stats.visits)
    action = jnp.argmax(jnp.where(stats.valid, score, -jnp.inf)).astype(jnp.int32)
    logits = stats.prior_logits + sigma_q
    logits = jnp.where(stats.valid, logits - jnp.max(jnp.where(stats.valid, logits, -jnp.inf)),
                       jnp.finfo(logits.dtype).min)
    return action, jax.nn.softmax(logits)
