"""Typed configs: every shipped config loads and validates; bad fields are refused in-process, by name."""
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import jax
import pytest

from rlm_jax import config, formatting
from rlm_jax.tasks import get_task, io as task_io
from rlm_jax.tokenizer import SentencePieceTokenizer
from rlm_jax.config_utils import load_config
from rlm_jax.models.config import ModelConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.py"


def _load(path, tmp_path):
    """A shipped config as its command line gives it: a task that reads its problems from a file (configs/math.py)
    gets one (`--config.task.data=...`, or evaluate.py's --data)."""
    cd = load_config(path)
    if not get_task(cd.task.name).generates:
        cd.task.data = str(tmp_path / "problems.jsonl")
        Path(cd.task.data).write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    return config.from_configdict(cd)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_validates_and_round_trips(path, tmp_path):
    rc = _load(path, tmp_path)
    config.check_devices(rc, jax.device_count())
    cfg = rc.model_config(rc.tokenizer.vocab_size)
    # Search contexts (prompt + D steps of L tokens) and training sequences fit the model's context.
    assert rc.search.prompt_len + rc.search.max_new_tokens <= cfg.max_seq_len and rc.seq_len <= cfg.max_seq_len
    # What a run records in config.json reads back as the same config (evaluate.py / solve.py rely on it).
    assert config.from_configdict(json.loads(json.dumps(config.to_dict(rc)))) == rc


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_the_longest_examples_fit(path, tmp_path):
    """Every shipped config's prompts fit search.prompt_len and its SFT examples seq_len, measured with a
    tokenizer trained as the tokenizer phase does but on fewer problems (fewer merges: longer encodings, so
    this errs on the safe side). Nothing is trained; the start-up check (`check_sizes`) passes too."""
    rc = _load(path, tmp_path)
    config.check_sizes(rc)
    task = get_task(rc.task.name)
    try:
        problems = task_io.generate_dataset(task, task_io.parse_levels(rc.task.levels), 150, rc.seed, progress=False)
    except NotImplementedError:
        pytest.skip(f"{path.name}: task {rc.task.name} reads a file, no generator to measure")
    solutions = [task.solve(p) for p in problems]
    tok = SentencePieceTokenizer.train([task.prompt(p) + "\n" + "\n".join(s) for p, s in zip(problems, solutions)],
                                       vocab_size=rc.tokenizer.vocab_size)
    prompt = max(len(formatting.prompt_ids(tok, task, p)) for p in problems)
    example = max(len(formatting.sft_example(tok, task, p, s)[0]) for p, s in zip(problems, solutions))
    assert prompt <= rc.search.prompt_len, f"{path.name}: prompts of {prompt} tokens > search.prompt_len"
    assert example <= rc.seq_len, f"{path.name}: examples of {example} tokens > seq_len={rc.seq_len}"


def test_experiments_extend_the_neutral_base():
    base = config.from_configdict(load_config(CONFIGS[0].parent / "base.py"))
    assert base == config.RunConfig()
    assert base.pretrain.steps == 0 and base.value_refit.steps == 0 and base.eval.proposals == "sample"
    countdown = config.from_configdict(load_config(CONFIGS[0].parent / "countdown.py"))
    changed = {f.name for f in dataclasses.fields(config.RunConfig) if getattr(countdown, f.name) != getattr(base, f.name)}
    assert changed == {"task", "pretrain", "value_refit", "eval", "rl"}  # countdown states only its own features
    assert countdown.rl == dataclasses.replace(base.rl, search_free_baseline=True)


def _with(path: str, value, base=TINY) -> dict:
    """The config of `base` as a plain dict (as config.json stores it) with one field set."""
    d = load_config(base).to_dict()
    *sections, name = path.split(".")
    node = d
    for s in sections:
        node = node[s]
    node[name] = value
    return d


# (field, bad value, what the message must say): each refused by from_configdict, naming the field.
BAD = [
    ("eval.strategies", "greedy:1,bogus:3", "unknown strategy 'bogus'"),
    ("eval.strategies", "mcts:0", "budget must be >= 1"),
    ("task.name", "chess", "unknown task 'chess'"),
    ("rl.algorithm", "a2c", "rl.algorithm='a2c'"),
    ("rl.sft_mix", 1.5, "rl.sft_mix=1.5"),
    ("rl.preset", "alphago", "rl.preset='alphago'"),
    ("eval.strategy_problems", -1, "eval.strategy_problems=-1: must be >= 0"),
    ("task.traces_per_problem", 0, "task.traces_per_problem=0: must be >= 1"),
    ("task.eval_fraction", 0.0, "task.eval_fraction=0.0"),
    ("search.proposals", "unique", "search.proposals='unique'"),
    ("eval.proposals", "unique", "eval.proposals='unique'"),
    ("model.num_heads", 3, "does not divide d_model"),
    ("pretrain.steps", -1, "config pretrain.steps=-1: must be >= 0"),
    ("task.name", "prontoqa", "task.traces_per_problem=4: task prontoqa cannot enumerate its solutions; use 1"),
    ("pretrain.steps", 10, "task knapsack has no random steps to pretrain on; set pretrain.steps=0"),
    ("value_refit.steps", -1, "config value_refit.steps=-1"),
    ("value_refit.loss", "hinge", "value_refit.loss='hinge'"),
    ("value.loss", "hinge", "value.loss='hinge'"),
    ("sft.lr", -1.0, "config sft.lr=-1.0: the learning rate must be > 0"),
    ("rl.policy_update.lr", 0.0, "config rl.policy_update.lr=0.0: the learning rate must be > 0"),
    ("seed", -1, "seed=-1: the seed must be >= 0"),
    ("value_head.kind", "critic", "config value_head.kind='critic' unknown"),
    ("search.step_len", 60, "model.max_seq_len=160"),
    ("sft.steps", "many", "sft.steps='many': must be a int"),
]


@pytest.mark.parametrize("field, value, message", BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_bad_field_is_named(field, value, message):
    base = TINY.parent / ("knapsack.py" if "knapsack" in message else "tiny.py")
    with pytest.raises(ValueError) as e:
        config.from_configdict(_with(field, value, base))
    assert message in str(e.value), str(e.value)


def test_unknown_fields_are_named():
    d = load_config(TINY).to_dict()
    d["sft"]["stepz"] = 5
    with pytest.raises(ValueError, match=r"unknown config field\(s\) sft.stepz; valid fields of sft: .*steps"):
        config.from_configdict(d)
    d = load_config(TINY).to_dict()
    d["model"]["d_modle"] = 5
    with pytest.raises(ValueError, match="d_modle"):
        config.from_configdict(d)


def test_batch_sizes_must_divide_over_the_mesh():
    rc = config.from_configdict(_with("rl.policy_update.batch_size", 12))
    config.check_devices(rc, 2)
    with pytest.raises(ValueError, match="rl.policy_update.batch_size=12: must be a positive multiple of 8"):
        config.check_devices(rc, 8)


def test_rl_search_and_evaluation_read_their_own_proposal_settings():
    """search.proposals drives RL's search (a verifier), eval.proposals the test-time strategies."""
    rc = config.from_configdict(load_config(TINY))
    rc = dataclasses.replace(rc, search=dataclasses.replace(rc.search, proposals="distinct", temperature=1.0),
                             eval=dataclasses.replace(rc.eval, proposals="sample", temperature=0.5))
    cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32)
    tok = SimpleNamespace(step_id=1, eos_id=2, pad_id=0)
    train = rc.lm_spec(cfg, tok, verifier=lambda *a: None)
    test = rc.lm_spec(cfg, tok)
    assert (train.proposals, train.temperature) == ("distinct", 1.0)
    assert (test.proposals, test.temperature) == ("sample", 0.5)


def test_phase_keys_do_not_depend_on_python_hash_salt():
    """A new phase's random stream comes from a CRC of its name (Python's `hash` is salted per process)."""
    assert config.stable_hash("grpo_sampled") == 2146013075
