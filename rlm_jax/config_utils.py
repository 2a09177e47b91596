"""Helpers for ml_collections config files, which are loaded by path (not as a package)."""
from __future__ import annotations

import importlib.util
import os

import ml_collections


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """`get_config()` of the config file at `path`."""
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    if spec is None:
        raise FileNotFoundError(f"no config file at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def sibling(config_file: str, name: str) -> ml_collections.ConfigDict:
    """The config `name`.py next to `config_file` (a config's `__file__`): to derive one config from another."""
    return load_config(os.path.join(os.path.dirname(os.path.abspath(config_file)), name + ".py"))
