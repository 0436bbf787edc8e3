"""Documents from the sources `fastgrow prepare` reads, streamed in bounded memory.

Sources (one or several, read in the order given):
    ``"stdlib"``      the ``.py`` files of the running interpreter's standard library (site-/dist-packages
                      skipped; files that are not valid UTF-8 are skipped and counted, since nobody chose
                      them), in a fixed shuffled order (see `stdlib_files`).
    a file or folder  folders are walked recursively in sorted order, skipping hidden names and
                      ``__pycache__``. By suffix (after an optional ``.gz``/``.bz2``/``.xz``/``.zst``
                      compression suffix): ``.jsonl`` one JSON object per line (read here, line by line);
                      ``.json`` (an array or json lines) and ``.parquet`` through the datasets "json" /
                      "parquet" builders; anything else is UTF-8 text.
    ``"hf:NAME[:CONFIG][@SPLIT]"``  a Hugging Face Hub dataset, streamed with ``datasets.load_dataset``.

Documents: a text file is one document, except that a file longer than ``doc_chars`` characters (a corpus
in one big file, a nanoGPT-style ``input.txt``) is split into documents of at most ``doc_chars``
characters, cut after a blank line (else after a line end, else at the bound). It is read in 1 MiB
chunks, so memory does not grow with the file. For json/jsonl/parquet/Hub sources a document is a
record's ``text_field``. A record without it (missing or null) is an error naming the file and line,
unless ``skip_missing``: then it is skipped and counted.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import io
import json
import lzma
import os
import platform
import random
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


class DataError(ValueError):
    """Bad input to `prepare` (or a bad data directory); the message names the file/field/problem."""


_COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
_STRUCTURED = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages"}
_CHUNK = 1 << 20  # bytes read at once from a text file
DEFAULT_DOC_CHARS = 1_000_000  # larger than every stdlib module (the largest is 0.76 MB), so code stays whole


@dataclass
class Part:
    """One unit the document reader handles: a text file, a json/jsonl/parquet file, or a Hub dataset."""

    kind: str  # "text" | "jsonl" | "json" | "parquet" | "hf"
    path: Path | None = None
    lenient: bool = False  # skip (and count) undecodable text files instead of failing (stdlib)
    hf: tuple[str, str | None, str] | None = None  # (name, config, split)

    @property
    def structured(self) -> bool:
        return self.kind != "text"


@dataclass
class ReadStats:
    documents: int = 0
    bytes: int = 0
    skipped_files: int = 0  # undecodable stdlib files
    skipped_records: int = 0  # records without the text field (with skip_missing)
    split_files: int = 0  # text files longer than doc_chars, split into several documents
    truncated: bool = False


def compression_of(path: Path) -> str | None:
    return _COMPRESSION.get(path.suffix.lower())


def kind_of(path: Path) -> str:
    """ "text", "jsonl", "json" or "parquet", from the suffix under any compression suffix."""
    name = path.name.lower()
    if compression_of(path):
        name = name[: -len(path.suffix)]
    return _STRUCTURED.get(Path(name).suffix, "text")


def open_binary(path: Path) -> IO[bytes]:
    """`path` opened for reading bytes, decompressed on the fly by its suffix."""
    comp = compression_of(path)
    if comp is None:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    if comp == "gzip":
        return gzip.open(path, "rb")
    if comp == "bz2":
        return bz2.open(path, "rb")
    if comp == "xz":
        return lzma.open(path, "rb")
    try:
        import zstandard
    except ImportError:
        raise DataError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from None
    raw = open(path, "rb")  # noqa: SIM115 - closed with the reader (closefd)
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True))


def _walk(folder: Path) -> list[Path]:
    """Files under `folder`, recursively, sorted by relative path; hidden names and caches skipped."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS)
        out.extend(Path(root) / f for f in files if not f.startswith("."))
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def parse_hf_source(spec: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG][@SPLIT]` -> (name, config or None, split; default "train")."""
    body = spec[3:] if spec.startswith("hf:") else spec
    rest, at, split = body.rpartition("@")
    if not at:
        rest, split = body, "train"
    name, _, config = rest.partition(":")
    if not name or not split or (":" in rest and not config):
        raise DataError(f"bad Hugging Face source {spec!r}; expected hf:NAME[:CONFIG][@SPLIT]")
    return name, (config or None), split


def stdlib_files() -> tuple[Path, list[Path]]:
    """The running interpreter's standard-library folder and its .py files (no site-packages), in a fixed
    shuffled order: sorted, then shuffled with seed 0. Alphabetical order would make a `max_bytes` slice
    the first packages only and put one package at the tail, where the validation split comes from
    (a 4 MB slice ended inside `encodings/`, whose codec tables made validation loss 2 nats below train)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder not found: {root}")
    files = [f for f in _walk(root) if f.suffix == ".py"]
    random.Random(0).shuffle(files)
    return root, files


def source_name(source: str | os.PathLike) -> str:
    """A folder name for a source: `stdlib`, a path's name without suffixes, a Hub dataset's name."""
    s = os.fspath(source)
    if s == "stdlib":
        return "stdlib"
    if s.startswith("hf:"):
        return parse_hf_source(s)[0].rstrip("/").split("/")[-1] or "hf"
    p = Path(s.rstrip("/\\") or s)
    name = p.name
    while Path(name).suffix and len(Path(name).suffix) <= 8 and Path(name).stem:
        name = Path(name).stem
    return name or "data"


def resolve_sources(source: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[Part], list[dict]]:
    """Expand `source` into reader parts plus a JSON description of each source (for meta.json)."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise DataError("no data source given")
    parts: list[Part] = []
    described: list[dict] = []
    for item in items:
        s = os.fspath(item)
        if s == "stdlib":
            root, files = stdlib_files()
            parts += [Part("text", f, lenient=True) for f in files]
            described.append(
                {"kind": "stdlib", "path": str(root), "python": platform.python_version(), "files": len(files)}
            )
        elif s.startswith("hf:"):
            name, config, split = parse_hf_source(s)
            parts.append(Part("hf", hf=(name, config, split)))
            described.append({"kind": "hf", "name": name, "config": config, "split": split})
        else:
            p = Path(s)
            if not p.exists():
                raise FileNotFoundError(f"data source not found: {p}")
            files = _walk(p) if p.is_dir() else [p]
            if not files:
                raise DataError(f"no input files in folder {p} (hidden files and __pycache__ are skipped)")
            parts += [Part(kind_of(f), f) for f in files]
            described.append({"kind": "path", "path": str(p.resolve()), "files": len(files)})
    return parts, described


# ---------------------------------------------------------------------------------------------- text


def check_text_file(path: Path, chunk: int = 8 << 20) -> str | None:
    """None if `path` is readable UTF-8 text, else the reason it is not (binary / undecodable)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open_binary(path) as f:
            while True:
                block = f.read(chunk)
                final = not block
                nul = block.find(b"\x00")
                if nul >= 0:
                    return f"contains NUL bytes (byte {offset + nul}; binary file?)"
                pending = len(decoder.getstate()[0])  # bytes of a character cut by the last chunk
                try:
                    decoder.decode(block, final=final)
                except UnicodeDecodeError as e:
                    return f"is not valid UTF-8 (byte {offset - pending + e.start}: {e.reason})"
                if final:
                    return None
                offset += len(block)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"cannot read input file {path}: {getattr(e, 'strerror', None) or e}") from None


def _not_text(path: Path) -> DataError:
    reason = check_text_file(path) or "could not be decoded"
    return DataError(f"input file {path} {reason}; only text, .jsonl/.json and .parquet are supported")


def _cut(text: str, limit: int) -> int:
    """Where to end a document of at most `limit` characters: after the last blank line, else after the
    last line end (either in the second half), else at the limit."""
    i = text.rfind("\n\n", 0, limit - 1)
    if i >= limit // 2:
        return i + 2
    i = text.rfind("\n", 0, limit)
    if i >= limit // 2:
        return i + 1
    return limit


def _text_documents(part: Part, doc_chars: int, stats: ReadStats) -> Iterator[str]:
    path = part.path
    assert path is not None
    if part.lenient and check_text_file(path) is not None:
        stats.skipped_files += 1
        return
    try:
        f = open_binary(path)
    except OSError as e:
        raise DataError(f"cannot read input file {path}: {e.strerror or e}") from None
    # Universal newlines, as Python's text mode (and the datasets "text" reader before) does.
    reader = io.TextIOWrapper(f, encoding="utf-8", errors="strict", newline=None)
    pending = ""
    split = False
    with reader:
        while True:
            try:
                chunk = reader.read(_CHUNK)
            except UnicodeDecodeError:
                raise _not_text(path) from None
            except (OSError, EOFError, lzma.LZMAError) as e:
                raise DataError(f"cannot read input file {path}: {getattr(e, 'strerror', None) or e}") from None
            if "\x00" in chunk:
                raise _not_text(path)
            pending += chunk
            while len(pending) > 2 * doc_chars or (not chunk and len(pending) > doc_chars):
                cut = _cut(pending, doc_chars)
                split = True
                yield pending[:cut]
                pending = pending[cut:]
            if not chunk:
                break
    stats.split_files += split
    if pending:
        yield pending


# --------------------------------------------------------------------------------------- structured


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _record_text(row: dict, text_field: str, where: str, skip_missing: bool, stats: ReadStats) -> str | None:
    """A record's text; None for a record without `text_field` (absent or null) when skip_missing (it is
    counted), an error otherwise; a non-string value is an error."""
    value = row.get(text_field)
    if isinstance(value, str):
        return value
    if value is not None:
        raise DataError(f"{where}: field {text_field!r} is {type(value).__name__}, not text")
    if skip_missing:
        stats.skipped_records += 1
        return None
    what = "is null" if text_field in row else f"is missing (fields: {sorted(row)})"
    raise DataError(
        f"{where}: field {text_field!r} {what}; set --text-field, or pass --skip-missing to skip such records"
    )


def _jsonl_documents(part: Part, text_field: str, skip_missing: bool, stats: ReadStats) -> Iterator[str]:
    path = part.path
    try:
        f = open_binary(path)
    except OSError as e:
        raise DataError(f"cannot read input file {path}: {e.strerror or e}") from None
    with f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except (OSError, EOFError, lzma.LZMAError) as e:
                raise DataError(f"cannot read input file {path}: {getattr(e, 'strerror', None) or e}") from None
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}:{lineno}: not a JSON line ({_first_line(e)})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: a JSON {type(row).__name__}, not an object with a text field")
            value = _record_text(row, text_field, f"{path}:{lineno}", skip_missing, stats)
            if value is not None:
                yield value


def _guarded(rows: Iterable[dict], what: str) -> Iterator[dict]:
    """Re-raise a reader's deep exception (pyarrow, json) as one DataError line saying what failed."""
    it = iter(rows)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise DataError(f"{what}: {_first_line(e)}") from None
        yield row


def _rows_text(
    rows: Iterable[dict], text_field: str, where: str, skip_missing: bool, stats: ReadStats
) -> Iterator[str]:
    for i, row in enumerate(rows):
        value = _record_text(row, text_field, f"{where} record {i}", skip_missing, stats)
        if value is not None:
            yield value


def _datasets_documents(part: Part, text_field: str, skip_missing: bool, stats: ReadStats) -> Iterator[str]:
    import datasets

    if part.kind == "hf":
        assert part.hf is not None
        name, config, split = part.hf
        where = f"Hugging Face dataset {name!r}" + (f" config {config!r}" if config else "") + f" split {split!r}"
        try:
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
        except Exception as e:
            raise DataError(f"cannot load {where}: {_first_line(e)}") from None
    else:
        where = str(part.path)
        try:
            ds = datasets.load_dataset(part.kind, data_files=[str(part.path)], split="train", streaming=True)
        except Exception as e:
            raise DataError(f"cannot read {part.path} as {part.kind}: {_first_line(e)}") from None
        where = str(part.path)
    try:
        features = getattr(ds, "features", None)
    except Exception as e:
        raise DataError(f"cannot read {where}: {_first_line(e)}") from None
    if features is not None and text_field not in features:
        raise DataError(f"{where}: no field {text_field!r} (fields: {sorted(features)}); set --text-field")
    yield from _rows_text(_guarded(ds, f"cannot read {where}"), text_field, where, skip_missing, stats)


# ------------------------------------------------------------------------------------------ documents


def part_documents(
    part: Part, text_field: str, stats: ReadStats, *, skip_missing: bool = False, doc_chars: int = DEFAULT_DOC_CHARS
) -> Iterator[str]:
    """Raw documents of one part, in order (empty ones included; `iter_documents` drops them)."""
    if part.kind == "text":
        return _text_documents(part, doc_chars, stats)
    if part.kind == "jsonl":
        return _jsonl_documents(part, text_field, skip_missing, stats)
    return _datasets_documents(part, text_field, skip_missing, stats)


def iter_documents(
    parts: list[Part],
    text_field: str,
    max_bytes: int | None,
    stats: ReadStats,
    *,
    skip_missing: bool = False,
    doc_chars: int = DEFAULT_DOC_CHARS,
) -> Iterator[str]:
    """Non-empty documents in source order, stopping after `max_bytes` UTF-8 bytes (the last document is
    cut at a character boundary so the total never exceeds the cap)."""
    remaining = float("inf") if max_bytes is None else max_bytes
    for part in parts:
        for doc in part_documents(part, text_field, stats, skip_missing=skip_missing, doc_chars=doc_chars):
            if not doc:
                continue
            n = len(doc.encode("utf-8")) if max_bytes is not None or not doc.isascii() else len(doc)
            if n >= remaining:
                if n > remaining:
                    stats.truncated = True
                    # errors="ignore" drops only a multi-byte character cut in half at the end.
                    doc = doc.encode("utf-8")[: int(remaining)].decode("utf-8", errors="ignore")
                    n = len(doc.encode("utf-8"))
                if n:
                    stats.documents += 1
                    stats.bytes += n
                    yield doc
                return
            remaining -= n
            stats.documents += 1
            stats.bytes += n
            yield doc


def describe_sources(described: list[dict[str, Any]]) -> str:
    return ", ".join(d.get("path") or d.get("name", "?") for d in described)


__all__ = [
    "DataError",
    "Part",
    "ReadStats",
    "check_text_file",
    "iter_documents",
    "parse_hf_source",
    "resolve_sources",
    "source_name",
    "stdlib_files",
]
