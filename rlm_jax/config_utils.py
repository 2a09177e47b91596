"""The ml_collections layer: config files loaded by path (not as a package), and their dicts made typed."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Mapping

import ml_collections


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """`get_config()` of the config file at `path`; a missing file, a syntax error or a file without
    `get_config` is one ValueError / FileNotFoundError naming the file and the fix."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file at {path}; pass --config=<a configs/*.py file defining "
                                "get_config()>, e.g. configs/countdown.py")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    if spec is None or spec.loader is None:
        raise ValueError(f"config file {path} is not a Python file; pass a .py file defining get_config()")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ValueError(f"config file {path} line {e.lineno}: {e.msg}; fix the file") from None
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config file {path} defines no get_config(); add `def get_config(): return ...` "
                         "returning an ml_collections.ConfigDict (see configs/base.py)")
    return module.get_config()


def sibling(config_file: str, name: str) -> ml_collections.ConfigDict:
    """The config `name`.py next to `config_file` (a config's `__file__`): to derive one config from another."""
    return load_config(os.path.join(os.path.dirname(os.path.abspath(config_file)), name + ".py"))


def fail(field: str, value, fix: str):
    raise ValueError(f"config {field}={value!r}: {fix}")


def dataclass_from_mapping(cls, value, types: dict, plain: tuple = (), path: str = ""):
    """`cls(**value)` for a (nested) dataclass `cls`, recursing into fields whose annotation names a class in
    `types`; fields in `plain` stay mappings. Unknown fields, wrong types and the classes' own checks raise one
    ValueError naming the field path."""
    if not dataclasses.is_dataclass(cls):
        return value
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        fail(path, value, f"must be a section of fields ({cls.__name__})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ValueError(f"unknown config field(s) {', '.join(where + u for u in unknown)}; valid fields"
                         f"{' of ' + path if path else ''}: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, v in value.items():
        f = fields[name]
        sub = f"{path}.{name}" if path else name
        typ = f.type if not isinstance(f.type, str) else types.get(f.type)
        if typ is not None and dataclasses.is_dataclass(typ):
            kwargs[name] = dataclass_from_mapping(typ, v, types, plain, sub)
        elif name in plain:
            kwargs[name] = dict(v)
        else:
            kwargs[name] = _coerce(sub, f, v)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"config {path or 'run'}: {e}") from None
    except ValueError as e:  # a section's own check names its class: name the field path the user wrote
        msg = str(e).replace(f"{cls.__name__}.", f"{path}.") if path else str(e)
        if path and not msg.startswith(("config ", "unknown config")):  # a check that names no config field
            msg = f"config {msg}" if msg.startswith(f"{path}.") else f"config {path}: {msg}"
        raise ValueError(msg) from None


def _coerce(path: str, f: dataclasses.Field, v):
    """Values from files and the command line as the field's type (tuples stay tuples; ints may fill floats)."""
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(v, list):
        v = tuple(v)
    if default is None or v is None:
        return v
    if isinstance(default, bool):
        if not isinstance(v, bool):
            fail(path, v, "must be True or False")
        return v
    if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if isinstance(default, (int, float, str, tuple)) and not isinstance(v, type(default)):
        fail(path, v, f"must be a {type(default).__name__} (e.g. {default!r})")
    return v
