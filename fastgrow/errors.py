"""Exception types shared across fastgrow (kept here so modules can raise them without import circles),
and errors that read right both from Python and from the command line.

Library functions name their Python arguments (`overwrite=True`); the command line must name its flags
(`--overwrite`). `with_cli_message(exc, text)` attaches the command line's wording to an exception, and
the CLI prints `cli_message(exc)`, so neither audience reads the other's names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def with_cli_message(exc: E, text: str) -> E:
    """Return `exc` carrying `text` as its command-line wording."""
    exc.cli_message = text  # type: ignore[attr-defined]
    return exc


def cli_message(exc: BaseException) -> str:
    """The command line's wording of `exc`: its attached CLI message, else str(exc)."""
    return getattr(exc, "cli_message", None) or str(exc)


def option_error(cls: Callable[[str], E], message: Callable[[str], str], api: str, cli: str) -> E:
    """`cls(message(api))` whose command-line wording is `message(cli)`: one sentence, the option spelled
    for each audience, e.g. `option_error(FileExistsError, lambda o: f"... pass {o}", "overwrite=True",
    "--overwrite")`."""
    return with_cli_message(cls(message(api)), message(cli))
