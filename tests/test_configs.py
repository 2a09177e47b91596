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
