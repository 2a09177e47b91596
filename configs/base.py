"""The neutral base every experiment extends: `rlm_jax/config.py`'s defaults (documented there, field by field).

No pretraining, no value refit, sampled proposals: features an experiment switches on where they were
measured to pay. A config file states only what it changes:

    c = sibling(__file__, "base"); c.task.name = "prontoqa"; ...
"""
from rlm_jax.config import default_configdict


def get_config():
    return default_configdict()
