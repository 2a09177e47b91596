"""Every training phase and the evaluation run data-parallel on a mesh and equal the one-device run.

The pipeline trains through `trainer.train` (SFT, value model, RL policy and value updates; one
`trainer.jit_train_step`) and evaluates / searches through `parallel.shard_search_inputs` (every
strategy). Here each of those, on the 8 simulated CPU devices of conftest.py with meshes (data=2, fsdp=4) and (2, 2, 2), is compared with the
same call on a one-device mesh: same seeds, same batches. The training phases use the (data=2, fsdp=2,
tensor=2) mesh, which exercises all three axes; test_parallel.py covers more mesh shapes for one step.
"""
import dataclasses
import functools

import jax
import numpy as np
import pytest

from rlm_jax import evaluation, formatting, parallel
from rlm_jax.config import TrainerConfig
from rlm_jax.models import heads, transformer
from rlm_jax.models.config import ModelConfig
from rlm_jax.search import mcts
from rlm_jax.search.base import LMSpec
from rlm_jax.tasks import get_task
from rlm_jax.tokenizer import SentencePieceTokenizer
from rlm_jax.training import rl, search_rl, steps, trainer, value
from rlm_jax.training.rollouts import make_verifier

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                  max_seq_len=64)
HEAD = heads.HeadConfig(kind="value", hidden=(16,))
N, T, BATCH, STEPS = 48, 16, 16, 3


def one_device_mesh():
    return parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(2, 2, 2)


def _examples(seed):
    """Random left-padded rows [N, T]: tokens, mask, loss_mask (the completion), and per-row scalars."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, T + 1, N)
    mask = np.arange(T)[None] >= (T - lengths)[:, None]
    prompt = rng.integers(1, 4, N)
    loss_mask = mask & (np.arange(T)[None] >= (T - lengths + prompt)[:, None])
    tokens = np.where(mask, rng.integers(1, CFG.vocab_size, (N, T)), 0).astype(np.int32)
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def _train_config(**kw):
    return TrainerConfig(**{**dict(steps=STEPS, batch_size=BATCH, lr=1e-3, warmup_steps=1, weight_decay=0.0,
                                   clip_norm=1.0, grad_accum=1, save_every=100, log_every=1), **kw})


def assert_sharded_like_rules(params, mesh, head_cfg=None):
    """Params come back in their rule shardings on `mesh` (not gathered onto one device)."""
    want = parallel.model_param_shardings(CFG, mesh, head_cfg=head_cfg)
    for x, sh in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        assert x.sharding.is_equivalent_to(sh, x.ndim), (x.sharding, sh)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(params))


class Recorder:
    """A MetricsWriter stand-in that keeps every logged row."""

    def __init__(self):
        self.rows = []

    def write(self, step, metrics, prefix=""):
        self.rows.append((prefix, step, dict(metrics)))


def _run_sft(mesh, tmp_path, tag):
    rec = Recorder()
    params = transformer.init_params(CFG, jax.random.key(0))
    out, _ = trainer.train("sft", _train_config(), trainer.Objective(steps.next_token_loss, (CFG,)), CFG, params,
                           trainer.example_batches(_examples(0), BATCH, seed=3), tmp_path / tag, rec, mesh)
    return out, [m for _, _, m in rec.rows]


def max_abs_diff(a, b) -> float:
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_sft_on_a_mesh_equals_one_device(mesh, tmp_path):
    ref, ref_metrics = _run_sft(one_device_mesh(), tmp_path, "ref")
    out, metrics = _run_sft(mesh, tmp_path, "mesh")
    assert_sharded_like_rules(out, mesh)
    assert len(metrics) == STEPS
    for a, b in zip(ref_metrics, metrics):
        for k in ("loss", "grad_norm", "num_tokens"):
            np.testing.assert_allclose(b[k], a[k], rtol=2e-5, err_msg=k)
    # Params agree to float noise, far below how far training moved them.
    moved = max_abs_diff(transformer.init_params(CFG, jax.random.key(0)), ref)
    diff = max_abs_diff(ref, out)
    assert diff < 1e-2 * moved, (diff, moved)


def _run_value(mesh, tmp_path, tag):
    rec = Recorder()
    vparams = heads.init_value_params(CFG, HEAD, jax.random.key(1))
    arrays = {k: v for k, v in _examples(1).items() if k != "loss_mask"}
    targets = np.random.default_rng(2).uniform(-1, 1, N).astype(np.float32)
    out, _ = trainer.train("value", _train_config(), value.objective(CFG, HEAD, "mse"), CFG, vparams,
                           trainer.example_batches({**arrays, "q": targets}, BATCH, seed=4), tmp_path / tag, rec,
                           mesh, head=HEAD)
    return out, [m for _, _, m in rec.rows]


@pytest.mark.slow
def test_value_training_on_a_mesh_equals_one_device(mesh, tmp_path):
    ref, ref_metrics = _run_value(one_device_mesh(), tmp_path, "ref")
    out, metrics = _run_value(mesh, tmp_path, "mesh")
    assert_sharded_like_rules(out, mesh, HEAD)
    for a, b in zip(ref_metrics, metrics):
        for k in ("loss", "grad_norm"):
            np.testing.assert_allclose(b[k], a[k], rtol=2e-5, err_msg=k)
    diff, moved = max_abs_diff(ref, out), max_abs_diff(heads.init_value_params(CFG, HEAD, jax.random.key(1)), ref)
    assert diff < 1e-2 * moved, (diff, moved)


def _policy_batch(seed):
    """A PPO/GRPO batch [BATCH, ...]: rows, behaviour / reference log-probs, advantages, groups."""
    ex = {k: v[:BATCH] for k, v in _examples(seed).items()}
    rng = np.random.default_rng(seed)
    lp = lambda: -rng.uniform(0.5, 4.0, (BATCH, T - 1)).astype(np.float32)
    q = rng.uniform(-1, 1, BATCH).astype(np.float32)
    return {**ex, "old_logprobs": lp(), "ref_logprobs": lp(), "q": q, "reward": q,
            "advantage": rng.normal(size=BATCH).astype(np.float32), "group": rng.integers(0, 4, BATCH).astype(np.int32)}


def _dpo_batch(seed):
    a, b = _policy_batch(seed), _policy_batch(seed + 1)
    return {**{f"chosen_{k}": a[k] for k in ("tokens", "mask", "loss_mask", "ref_logprobs")},
            **{f"rejected_{k}": b[k] for k in ("tokens", "mask", "loss_mask", "ref_logprobs")}}


def _rehearsal_batch(seed):
    """RL rows plus reference traces for the SFT rehearsal term (`rl.rehearsal_loss`'s nested batch)."""
    return {"rl": _policy_batch(seed), "sft": {k: v[BATCH:2 * BATCH] for k, v in _examples(seed).items()}}


_PPO = functools.partial(rl.ppo_loss, CFG, clip_eps=0.2, kl_coef=0.01, entropy_coef=0.01)
RL_LOSSES = {
    "ppo": (_PPO, _policy_batch, None),
    "ppo_rehearsal": (functools.partial(rl.rehearsal_loss, CFG, _PPO, sft_weight=0.5), _rehearsal_batch, None),
    "dpo": (functools.partial(rl.dpo_loss, CFG, beta=0.1), _dpo_batch, None),
    "value_mse": (functools.partial(value.value_regression_loss, CFG, HEAD), _policy_batch, HEAD),
}


def _sharded_trainer(mesh, tx, params, loss_fn, head):
    """(step, params, opt_state) on `mesh`, placed as `trainer.train` places them: params copied onto their
    rule shardings (the step donates them), the optimizer state created in its shardings."""
    p_sh = parallel.model_param_shardings(CFG, mesh, head_cfg=head)
    p = jax.jit(lambda t: jax.tree.map(lambda x: x.copy(), t), out_shardings=p_sh)(
        jax.tree.map(parallel.put_global, params, p_sh))
    o = trainer.init_opt_state(tx, p, trainer.opt_state_shardings(tx, CFG, mesh, head_cfg=head))
    step = trainer.jit_train_step(CFG, mesh, tx, loss_fn=loss_fn, head_cfg=head)
    return lambda p, o, batch: step(p, o, parallel.shard_global_batch(batch, mesh)), p, o


@pytest.mark.parametrize("name", list(RL_LOSSES))
def test_rl_update_steps_on_a_mesh_equal_one_device(mesh, name):
    loss_fn, make_batch, head = RL_LOSSES[name]
    params = (transformer.init_params(CFG, jax.random.key(5)) if head is None
              else heads.init_value_params(CFG, head, jax.random.key(5)))
    batch = make_batch(11)
    tx = trainer.make_optimizer(TrainerConfig(lr=1e-3, steps=10, warmup_steps=0, weight_decay=0.0, clip_norm=1.0))
    results = []
    for m in (one_device_mesh(), mesh):
        step, p, o = _sharded_trainer(m, tx, params, loss_fn, head)
        for _ in range(2):
            p, o, metrics = step(p, o, batch)
        results.append((p, jax.device_get(metrics)))
    (ref, ref_m), (out, out_m) = results
    assert_sharded_like_rules(out, mesh, head)
    assert set(ref_m) == set(out_m)
    for k in ref_m:
        np.testing.assert_allclose(out_m[k], ref_m[k], rtol=2e-5, atol=1e-6, err_msg=k)
    assert float(ref_m["grad_norm"]) > 1e-3  # a real gradient flowed
    diff, moved = max_abs_diff(ref, out), max_abs_diff(params, ref)
    assert diff < 1e-2 * moved, (diff, moved)


# ------------------------------------------------------------------------------------------ search

@pytest.fixture(scope="module")
def countdown():
    """Countdown problems, a small sentencepiece tokenizer and random-init policy / value models."""
    task = get_task("countdown3")
    problems = [task.generate(seed, 0.3) for seed in range(24)]
    tok = SentencePieceTokenizer.train([task.prompt(p) + "\n" + "\n".join(task.solve(p)) for p in problems],
                                       vocab_size=300)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      mlp_dim=64, max_seq_len=80, init_std=0.3)
    policy = transformer.init_params(cfg, jax.random.key(0))
    vparams = heads.init_value_params(cfg, HEAD, jax.random.key(1))
    spec = LMSpec(policy=cfg, value=cfg, head=HEAD, step_id=tok.step_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                  num_slots=3, step_len=8, max_depth=3, temperature=1.0)
    return task, problems, tok, policy, vparams, spec


@pytest.mark.slow
def test_every_strategy_evaluates_the_same_on_a_mesh(countdown):
    """evaluation.evaluate (what the pipeline reports) with the batch split 8 ways equals one device:
    accuracy, generated tokens and per-level accuracy of every strategy."""
    task, problems, tok, policy, vparams, spec = countdown
    strategies = [("greedy", 1), ("sample", 1), ("best_of_n", 3), ("self_consistency", 3), ("beam", 2),
                  ("mcts", 3)]
    run = functools.partial(evaluation.evaluate, spec, policy, vparams, tok, task, problems, strategies,
                            jax.random.key(3), 16, 24)
    ref = run()
    out = run(mesh=parallel.make_mesh(2, 4, 1))
    for a, b in zip(ref, out):
        assert (a.strategy, a.budget, a.accuracy, a.per_level) == (b.strategy, b.budget, b.accuracy, b.per_level)
        assert a.tokens_per_problem == b.tokens_per_problem, a.strategy
    assert len({r.tokens_per_problem for r in ref}) > 3  # strategies really generated different amounts


@pytest.mark.slow
def test_training_mode_search_and_samples_are_the_same_on_a_mesh(countdown):
    """The RL phase's search (verifier rewards) and the samples it extracts, batch split 8 ways."""
    task, problems, tok, policy, vparams, spec = countdown
    prompts = [formatting.prompt_ids(tok, task, p) for p in problems]
    spec = dataclasses.replace(spec, verifier=make_verifier(tok, task, problems))

    def collect(mesh):
        samples = []
        for s0, real, out in search_rl.run_search(spec, policy, vparams, prompts, tok.pad_id, jax.random.key(9), 8,
                                                  mcts.puct(), 8, 24, mesh):
            samples += search_rl.extract_samples(jax.tree.map(lambda x: x[:real], out), prompts[s0:s0 + real],
                                                 s0)[0]
        return samples, out.tree.parent.shape[1]

    (ref, capacity), (out, _) = collect(None), collect(parallel.make_mesh(2, 4, 1))
    assert len(ref) == len(out) > 0
    for a, b in zip(ref, out):
        assert (a["state"], a["action"], a["group"]) == (b["state"], b["action"], b["group"])
        np.testing.assert_allclose([b["q"], b["v_parent"]], [a["q"], a["v_parent"]], atol=1e-5)
    # A group is one parent node, numbered (problem row) * capacity + node across the search batches:
    # its samples share one state, which starts with that problem's prompt.
    by_group = {}
    for s in ref:
        row = s["group"] // capacity
        assert s["state"][:len(prompts[row])] == prompts[row]
        by_group.setdefault(s["group"], set()).add(tuple(s["state"]))
    assert all(len(v) == 1 for v in by_group.values())
