"""Configuration as data: frozen dataclasses, saved as JSON next to every result.

``replace_config(cfg, **overrides)`` validates field names; ``config_from_dict(cls, d)`` rebuilds a
config from its JSON form (unknown keys are an error, so a typo never passes silently).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError
from .io import read_json, to_jsonable, write_json

__all__ = ["replace_config", "config_from_dict", "save_config", "load_config", "config_to_dict",
           "default_data_dir"]

T = TypeVar("T")


def config_to_dict(cfg: Any) -> dict:
    return to_jsonable(cfg)


def replace_config(cfg: T, **overrides: Any) -> T:
    """Return a copy of the frozen dataclass ``cfg`` with ``overrides`` applied (``None`` values ignored)."""
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"{type(cfg).__name__} has no field(s) {unknown}; known: {sorted(names)}")
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def config_from_dict(cls: type[T], data: dict) -> T:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {unknown}")
    kwargs = {}
    for k, v in data.items():
        default = getattr(cls, k, None) if k in names else None
        kwargs[k] = tuple(v) if isinstance(v, list) and isinstance(default, tuple) else v
    return cls(**kwargs)


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    return write_json(path, cfg)


def load_config(cls: type[T], path: str | os.PathLike) -> T:
    return config_from_dict(cls, read_json(path))


def default_data_dir() -> Path | None:
    """The one place the environment is read for data: ``TBKD_DATA`` (a TBX11K root), else ``None``."""
    value = os.environ.get("TBKD_DATA")
    return Path(value).expanduser() if value else None
