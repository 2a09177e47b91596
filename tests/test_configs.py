"""Every shipped config loads and passes the pipeline's start-up validation."""
from pathlib import Path

import pytest

from rlm_jax.config_utils import load_config
from rlm_jax.training import pipeline

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def _load(path):
    return load_config(path)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_validates(path, tmp_path):
    c = _load(path)
    pipeline.validate_config(c, tmp_path / "w")
    cfg = pipeline.model_config(c, c.tokenizer.vocab_size)
    # Search contexts (prompt + D steps of L tokens) and decoding must fit the model's context.
    assert c.search.prompt_len + c.search.max_depth * c.search.step_len <= cfg.max_seq_len
    assert c.seq_len <= cfg.max_seq_len


def test_bad_fields_are_named(tmp_path):
    c = _load(CONFIGS[0])
    c.rl.preset = "alphago"
    with pytest.raises(ValueError, match="rl.preset='alphago' unknown"):
        pipeline.validate_config(c, tmp_path)


def test_rl_search_and_evaluation_read_their_own_proposal_settings():
    """search.proposals drives RL's search (a verifier), eval.proposals the test-time strategies."""
    from types import SimpleNamespace

    from rlm_jax.models.config import ModelConfig

    c = _load(CONFIGS[0])
    cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32)
    tok = SimpleNamespace(step_id=1, eos_id=2, pad_id=0)
    c.search.proposals, c.eval.proposals = "distinct", "sample"
    assert pipeline.lm_spec(c, cfg, tok, verifier=lambda *a: None).proposals == "distinct"
    assert pipeline.lm_spec(c, cfg, tok).proposals == "sample"
    c.eval.proposals = ""  # unset: as RL's search
    assert pipeline.lm_spec(c, cfg, tok).proposals == "distinct"
