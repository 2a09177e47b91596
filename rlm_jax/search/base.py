"""The search's I/O types and callable signatures, with shapes (as mctx's `base.py`).

Shapes: `B` problems, `N` node capacity, `K` child slots per node, `M` nodes created by one expansion
call, `W` simulations per iteration (`SearchConfig.num_parallel`), `D` step slots of a solution, `L`
tokens per step, `n` rows of a flat batch. Functions named `*_one` elsewhere take one unbatched tree.

MCTS over any environment (`mcts.mcts`):
    RootInput, ExpandFn -> ExpandOutput, SearchOutput
and the rules a `SearchConfig` carries (presets in mcts.py):
    ScoreFn (selection at a node, from its ChildStats), QTransform, RootRule (root noise, root
    scores, acting), BackupFn.
The LM as the environment (`lm.py`, operators.py, the strategies):
    LMSpec (static models + sampling settings), Verifier, Proposals, StrategyOutput.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol

import chex
import numpy as np

from rlm_jax.models import heads
from rlm_jax.models.config import ModelConfig

if TYPE_CHECKING:
    from rlm_jax.search.tree import Tree


# ---------------------------------------------------------------- MCTS: environment I/O
@chex.dataclass(frozen=True)
class RootInput:
    """The evaluated root of each problem.

    prior_logits: [B, K] logits of the root's K child slots (`-inf`: invalid slot).
    value: [B] evaluator's value of the root.
    embedding: pytree with leaves [B, ...]: whatever `expand_fn` needs to extend the root
        (toy envs: a state id; an LM: the root's step tokens + length).
    terminal: [B] bool or None (= not terminal).
    cost: [B] float32 or None: model positions computed to evaluate the root (an LM's token positions).
    """

    prior_logits: chex.Array
    value: chex.Array
    embedding: Any
    terminal: chex.Array | None = None
    cost: chex.Array | None = None


@chex.dataclass(frozen=True)
class ExpandOutput:
    """What `expand_fn` returns for the M new nodes of each problem (leaves [B, M, ...]).

    embedding: pytree with leaves [B, M, ...], the same structure as the root's embedding.
    reward: [B, M] reward on the edge parent -> new node.
    discount: [B, M] discount on that edge (0 at the end of an episode, as in mctx).
    prior_logits: [B, M, K] logits of the *new node's* K child slots (`-inf`: invalid slot).
    value: [B, M] evaluator's value V of the new node (for a terminal node, its final value, e.g. the
        verifier's score when the reward is not put on the edge).
    terminal: [B, M] bool; terminal nodes are never expanded.
    cost: [B] float32 or None: model positions this call computed for each problem, void entries included.
    """

    embedding: Any
    reward: chex.Array
    discount: chex.Array
    prior_logits: chex.Array
    value: chex.Array
    terminal: chex.Array
    cost: chex.Array | None = None


# expand_fn(params, key, tree, parent_index [B, M], action [B, M]) -> ExpandOutput [B, M, ...]: evaluates
# the children in slot `action` of `parent_index` (see mcts.py for the order of the M entries). Static in
# the search's jit: pass a hashable callable that compares by value (a frozen dataclass with __call__).
ExpandFn = Callable[[Any, chex.PRNGKey, "Tree", chex.Array, chex.Array], ExpandOutput]


@chex.dataclass(frozen=True)
class SearchOutput:
    """Result of `mcts`. Shapes: B problems, K slots, N capacity, D = max_depth + 1.

    tree: the final Tree (for inspection; visits / values of every node are training statistics).
    action: [B] chosen root slot. action_weights: [B, K] policy target (visit distribution;
        Gumbel: the improved policy softmax(logits + sigma(completed Q))).
    root_visits: [B, K] int32; root_qvalues: [B, K] (0 where unvisited); root_value: [B].
    best_path: [B, D] nodes root..best_node, NONE-padded; best_node: [B]: the highest-valued terminal
        node (value = reward + discount * V) if the tree has one (found_terminal [B]), else the end of
        the most-visited path.
    visits: [B, N] int32 and values: [B, N] backed-up V of every node (0 beyond num_nodes).
    cost: [B] float32 model positions the environment reported computing (root + every expand call; 0
        for environments that report none).
    """

    tree: Tree
    action: chex.Array
    action_weights: chex.Array
    root_visits: chex.Array
    root_qvalues: chex.Array
    root_value: chex.Array
    best_path: chex.Array
    best_node: chex.Array
    found_terminal: chex.Array
    visits: chex.Array
    values: chex.Array
    cost: chex.Array


# ---------------------------------------------------------------- MCTS: the rules of a SearchConfig
class ChildStats(NamedTuple):
    """Everything a selection rule reads at one node of one (unbatched) tree. [K] unless noted
    (`tree.child_stats` gives them batched: [B, K] and [B])."""

    index: chex.Array  # child node index, NONE where the slot is empty
    filled: chex.Array  # bool, the child exists
    valid: chex.Array  # bool, the slot may be chosen (finite prior logit)
    visits: chex.Array  # int32, 0 where empty
    qvalues: chex.Array  # reward + discount * V(child), 0 where empty
    values: chex.Array  # V(child), 0 where empty
    prior_logits: chex.Array
    node_visits: chex.Array  # [] visits of the node itself
    node_value: chex.Array  # [] V(node)
    raw_value: chex.Array  # [] evaluator's value of the node


# A selection rule: (stats of one node, depth [], extra: this problem's RootRule data) -> scores [K]; the
# descent takes the argmax over the slots it may choose. Rules are frozen dataclasses (hashable, equal by
# value: part of the jit cache key) written for one node and lifted with vmap (selection.py, gumbel.py).
ScoreFn = Callable[[ChildStats, chex.Array, Any], chex.Array]

# A Q transform: ChildStats -> normalised Q of the K slots [K] in [0, 1] (unvisited slots 0).
QTransform = Callable[[ChildStats], chex.Array]

# backup(tree, start [B, W], leaf_return [B, W]) -> tree with the W paths' visits / value sums updated:
# start is the deepest node of each path (NONE: skip), leaf_return the return at it (backup.py).
BackupFn = Callable[["Tree", chex.Array, chex.Array], "Tree"]


class RootRule(Protocol):
    """How a search treats the root: its noise, its selection rule and the final action (selection.py's
    `MuZeroRoot`, gumbel.py's `GumbelRoot`). A frozen dataclass (hashable: part of the jit cache key)."""

    def prepare(self, key: chex.PRNGKey, root: RootInput) -> tuple[chex.PRNGKey, chex.PRNGKey, RootInput, Any]:
        """-> (acting key, search key, the root to search from (e.g. noisy priors), extra: pytree [B, ...]
        handed to the root's ScoreFn and to `act`)."""

    def scores(self, interior: ScoreFn, num_simulations: int) -> ScoreFn:
        """The root's ScoreFn for a search of `num_simulations` simulations in all (`interior` itself
        when the root is scored like every node)."""

    def act(self, key: chex.PRNGKey, stats: ChildStats, extra: Any) -> tuple[chex.Array, chex.Array]:
        """(action [B], action_weights [B, K]) from the roots' final stats (fields [B, K] / [B])."""


# ---------------------------------------------------------------- the LM as the environment
# verifier(problem_index [n] int32, steps [n, D, L] int32, steps_mask [n, D, L] bool) -> [n] float32 score
# in [-1, 1] (+1 solved). Runs on the host (`jax.pure_callback`): verifiers are Python programs.
Verifier = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
# tool(tokens [n, L] int32, mask [n, L] bool) -> (tokens, mask): proposals with the task's tools run
# (`rlm_jax/tools.py`; a host callback between steps).
ToolRunner = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

PROPOSALS = ("sample", "distinct", "diverse")  # LMSpec.proposals


@dataclasses.dataclass(frozen=True, eq=True)
class LMSpec:
    """Static description of the models a search uses (hashable: part of the jit cache key).

    policy: the policy's ModelConfig. value / head: the value model's trunk config and head (None: no
      value model; non-terminal nodes are then valued 0). step_id / eos_id / pad_id: tokenizer ids.
    step_ends: more ids that end a step as step_id does: the tokens where a byte-level BPE merged the step
      delimiter with other characters (".\n\n" in Qwen2's and Llama 3's vocabularies;
      `HFTokenizer.step_end_ids`). The token stays in its step, as step_id does.
    num_slots: K proposals per node. step_len: L, the most tokens of one step (a longer step is
      truncated and its slot marked invalid). max_depth: D, the most steps of a solution.
    temperature / top_k: how proposals are sampled. prior: "mean" or "sum" of the step's token
      log-probs as the slot's prior logit. dedupe: identical proposals of a node keep one slot.
    proposals: how a node's k proposals are drawn: "sample" (independent samples; a confident policy
      repeats itself, and the repeats are merged by `dedupe`) or "distinct" (sampling without
      replacement, `distinct_sampling`: k different steps for the tokens of k samples) or "diverse"
      (x1's decoding: Diverse Beam Search with one beam per group, `decoding.diverse_tokens`: slot 0 is
      the greedy step, each later slot greedy under a penalty of `diversity_penalty` per earlier slot that
      chose the same token at the same position; deterministic, the temperature unused).
    verifier: host function scoring finished solutions (training mode); None: terminals are valued by
      the value model (inference mode, fully on device).
    num_rollouts: R rollouts (`simulate`) per new non-terminal MCTS node, 0 = none (x1's
      num_simulations_per_node). Its value is then (1 - rollout_alpha) * V_model + rollout_alpha * mean
      rollout reward (x1's alpha: 0.5 with rollouts; 1 = rollouts only, as x1's example_mcts.py).
    rollout_temperature: sampling temperature of the rollouts (None: `temperature`; 0: greedy rollouts).
    rollout_discount: a rollout's reward is discounted by rollout_discount ** (steps it added). 1 is x1's
      code (undiscounted mean); the paper discounts by gamma^(T - t) (pass the search's gamma).
    kv_cache: the tree is the paged KV cache (`paged.py`): no prefix is ever recomputed. False: every
      expansion re-reads each node's whole context (the re-prefill baseline `bench_search` compares with).
    compact: with the cache, rows that finished decoding leave the batch (`decoding.decode_compacting`; the
      same draws). Off where the batch is split over devices: the gathers would move rows between them
      (`RunConfig.lm_spec` decides from the mesh).
    shared_trunk: the value head reads the policy's own hidden state (x1's and the paper's shared base;
      value params are `{"head": ...}` and `value` must be the policy's config): with the cache a node's
      value then costs no forward pass. False: the value model is its own trunk (`{"trunk", "head"}`).
    branch_entropy: uncertainty-triggered branching (the blueprint's fork where the model is unsure): a node
      gets K proposals only where the entropy (nats, `uncertainty.token_stats`) of the policy's first-token
      distribution at its context exceeds this; elsewhere one greedy continuation, the other K - 1 slots
      empty and never decoded. 0: always K (off). Needs kv_cache and proposals="sample".
    tool: tool steps (`rlm_jax/tools.py`): a host function that runs the task's tools in every new step (a
      calculator writes the value of `7*4=` into it) before anything reads the step; None: no tools.

    K and x1: x1 expands M = 2 children per node, all at once; `mcts.x1()` expands all K = num_slots
    proposals of a node at once, so num_slots=2 is x1's setting (the toy-env reference test runs K = 2).
    """

    policy: ModelConfig
    step_id: int
    eos_id: int
    pad_id: int
    value: ModelConfig | None = None
    head: heads.HeadConfig | None = None
    num_slots: int = 4
    step_len: int = 16
    max_depth: int = 4
    temperature: float = 1.0
    top_k: int = 0
    prior: str = "mean"
    dedupe: bool = True
    proposals: str = "sample"
    verifier: Verifier | None = None  # compared by identity: a new function means a new program
    num_rollouts: int = 0
    rollout_alpha: float = 0.5
    rollout_temperature: float | None = None
    rollout_discount: float = 1.0
    kv_cache: bool = True
    shared_trunk: bool = False
    compact: bool = True
    step_ends: tuple[int, ...] = ()
    branch_entropy: float = 0.0
    diversity_penalty: float = 1.0
    tool: ToolRunner | None = None  # compared by identity, as the verifier

    def __post_init__(self):
        object.__setattr__(self, "step_ends", tuple(int(i) for i in self.step_ends))  # hashable, any sequence
        if self.eos_id in self.step_ends:
            raise ValueError(f"LMSpec.step_ends holds eos_id {self.eos_id}: a token ends a step or the solution")
        if self.proposals not in PROPOSALS:
            raise ValueError(f"LMSpec.proposals must be one of {PROPOSALS}, got {self.proposals!r}")
        if self.diversity_penalty < 0:
            raise ValueError(f"LMSpec.diversity_penalty must be >= 0, got {self.diversity_penalty}")
        if self.branch_entropy < 0:
            raise ValueError(f"LMSpec.branch_entropy must be >= 0 nats (0: always branch), got {self.branch_entropy}")
        if self.branch_entropy and (not self.kv_cache or self.proposals != "sample"):
            raise ValueError("LMSpec.branch_entropy needs kv_cache=True and proposals='sample' (the cached "
                             "sampler decides per node how many slots to decode)")
        if self.proposals == "distinct" and self.top_k:
            raise ValueError("LMSpec: distinct proposals sample from the whole vocabulary; set top_k=0")
        if self.prior not in ("mean", "sum"):
            raise ValueError(f"LMSpec.prior must be 'mean' or 'sum', got {self.prior!r}")
        if (self.value is None) != (self.head is None):
            raise ValueError("LMSpec: give both value and head (the value model), or neither")
        if self.num_rollouts < 0 or not 0.0 <= self.rollout_alpha <= 1.0:
            raise ValueError(f"LMSpec: num_rollouts must be >= 0 and rollout_alpha in [0, 1], got "
                             f"{self.num_rollouts}, {self.rollout_alpha}")
        if self.shared_trunk and self.value != self.policy:
            raise ValueError("LMSpec: a shared-trunk value head reads the policy's hidden state; pass "
                             "value=policy (the policy's ModelConfig) with shared_trunk=True")
        if self.num_rollouts and self.value is None and self.verifier is None:
            raise ValueError("LMSpec: rollouts are scored by the verifier (training mode) or the value model "
                             "(inference mode); give one of them, or num_rollouts=0")

    @property
    def stops(self) -> tuple[int, ...]:
        """The ids a proposal's decoding stops at: every step end, then EOS."""
        return (self.step_id, *self.step_ends, self.eos_id)

    @property
    def context_len(self) -> int:
        """Length of a context without the prompt: D slots of L tokens."""
        return self.max_depth * self.step_len


@chex.dataclass(frozen=True)
class Proposals:
    """k sampled next steps per context. tokens, mask: [n, k, L]; logprob: [n, k] sum of the step's
    token log-probs; length: [n, k] tokens of the step (its STEP/EOS included); terminal: [n, k] ended
    with EOS; ok: [n, k] ended with STEP or EOS within L; cost: [n] float32 token positions the policy
    computed for them (prefill and decode rows, padding and finished rows included); entropy: [n] float32
    the entropy (nats) of the policy's first-token distribution at each context (None where not computed:
    the re-prefill sampler); sampled: [n, k] int32 tokens the model sampled, where a tool wrote into the
    step (None: `length`, no tool ran)."""

    tokens: chex.Array
    mask: chex.Array
    logprob: chex.Array
    length: chex.Array
    terminal: chex.Array
    ok: chex.Array
    cost: chex.Array | None = None
    entropy: chex.Array | None = None
    sampled: chex.Array | None = None

    @property
    def sampled_tokens(self) -> chex.Array:
        """[n, k] tokens the model sampled (what counts as generated; a tool's result does not)."""
        return self.length if self.sampled is None else self.sampled


@chex.dataclass(frozen=True)
class StrategyOutput:
    """A strategy's answer per problem (beam.py, sampling.py). steps, mask: [B, D, L]; score: [B] (value,
    verifier score or log-prob); finished: [B] the answer ended with EOS; generated_tokens: [B] tokens
    sampled in total; cost: [B] token positions the models computed (None where not counted)."""

    steps: chex.Array
    mask: chex.Array
    score: chex.Array
    finished: chex.Array
    generated_tokens: chex.Array
    cost: chex.Array | None = None
