"""Typed config values from TOML and command-line text, and the check every config section uses.

`build_section(cls, values, section)` builds one frozen config dataclass from a table: unknown keys are
an error listing the known ones, and each value is converted to its field's type (`coerce`: booleans
from true/false/yes/no/on/off/1/0, integers from counts such as `100k` or `1.1B`, floats, strings,
optional fields), so every mistake is one ConfigError naming `section.key`.
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields
from typing import Any

from fastgrow.errors import ConfigError


def check(cond: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless cond: how the config dataclasses validate their fields."""
    if not cond:
        raise ConfigError(msg)


def build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config section [{section}] must be a table, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    check(not unknown, f"unknown key(s) in [{section}]: {sorted(unknown)} (known: {sorted(known)})")
    hints = typing.get_type_hints(cls)
    coerced = {k: coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    return cls(**coerced)


def coerce(value: Any, hint: Any, name: str) -> Any:
    """Convert a TOML/CLI value to the field's type; raise ConfigError naming the field."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(types, "UnionType", typing.Union)):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{name}: cannot use {value!r} ({'; '.join(errors)})")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{name} must be true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return parse_count(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str | int | float) -> int:
    """Parse '410M', '1.1B', '300B', '2e12', '4096' into an integer count (ValueError otherwise)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0 or (isinstance(text, float) and not text.is_integer() and text < 1):
            raise ValueError(f"count must be a non-negative number, got {text!r}")
        return int(text)
    s = str(text).strip().replace("_", "").replace(",", "")
    if not s:
        raise ValueError("empty count")
    mult = 1.0
    if s[-1].lower() in _SUFFIXES:
        mult = _SUFFIXES[s[-1].lower()]
        s = s[:-1]
    try:
        v = float(s) * mult
    except ValueError:
        raise ValueError(f"cannot parse {text!r} as a count (examples: 410M, 1.1B, 300B, 2e12)") from None
    if v < 0 or v != v:
        raise ValueError(f"count must be non-negative, got {text!r}")
    return int(round(v))
