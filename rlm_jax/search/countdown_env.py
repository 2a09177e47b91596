"""Countdown as an `mcts` environment with a hand-made oracle policy and value (no model, no learning).

For oracle tests and benchmarks of the search: does the search find what a noisy policy alone misses?

State: the remaining numbers `nums [n]` int32 (-1 = used; a result goes into the first operand's slot)
and the `target`. Moves: K = 4 * n(n-1)/2 slots, one per (pair i < j, op) with the Stream-of-Search
integer rules (`tasks.countdown.Rules(fractions=False, non_negative=True)`): with a = max, b = min of
the pair, `a+b`, `a-b`, `a*b`, and `a/b` only when exact (b > 0). (The task also allows `0/x = 0`,
which `0*x` already reaches, so the reachable values are the same.) A move is legal when both slots
are live. A state with one live number is terminal: value +1 if it is the target, else -1 (exact,
a verifier). Reward 0 and discount 1 on every edge, as for the LM environment.

Oracle, deliberately noisy, deterministic in (state, seed) (a hash, so every search sees the same):
- solvability of a state: exact, by enumerating every move sequence in JAX (n = 4: 24*12*4 sequences,
  computed as 24^3 with illegal moves masked; jittable, no host lookups);
- prior logits: uniform noise in [-logit_noise, logit_noise] on legal moves (-inf on illegal ones),
  plus `hint_bonus` on the moves that keep the target reachable, but only in a `hint_prob` fraction
  of states (elsewhere the prior is pure noise);
- value of a non-terminal state: +-value_mean (solvable or not) plus uniform noise in
  [-value_noise, value_noise], clipped to [-1, 1].

    env = CountdownEnv(num_numbers=4)
    root = env.root(numbers [B, n], target [B])
    out = mcts.mcts(None, key, root, env, num_simulations, config)   # env is the expand_fn
    solved = env.solved(out)                                          # [B] bool
    chains, _ = env.sample_chains(numbers, target, key, n)            # best-of-N: [B, n] solved
"""
from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax.search.toy_env import _hash, _unit
from rlm_jax.search.tree import ExpandOutput, RootInput, Tree

OPS = ("+", "-", "*", "/")
USED = -1


def moves(num_numbers: int) -> tuple[tuple[int, int, int], ...]:
    """The K slots: (i, j, op index) for pairs i < j, ops in OPS order."""
    return tuple((i, j, o) for i, j in itertools.combinations(range(num_numbers), 2) for o in range(len(OPS)))


def successors(nums: jax.Array, num_numbers: int):
    """nums [..., n] -> (next [..., K, n], legal [..., K], result [..., K])."""
    table = np.array(moves(num_numbers), np.int32)  # [K, 3]
    x = jnp.take(nums, table[:, 0], axis=-1)  # [..., K]
    y = jnp.take(nums, table[:, 1], axis=-1)
    a, b = jnp.maximum(x, y), jnp.minimum(x, y)
    op = table[:, 2]
    safe_b = jnp.maximum(b, 1)
    result = jnp.select([op == 0, op == 1, op == 2], [a + b, a - b, a * b], a // safe_b)
    legal = (x != USED) & (y != USED) & ((op != 3) | ((b > 0) & (a % safe_b == 0)))
    slot = jnp.arange(num_numbers)
    nxt = jnp.where(slot == table[:, 0, None], result[..., None], nums[..., None, :])
    nxt = jnp.where(slot == table[:, 1, None], USED, nxt)
    return nxt, legal, result


def _final(nums, target):
    """One live number, equal to the target."""
    live = nums != USED
    return (jnp.sum(live, -1) == 1) & (jnp.max(nums, -1) == target)


def reaches(nums: jax.Array, target: jax.Array, num_numbers: int, moves_left: int | None = None) -> jax.Array:
    """Exact: some sequence of legal moves from nums [..., n] ends on target [...]. -> [...] bool.

    Enumerates all K^moves_left sequences (illegal ones masked; default n - 1 moves, enough for any
    state), so the cost grows as K^(n-1): fine for n <= 4."""
    def go(nums, target, levels):
        done = _final(nums, target)
        if levels == 0:
            return done
        nxt, legal, _ = successors(nums, num_numbers)
        below = go(nxt, target[..., None], levels - 1)
        return done | jnp.any(legal & below, axis=-1)

    return go(nums, jnp.asarray(target), num_numbers - 1 if moves_left is None else moves_left)


def _state_hash(nums, target, salt):
    h = _hash(jnp.asarray(target, jnp.uint32) ^ jnp.uint32(salt))
    for i in range(nums.shape[-1]):
        h = _hash(h ^ nums[..., i].astype(jnp.uint32) * jnp.uint32(0x9E3779B9))
    return h


@dataclasses.dataclass(frozen=True)
class CountdownEnv:
    """The environment and its oracle (see the module docstring). Hashable: pass the env itself as
    `mcts`'s expand_fn, so equal envs share a compilation."""

    num_numbers: int = 4
    logit_noise: float = 1.0
    hint_bonus: float = 3.0
    hint_prob: float = 0.5
    value_mean: float = 0.5
    value_noise: float = 0.6
    seed: int = 0

    def __post_init__(self):
        if not 2 <= self.num_numbers <= 4:
            raise ValueError(f"CountdownEnv.num_numbers must be 2..4 (exhaustive oracle), got {self.num_numbers}")

    @property
    def num_actions(self) -> int:
        return len(moves(self.num_numbers))

    def evaluate(self, nums, target):
        """(prior_logits [..., K], value [...], terminal [...]) of states nums [..., n], target [...]."""
        n, k = self.num_numbers, self.num_actions
        nxt, legal, _ = successors(nums, n)
        good = legal & reaches(nxt, target[..., None], n, n - 2)  # moves that keep the target reachable
        h = _state_hash(nums, target, self.seed)
        slot_h = _hash(h[..., None] ^ (jnp.arange(k, dtype=jnp.uint32) + 1) * jnp.uint32(0x85EBCA6B))
        noise = self.logit_noise * (2 * _unit(slot_h) - 1)
        hinted = _unit(_hash(h ^ jnp.uint32(0x27D4EB2F))) < self.hint_prob
        logits = jnp.where(legal, noise + self.hint_bonus * (good & hinted[..., None]), -jnp.inf)
        terminal = jnp.sum(nums != USED, -1) <= 1
        solvable = jnp.any(good, -1)
        v_noise = self.value_noise * (2 * _unit(_hash(h ^ jnp.uint32(0x165667B1))) - 1)
        value = jnp.clip(jnp.where(solvable, self.value_mean, -self.value_mean) + v_noise, -1.0, 1.0)
        value = jnp.where(terminal, jnp.where(_final(nums, target), 1.0, -1.0), value)
        return logits, value, terminal

    def root(self, numbers, target) -> RootInput:
        """numbers [B, n] (positive ints), target [B] -> the evaluated roots."""
        nums = jnp.asarray(numbers, jnp.int32)
        if nums.ndim != 2 or nums.shape[1] != self.num_numbers:
            raise ValueError(f"numbers must be [B, {self.num_numbers}], got shape {nums.shape}")
        target = jnp.asarray(target, jnp.int32)
        logits, value, terminal = self.evaluate(nums, target)
        return RootInput(prior_logits=logits, value=value, embedding={"nums": nums, "target": target},
                         terminal=terminal)

    def __call__(self, params, key, tree: Tree, parent_index, action) -> ExpandOutput:
        """expand_fn: the children (parent_index [B, M], action [B, M]). params and key are unused."""
        del params, key
        rows = jnp.arange(parent_index.shape[0])[:, None]
        nums = tree.embedding["nums"][rows, parent_index]  # [B, M, n]
        target = tree.embedding["target"][rows, parent_index]
        nxt, _, _ = successors(nums, self.num_numbers)  # [B, M, K, n]
        nums = jnp.take_along_axis(nxt, action[..., None, None], axis=2)[:, :, 0]
        logits, value, terminal = self.evaluate(nums, target)
        zeros = jnp.zeros(value.shape)
        return ExpandOutput(embedding={"nums": nums, "target": target}, reward=zeros, discount=zeros + 1.0,
                            prior_logits=logits, value=value, terminal=terminal)

    def _chains(self, numbers, target, choose):
        """One chain of n - 1 moves per row, the move at step i chosen by choose(i, logits [R, K]) -> [R].
        -> (solved [R] bool, actions [R, n-1])."""
        root = self.root(numbers, target)
        nums, target, logits = root.embedding["nums"], root.embedding["target"], root.prior_logits
        actions = []
        for i in range(self.num_numbers - 1):
            a = choose(i, logits)
            nxt, _, _ = successors(nums, self.num_numbers)
            nums = jnp.take_along_axis(nxt, a[:, None, None], axis=1)[:, 0]
            if i < self.num_numbers - 2:  # the last state is terminal: only checked, not evaluated
                logits, _, _ = self.evaluate(nums, target)
            actions.append(a)
        return _final(nums, target), jnp.stack(actions, 1)

    def greedy_chain(self, numbers, target):
        """The policy alone: always the argmax-prior move. -> (solved [B], actions [B, n-1])."""
        return self._chains(numbers, target, lambda i, logits: jnp.argmax(logits, -1))

    def sample_chains(self, numbers, target, key, n: int):
        """Best-of-N with the policy alone: n chains per problem, each move sampled from softmax(prior).
        The terminal value is exact (a verifier), so best-of-N succeeds iff some chain is solved.
        A chain evaluates num_numbers - 1 states: the root (shared by all chains, counted once per
        chain all the same) and the states after each move but the last, whose terminal check is free.
        numbers [B, n], target [B] -> (solved [B, n_chains] bool, actions [B, n_chains, n-1])."""
        b = numbers.shape[0]
        rep = lambda x: jnp.repeat(jnp.asarray(x, jnp.int32), n, axis=0)
        keys = jax.random.split(key, self.num_numbers - 1)
        solved, actions = self._chains(rep(numbers), rep(target),
                                       lambda i, logits: jax.random.categorical(keys[i], logits, axis=-1))
        return solved.reshape(b, n), actions.reshape(b, n, -1)

    def solved(self, out) -> jax.Array:
        """[B] the search's best node (its highest-valued terminal, see `mcts.best_node`) is a solution."""
        rows = jnp.arange(out.best_node.shape[0])
        nums = out.tree.embedding["nums"][rows, out.best_node]
        return out.found_terminal & _final(nums, out.tree.embedding["target"][rows, out.best_node])


def move_text(nums, action: int, num_numbers: int) -> tuple[str, list[int]]:
    """Host side: the step text `a op b=c` of move `action` from nums [n], and the next nums."""
    i, j, o = moves(num_numbers)[int(action)]
    x, y = int(nums[i]), int(nums[j])
    a, b = max(x, y), min(x, y)
    c = {"+": a + b, "-": a - b, "*": a * b, "/": a // max(b, 1)}[OPS[o]]
    nxt = [int(v) for v in nums]
    nxt[i], nxt[j] = c, USED
    return f"{a}{OPS[o]}{b}={c}", nxt


def path_texts(numbers, actions, num_numbers: int) -> list[str]:
    """Host side: the steps of a move sequence from `numbers` (what the task's verifier reads)."""
    nums, steps = list(numbers), []
    for a in actions:
        text, nums = move_text(nums, a, num_numbers)
        steps.append(text)
    return steps
