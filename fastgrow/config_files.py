"""Run configs from TOML files and `--section.key=value` overrides.

Settings apply in this order: a preset (the file's `preset = "name"` or the caller's), the file's
sections, then each override. Growth stages: a `[growth]` table is one stage, `[[growth]]` tables
several; `--growth.KEY=V` addresses the single stage, `--growth.N.KEY=V` stage N (see apply_overrides).
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from fastgrow.config import GrowthConfig, RunConfig, preset
from fastgrow.errors import ConfigError


def read_toml(p: Path, what: str) -> dict[str, Any]:
    """The tables of TOML file `p` (`what` names it in the FileNotFoundError); invalid TOML is a ConfigError."""
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None


def set_keys(p: Path, d: dict[str, Any], section: str, values: dict[str, Any]) -> None:
    """Set the keys of file `p`'s table [section] in the config dict `d`; an unknown key is an error."""
    for k, v in values.items():
        if k not in d[section]:
            raise ConfigError(f"{p}: unknown key {k!r} in [{section}] (known: {sorted(d[section])})")
        d[section][k] = v


def _parse_override_value(text: str) -> Any:
    """CLI values: TOML scalars where they parse (numbers, booleans, quoted strings), else raw text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.key=value` overrides (leading dashes allowed) and revalidate.

    Growth stages: `growth.KEY=V` sets KEY of the single stage (creating stage 0 if the run has none; an
    error if it has several), `growth.N.KEY=V` sets KEY of stage N (0-based; N = the number of stages
    appends a new one).
    """
    d = cfg.to_dict()
    known_growth = {f.name for f in fields(GrowthConfig)}
    for item in overrides:
        s = item.lstrip("-")
        if "=" not in s or "." not in s.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} is not of the form --section.key=value (e.g. --train.lr=1e-3)")
        key, value = s.split("=", 1)
        section, _, name = key.partition(".")
        if section not in d:
            raise ConfigError(f"override {item!r}: unknown section {section!r} (known: {sorted(d)})")
        if section == "growth":
            stage, name = _override_stage(item, d["growth"], name)
            if name not in known_growth:
                raise ConfigError(
                    f"override {item!r}: unknown key {name!r} in [growth] (known: {sorted(known_growth)})"
                )
            stage[name] = _parse_override_value(value)
            continue
        if name not in d[section]:
            raise ConfigError(f"override {item!r}: unknown key {name!r} in [{section}] (known: {sorted(d[section])})")
        d[section][name] = _parse_override_value(value)
    return RunConfig.from_dict(d)


def _override_stage(item: str, stages: list[dict[str, Any]], name: str) -> tuple[dict[str, Any], str]:
    """The stage dict a growth override addresses (appending one where it asks for a new stage)."""
    index, sep, rest = name.partition(".")
    if sep and index.isdigit():
        n = int(index)
        if n > len(stages):
            raise ConfigError(
                f"override {item!r}: the run has {len(stages)} growth stage(s); address growth.0 .. "
                f"growth.{len(stages)} (growth.{len(stages)} appends a stage)"
            )
        if n == len(stages):
            stages.append({})
        return stages[n], rest
    if len(stages) > 1:
        raise ConfigError(
            f"override {item!r}: the run has {len(stages)} growth stages; address one as --growth.N.{name}=... "
            f"(N = 0 .. {len(stages) - 1})"
        )
    if not stages:
        stages.append({})
    return stages[0], name


def load_toml(path: str | Path, base: RunConfig | None = None, *, preset_name: str | None = None) -> RunConfig:
    """Read a TOML config. A top-level `preset = "name"` starts from that preset; sections override it.

    Growth: a `[growth]` table is one stage, an array of tables `[[growth]]` several (in increasing
    at_tokens order); either replaces the base's stages.

    base: the config to start from when the file names no preset. preset_name: the preset the caller
    chose elsewhere (the command line's --preset); a file that names a different one is an error rather
    than one of them silently winning.
    """
    p = Path(path)
    raw = read_toml(p, "config file")
    start = base or RunConfig()
    if "preset" in raw:
        file_preset = str(raw.pop("preset"))
        if preset_name is not None and file_preset.lower() != preset_name.lower():
            raise ConfigError(
                f"--preset {preset_name} conflicts with preset = {file_preset!r} in {p}; "
                "drop one of them (a preset is a starting point, the file's sections then override it)"
            )
        start = preset(file_preset)
    d = start.to_dict()
    for section, values in raw.items():
        if section not in d:
            raise ConfigError(f"{p}: unknown config section [{section}] (known: {sorted(d)})")
        if section == "growth":
            d["growth"] = _toml_stages(p, values)
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{p}: [{section}] must be a table")
        set_keys(p, d, section, values)
    try:
        return RunConfig.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def _toml_stages(p: Path, values: Any) -> list[dict[str, Any]]:
    if isinstance(values, dict):
        # `[growth]` with at_tokens = 0: the older way to say "no growth".
        return [] if values.get("at_tokens", None) == 0 else [values]
    if isinstance(values, list) and all(isinstance(v, dict) for v in values):
        return values
    raise ConfigError(f"{p}: growth must be a [growth] table or [[growth]] tables")
