"""Write a run configuration as TOML that `fastgrow train --config` (fastgrow.config_files.load_toml) reads back.

`dumps_toml(mapping)` is a small generic TOML writer for what configs hold: top-level scalars first, then a
`[table]` per nested mapping (sub-tables as `[table.sub]`), then `[[name]]` per element of a list of
mappings (so several growth stages print as `[[growth]]` tables). Scalars: booleans, integers, floats
(inf/nan included), strings (escaped so any text survives), and lists of scalars. A None value has no
TOML form: it is written as a comment and left out, so the reader falls back to the field's default.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastgrow.config import RunConfig

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _string(k)


def _string(s: str) -> str:
    # JSON string escapes are TOML basic-string escapes; ensure_ascii=False keeps non-ASCII text as is
    # (JSON's \ud83d\ude00 surrogate pairs are not valid TOML), and DEL must be escaped in TOML.
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _scalar(v: Any, where: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # shortest text that reads back as the same float
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, Sequence) and not _is_table_list(v):
        return "[" + ", ".join(_scalar(x, where) for x in v) + "]"
    raise TypeError(f"{where}: cannot write {type(v).__name__} {v!r} as a TOML value")


def _is_table_list(v: Any) -> bool:
    return isinstance(v, Sequence) and not isinstance(v, str) and len(v) > 0 and all(isinstance(x, Mapping) for x in v)


def _body(table: Mapping[str, Any], path: str, out: list[str]) -> None:
    """Scalars of `table` as `key = value` lines, then its sub-tables and lists of tables."""
    for k, v in table.items():
        if v is None:
            out.append(f"# {_key(k)} is unset (no TOML value): the default applies")
        elif not isinstance(v, Mapping) and not _is_table_list(v):
            out.append(f"{_key(k)} = {_scalar(v, f'{path}{k}')}")
    for k, v in table.items():
        name = f"{path}{_key(k)}"
        if isinstance(v, Mapping):
            out.extend(["", f"[{name}]"])
            _body(v, name + ".", out)
        elif _is_table_list(v):
            for item in v:
                out.extend(["", f"[[{name}]]"])
                _body(item, name + ".", out)


def dumps_toml(data: Mapping[str, Any], header: str = "") -> str:
    """`data` as a TOML document (see the module docstring); `header` lines become leading comments."""
    out = [f"# {line}".rstrip() for line in header.splitlines()]
    _body(data, "", out)
    while out and out[0] == "":
        out.pop(0)
    return "\n".join(out) + "\n"


def config_toml(cfg: RunConfig, header: str = "") -> str:
    """The whole resolved config, every field explicit, as a file for `fastgrow train --config`."""
    d = cfg.to_dict()
    stages = d.get("growth")
    if isinstance(stages, list) and not stages:
        # No growth stages: nothing to write (an empty array would not say which kind of value it is).
        del d["growth"]
        header = (header + "\n" if header else "") + "no [growth] stages: the model keeps its size"
    elif isinstance(stages, list) and len(stages) == 1 and stages[0].get("at_tokens") != 0:
        # One stage reads best as a plain [growth] table (a table with at_tokens = 0 would read back as
        # "no growth", so such a stage stays a [[growth]] array entry).
        d["growth"] = stages[0]
    return dumps_toml(d, header)
