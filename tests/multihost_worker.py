"""One process of the multi-host test (tests/test_multihost.py); also importable for its constants.

    python tests/multihost_worker.py run --out=DIR --ckpt=DIR --workdir=DIR \
        [--coordinator=localhost:PORT --num_processes=2 --process_id=I]
    python tests/multihost_worker.py restore --out=DIR --restore_from=DIR [--mesh=1,2,2] [...]

Devices come from the environment (XLA_FLAGS=--xla_force_host_platform_device_count=N, JAX_PLATFORMS=cpu);
with --num_processes=2 the processes join one JAX job through `multihost.initialize_distributed` and jax's
CPU collectives (gloo, the default of `jax_cpu_collectives_implementation` in jax 0.10).

`run`: on a mesh over every device of every process (fsdp = all devices, so the weights are split across
the processes), each process feeds its own rows of the global batch and
  1. takes TRAIN_STEPS sharded adamw steps (`training.trainer.jit_train_step`);
  2. runs a data-parallel MCTS (`rlm_jax.parallel.shard_search_inputs`) in training mode: sampled proposals and
     value-model evaluations on device, finished solutions scored by a host-callback verifier (the
     other strategies, sharded, are covered by tests/test_data_parallel_search.py);
  3. saves params, optimizer state and a PRNG key as a sharded orbax checkpoint (`--ckpt`);
  4. writes metrics and progress into `--workdir` from every process, runs the pipeline's data + tokenizer
     phases there (`phases.run_phases`) and the evaluation phase's body with stub evaluations, which writes
     the report (primary-only writers must make all of that safe).
`restore`: restores `--restore_from` into this job's mesh (optionally another layout, `--mesh`).
Process 0 writes `results.npz` (global values, gathered from every process); every process writes
`proc<i>.json` (what it saw and did locally).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from rlm_jax import multihost
from rlm_jax import parallel as par

# ---------------------------------------------------------------------------------------- constants
# Shared with the test, which recomputes the training steps unsharded as an independent reference.

TRAIN_STEPS, B, T = 2, 8, 16
PLEN = 8
PAD, STEP, EOS = 0, 1, 2


def train_cfg():
    from rlm_jax.models.config import ModelConfig
    # embed 32: splits 4 ways over fsdp (one layer's weights are shared by both processes' devices).
    return ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                       max_seq_len=32)


def optimizer():
    import optax
    # eps=1e-3: see tests/test_parallel.py (adam's first step is ill-conditioned for tiny gradients).
    return optax.adamw(learning_rate=1e-2, eps=1e-3, weight_decay=0.1)


def train_batch(step: int) -> dict[str, np.ndarray]:
    """The global batch of a step: random tokens, left-padded rows of different lengths."""
    rng = np.random.default_rng(100 + step)
    tokens = rng.integers(0, 64, (B, T)).astype(np.int32)
    lengths = rng.integers(1, T + 1, B)
    mask = np.arange(T)[None, :] >= (T - lengths)[:, None]
    return {"tokens": tokens, "mask": mask, "loss_mask": mask & (rng.random((B, T)) < 0.7)}


def search_setup():
    """(spec, policy params, value params, prompt [B, P], prompt_mask) as host values."""
    import jax
    from rlm_jax import decoding
    from rlm_jax.models import heads, transformer
    from rlm_jax.models.config import ModelConfig
    from rlm_jax.search.base import LMSpec
    cfg = ModelConfig(vocab_size=10, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=32,
                      max_seq_len=64, init_std=0.5)
    head = heads.HeadConfig(kind="value", hidden=(8,))
    spec = LMSpec(policy=cfg, value=cfg, head=head, step_id=STEP, eos_id=EOS, pad_id=PAD, num_slots=3,
                  step_len=6, max_depth=3)
    policy = jax.device_get(transformer.init_params(cfg, jax.random.key(1)))
    value = jax.device_get(heads.init_value_params(cfg, head, jax.random.key(2)))
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 10, size=rng.integers(1, PLEN))) for _ in range(B)]
    t, m = decoding.pad_prompts(prompts, PAD, length=PLEN)
    return spec, policy, value, np.asarray(t), np.asarray(m)


def verifier_score(problem_index, steps, mask):
    """A deterministic stand-in verifier: +1 / -1 from the problem index and the solution's tokens."""
    total = np.sum(np.where(mask, steps, 0), axis=(1, 2))
    return np.where((problem_index + total) % 3 == 0, 1.0, -1.0).astype(np.float32)


def flatten(tree, prefix: str) -> dict[str, np.ndarray]:
    import jax
    return {prefix + jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tiny_pipeline_config():
    from rlm_jax.config_utils import load_config
    c = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
    c.task.num_train, c.task.num_eval, c.tokenizer.corpus_problems = 150, 8, 150
    return c


# --------------------------------------------------------------------------------------------- roles

def run(args, info: dict, results: dict) -> None:
    import jax
    from rlm_jax import checkpoint as ckpt_lib
    from rlm_jax import metrics as metrics_lib
    from rlm_jax import progress
    from rlm_jax.search import lm, mcts
    from rlm_jax.training import trainer

    mesh = par.make_mesh(data=1, fsdp=-1, tensor=1)
    rows = par.process_batch_slice(B, mesh)
    info["rows"] = [rows.start, rows.stop]

    # 1. Sharded train steps; each process passes only its rows.
    t0 = time.time()
    cfg, tx = train_cfg(), optimizer()
    params = par.init_sharded_params(cfg, jax.random.key(0), mesh)
    opt_state = trainer.init_opt_state(tx, params, trainer.opt_state_shardings(tx, cfg, mesh))
    step = trainer.jit_train_step(cfg, mesh, tx)
    for i in range(TRAIN_STEPS):
        local = {k: v[rows] for k, v in train_batch(i).items()}
        params, opt_state, metrics = step(params, opt_state, par.shard_batch(local, mesh))
        results.update({f"train/metrics/{i}/{k}": np.asarray(float(v)) for k, v in metrics.items()})
    q = params["blocks"]["attn"]["q_proj"]
    info["q_proj_local_shards"] = [list(s.data.shape) for s in q.addressable_shards]
    info["q_proj_global_shape"] = list(q.shape)

    # 2. Data-parallel searches.
    t_search = time.time()
    calls = []

    def verifier(problem_index, steps_, mask):
        calls.append(int(problem_index.shape[0]))
        return verifier_score(problem_index, steps_, mask)

    spec, policy, value, prompt, prompt_mask = search_setup()
    inputs = par.shard_search_inputs(
        lm.search_inputs(policy, value, prompt[rows], prompt_mask[rows], problem_index=np.arange(B)[rows]), mesh)
    key = par.replicate(jax.random.key(7), mesh)
    # MCTS in training mode: the verifier is a host callback, value-model evaluations run on device.
    with par.search_mesh(mesh):  # as evaluation / RL run it: pin_batch keeps the rows split
        outs = {"mcts": lm.lm_mcts_jit(dataclasses.replace(spec, verifier=verifier), inputs, key, 3,
                                       mcts.muzero(num_parallel=2))}
    jax.block_until_ready(outs)
    info["verifier_calls"] = calls
    info["seconds_train"], info["seconds_search"] = t_search - t0, time.time() - t_search
    host = par.to_host({"train": {"params": params, "opt_state": opt_state}, "search": outs})
    results.update(flatten(host["train"], "train/state"))
    results.update(flatten(host["search"], "search/"))

    # 3. Sharded checkpoint, written by every process.
    ckpt = ckpt_lib.Checkpointer(args.ckpt, max_to_keep=1)
    ckpt.save(TRAIN_STEPS, {"params": params, "opt_state": opt_state, "key": key},
              {"step": TRAIN_STEPS, "processes": jax.process_count()}, force=True)
    ckpt.close()

    # 4. Reports: every process calls the writers on the shared workdir.
    workdir = Path(args.workdir)
    writer = metrics_lib.MetricsWriter(workdir, tensorboard=False)
    writer.write(TRAIN_STEPS, {k.rsplit("/", 1)[-1]: v for k, v in results.items()
                               if k.startswith(f"train/metrics/{TRAIN_STEPS - 1}/")}, prefix="train")
    writer.close()
    progress.mark_done(workdir, "train", {"steps": TRAIN_STEPS})
    t_pipe = time.time()
    _pipeline_writes(workdir, info)
    info["seconds_pipeline"] = time.time() - t_pipe


def _pipeline_writes(workdir: Path, info: dict) -> None:
    """The pipeline's own writers on the shared workdir; records which ones ran in this process."""
    from rlm_jax import config, evaluation, report
    from rlm_jax.tasks import io as task_io
    from rlm_jax.tokenizer import SentencePieceTokenizer
    from rlm_jax.training import final_eval, phases, pipeline

    writes = {"save_records": 0, "tokenizer_train": 0, "scaling_plot": 0}

    def counting(name, fn):
        def wrapped(*a, **k):
            writes[name] += 1
            return fn(*a, **k)
        return wrapped

    task_io.save_records = counting("save_records", task_io.save_records)
    SentencePieceTokenizer.train = staticmethod(counting("tokenizer_train", SentencePieceTokenizer.train))
    report.scaling_plot = counting("scaling_plot", report.scaling_plot)
    rc = config.from_configdict(tiny_pipeline_config())
    run, results = phases.run_phases(rc, workdir / "pipeline",
                                     [p for p in pipeline.PHASES if p.name in ("data", "tokenizer")])
    train, ev, tok = results["data"]["train"], results["data"]["eval"], results["tokenizer"]

    # The evaluation phase's body, its report included, with stub evaluations (no trained models here).
    def stub_evaluate(spec, policy, value, tok_, task, problems, strategies, *a, **k):
        solved = [i % 4 == 0 for i in range(len(problems))]
        return [evaluation.Result(name, budget, sum(solved) / len(solved), 10.0 * budget, 1.0, {"1": 0.25}, solved)
                for name, budget in strategies]

    evaluation.evaluate, evaluation.selection_ceiling = stub_evaluate, lambda *a, **k: None
    final_eval.evaluate_run(run, {**results, "sft": None, "value": None, "value_refit": None,
                                  "rl_control": None, "rl": {"policy": None}})
    info["pipeline_writes"] = writes
    info["pipeline_data"] = [len(train), len(ev), hashlib.sha256(
        json.dumps([train, ev], sort_keys=True, default=str).encode()).hexdigest()]
    info["tokenizer_vocab"] = tok.vocab_size
    info["tokenizer_probe"] = tok.encode("12 + 3 = 15")


def restore(args, info: dict, results: dict) -> None:
    import jax
    from rlm_jax import checkpoint as ckpt_lib
    from rlm_jax.models import transformer
    from rlm_jax.training import trainer

    data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    mesh = par.make_mesh(data=data, fsdp=fsdp, tensor=tensor)
    cfg, tx = train_cfg(), optimizer()
    abstract_params = transformer.abstract_params(cfg)
    abstract = ckpt_lib.with_shardings(
        {"params": abstract_params, "opt_state": jax.eval_shape(tx.init, abstract_params),
         "key": jax.eval_shape(lambda: jax.random.key(0))},
        {"params": par.param_shardings(cfg, mesh), "opt_state": trainer.opt_state_shardings(tx, cfg, mesh),
         "key": par.replicated(mesh)})
    ckpt = ckpt_lib.Checkpointer(args.restore_from)
    state, meta = ckpt.restore(abstract_state=abstract)
    ckpt.close()
    want = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    got = jax.tree.leaves(state)
    info["shardings_match"] = all(g.sharding == w.sharding for g, w in zip(got, want)) and len(got) == len(want)
    info["meta"] = meta
    info["key_is_typed"] = bool(jax.dtypes.issubdtype(state["key"].dtype, jax.dtypes.prng_key))
    host = par.to_host({"params": state["params"], "opt_state": state["opt_state"],
                       "key": jax.random.key_data(state["key"])})
    results.update(flatten({"params": host["params"], "opt_state": host["opt_state"]}, "train/state"))
    results["key_data"] = np.asarray(host["key"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("role", choices=("run", "restore"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt")
    ap.add_argument("--workdir")
    ap.add_argument("--restore_from")
    ap.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor of the restore mesh")
    ap.add_argument("--coordinator")
    ap.add_argument("--num_processes", type=int, default=1)
    ap.add_argument("--process_id", type=int, default=0)
    args = ap.parse_args(argv)

    # Before anything touches a device.
    distributed = multihost.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax
    pid = jax.process_index()
    info = {"process_index": pid, "process_count": jax.process_count(), "distributed": distributed,
            "local_devices": jax.local_device_count(), "devices": jax.device_count(),
            "collectives": jax.config.jax_cpu_collectives_implementation}
    results: dict[str, np.ndarray] = {}
    (run if args.role == "run" else restore)(args, info, results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"proc{pid}.json").write_text(json.dumps(info, indent=1, default=str))
    if pid == 0:
        np.savez(out / "results.npz", **results)
    if distributed:  # nobody exits while another still needs it for a collective
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("multihost_worker:done")
    print(f"process {pid}: {args.role} ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
