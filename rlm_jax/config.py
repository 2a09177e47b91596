"""Typed run configuration: one frozen dataclass per section, validated where it is built.

ml_collections stays the file and command-line layer (`configs/*.py`, `--config.sft.steps=200`); the entry
point converts the ConfigDict once (`from_configdict`) and everything below it reads typed fields. Every
phase that trains takes a `TrainerConfig` (or a subclass adding its own fields), so the optimizer and loop
knobs are declared once. Defaults are neutral: a config file states only what its experiment changes
(`configs/base.py` is these defaults; countdown, prontoqa and knapsack extend it).

Each `__post_init__` raises a ValueError naming the field, the value and the fix. Checks that need the
device count (batch sizes against the mesh) are in `check_devices`.
"""
from __future__ import annotations

import dataclasses
import re
import zlib
from pathlib import Path
from typing import Any, Mapping

import jax
import ml_collections

from rlm_jax import config_utils, evaluation, tools
from rlm_jax.models import hf_config
from rlm_jax.models.config import ModelConfig
from rlm_jax.models.heads import HeadConfig
from rlm_jax.parallel import MeshConfig
from rlm_jax.search import mcts
from rlm_jax.search.base import PROPOSALS, LMSpec
from rlm_jax.tasks import get_task
from rlm_jax.tasks import io as task_io

RL_ALGORITHMS = ("ppo", "grpo", "dpo", "sft", "grpo_sampled")
MIN_VOCAB = 256 + 4 + 1  # the sentencepiece tokenizer's byte-fallback pieces, specials and step delimiter
VALUE_LOSSES = ("mse", "bce")
VALUE_TARGETS = ("rollouts", "exact")


_fail = config_utils.fail
_MODEL_DEFAULTS = ModelConfig(vocab_size=1, d_model=2, num_layers=1, num_heads=1, num_kv_heads=1, mlp_dim=1)
_MODEL_TYPES = {f.name: str(getattr(f.type, "__name__", f.type)) for f in dataclasses.fields(ModelConfig)}


def _at_least(section: str, obj, minimum: int, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < minimum:
            _fail(f"{section}.{name}", getattr(obj, name), f"must be >= {minimum}")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Optimizer and loop knobs of every phase that trains (`training/trainer.py`).

    steps: optimizer updates; each update averages `grad_accum` micro-batches of `batch_size` rows
    (denominator-aware: token-weighted, as one batch of batch_size * grad_accum rows would be).
    AdamW with `warmup_steps` of linear warmup then cosine decay to lr / 10; global-norm clipping at
    `clip_norm` (0: none). Checkpoints every `save_every` updates, metrics every `log_every`."""

    steps: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    grad_accum: int = 1
    save_every: int = 100
    log_every: int = 20

    @property
    def section(self) -> str:
        return type(self).__name__

    def __post_init__(self):
        _at_least(self.section, self, 0, "steps", "warmup_steps")
        _at_least(self.section, self, 1, "batch_size", "grad_accum", "save_every", "log_every")
        if not self.lr > 0:
            _fail(f"{self.section}.lr", self.lr, "the learning rate must be > 0")
        if self.weight_decay < 0 or self.clip_norm < 0:
            _fail(f"{self.section}.weight_decay/clip_norm", (self.weight_decay, self.clip_norm), "must be >= 0")

    def replace(self, **kw) -> "TrainerConfig":
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """name: a registered task; levels "1-10" or "1,3"; num_train problems with reference traces (SFT),
    num_rl more training-split problems only RL sees (verifier only), num_eval held out (split by problem
    hash, `eval_fraction` of all problems); traces_per_problem distinct solutions of each for SFT.
    trace: what SFT (and RL's rehearsal) trains on: "solution" (reference solutions) or "search" (trace-based
    supervision, Stream of Search: the linearised trace of a heuristic search, its dead ends and backtracking
    steps included, ending in a solution; at most search.max_depth steps, problems without such a trace are
    left out; tasks with `search_trace`: countdown, countdown3, game24).
    chat_template: "none" (a prompt is the task's text), "auto" (model.init's tokenizer's chat template: the
    task's text as the user's turn after `system_prompt`, the solution as the assistant's, ended by the
    template's end-of-turn token) or a .jinja file replacing the tokenizer's template. fewshot: with a chat
    template, the first `fewshot` SFT problems and their reference solutions as earlier turns of every prompt.
    data: "" (the task generates its problems) or a problems file the data phase splits instead (the task's
    `read_problems`: GSM8K/MATH-format JSONL for jsonl_math, x1's format otherwise), at `levels`: SFT takes
    the train-split problems that carry a worked solution, RL the rest of the train split (an answer is enough:
    the verifier), evaluation the eval split."""

    name: str = "countdown3"
    levels: str = "1-10"
    num_train: int = 1000
    num_rl: int = 3072
    num_eval: int = 768
    eval_fraction: float = 0.2
    traces_per_problem: int = 1
    trace: str = "solution"
    data: str = ""
    chat_template: str = "none"
    system_prompt: str = ""
    fewshot: int = 0

    def __post_init__(self):
        task = get_task(self.name)  # unknown -> ValueError listing the valid ones
        try:
            task_io.parse_levels(self.levels)
        except ValueError as e:
            _fail("task.levels", self.levels, str(e))
        _at_least("task", self, 1, "num_train", "num_eval", "traces_per_problem")
        _at_least("task", self, 0, "num_rl", "fewshot")
        if not 0.0 < self.eval_fraction < 1.0:
            _fail("task.eval_fraction", self.eval_fraction, "the held-out share of problems must be in (0, 1)")
        if not isinstance(self.chat_template, str) or (self.chat_template not in ("none", "auto")
                                                       and not Path(self.chat_template).expanduser().is_file()):
            _fail("task.chat_template", self.chat_template, "use 'none' (the task's text), 'auto' (model.init's "
                  "tokenizer's chat template) or the path of a .jinja template file")
        if self.chat_template not in ("none", "auto"):
            object.__setattr__(self, "chat_template", str(Path(self.chat_template).expanduser().resolve()))
        if not isinstance(self.data, str):
            _fail("task.data", self.data, "must be a file path (or '' to generate problems)")
        if self.data:
            path = Path(self.data).expanduser().resolve()
            if not path.is_file():
                _fail("task.data", self.data, "no such file; pass the problems file (GSM8K/MATH-format JSONL for "
                      "jsonl_math, x1's .json/.json.bz2 for the other tasks)")
            object.__setattr__(self, "data", str(path))  # frozen: set once; absolute, as config.json records it
        elif not task.generates:
            _fail("task.data", self.data, f"task {self.name} reads its problems from a file: set "
                  "task.data=<problems.jsonl> (GSM8K or MATH format)")
        # Refused now, not hours into the data phase: more draws than the task has distinct problems.
        space = None if self.data else task.problem_space(task_io.parse_levels(self.levels))
        if space is not None and self.draws > space:
            by_eval = self.num_eval / self.eval_fraction >= (self.num_train + self.num_rl) / (1 - self.eval_fraction)
            field = "num_eval" if by_eval else "num_train"
            _fail(f"task.{field}", getattr(self, field),
                  f"num_train={self.num_train}, num_rl={self.num_rl}, num_eval={self.num_eval} at eval_fraction="
                  f"{self.eval_fraction} need {self.draws} distinct {self.name} problems, more than the {space} it "
                  "has; ask for fewer, or use a larger task (e.g. countdown)")
        if self.traces_per_problem > 1 and not task.capabilities.solutions:
            _fail("task.traces_per_problem", self.traces_per_problem,
                  f"task {self.name} cannot enumerate its solutions; use 1")
        if self.trace not in ("solution", "search"):
            _fail("task.trace", self.trace, "use 'solution' (reference solutions) or 'search' (linearised search traces)")
        if self.trace == "search" and not task.capabilities.search_traces:
            _fail("task.trace", self.trace, f"task {self.name} writes no search traces (countdown, countdown3 and game24 "
                  "do); use task.trace=solution")
        if self.trace == "search" and self.traces_per_problem != 1:
            _fail("task.traces_per_problem", self.traces_per_problem, "a search trace is one per problem; use 1 with "
                  "task.trace=search")

    @property
    def draws(self) -> int:
        """Problems the data phase generates: enough for every split (the hash split puts ~eval_fraction of them
        in eval), with a margin."""
        return int(max((self.num_train + self.num_rl) / (1 - self.eval_fraction),
                       self.num_eval / self.eval_fraction) * 1.1) + 64


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """A sentencepiece tokenizer trained on the reference traces of the first `corpus_problems` problems."""

    vocab_size: int = 300
    corpus_problems: int = 1000

    def __post_init__(self):
        _at_least("tokenizer", self, 1, "corpus_problems")
        if self.vocab_size <= MIN_VOCAB:
            _fail("tokenizer.vocab_size", self.vocab_size, f"must exceed {MIN_VOCAB} (256 byte pieces, 4 specials and "
                  "the step delimiter) by at least the corpus' distinct characters; e.g. 300")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """The search's shape (`search.base.LMSpec`): K proposals (`num_slots`) per node, steps of at most
    `step_len` tokens, at most `max_depth` steps; prompts padded to `prompt_len`. MCTS: `num_parallel` leaves
    per iteration, `num_rollouts` rollouts per new node blended with weight `rollout_alpha`. `proposals`:
    "sample" (independent; repeats merged), "distinct" (without replacement) or "diverse" (x1's Diverse Beam
    Search, deterministic). `kv_cache`: the tree is the
    paged KV cache (search/paged.py; the same trees, fewer positions computed); False re-reads every
    node's context (the baseline bench_search compares with). `branch_entropy` > 0: a node branches into K
    proposals only where the policy's first-token entropy (nats) exceeds it, else one greedy step
    (`LMSpec.branch_entropy`). `tools`: tool steps (`rlm_jax/tools.py`): the task's tools (countdown's
    calculator, GSM8K's calculator annotations) run on every step of the tree searches, on the host between
    steps, before anything reads the step. RL's search uses these; evaluation may override temperature
    and proposals (`EvalConfig`)."""

    num_slots: int = 4
    step_len: int = 12
    max_depth: int = 3
    temperature: float = 1.0
    prompt_len: int = 32
    num_parallel: int = 1
    num_rollouts: int = 0
    rollout_alpha: float = 0.5
    proposals: str = "sample"
    kv_cache: bool = True
    branch_entropy: float = 0.0
    tools: bool = False

    def __post_init__(self):
        _at_least("search", self, 1, "num_slots", "step_len", "max_depth", "prompt_len", "num_parallel")
        _at_least("search", self, 0, "num_rollouts", "branch_entropy")
        if self.branch_entropy and not self.kv_cache:
            _fail("search.branch_entropy", self.branch_entropy, "uncertainty-triggered branching runs in the "
                  "KV-cached search: set search.kv_cache=True or search.branch_entropy=0")
        if self.proposals not in PROPOSALS:
            _fail("search.proposals", self.proposals, "use 'sample' (independent samples), 'distinct' (sampling "
                  "without replacement) or 'diverse' (Diverse Beam Search)")
        if not 0.0 <= self.rollout_alpha <= 1.0:
            _fail("search.rollout_alpha", self.rollout_alpha, "must be in [0, 1]")

    @property
    def max_new_tokens(self) -> int:
        """Tokens a solution may take: max_depth steps of at most step_len tokens."""
        return self.max_depth * self.step_len


@dataclasses.dataclass(frozen=True)
class PretrainConfig(TrainerConfig):
    """Phase 0 (`training/pretrain.py`): `documents` of `steps_per_document` random legal task steps.
    steps=0: no pretraining (the default; tasks without random steps must keep it)."""

    steps: int = 0
    documents: int = 40000
    steps_per_document: int = 5
    lr: float = 3e-3
    warmup_steps: int = 30
    save_every: int = 500

    def __post_init__(self):
        super().__post_init__()
        _at_least(self.section, self, 1, "documents", "steps_per_document")


@dataclasses.dataclass(frozen=True)
class SFTConfig(TrainerConfig):
    """Phase 1 policy SFT on reference traces (`training/sft.py`)."""

    steps: int = 800
    lr: float = 3e-3
    warmup_steps: int = 30

    def __post_init__(self):
        super().__post_init__()
        _at_least(self.section, self, 1, "steps")


@dataclasses.dataclass(frozen=True)
class ValueFitConfig(TrainerConfig):
    """A value-model fit on states of the policy's samples at `temperature`: `samples_per_problem` of each of the
    first `problems` training problems (the SFT problems, then RL's own); `loss` "mse" (continuous targets) or
    "bce" (binary labels)."""

    problems: int = 256
    samples_per_problem: int = 2
    loss: str = "mse"
    temperature: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        _at_least(self.section, self, 1, "problems", "samples_per_problem")
        if self.loss not in VALUE_LOSSES:
            _fail(f"{self.section}.loss", self.loss, "use 'mse' (continuous targets) or 'bce' (binary labels)")
        if not self.temperature > 0:
            _fail(f"{self.section}.temperature", self.temperature, "sample the states at a temperature > 0 (e.g. 0.7)")


@dataclasses.dataclass(frozen=True)
class ValueConfig(ValueFitConfig):
    """Phase 1 value model (`training/value.py`) on the SFT policy's samples (problems beyond task.num_train
    come from RL's pool: they need no reference solution). targets: "rollouts" (the SFT policy's
    `rollouts` Monte-Carlo rollouts, discounted by `gamma`) or "exact" (the task's exact step labels, as a PRM
    is fit: can this state still be solved; needs a task with `can_succeed`, best with loss="bce"). init: "" (a head on a copy of the SFT policy's trunk) or "hf:<folder>": the
    trunk is that Hugging Face folder's model (any supported family and size, e.g. a reward model's base),
    under a fresh head; its tokenizer must be the policy's (model.init's)."""

    steps: int = 200
    warmup_steps: int = 20
    rollouts: int = 4
    gamma: float = 1.0
    targets: str = "rollouts"
    init: str = ""

    def __post_init__(self):
        super().__post_init__()
        _at_least(self.section, self, 1, "steps", "rollouts")
        if self.targets not in VALUE_TARGETS:
            _fail("value.targets", self.targets, "use 'rollouts' (Monte-Carlo rollouts of the SFT policy) or "
                  "'exact' (the task's exact step labels)")
        if not isinstance(self.init, str) or (self.init and not self.init.startswith("hf:")) or self.init == "hf:":
            _fail("value.init", self.init, "use '' (a head on the SFT policy's trunk) or 'hf:<folder>' (a local "
                  "Hugging Face model folder)")
        if self.init:  # absolute, so the recorded config.json finds it from any working directory
            object.__setattr__(self, "init", f"hf:{Path(self.init[3:]).expanduser().resolve()}")


@dataclasses.dataclass(frozen=True)
class RefitConfig(ValueFitConfig):
    """After RL (`training/value.py`, the refit phase): the value model refit on the task's exact labels of
    the final policy's samples at `temperature` on training problems. steps=0: keep RL's value model (the
    default). For ablations: `init` "rl" (start from RL's value model) or "phase1" (from phase 1's, before
    RL's value regression); `samples_from` "rl" (the final policy samples the states, held-out ones
    included) or "sft" (the SFT policy does)."""

    steps: int = 0
    lr: float = 2e-3
    warmup_steps: int = 20
    save_every: int = 250
    problems: int = 4000
    samples_per_problem: int = 4
    temperature: float = 0.7
    loss: str = "bce"
    init: str = "rl"
    samples_from: str = "rl"

    def __post_init__(self):
        super().__post_init__()
        if self.init not in ("rl", "phase1"):
            _fail("value_refit.init", self.init, "use 'rl' (RL's value model) or 'phase1' (phase 1's)")
        if self.samples_from not in ("rl", "sft"):
            _fail("value_refit.samples_from", self.samples_from, "use 'rl' (the final policy) or 'sft' (the SFT policy)")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Phase 2, RL from search (`training/search_rl.py`): `iterations` of MCTS (`simulations`, `preset`,
    batches of `batch_size` problems) on the next `problems_per_iteration` problems of the pool; verified
    paths into a FIFO replay buffer (`replay_capacity` rows); the policy update (`policy_update`: at most
    policy_update.steps, about `policy_epochs` passes over the buffer, `sft_mix` of each batch rehearsing SFT traces)
    with `algorithm`, and the value regression on backed-up values (`value_update`; steps=0 keeps phase 1's
    value model, e.g. one fit on exact labels). `control`: also train the SFT policy with
    RL's update steps on SFT traces only (`training/control.py`). algorithm "grpo_sampled": no search, GRPO
    over `group_size` completions per problem sampled at search.temperature (`training/group_samples.py`).
    `search_free_baseline`: also run RL's iterations with grpo_sampled from the SFT policy at no more generated
    tokens than the search used (`training/search_free.py`), and pair the two in the report (skipped when RL is
    grpo_sampled itself)."""

    iterations: int = 6
    problems_per_iteration: int = 512
    simulations: int = 12
    preset: str = "puct"
    batch_size: int = 32
    algorithm: str = "sft"
    policy_epochs: float = 8.0
    sft_mix: float = 0.5
    replay_capacity: int = 4096
    clip_eps: float = 0.2
    kl_coef: float = 0.01
    entropy_coef: float = 0.01
    dpo_beta: float = 0.1
    group_size: int = 8
    control: bool = True
    search_free_baseline: bool = False
    policy_update: TrainerConfig = TrainerConfig(steps=300, lr=3e-4, warmup_steps=10, save_every=1000)
    value_update: TrainerConfig = TrainerConfig(steps=60, lr=5e-4, save_every=1000)

    def __post_init__(self):
        _at_least("rl", self, 0, "iterations")
        _at_least("rl", self, 1, "problems_per_iteration", "simulations", "batch_size", "replay_capacity")
        if self.preset not in mcts.PRESETS:
            _fail("rl.preset", self.preset, f"use one of {sorted(mcts.PRESETS)}")
        if self.algorithm not in RL_ALGORITHMS:
            _fail("rl.algorithm", self.algorithm, f"use one of {RL_ALGORITHMS}")
        baseline = self.search_free_baseline and self.iterations > 0 and self.algorithm != "grpo_sampled"
        if (self.algorithm == "grpo_sampled" or baseline) and self.group_size < 2:
            _fail("rl.group_size", self.group_size, "GRPO normalises rewards within a group of completions: "
                  "use at least 2 per problem" + (" (or set rl.search_free_baseline=False)" if baseline else ""))
        if not 0.0 <= self.sft_mix < 1.0:
            _fail("rl.sft_mix", self.sft_mix, "the fraction of each RL update batch that rehearses SFT traces "
                  "must be in [0, 1)")
        if self.policy_epochs <= 0:
            _fail("rl.policy_epochs", self.policy_epochs, "must be > 0")
        if self.rehearsal_rows and self.policy_update.grad_accum > 1:
            _fail("rl.policy_update.grad_accum", self.policy_update.grad_accum, "SFT rehearsal (rl.sft_mix > 0) adds two means; "
                  "accumulate with rl.policy_update.grad_accum=1 or set rl.sft_mix=0")

    @property
    def rehearsal_rows(self) -> int:
        """Rows of SFT traces in each RL update batch (sft_mix of update.batch_size)."""
        return int(round(self.sft_mix * self.policy_update.batch_size))


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation (`training/final_eval.py`, `experiments/evaluate.py`): greedy accuracy of each phase on every
    held-out problem, then `strategies` ("name:budget,...") on the first `strategy_problems` (0: all), MCTS
    with `mcts_preset`, sampling at `temperature` with `proposals` ("sample" | "distinct" | "diverse": how MCTS and beam
    nodes draw their K proposals at test time; RL's search has its own in `SearchConfig`)."""

    batch_size: int = 64
    strategy_problems: int = 0
    strategies: str = "greedy:1,sample:1,best_of_n:4,best_of_n:8,self_consistency:4,self_consistency:8," \
                      "beam:2,beam:4,mcts:8,mcts:16"
    mcts_preset: str = "puct"
    temperature: float = 0.5
    proposals: str = "sample"

    def __post_init__(self):
        evaluation.parse_strategies(self.strategies)
        if self.mcts_preset not in mcts.PRESETS:
            _fail("eval.mcts_preset", self.mcts_preset, f"use one of {sorted(mcts.PRESETS)}")
        _at_least("eval", self, 0, "strategy_problems")
        _at_least("eval", self, 1, "batch_size")
        if self.proposals not in PROPOSALS:
            _fail("eval.proposals", self.proposals, "use 'sample' (independent samples), 'distinct' (sampling "
                  "without replacement) or 'diverse' (Diverse Beam Search)")
        if self.temperature < 0:
            _fail("eval.temperature", self.temperature, "must be >= 0 (0: greedy)")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The whole run. `model` holds `models.config.ModelConfig`'s fields except vocab_size (the tokenizer's),
    and `init`: "" (random weights, a sentencepiece tokenizer trained on the task) or "hf:<folder>", a local
    Hugging Face folder (Llama, Qwen2, Qwen3) that every phase starts from: its config.json is the model (the
    other model fields are ignored, but dtype / param_dtype and LoRA's lora_rank / lora_alpha / lora_targets),
    its tokenizer the run's, and phase 0 (pretrain) is skipped. `model.lora_rank` > 0 (with a folder) trains
    LoRA adapters on policy and value over the folder's frozen weights (`models/lora.py`) instead of every
    weight. `seq_len` is the training sequence length (prompt + solution)."""

    seed: int = 0
    task: TaskConfig = TaskConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(
        init="", d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=384, max_seq_len=160, rope_theta=10000.0,
        tie_embeddings=False, dtype="float32", param_dtype="float32"))
    mesh: MeshConfig = MeshConfig()
    value_head: HeadConfig = HeadConfig(kind="value", hidden=(128,))
    search: SearchConfig = SearchConfig()
    seq_len: int = 64
    pretrain: PretrainConfig = PretrainConfig()
    sft: SFTConfig = SFTConfig()
    value: ValueConfig = ValueConfig()
    value_refit: RefitConfig = RefitConfig()
    rl: RLConfig = RLConfig()
    eval: EvalConfig = EvalConfig()

    def __post_init__(self):
        if self.seed < 0:
            _fail("seed", self.seed, "the seed must be >= 0")
        if self.seq_len < 2:
            _fail("seq_len", self.seq_len, "a training sequence needs >= 2 tokens")
        if not self.value_head.hidden or any(h < 1 for h in self.value_head.hidden):
            _fail("value_head.hidden", self.value_head.hidden, "the head's MLP widths must be >= 1, e.g. (128,)")
        self._normalize_init()
        for name, v in self.model.items():  # ModelConfig converts with int(): name the field instead
            want = {"int": (int,), "float": (int, float)}.get(_MODEL_TYPES.get(name))
            if want and (isinstance(v, bool) or not isinstance(v, want)):
                _fail(f"model.{name}", v, f"must be a number ({_MODEL_TYPES[name]})")
        if self.search.tools and not get_task(self.task.name).tools:
            _fail("search.tools", self.search.tools, f"task {self.task.name} declares no tools (countdown, countdown3, "
                  "game24 and jsonl_math do); set search.tools=False")
        if self.pretrain.steps and not self.init_folder() and not get_task(self.task.name).capabilities.random_steps:
            _fail("pretrain.steps", self.pretrain.steps, f"task {self.task.name} has no random steps to pretrain "
                  "on; set pretrain.steps=0")
        if self.search.branch_entropy and {self.search.proposals, self.eval.proposals} != {"sample"}:
            _fail("search.branch_entropy", self.search.branch_entropy, "branching on uncertainty draws independent "
                  "samples: set search.proposals and eval.proposals to 'sample', or search.branch_entropy=0")
        cfg = self.model_config(self.tokenizer.vocab_size)  # head / width errors surface now
        if cfg.lora_rank and not self.init_folder():
            _fail("model.lora_rank", cfg.lora_rank, "LoRA adapts a pretrained model over its frozen weights: set "
                  "model.init=hf:<folder>, or model.lora_rank=0 to train every weight")
        if self.task.fewshot and self.task.chat_template == "none":
            _fail("task.fewshot", self.task.fewshot, "few-shot turns go through a chat template: set "
                  "task.chat_template=auto (or a .jinja file), or task.fewshot=0")
        if self.task.chat_template != "none" and not self.init_folder():
            _fail("task.chat_template", self.task.chat_template, "chat prompts need a pretrained model's tokenizer: "
                  "set model.init=hf:<folder>, or task.chat_template=none")
        if self.value.init:
            if not self.init_folder():
                _fail("value.init", self.value.init, "a value model from its own folder reads the policy's tokens: "
                      "set model.init=hf:<folder> too (the tokenizer comes from it), or value.init=''")
            vcfg = self.value_model_config(cfg.vocab_size)
            if vcfg.vocab_size < cfg.vocab_size:
                _fail("value.init", self.value.init, f"its vocabulary ({vcfg.vocab_size}) is smaller than the policy's "
                      f"({cfg.vocab_size}): the two models must share a tokenizer")
        context = self.search.prompt_len + self.search.max_new_tokens
        if context > cfg.max_seq_len or self.seq_len > cfg.max_seq_len:
            _fail("model.max_seq_len", cfg.max_seq_len,
                  f"search contexts need search.prompt_len + max_depth * step_len = {context} tokens and training "
                  f"seq_len={self.seq_len}; raise model.max_seq_len or shorten the search")

    def _normalize_init(self) -> None:
        """model.init present ("" in configs and runs from before it) and its folder absolute, so the recorded
        config.json finds it from any working directory; LoRA's fields present (off) where a config or an older
        run's config.json lacks them, so `--config.model.lora_rank=8` overrides one."""
        init = self.model.get("init", "")
        if not isinstance(init, str) or (init and not init.startswith("hf:")) or init == "hf:":
            _fail("model.init", init, "use '' (random weights) or 'hf:<folder>' (a local Hugging Face model folder "
                  "with config.json, *.safetensors and the tokenizer)")
        if init:
            init = f"hf:{Path(init[3:]).expanduser().resolve()}"
        lora = {k: getattr(_MODEL_DEFAULTS, k) for k in ("lora_rank", "lora_alpha", "lora_targets")}
        object.__setattr__(self, "model", {**lora, **self.model, "init": init})  # frozen: set once, here

    def init_folder(self) -> Path | None:
        """The pretrained Hugging Face folder of model.init ("hf:<folder>"), or None (random weights)."""
        init = self.model.get("init", "")
        return Path(init[3:]) if init else None

    # ------------------------------------------------------------------------------------- factories
    def model_config(self, vocab_size: int) -> ModelConfig:
        """The model: model.init's folder's config.json (its own vocabulary), else the model fields with the
        tokenizer's `vocab_size`."""
        folder = self.init_folder()
        if folder is not None:
            return self._folder_config(folder, "model.init", self.model["init"])
        fields = {k: v for k, v in self.model.items() if k != "init"}
        try:
            return ModelConfig.from_dict({**fields, "vocab_size": vocab_size})
        except (TypeError, ValueError) as e:
            raise ValueError(f"config model: {e}") from None

    def value_model_config(self, vocab_size: int) -> ModelConfig:
        """The value model's trunk: value.init's folder's config.json (with the model section's LoRA fields), else
        the policy's (`model_config`)."""
        if not self.value.init:
            return self.model_config(vocab_size)
        return self._folder_config(Path(self.value.init[3:]), "value.init", self.value.init)

    def _folder_config(self, folder: Path, field: str, value: str) -> ModelConfig:
        """A Hugging Face folder's config.json as the model, with the model section's dtypes and LoRA fields;
        a bad folder fails naming `field`."""
        fields = {k: v for k, v in self.model.items() if k != "init"}
        try:
            cfg = hf_config.config_from_hf(folder, dtype=fields.get("param_dtype", "float32"),
                                           compute_dtype=fields.get("dtype"))
        except (ValueError, KeyError) as e:
            _fail(field, value, f"{e}")
        try:
            return cfg.replace(**{k: v for k, v in fields.items() if k.startswith("lora_")})
        except (TypeError, ValueError) as e:
            raise ValueError(f"config model: {e}") from None

    def lm_spec(self, cfg: ModelConfig, tok, verifier=None, temperature: float | None = None, task=None) -> LMSpec:
        """The search environment: at test time (no verifier) eval.temperature and eval.proposals; RL's search
        (with a verifier) search.temperature and search.proposals; `temperature` overrides either. `task`
        runs its tools in the steps with search.tools (then it is needed)."""
        s, inference = self.search, verifier is None
        if s.tools and task is None:
            raise ValueError("RunConfig.lm_spec: search.tools needs the task whose tools the steps call (task=)")
        if temperature is None:
            temperature = self.eval.temperature if inference else s.temperature
        value = self.value_model_config(tok.vocab_size) if self.value.init else cfg
        return LMSpec(policy=cfg, value=value, head=self.value_head, step_id=tok.step_id, eos_id=tok.eos_id,
                      pad_id=tok.pad_id, num_slots=s.num_slots, step_len=s.step_len, max_depth=s.max_depth,
                      temperature=temperature, verifier=verifier, num_rollouts=s.num_rollouts,
                      rollout_alpha=s.rollout_alpha, proposals=self.proposals(inference), kv_cache=s.kv_cache,
                      compact=self.batch_ways() == 1, step_ends=getattr(tok, "step_end_ids", ()),
                      branch_entropy=s.branch_entropy,
                      tool=tools.runner(tok, task, s.step_len) if s.tools else None)

    def batch_ways(self) -> int:
        """How many ways the mesh splits a batch on this host's devices (data x fsdp; 0 if the mesh does not fit)."""
        try:
            data, fsdp, _ = self.mesh.resolve(jax.device_count())
        except ValueError:
            return 0
        return data * fsdp

    def proposals(self, inference: bool) -> str:
        return self.eval.proposals if inference else self.search.proposals

    def strategy_problem_count(self, num_eval: int) -> int:
        """How many of `num_eval` held-out problems the test-time strategies run on."""
        return min(self.eval.strategy_problems or num_eval, num_eval)


def check_devices(c: RunConfig, num_devices: int) -> None:
    """Every batch size divides over the mesh's batch ways (data x fsdp) on `num_devices` devices."""
    data, fsdp, _ = c.mesh.resolve(num_devices)  # a mesh that does not fit -> ValueError
    ways = data * fsdp
    fields = {"sft.batch_size": c.sft.batch_size, "value.batch_size": c.value.batch_size,
              "rl.batch_size": c.rl.batch_size, "rl.policy_update.batch_size": c.rl.policy_update.batch_size,
              "rl.value_update.batch_size": c.rl.value_update.batch_size, "eval.batch_size": c.eval.batch_size}
    if c.pretrain.steps and not c.init_folder():
        fields["pretrain.batch_size"] = c.pretrain.batch_size
    if c.value_refit.steps:
        fields["value_refit.batch_size"] = c.value_refit.batch_size
    for field, size in fields.items():
        if size % ways:
            _fail(field, size, f"must be a positive multiple of {ways}, the ways the mesh {c.mesh} splits a batch "
                  f"over {num_devices} devices")
    n_sft = c.rl.rehearsal_rows
    if n_sft % ways or (c.rl.policy_update.batch_size - n_sft) % ways:
        _fail("rl.sft_mix", c.rl.sft_mix, f"splits rl.policy_update.batch_size={c.rl.policy_update.batch_size} into {n_sft} "
              f"rehearsal + {c.rl.policy_update.batch_size - n_sft} replay rows; both must be multiples of {ways} (the "
              "mesh's batch ways)")


def stable_hash(name: str) -> int:
    """A hash of `name` that is the same in every process and Python run (unlike the salted `hash`)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def check_sizes(c: RunConfig, per_level: int = 1) -> None:
    """Sizes against the data, before any phase runs: `per_level` problems of each level from the task's
    generator must fit the vocabulary (tokenizer.vocab_size), the prompt length (search.prompt_len) and the
    training sequence length (seq_len). The tokenizer is trained later, so token counts are lower bounds
    (`min_tokens`): what this refuses cannot fit, and pad_examples still checks the exact lengths."""
    task = get_task(c.task.name)
    try:
        problems = [task.generate(task_io.problem_seed(c.seed, i), task_io.difficulty_for(level, i))
                    for level in task_io.parse_levels(c.task.levels) for i in range(per_level)]
    except NotImplementedError:  # a task read from a file: nothing to sample before the data phase
        return
    chars, prompt, total = set(), 0, 0
    for p in problems:
        text, steps = task.prompt(p), task.solve(p)
        if c.task.trace == "search":
            steps = task.search_trace(p, c.search.max_depth) or steps
        chars.update(text + "".join(steps))
        p_len = 2 + min_tokens(text)  # [BOS] prompt [STEP]
        prompt, total = max(prompt, p_len), max(total, p_len + sum(min_tokens(s) + 1 for s in steps))
    if c.tokenizer.vocab_size <= MIN_VOCAB + len(chars - {"\n"}):
        _fail("tokenizer.vocab_size", c.tokenizer.vocab_size, f"the task's text has {len(chars)} distinct characters, "
              f"each a piece besides {MIN_VOCAB} byte and special pieces; use more than {MIN_VOCAB + len(chars)}")
    if prompt > c.search.prompt_len:
        _fail("search.prompt_len", c.search.prompt_len, f"{c.task.name} prompts take at least {prompt} tokens; raise it")
    if total > c.seq_len:
        _fail("seq_len", c.seq_len, f"{c.task.name} examples (prompt and solution) take at least {total} tokens; "
              "raise it (and model.max_seq_len with it)")


def min_tokens(text: str) -> int:
    """A lower bound on the tokens of `text` under the run's sentencepiece tokenizer, which makes every digit a
    token (split_digits) and no piece spans a digit: the digits plus one per run of other characters."""
    return sum("0" <= ch <= "9" for ch in text) + len(re.findall(r"[^0-9]+", text))


# ------------------------------------------------------------------------------- ml_collections layer

# Field annotations are strings under `from __future__ import annotations`: their section classes by name.
_TYPES = {c.__name__: c for c in (TrainerConfig, TaskConfig, TokenizerConfig, SearchConfig, PretrainConfig,
                                   SFTConfig, ValueFitConfig, ValueConfig, RefitConfig, RLConfig, EvalConfig, MeshConfig,
                                   HeadConfig)}


def from_configdict(c: ml_collections.ConfigDict | Mapping) -> RunConfig:
    """The typed config of an ml_collections config (what `configs/*.py` return, with command-line overrides).
    Unknown fields, wrong types and out-of-range values raise one ValueError naming the field."""
    d = c.to_dict() if isinstance(c, ml_collections.ConfigDict) else dict(c)
    return config_utils.dataclass_from_mapping(RunConfig, d, _TYPES, plain=("model",))


def to_dict(c: RunConfig) -> dict:
    """Plain nested dict of a RunConfig (JSON-able: tuples become lists)."""
    return dataclasses.asdict(c)


def default_configdict() -> ml_collections.ConfigDict:
    """The defaults as an ml_collections ConfigDict: what `configs/base.py` returns and others extend."""
    d = to_dict(RunConfig())
    d["value_head"]["hidden"] = tuple(d["value_head"]["hidden"])
    return ml_collections.ConfigDict(d)
