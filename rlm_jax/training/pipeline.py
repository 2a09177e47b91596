"""The main job: data -> tokenizer -> pretraining -> SFT -> value model -> RL from search -> value refit on
exact step labels -> evaluation, from one config.

Every phase records its completion in `workdir/progress.json` and saves its result under `workdir`;
a re-run skips completed phases and resumes an interrupted one from its last checkpoint (training
loops checkpoint every `save_every` steps; RL checkpoints after every iteration).

Layout of `workdir`:
  data/{train,eval}.json       problems (x1's format), split by problem hash
  data/rl.json                 task.num_rl more training-split problems for RL only (no traces used)
  tokenizer/                   sentencepiece model
  pretrain/, sft/, value/, rl/ checkpoints and final params per phase (pretrain only with its steps > 0)
  value_refit/after_rl_N/      the value model refit on the policy after N RL iterations (value_refit.steps > 0)
  metrics.jsonl, events.*      metrics (JSONL + TensorBoard)
  report.md, scaling.png, eval.json

Devices: every phase runs on the mesh of `c.mesh` (`parallel.MeshConfig`: data x fsdp x tensor, -1 = all
remaining devices; default fsdp over every device): training steps are sharded (`parallel.sharded_trainer`,
batch over data x fsdp, params and optimizer state by the logical-axis rules) and every search batch is
split over the data axes (`distributed_search`). Multi-host: every process runs `run` with the same
config and draws the same global batches; only process 0 writes the data files, the tokenizer, progress,
metrics and the report (the others wait for it at a barrier, then read the same files); orbax writes
every process's shards. The workdir must be shared by all hosts.
"""
from __future__ import annotations

import functools
import json
import os
import socket
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from rlm_jax import checkpoint as ckpt_lib
from rlm_jax import distributed_search, evaluation, formatting, parallel
from rlm_jax import metrics as metrics_lib
from rlm_jax.models import heads, transformer
from rlm_jax.models.config import ModelConfig
from rlm_jax.search import operators as ops
from rlm_jax.tasks import get_task
from rlm_jax.tasks import io as task_io
from rlm_jax.tasks.base import split_of
from rlm_jax.tokenizer import SentencePieceTokenizer, load_tokenizer
from rlm_jax.training import loop, optim, pretrain, replay, rl, search_rl, sft, value
from rlm_jax.training.rollouts import make_verifier

# Run order: data, tokenizer, pretrain, sft, value, rl, (control), value_refit, eval. The later additions are
# listed last so that the other phases' random keys (`Run.phase_key`) did not change when they came.
PHASES = ("data", "tokenizer", "sft", "value", "rl", "eval", "pretrain", "value_refit")
# The report's label of the control policy (`Run.rl_control`).
CONTROL = "SFT + RL's update steps on SFT traces only (control)"


def validate_config(c: ml_collections.ConfigDict, workdir) -> None:
    """Fails fast, before any work, with a message naming the bad field and the fix."""
    get_task(c.task.name)  # unknown task -> ValueError listing the valid ones
    task_io.parse_levels(c.task.levels)
    evaluation.parse_strategies(c.eval.strategies)
    if c.eval.mcts_preset not in evaluation.PRESETS:
        raise ValueError(f"eval.mcts_preset={c.eval.mcts_preset!r} unknown; use one of {sorted(evaluation.PRESETS)}")
    if c.rl.preset not in evaluation.PRESETS:
        raise ValueError(f"rl.preset={c.rl.preset!r} unknown; use one of {sorted(evaluation.PRESETS)}")
    if c.rl.algorithm not in search_rl.ALGORITHMS:
        raise ValueError(f"rl.algorithm={c.rl.algorithm!r} unknown; use one of {search_rl.ALGORITHMS}")
    for field in ("sft.steps", "value.steps", "rl.simulations", "task.num_train", "task.num_eval"):
        section, name = field.split(".")
        if int(c[section][name]) < 1:
            raise ValueError(f"config {field}={c[section][name]} must be >= 1")
    mix = float(c.rl.get("sft_mix", 0.0))
    if not 0.0 <= mix < 1.0:
        raise ValueError(f"rl.sft_mix={mix} must be in [0, 1): the fraction of each RL update batch that "
                         "rehearses SFT traces")
    if pretrain_steps(c) < 0:
        raise ValueError(f"config pretrain.steps={pretrain_steps(c)} must be >= 0 (0: no pretraining)")
    if pretrain_steps(c) and not hasattr(get_task(c.task.name), "random_steps"):
        raise ValueError(f"pretrain.steps={pretrain_steps(c)}: task {c.task.name} has no random steps to pretrain "
                         "on; set pretrain.steps=0")
    if refit_steps(c) < 0:
        raise ValueError(f"config value_refit.steps={refit_steps(c)} must be >= 0 (0: keep RL's value model)")
    for field, loss in (("value.loss", c.value.get("loss", "mse")),
                        ("value_refit.loss", c.value_refit.get("loss", "mse") if refit_steps(c) else "mse")):
        if loss not in ("mse", "bce"):
            raise ValueError(f"config {field}={loss!r} unknown; use 'mse' (continuous targets) or 'bce' (binary "
                             "labels)")
    if traces_per_problem(c) < 1:
        raise ValueError(f"config task.traces_per_problem={traces_per_problem(c)} must be >= 1")
    if traces_per_problem(c) > 1 and not hasattr(get_task(c.task.name), "solutions"):
        raise ValueError(f"task.traces_per_problem={traces_per_problem(c)}: task {c.task.name} cannot enumerate "
                         "its solutions; use 1")
    if int(c.eval.get("strategy_problems", 0)) < 0:
        raise ValueError(f"config eval.strategy_problems={c.eval.strategy_problems} must be >= 0 (0: every "
                         "held-out problem)")
    if int(c.rl.iterations) < 0:
        raise ValueError(f"config rl.iterations={c.rl.iterations} must be >= 0")
    for field, value in (("search.proposals", proposals_setting(c, inference=False)),
                         ("eval.proposals", proposals_setting(c, inference=True))):
        if value not in ops.PROPOSALS:
            raise ValueError(f"config {field}={value!r} unknown; use 'sample' (independent samples) or "
                             "'distinct' (sampling without replacement)")
    data, fsdp, _ = mesh_config(c).resolve(jax.device_count())  # a mesh that does not fit -> ValueError
    ways = data * fsdp  # the batch is split over data x fsdp (parallel.DEFAULT_RULES)
    batch_fields = (("pretrain.batch_size",) if pretrain_steps(c) else ()) + (
        ("value_refit.batch_size",) if refit_steps(c) else ())
    for field in batch_fields + ("sft.batch_size", "value.batch_size", "rl.batch_size", "rl.batch_size_update",
                                 "eval.batch_size"):
        section, name = field.split(".")
        if int(c[section][name]) < 1 or int(c[section][name]) % ways:
            raise ValueError(f"config {field}={c[section][name]} must be a positive multiple of {ways}, the ways "
                             f"the mesh {mesh_config(c)} splits a batch over {jax.device_count()} devices")
    n_sft = rehearsal_rows(c.rl)
    if n_sft % ways or (c.rl.batch_size_update - n_sft) % ways:
        raise ValueError(f"rl.sft_mix={mix} splits rl.batch_size_update={c.rl.batch_size_update} into {n_sft} "
                         f"rehearsal + {c.rl.batch_size_update - n_sft} replay rows; both must be multiples of "
                         f"{ways} (the mesh's batch ways): pick sft_mix * batch_size_update accordingly")
    cfg = model_config(c, vocab_size=max(int(c.tokenizer.vocab_size), 1))  # head/width errors surface now
    context = c.search.prompt_len + c.search.max_depth * c.search.step_len
    if context > cfg.max_seq_len or c.seq_len > cfg.max_seq_len:
        raise ValueError(f"search contexts need search.prompt_len + max_depth * step_len = {context} tokens and "
                         f"training seq_len={c.seq_len}, but model.max_seq_len={cfg.max_seq_len}; raise "
                         "model.max_seq_len or shorten the search")
    wd = Path(workdir)
    try:
        wd.mkdir(parents=True, exist_ok=True)
        probe = wd / f".write_test-{socket.gethostname()}-{os.getpid()}"  # unique: every process probes
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"workdir {wd} is not writable ({e.strerror}); pass a --workdir you can write to") from e


def rehearsal_rows(rl_config) -> int:
    """Rows of SFT traces in each RL update batch (rl.sft_mix of rl.batch_size_update)."""
    return int(round(float(rl_config.get("sft_mix", 0.0)) * rl_config.batch_size_update))


def pretrain_steps(c) -> int:
    return int(c.pretrain.steps) if "pretrain" in c else 0


def refit_steps(c) -> int:
    return int(c.value_refit.steps) if "value_refit" in c else 0


def refit_folder(workdir, rl_iterations: int) -> Path:
    """Where the value refit after `rl_iterations` RL iterations lives: a refit belongs to the policy it
    was fit on, so more RL iterations (a rerun with a larger rl.iterations) get a new one."""
    return Path(workdir) / "value_refit" / f"after_rl_{rl_iterations}"


def refit_done(workdir, rl_iterations: int) -> bool:
    info = ckpt_lib.read_progress(workdir).get("value_refit", {})
    return bool(info.get("done")) and info.get("info", {}).get("rl_iterations") == rl_iterations


def traces_per_problem(c) -> int:
    return int(c.task.get("traces_per_problem", 1))


def strategy_problem_count(c, num_eval: int) -> int:
    """How many of `num_eval` held-out problems the test-time strategies run on (eval.strategy_problems, 0: all)."""
    return min(int(c.eval.get("strategy_problems", 0)) or num_eval, num_eval)


def iteration_problems(pool, it: int, n: int) -> list:
    """RL iteration `it`'s problems: the pool's next `n` (at most the whole pool), cycling through it."""
    return [pool[(it * n + i) % len(pool)] for i in range(min(n, len(pool)))]


def mesh_config(c) -> parallel.MeshConfig:
    """The run's mesh shape (`c.mesh`; a config without one: FSDP over every device)."""
    return parallel.MeshConfig(**(c.mesh.to_dict() if "mesh" in c else {}))


def abstract_like(cfg: ModelConfig, mesh, head: heads.HeadConfig | None = None):
    """Abstract params (a policy's, or a value model's with `head`) in their shardings on `mesh`: what a
    phase's saved params restore into."""
    return ckpt_lib.with_shardings(parallel.abstract_model_params(cfg, head),
                                   parallel.model_param_shardings(cfg, mesh, head_cfg=head))


def head_config(c) -> heads.HeadConfig:
    return heads.HeadConfig(kind=c.value_head.kind, hidden=tuple(c.value_head.hidden))


def model_config(c, vocab_size: int) -> ModelConfig:
    return ModelConfig.from_dict({**c.model.to_dict(), "vocab_size": vocab_size})


def proposals_setting(c, inference: bool) -> str:
    """How search nodes draw their proposals: `search.proposals` in RL's search, `eval.proposals` (if set)
    at test time."""
    train = c.search.get("proposals", "sample")
    return (c.eval.get("proposals") or train) if inference else train


def lm_spec(c, cfg: ModelConfig, tok, verifier=None, temperature=None) -> ops.LMSpec:
    """The search environment of a run. Sampling temperature: `temperature`, else for inference
    (no verifier) `eval.temperature` if the config sets one, else `search.temperature`. Proposals
    (`LMSpec.proposals`): for inference `eval.proposals` if set, else `search.proposals` (RL's search)."""
    s = c.search
    if temperature is None and verifier is None:
        temperature = c.eval.get("temperature")
    head = head_config(c)
    return ops.LMSpec(policy=cfg, value=cfg, head=head, step_id=tok.step_id, eos_id=tok.eos_id,
                      pad_id=tok.pad_id, num_slots=s.num_slots, step_len=s.step_len, max_depth=s.max_depth,
                      temperature=s.temperature if temperature is None else temperature, verifier=verifier,
                      num_rollouts=s.get("num_rollouts", 0), rollout_alpha=s.get("rollout_alpha", 0.5),
                      proposals=proposals_setting(c, inference=verifier is None))


class Run:
    """The state shared by the phases of one run (config, workdir, task, metrics)."""

    def __init__(self, c: ml_collections.ConfigDict, workdir):
        validate_config(c, workdir)
        self.c, self.workdir = c, Path(workdir)
        self.task = get_task(c.task.name)
        self.writer = metrics_lib.MetricsWriter(self.workdir)
        self.key = jax.random.key(c.seed)
        self.mesh = mesh_config(c).make()
        self.head = head_config(c)

    def like(self, cfg, head=None):
        return abstract_like(cfg, self.mesh, head)

    def log(self, msg: str) -> None:
        if jax.process_index() == 0:
            print(f"[rlm_jax] {msg}", flush=True)

    def done(self, phase: str) -> bool:
        return ckpt_lib.is_done(self.workdir, phase)

    def agreed_done(self, phase: str) -> bool:
        """`done(phase)` as process 0 sees it, on every process (a collective: all processes call it in the
        same order), so all take the same branch around the barrier of a phase only process 0 writes."""
        if jax.process_count() == 1:
            return self.done(phase)
        return bool(multihost_utils.broadcast_one_to_all(np.int32(self.done(phase))))

    def barrier(self, name: str) -> None:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(name)

    def mark(self, phase: str, info=None) -> None:
        ckpt_lib.mark_done(self.workdir, phase, info or {})

    @property
    def max_new_tokens(self) -> int:
        """Tokens a solution may take: search.max_depth steps of at most search.step_len tokens."""
        return self.c.search.max_depth * self.c.search.step_len

    def phase_key(self, phase: str):
        return jax.random.fold_in(self.key, PHASES.index(phase) if phase in PHASES else hash(phase) % 1000)

    # ------------------------------------------------------------------------------------------ data
    def data(self):
        d = self.workdir / "data"
        if not self.agreed_done("data"):
            # Every process generates (deterministic in the seed: no one waits long at the barrier);
            # process 0 writes, then all read the same files.
            train, ev, rl_pool = self._make_data()
            if jax.process_index() == 0:
                d.mkdir(parents=True, exist_ok=True)
                task_io.save_records(d / "train.json", train)
                task_io.save_records(d / "eval.json", ev)
                if rl_pool:
                    task_io.save_records(d / "rl.json", rl_pool)
                self.mark("data", {"train": len(train), "eval": len(ev), "rl": len(rl_pool)})
                self.log(f"data: {len(train)} train / {len(ev)} eval / {len(rl_pool)} RL-only problems "
                         f"({self.c.task.name})")
            self.barrier("rlm_jax:data")
        return task_io.load_records(d / "train.json"), task_io.load_records(d / "eval.json")

    def rl_only_problems(self) -> list:
        """`data/rl.json`: task.num_rl problems of the training split that SFT never saw, whose traces RL does
        not use (only the verifier scores them); [] where task.num_rl = 0."""
        path = self.workdir / "data" / "rl.json"
        return task_io.load_records(path) if path.exists() else []

    def rl_problems(self, train):
        """RL's problem pool: its own problems (`rl_only_problems`), else the SFT problems."""
        return self.rl_only_problems() or train

    def training_pool(self, train):
        """Every training problem: SFT's (`train`) and RL's own."""
        return train + self.rl_only_problems()

    def _make_data(self):
        c = self.c
        levels = task_io.parse_levels(c.task.levels)
        num_rl = int(c.task.get("num_rl", 0))
        # enough draws for every split (the hash split puts ~eval_fraction of them in eval), with a margin
        n = int(max((c.task.num_train + num_rl) / (1 - c.task.eval_fraction),
                    c.task.num_eval / c.task.eval_fraction) * 1.1) + 64
        problems = task_io.generate_dataset(self.task, levels, n, seed=c.seed,
                                            progress=jax.process_index() == 0)
        train_split = [p for p in problems if split_of(p, c.task.eval_fraction) == "train"]
        train, rl_pool = train_split[:c.task.num_train], train_split[c.task.num_train:c.task.num_train + num_rl]
        ev = [p for p in problems if split_of(p, c.task.eval_fraction) == "eval"][:c.task.num_eval]
        if len(ev) < c.task.num_eval or len(train) < c.task.num_train or len(rl_pool) < num_rl:
            raise RuntimeError(f"generated {len(train)} train / {len(rl_pool)} RL / {len(ev)} eval problems, fewer "
                               "than asked; lower task.num_train/num_rl/num_eval or raise eval_fraction")
        return train, ev, rl_pool

    # ------------------------------------------------------------------------------------- tokenizer
    def tokenizer(self, train):
        folder = self.workdir / "tokenizer"
        if not self.agreed_done("tokenizer"):
            if jax.process_index() == 0:
                corpus = [self.task.prompt(p) + "\n" + "\n".join(self.task.solve(p))
                          for p in train[:self.c.tokenizer.corpus_problems]]
                SentencePieceTokenizer.train(corpus, vocab_size=self.c.tokenizer.vocab_size, out=folder)
                self.mark("tokenizer")
            self.barrier("rlm_jax:tokenizer")
        return load_tokenizer(folder)

    # -------------------------------------------------------------------------------------- pretrain
    def pretrain(self, tok, cfg):
        """The policy's pretrained params (pretrain.steps > 0: `pretrain` module), else None."""
        if not pretrain_steps(self.c):
            return None
        pc, final = self.c.pretrain, self.workdir / "pretrain" / "final"
        if self.done("pretrain"):
            return loop.load_result(final, self.like(cfg))
        params = parallel.init_sharded_params(cfg, self.phase_key("pretrain"), self.mesh)
        arrays = pretrain.documents(self.task, tok, pc.documents, pc.steps_per_document, self.c.seed,
                                    self.c.seq_len)
        self.log(f"pretrain: {len(arrays['tokens'])} documents of {pc.steps_per_document} random "
                 f"{self.c.task.name} steps")
        params, last = sft.run_sft(cfg, params, arrays, pc, self.workdir / "pretrain" / "ckpt", self.writer,
                                   self.c.seed, self.mesh, name="pretrain")
        loop.save_result(final, params)
        self.mark("pretrain", last)
        return params

    # ------------------------------------------------------------------------------------------- sft
    def sft(self, tok, cfg, train, init=None):
        """SFT from `init` (the pretrained params) or, without it, from random params."""
        final = self.workdir / "sft" / "final"
        if self.done("sft"):
            return loop.load_result(final, self.like(cfg))
        params = init if init is not None else parallel.init_sharded_params(cfg, self.phase_key("sft"), self.mesh)
        arrays = self.trace_arrays(tok, train)
        self.log(f"sft: {transformer.count_params(params) / 1e6:.2f}M params, {len(arrays['tokens'])} traces "
                 f"of {len(train)} problems")
        params, last = sft.run_sft(cfg, params, arrays, self.c.sft, self.workdir / "sft" / "ckpt", self.writer,
                                   self.c.seed, self.mesh)
        loop.save_result(final, params)
        self.mark("sft", last)
        return params

    def trace_arrays(self, tok, problems):
        """The padded SFT examples of `problems`' reference traces, task.traces_per_problem of each where the
        task has that many (SFT's data, RL's rehearsal)."""
        rows, traces = sft.reference_traces(self.task, problems, traces_per_problem(self.c))
        return formatting.pad_examples(sft.trace_examples(tok, self.task, rows, traces), tok.pad_id,
                                       self.c.seq_len)

    # ----------------------------------------------------------------------------------------- value
    def value(self, tok, cfg, policy, train, ev):
        c = self.c.value
        head = self.head
        final = self.workdir / "value" / "final"
        if self.done("value"):
            return loop.load_result(final, self.like(cfg, head))
        k_states, k_targets, k_eval, k_init = jax.random.split(self.phase_key("value"), 4)
        max_new = self.max_new_tokens
        states = value.collect_states(cfg, policy, tok, self.task, train[:c.problems], k_states,
                                      c.samples_per_problem, max_new)
        targets = value.state_targets(cfg, policy, tok, self.task, states, k_targets, c.rollouts, max_new, c.gamma)
        arrays = value.state_arrays(tok, self.task, states, self.c.seq_len)
        self.log(f"value: {len(states)} states, mean target {targets.mean():+.3f}")
        vparams = heads.init_value_params(cfg, head, k_init, trunk=policy)
        vparams, last = value.run_value_training(cfg, head, vparams, arrays, targets, c,
                                                 self.workdir / "value" / "ckpt", self.writer, self.c.seed,
                                                 self.mesh)
        acc = self.held_out_value_check("value", cfg, vparams, self.held_out_states(cfg, policy, tok, ev, k_eval))
        loop.save_result(final, vparams)
        self.mark("value", {**last, **acc})
        return vparams

    def held_out_states(self, cfg, policy, tok, ev, key) -> dict:
        """States of `policy`'s samples of evaluation problems (2 per problem) with their exact labels: what
        `held_out_value_check` scores a value model on."""
        states = value.collect_states(cfg, policy, tok, self.task, ev, key, 2, self.max_new_tokens)
        return {"arrays": value.state_arrays(tok, self.task, states, self.c.seq_len),
                "labels": value.exact_labels(self.task, states),
                "finished": np.asarray([st[2] for st in states])}

    def held_out_value_check(self, name, cfg, vparams, held_out) -> dict:
        """The value model against the exact labels of `held_out` (`held_out_states`): sign accuracy, the best
        constant's, and the finished-state AUC; logged as `{name}_eval`."""
        pred = value.predict(cfg, self.head, vparams, held_out["arrays"])
        labels = held_out["labels"]
        acc = {**value.label_accuracy(pred, labels),
               "finished_auc": value.finished_auc(pred, labels, held_out["finished"])}
        self.writer.write(0, acc, prefix=f"{name}_eval")
        self.log(f"{name}: held-out label accuracy {acc['value_accuracy']:.3f} "
                 f"(constant predictor {acc['constant_accuracy']:.3f}, {acc['labelled_states']} states); "
                 f"AUC on finished states {acc['finished_auc']:.3f}")
        return acc

    # ----------------------------------------------------------------------------------- value refit
    def value_refit(self, tok, cfg, policy, vparams, pool, ev):
        """The final value model (value_refit.steps > 0; else `vparams` unchanged): `vparams` refit on the
        task's exact labels (`Task.can_succeed`: can this partial solution still be completed; the verifier
        for finished ones) of the final policy's samples on training problems, as a PRM is fit to step
        labels. Rollout and backed-up values judge the policy's own steps only as well as the policy
        completes them; these labels judge the steps themselves."""
        c = self.c.get("value_refit")
        if c is None or not int(c.steps):
            return vparams
        rl_iterations = int(self.c.rl.iterations)
        folder = refit_folder(self.workdir, rl_iterations)
        if refit_done(self.workdir, rl_iterations):
            return loop.load_result(folder / "final", self.like(cfg, self.head))
        k_states, k_eval = jax.random.split(self.phase_key("value_refit"))
        states = value.collect_states(cfg, policy, tok, self.task, pool[:c.problems], k_states,
                                      c.samples_per_problem, self.max_new_tokens, c.temperature)
        labels = value.exact_labels(self.task, states)
        known = labels != 0
        if not known.any():
            raise ValueError(f"task {self.c.task.name} gave no exact label for any state; set value_refit.steps=0")
        states, labels = [st for st, k in zip(states, known) if k], labels[known]
        self.log(f"value_refit: {len(states)} labelled states of {min(c.problems, len(pool))} training problems "
                 f"({sum(st[2] for st in states)} finished), mean label {labels.mean():+.3f}")
        held_out = self.held_out_states(cfg, policy, tok, ev, k_eval)
        before = self.held_out_value_check("value_before_refit", cfg, vparams, held_out)
        vparams, last = value.run_value_training(cfg, self.head, vparams,
                                                 value.state_arrays(tok, self.task, states, self.c.seq_len), labels,
                                                 c, folder / "ckpt", self.writer, self.c.seed, self.mesh,
                                                 name="value_refit")
        acc = self.held_out_value_check("value_refit", cfg, vparams, held_out)
        loop.save_result(folder / "final", vparams)
        self.mark("value_refit", {**last, **acc, "auc_before": before["finished_auc"],
                                  "accuracy_before": before["value_accuracy"], "rl_iterations": rl_iterations})
        return vparams

    # -------------------------------------------------------------------------------------------- rl
    def rl(self, tok, cfg, policy, vparams, train, sft_problems=None):
        """`train`: the problem pool (`rl_problems`); iteration i searches its next problems_per_iteration.
        `sft_problems`: the SFT phase's problems, whose reference traces rl.sft_mix rehearses."""
        c = self.c.rl
        rehearsal = self.trace_arrays(tok, sft_problems) if rehearsal_rows(c) and sft_problems else None
        ref = policy
        # Replay buffers (FIFO, kept across iterations): policy samples of the chosen algorithm, and
        # (state, q) rows for the value model.
        state = {"policy": policy, "value": vparams,
                 "policy_replay": replay.init(c.replay_capacity, self.c.seq_len, search_rl.replay_fields(c.algorithm)),
                 "value_replay": replay.init(c.replay_capacity, self.c.seq_len, search_rl.VALUE_FIELDS)}
        models, buffers = ("policy", "value"), ("policy_replay", "value_replay")
        for it in range(c.iterations):
            phase = f"rl_{it}"
            final, kept = self.workdir / "rl" / f"iter_{it}", self.workdir / "rl" / f"replay_{it}"
            if self.done(phase):
                saved = loop.load_result(kept, self._global({k: state[k] for k in buffers}))
                state = {**loop.load_result(final, {"policy": self.like(cfg), "value": self.like(cfg, self.head)}),
                         **jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), saved)}  # host-local again
                continue
            state, info = self._rl_iteration(it, tok, cfg, state, ref, train, rehearsal)
            loop.save_result(final, {k: state[k] for k in models})  # what evaluate.py loads
            loop.save_result(kept, self._global({k: state[k] for k in buffers}))
            self.mark(phase, info)
        self.mark("rl", {"iterations": c.iterations})
        return state["policy"], state["value"]

    def rl_control(self, tok, cfg, sft_policy, sft_problems):
        """The ablation that tells what RL's search data added: the SFT policy trained with RL's exact
        updates (per iteration: as many steps, the same optimizer and schedule, batches of the same size)
        on SFT reference traces only. None when RL rehearses nothing (the control is then plain SFT)."""
        c = self.c.rl
        final = self.workdir / "rl" / "control"
        progress = ckpt_lib.read_progress(self.workdir)
        done = progress.get("rl_control", {})
        if done.get("done") and done.get("info", {}).get("iterations") == c.iterations:
            return loop.load_result(final, self.like(cfg))
        n_sft = rehearsal_rows(c)
        if not n_sft or not c.iterations:
            return None
        traces = self.trace_arrays(tok, sft_problems)
        policy = sft_policy
        for it in range(c.iterations):
            n_steps = int(progress.get(f"rl_{it}", {}).get("info", {}).get("policy_updates", 0))
            if not n_steps:
                continue
            tx = optim.make_optimizer(c.lr, n_steps, int(c.get("warmup_steps", 0)), 0.0, 1.0)
            more, rehearsed = (sft.batch_fn(traces, n, self.c.seed + 1000 + it)
                               for n in (c.batch_size_update - n_sft, n_sft))
            step_fn, policy, opt_state = parallel.sharded_trainer(cfg, self.mesh, tx, policy,
                                                                  loss_fn=rl.with_rehearsal(cfg, None))
            policy, _, _ = loop.train(f"rl_control_{it}", step_fn, policy, opt_state,
                                      lambda step: {"rl": more(step), "sft": rehearsed(step)}, n_steps,
                                      self.workdir / "rl" / f"ckpt_control_{it}", self.writer,
                                      save_every=c.save_every, log_every=c.log_every)
        loop.save_result(final, policy)
        self.mark("rl_control", {"iterations": c.iterations})
        return policy

    def _global(self, tree):
        """A host-local pytree (the replay buffers: every process holds the same) as arrays replicated over
        the mesh, which orbax can save from several processes."""
        return distributed_search.replicate(tree, self.mesh)

    def _rl_iteration(self, it, tok, cfg, state, ref, train, rehearsal=None):
        c = self.c.rl
        policy, vparams = state["policy"], state["value"]
        key = jax.random.fold_in(self.phase_key("rl"), it)
        problems = iteration_problems(train, it, c.problems_per_iteration)
        prompts = [formatting.prompt_ids(tok, self.task, p) for p in problems]
        spec = lm_spec(self.c, cfg, tok, verifier=make_verifier(tok, self.task, problems))
        preset = evaluation.PRESETS[c.preset](num_parallel=self.c.search.get("num_parallel", 1))
        samples, solutions = [], []
        bar = metrics_lib.progress(len(problems), desc=f"rl {it}: search")
        for s0, real, out in search_rl.run_search(spec, policy, vparams, prompts, tok.pad_id, key, c.simulations,
                                                  preset, c.batch_size, self.c.search.prompt_len, self.mesh):
            smp, sol = search_rl.extract_samples(jax.tree.map(lambda x: x[:real], out), prompts[s0:s0 + real], s0)
            samples += smp
            solutions += sol
            bar.update(real)
        bar.close()
        solved_rate = len({tuple(p) for p, _ in solutions}) / max(1, len(problems))
        info = {"samples": len(samples), "solutions": len(solutions), "search_solved": solved_rate}
        self.log(f"rl {it}: search solved {solved_rate:.3f} of {len(problems)} problems, "
                 f"{len(samples)} samples, {len(solutions)} verified solutions")
        arrays = search_rl.policy_arrays(cfg, c.algorithm, samples, solutions, policy, ref, tok.pad_id,
                                         self.c.seq_len, gamma=preset.discount or 1.0)
        varrays = search_rl.value_arrays(samples, tok.pad_id, self.c.seq_len)
        state = dict(state)
        if arrays is not None:
            state["policy_replay"] = replay.add(state["policy_replay"], arrays)
        if varrays is not None:
            state["value_replay"] = replay.add(state["value_replay"], varrays)
        # Policy update: a few epochs over the buffer, at most policy_steps (many passes over a handful
        # of solutions collapse the policy onto them).
        rows = int(state["policy_replay"].size)
        if rows:
            # SFT rehearsal: rl.sft_mix of every update batch are reference traces of the SFT problems (their
            # next-token loss is added), which keeps the policy from collapsing onto the search's few paths.
            n_sft = rehearsal_rows(c) if rehearsal is not None else 0
            n_new = c.batch_size_update - n_sft
            n_steps = int(min(c.policy_steps, max(1, np.ceil(c.policy_epochs * rows / n_new))))
            # Warmup: a fresh Adam's first updates move every weight by ~lr, whatever the gradient's size.
            tx = optim.make_optimizer(c.lr, n_steps, int(c.get("warmup_steps", 0)), 0.0, 1.0)
            if c.algorithm == "sft":
                loss_fn = None
            elif c.algorithm == "dpo":
                loss_fn = functools.partial(rl.dpo_loss, cfg, beta=c.dpo_beta)
            else:  # ppo and grpo (grpo advantages were computed over each iteration's groups)
                loss_fn = functools.partial(rl.ppo_loss, cfg, clip_eps=c.clip_eps, kl_coef=c.kl_coef,
                                            entropy_coef=c.entropy_coef)
            batches = search_rl.replay_sampler(state["policy_replay"], n_new, self.c.seed + it)
            if n_sft:
                loss_fn = rl.with_rehearsal(cfg, loss_fn)
                replayed, traces = batches, sft.batch_fn(rehearsal, n_sft, self.c.seed + it)
                batches = lambda step: {"rl": replayed(step), "sft": traces(step)}
            step_fn, policy, opt_state = parallel.sharded_trainer(cfg, self.mesh, tx, policy, loss_fn=loss_fn)
            policy, _, last = loop.train(f"rl_policy_{it}", step_fn, policy, opt_state, batches,
                                         n_steps, self.workdir / "rl" / f"ckpt_policy_{it}", self.writer,
                                         save_every=c.save_every, log_every=c.log_every)
            info.update({f"policy_{k}": v for k, v in last.items()})
            info["policy_updates"] = n_steps
        # Value update: MSE on the backed-up values in the buffer.
        if int(state["value_replay"].size):
            tx = optim.make_optimizer(c.value_lr, c.value_steps, 0, 0.0, 1.0)
            step_fn, vparams, opt_state = parallel.sharded_trainer(
                cfg, self.mesh, tx, vparams, loss_fn=functools.partial(rl.value_regression_loss, cfg, self.head),
                head_cfg=self.head)
            vparams, _, last = loop.train(f"rl_value_{it}", step_fn, vparams, opt_state,
                                          search_rl.replay_sampler(state["value_replay"], c.batch_size_update,
                                                                   self.c.seed + it),
                                          c.value_steps, self.workdir / "rl" / f"ckpt_value_{it}", self.writer,
                                          save_every=c.save_every, log_every=c.log_every)
            info.update({f"value_{k}": v for k, v in last.items()})
        info["replay_rows"], info["value_rows"] = rows, int(state["value_replay"].size)
        self.writer.write(it, info, prefix="rl_iteration")
        return {**state, "policy": policy, "value": vparams}, info

    # ------------------------------------------------------------------------------------------ eval
    def evaluate(self, tok, cfg, ev, checkpoints: dict):
        """Greedy accuracy of each checkpoint on every held-out problem, with paired differences (each later
        checkpoint against SFT, RL against the control); then every strategy with the final models on the
        first eval.strategy_problems (0: all) -- the strategies cost far more than greedy."""
        c = self.c.eval
        spec = lm_spec(self.c, cfg, tok)
        greedy, solved = {}, {}
        for label, (pol, val) in checkpoints.items():
            r = evaluation.evaluate(spec, pol, val, tok, self.task, ev, [("greedy", 1)], self.phase_key("eval"),
                                    c.batch_size, self.c.search.prompt_len, mesh=self.mesh)[0]
            greedy[label], solved[label] = r.accuracy, r.solved
            self.log(f"eval: greedy accuracy after {label}: {r.accuracy:.3f}")
        pairs = [(label, "SFT") for label in solved if label != "SFT"]
        pairs += [("RL", CONTROL)] if {"RL", CONTROL} <= solved.keys() else []
        differences = [(a, b, *evaluation.paired_difference(solved[a], solved[b])) for a, b in pairs
                       if len(ev) > 1]
        pol, val = list(checkpoints.values())[-1]
        n = strategy_problem_count(self.c, len(ev))
        results = evaluation.evaluate(
            spec, pol, val, tok, self.task, ev[:n], evaluation.parse_strategies(c.strategies),
            self.phase_key("eval"), c.batch_size, self.c.search.prompt_len, c.mcts_preset,
            num_parallel=self.c.search.get("num_parallel", 1),
            progress=lambda r: self.log(f"eval: {r.strategy}:{r.budget} accuracy {r.accuracy:.3f}, "
                                        f"{r.tokens_per_problem:.0f} tokens/problem, {r.seconds:.1f}s"),
            mesh=self.mesh)
        # What the final policy's samples offer any selection rule, at the largest sampling budget.
        budgets = [b for name, b in evaluation.parse_strategies(c.strategies)
                   if name in ("best_of_n", "self_consistency")]
        ceiling = evaluation.selection_ceiling(
            spec, pol, val, tok, self.task, ev[:n], max(budgets), jax.random.fold_in(self.phase_key("eval"), 1),
            c.batch_size, self.c.search.prompt_len, mesh=self.mesh) if budgets else None
        if ceiling is not None:
            self.log(f"eval: {ceiling}")
        return greedy, differences, results, ceiling

    def write_report(self, greedy, differences, results, value_info, ceiling=None, refit_info=None):
        if jax.process_index() != 0:  # one report per run, not one per host
            return
        wd = self.workdir
        evaluation.scaling_plot(results, wd / "scaling.png")
        versus = evaluation.equal_token_comparisons(results)
        (wd / "eval.json").write_text(json.dumps(
            {"greedy_by_phase": greedy, "paired_differences": [dict(zip(("a", "b", "mean", "se"), d))
                                                               for d in differences],
             "mcts_vs_best_of_n": [{"mcts": r.budget, "mcts_tokens": r.tokens_per_problem, "best_of_n": b.budget,
                                    "best_of_n_tokens": b.tokens_per_problem, "mean": m, "se": se}
                                   for r, b, m, se in versus],
             "selection_ceiling": ceiling and ceiling.__dict__, "results": [r.__dict__ for r in results]}, indent=1))
        c = self.c
        lines = [f"# rlm_jax report: {c.task.name}", "",
                 f"Held-out problems: {c.task.num_eval} (strategies: the first "
                 f"{strategy_problem_count(c, c.task.num_eval)}); "
                 f"model: d_model={c.model.d_model}, layers={c.model.num_layers}; "
                 f"pretraining: {pretrain_steps(c)} steps on random task steps; "
                 f"search: K={c.search.num_slots}, L={c.search.step_len}, D={c.search.max_depth}; "
                 f"RL: {c.rl.iterations} iterations of {c.rl.algorithm} "
                 f"({c.rl.simulations} MCTS simulations, {c.rl.preset}).", "",
                 "## Greedy accuracy by phase", "", "| after | greedy accuracy |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in greedy.items()]
        if differences:
            lines += ["", "Paired differences in greedy accuracy on the same problems (+- one standard error):", "",
                      "| | difference |", "|---|---:|"]
            lines += [f"| {a} - {b} | {m:+.3f} +- {se:.3f} |" for a, b, m, se in differences]
        if value_info:
            lines += ["", "## Value model (after the value phase, before RL)", "",
                      f"Held-out accuracy of sign(V) against exact solvability labels: "
                      f"{value_info.get('value_accuracy', float('nan')):.3f} (best constant predictor: "
                      f"{value_info.get('constant_accuracy', float('nan')):.3f}, "
                      f"{value_info.get('labelled_states', 0)} states). How well it ranks finished solutions "
                      f"(solved above failed; 0.5 = chance; the final value model's is under Selection ceiling): AUC "
                      f"{value_info.get('finished_auc', float('nan')):.3f}."]
        if refit_info:
            lines += ["", "## Value model refit on exact step labels (the final value model)", "",
                      f"Refit after RL on the task's exact labels of the final policy's samples "
                      f"({self.c.value_refit.problems} training problems). Held-out accuracy of sign(V): "
                      f"{refit_info['accuracy_before']:.3f} before, {refit_info['value_accuracy']:.3f} after "
                      f"(best constant predictor: {refit_info['constant_accuracy']:.3f}); AUC on finished states: "
                      f"{refit_info['auc_before']:.3f} before, {refit_info['finished_auc']:.3f} after."]
        if ceiling is not None:
            temperature = c.eval.get("temperature", c.search.temperature)
            lines += ["", "## Selection ceiling (final models)", "",
                      f"{ceiling.samples} samples per problem at T = {temperature} hold "
                      f"{ceiling.distinct_finished:.2f} distinct finished solutions per problem. A perfect verifier's "
                      f"pick among them solves {ceiling.pass_at_n:.3f} of the problems: the ceiling of best-of-N, "
                      f"self-consistency and any other choice among these samples. The value model's pick solves "
                      f"{ceiling.value_pick:.3f}; it ranks solved above failed finished samples with AUC "
                      f"{ceiling.value_auc:.3f}."]
        lines += ["", "## Strategies (final models)", "",
                  "Seconds include compilation. Tokens: all tokens sampled, proposals not chosen included.", "",
                  evaluation.markdown_table(results), ""]
        if versus:
            lines += ["## MCTS against best-of-N at equal tokens", "", evaluation.comparison_table(versus), ""]
        lines += ["## Accuracy per level", "", evaluation.per_level_table(results), "", "![scaling](scaling.png)", ""]
        (wd / "report.md").write_text("\n".join(lines))


def load_trained_models(c: ml_collections.ConfigDict, workdir, cfg: ModelConfig, mesh=None):
    """(policy, value or None, label) of a run's most advanced finished phase (the last RL iteration, else
    SFT and the value model; the value model refit on that policy where value_refit ran), in their
    shardings on `mesh` (default: the config's mesh).
    Raises FileNotFoundError, saying what to run, if no policy has been trained yet."""
    workdir = Path(workdir)
    mesh = mesh_config(c).make() if mesh is None else mesh
    done = {k for k, v in ckpt_lib.read_progress(workdir).items() if v.get("done")}
    policy_like, value_like = abstract_like(cfg, mesh), abstract_like(cfg, mesh, head_config(c))
    iters = sorted(int(k[3:]) for k in done if k.startswith("rl_") and k[3:].isdigit())
    rl_iterations = iters[-1] + 1 if iters else 0
    refit = (loop.load_result(refit_folder(workdir, rl_iterations) / "final", value_like), " + value refit") \
        if refit_done(workdir, rl_iterations) else None
    if iters:
        s = loop.load_result(workdir / "rl" / f"iter_{iters[-1]}", {"policy": policy_like, "value": value_like})
        value, note = refit or (s["value"], "")
        return s["policy"], value, f"RL iteration {iters[-1]}{note}"
    if "sft" not in done:
        raise FileNotFoundError(f"{workdir}: no trained policy yet (phases done: {', '.join(sorted(done)) or 'none'}); "
                                "run experiments/train.py until SFT finishes")
    policy = loop.load_result(workdir / "sft" / "final", policy_like)
    if refit:
        return policy, refit[0], "SFT policy + value model" + refit[1]
    if "value" in done:
        return policy, loop.load_result(workdir / "value" / "final", value_like), "SFT policy + value model"
    return policy, None, "SFT policy (no value model yet)"


def run(c: ml_collections.ConfigDict, workdir) -> Path:
    """Runs (or resumes) every phase; returns the path of report.md."""
    r = Run(c, workdir)
    train, ev = r.data()
    tok = r.tokenizer(train)
    cfg = model_config(c, tok.vocab_size)
    policy = r.sft(tok, cfg, train, init=None if r.done("sft") else r.pretrain(tok, cfg))
    vparams = r.value(tok, cfg, policy, train, ev)
    sft_policy = policy
    policy, vparams = r.rl(tok, cfg, policy, vparams, r.rl_problems(train), sft_problems=train)
    checkpoints = {"SFT": (sft_policy, vparams)}
    if c.rl.get("control", False):
        control = r.rl_control(tok, cfg, sft_policy, train)
        if control is not None:
            checkpoints[CONTROL] = (control, vparams)
    vparams = r.value_refit(tok, cfg, policy, vparams, r.training_pool(train), ev)
    if c.rl.iterations:
        checkpoints["RL"] = (policy, vparams)
    else:  # the strategies run with the last checkpoint's models
        checkpoints["SFT"] = (sft_policy, vparams)
    greedy, differences, results, ceiling = r.evaluate(tok, cfg, ev, checkpoints)
    progress = ckpt_lib.read_progress(r.workdir)
    r.write_report(greedy, differences, results, progress.get("value", {}).get("info", {}), ceiling,
                   progress.get("value_refit", {}).get("info"))
    r.mark("eval", {"greedy": greedy})
    r.writer.close()
    r.log(f"report: {r.workdir / 'report.md'}")
    return r.workdir / "report.md"
