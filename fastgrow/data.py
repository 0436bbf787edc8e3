"""`fastgrow prepare`: turn text into token shards that `fastgrow.loader` reads.

Public API
----------
``prepare(source, out_dir, *, tokenizer=None, vocab_size=4096, text_field="text", max_bytes=None,
overwrite=False, progress=True, shard_tokens=DEFAULT_SHARD_TOKENS, eos_token=EOS_TOKEN) -> dict``
    Read documents, train (or load) a tokenizer, write token shards and metadata; returns the metadata.
``describe(meta, out_dir=None) -> str``
    One line summarising a prepared directory (tokens, documents, bytes, shards, vocab, dtype).
``token_dtype(vocab_size) -> numpy.dtype``
    ``<u2`` (little-endian uint16) when every id fits (vocab <= 65536), else ``<u4``.
``DataError``
    ``ValueError`` subclass raised for bad input (binary file, missing field, no text, ...).

Sources (``source`` is one of these or a sequence of them, read in the order given)
    ``"stdlib"``            the ``.py`` files of the running interpreter's standard library
                            (``sysconfig.get_paths()["stdlib"]``, sorted, site-/dist-packages skipped;
                            files that are not valid UTF-8 are skipped and counted, since nobody chose them).
    a file or folder        folders are walked recursively in sorted order, skipping hidden names and
                            ``__pycache__``. ``.jsonl``/``.json`` go through the datasets "json" builder and
                            ``.parquet`` through "parquet" (documents = the ``text_field`` column); any other
                            file is UTF-8 text, one document per file (datasets "text",
                            ``sample_by="document"``).
    ``"hf:NAME[:CONFIG][@SPLIT]"``  a Hugging Face Hub dataset, streamed with ``datasets.load_dataset``
                            (split defaults to ``train``); documents = ``text_field``.

Output directory (format version 1)
    ``tokens-00000.bin ...``  raw little-endian token ids (dtype from ``token_dtype``); each document is
                              followed by the EOS id, so EOS separates documents; at most ``shard_tokens``
                              tokens per shard; the token stream is the shards concatenated in order.
    ``tokenizer.json``        the ``tokenizers`` tokenizer (byte-level BPE when trained here).
    ``meta.json``             written last: format/format_version, dtype, byte_order, vocab_size, eos_id,
                              eos_token, num_tokens, num_documents, num_bytes (UTF-8 bytes of text),
                              shards [{file, num_tokens, sha256}], tokenizer {file, sha256, trained},
                              sources (what was read), max_bytes, fastgrow_version.

Atomicity: everything is built in ``<out_dir>.tmp-<random>`` next to ``out_dir`` (fsynced, meta.json last)
and renamed into place; on any error the temp dir is removed. A complete ``out_dir`` (one with meta.json)
is only replaced when ``overwrite=True``: the old one is renamed away, the new one renamed in, the old one
deleted. A directory without meta.json that is not empty is never replaced (it is not ours to delete).

Options: ``max_bytes`` caps the UTF-8 text taken (documents in source order; the last one is cut at a
character boundary). A trained tokenizer may end up smaller than ``vocab_size`` on a tiny corpus; meta.json
records the real size, which the model's vocab must be at least. ``shard_tokens`` bounds a shard's size.

Errors (one line each, naming the thing): missing source / tokenizer path -> ``FileNotFoundError``; a
complete ``out_dir`` without ``overwrite`` -> ``FileExistsError``; no input files, no text, a binary or
non-UTF-8 text file, an unreadable file, a json/parquet/Hub source without ``text_field`` (the message
lists the fields it has), a tokenizer without ``eos_token`` -> ``DataError``; bad option values ->
``ValueError``.

Determinism: the same sources, options and library versions give byte-identical shards and meta.json
(no timestamps are recorded).

``datasets`` and ``tokenizers`` are imported inside the functions that need them, so importing this module
(and ``fastgrow.loader``, which uses its constants) works on machines without ``datasets``.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import platform
import random
import secrets
import shutil
import struct
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastgrow.errors import option_error
from fastgrow.fsutil import fsync_dir, fsync_file, sha256_file, write_json_durable

FORMAT_NAME = "fastgrow-tokens"
FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
SHARD_PATTERN = "tokens-{:05d}.bin"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_SHARD_TOKENS = 2**26
# Smallest trainable byte-level BPE: the 256 byte symbols plus the EOS special token.
MIN_TRAINED_VOCAB = 257

_TEXT_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages"}
# Documents handed to encode_batch at once: large enough to keep the Rust thread pool busy.
_ENCODE_BATCH_DOCS = 512
_ENCODE_BATCH_BYTES = 8 << 20


class DataError(ValueError):
    """Bad input to `prepare` (or a bad data directory); the message names the file/field/problem."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The on-disk dtype for token ids below `vocab_size`: little-endian uint16 if they fit, else uint32."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if vocab_size <= 2**16:
        return np.dtype("<u2")
    if vocab_size <= 2**32:
        return np.dtype("<u4")
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


# --------------------------------------------------------------------------------------------- sources


@dataclass
class _Part:
    """One unit the document reader handles: a run of text files, one json/parquet file, or a Hub dataset."""

    kind: str  # "text" | "json" | "parquet" | "hf"
    files: list[Path] = field(default_factory=list)
    lenient: bool = False  # skip (and count) undecodable text files instead of failing (stdlib)
    hf: tuple[str, str | None, str] | None = None  # (name, config, split)


def _walk(folder: Path) -> list[Path]:
    """Files under `folder`, recursively, sorted by relative path; hidden names and caches skipped."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS)
        out.extend(Path(root) / f for f in files if not f.startswith("."))
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def _group_files(files: list[Path], lenient: bool = False) -> list[_Part]:
    """Consecutive text files form one part (one datasets call); each json/parquet file is its own part
    so that an error can name the file it came from."""
    parts: list[_Part] = []
    for f in files:
        kind = _TEXT_KINDS.get(f.suffix.lower(), "text")
        if kind == "text" and parts and parts[-1].kind == "text":
            parts[-1].files.append(f)
        else:
            parts.append(_Part(kind=kind, files=[f], lenient=lenient))
    return parts


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


def resolve_sources(
    source: str | os.PathLike | Sequence[str | os.PathLike],
) -> tuple[list[_Part], list[dict]]:
    """Expand `source` into reader parts plus a JSON description of each source (for meta.json)."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise DataError("no data source given")
    parts: list[_Part] = []
    described: list[dict] = []
    for item in items:
        s = os.fspath(item)
        if s == "stdlib":
            root, files = stdlib_files()
            parts += _group_files(files, lenient=True)
            described.append(
                {
                    "kind": "stdlib",
                    "path": str(root),
                    "python": platform.python_version(),
                    "files": len(files),
                }
            )
        elif s.startswith("hf:"):
            name, config, split = parse_hf_source(s)
            parts.append(_Part(kind="hf", hf=(name, config, split)))
            described.append({"kind": "hf", "name": name, "config": config, "split": split})
        else:
            p = Path(s)
            if not p.exists():
                raise FileNotFoundError(f"data source not found: {p}")
            files = _walk(p) if p.is_dir() else [p]
            if not files:
                raise DataError(f"no input files in folder {p} (hidden files and __pycache__ are skipped)")
            parts += _group_files(files)
            described.append({"kind": "path", "path": str(p.resolve()), "files": len(files)})
    return parts, described


# --------------------------------------------------------------------------------------------- reading


@dataclass
class _ReadStats:
    documents: int = 0
    bytes: int = 0
    skipped_files: int = 0  # undecodable stdlib files
    skipped_records: int = 0  # json/parquet/hf records whose text field is null
    truncated: bool = False


def _check_text_file(path: Path, chunk: int = 8 << 20) -> str | None:
    """None if `path` is readable UTF-8 text, else the reason it is not (binary / undecodable).
    Reads in chunks so a large file is never held in memory twice."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as f:
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
    except OSError as e:
        raise DataError(f"cannot read input file {path}: {e.strerror or e}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


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


def _rows_text(rows: Iterable[dict], text_field: str, where: str, stats: _ReadStats) -> Iterator[str]:
    """The `text_field` of each row; a missing field names the field, the source and the fields it has."""
    for i, row in enumerate(rows):
        if text_field not in row:
            raise DataError(f"{where}: no field {text_field!r} (fields: {sorted(row)}); set text_field / --text-field")
        value = row[text_field]
        if value is None:
            stats.skipped_records += 1
            continue
        if not isinstance(value, str):
            raise DataError(f"{where}: record {i} field {text_field!r} is {type(value).__name__}, not text")
        yield value


def _stream_part(part: _Part, text_field: str, budget: float, stats: _ReadStats) -> Iterator[str]:
    """Raw documents of one part, in order. `budget` (bytes still wanted) only limits which files are
    opened; the caller truncates."""
    import datasets

    if part.kind == "text":
        files, covered = [], 0
        for f in part.files:
            if covered >= budget:
                break
            reason = _check_text_file(f)
            if reason is not None:
                if part.lenient:
                    stats.skipped_files += 1
                    continue
                raise DataError(f"input file {f} {reason}; only text, .jsonl/.json and .parquet are supported")
            files.append(f)
            # Decoded text never has more UTF-8 bytes than the file (newline translation only shrinks it).
            covered += f.stat().st_size
        if not files:
            return
        ds = datasets.load_dataset(
            "text", data_files=[str(f) for f in files], sample_by="document", split="train", streaming=True
        )
        for row in _guarded(ds, f"cannot read text files {files[0]} ... {files[-1]}"):
            yield row["text"]
        return
    if part.kind in ("json", "parquet"):
        (f,) = part.files
        where = f"{f}"
        try:
            ds = datasets.load_dataset(part.kind, data_files=[str(f)], split="train", streaming=True)
            features = ds.features
        except Exception as e:
            raise DataError(f"cannot read {f} as {part.kind}: {_first_line(e)}") from None
        if features is not None and text_field not in features:
            raise DataError(f"{where}: no field {text_field!r} (fields: {sorted(features)}); set text_field")
        yield from _rows_text(_guarded(ds, f"cannot read {f} as {part.kind}"), text_field, where, stats)
    if part.kind == "hf":
        assert part.hf is not None
        name, config, split = part.hf
        where = f"Hugging Face dataset {name!r}" + (f" config {config!r}" if config else "") + f" split {split!r}"
        try:
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
        except Exception as e:
            raise DataError(f"cannot load {where}: {_first_line(e)}") from None
        features = getattr(ds, "features", None)
        if features is not None and text_field not in features:
            raise DataError(f"{where}: no field {text_field!r} (fields: {sorted(features)}); set text_field")
        yield from _rows_text(_guarded(ds, f"cannot read {where}"), text_field, where, stats)


def iter_documents(parts: list[_Part], text_field: str, max_bytes: int | None, stats: _ReadStats) -> Iterator[str]:
    """Non-empty documents in source order, stopping after `max_bytes` UTF-8 bytes (the last document is
    cut at a character boundary so the total never exceeds the cap)."""
    remaining = float("inf") if max_bytes is None else max_bytes
    for part in parts:
        for doc in _stream_part(part, text_field, remaining, stats):
            if not doc:
                continue
            raw = doc.encode("utf-8")
            if len(raw) >= remaining:
                if len(raw) > remaining:
                    stats.truncated = True
                    # errors="ignore" drops only a multi-byte character cut in half at the end.
                    doc = raw[: int(remaining)].decode("utf-8", errors="ignore")
                    raw = doc.encode("utf-8")
                if raw:
                    stats.documents += 1
                    stats.bytes += len(raw)
                    yield doc
                return
            remaining -= len(raw)
            stats.documents += 1
            stats.bytes += len(raw)
            yield doc


# ------------------------------------------------------------------------------------- spill and shards


_LEN = struct.Struct("<Q")


def _spill_documents(docs: Iterable[str], path: Path, on_document=None) -> None:
    """Write documents to a length-prefixed UTF-8 file so the tokenizer trainer and the encoder can read
    them twice without reading (or downloading) the sources twice."""
    with open(path, "wb") as f:
        for doc in docs:
            raw = doc.encode("utf-8")
            f.write(_LEN.pack(len(raw)))
            f.write(raw)
            if on_document is not None:
                on_document(1)


def _read_spill(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:
        while header := f.read(_LEN.size):
            (n,) = _LEN.unpack(header)
            yield f.read(n).decode("utf-8")


def _spill_batches(path: Path) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for doc in _read_spill(path):
        batch.append(doc)
        size += len(doc)
        if len(batch) >= _ENCODE_BATCH_DOCS or size >= _ENCODE_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _ShardWriter:
    """Appends token ids to fixed-capacity shard files, hashing as it writes."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._hash = hashlib.sha256()
        self._count = 0
        self.total = 0

    def _open(self) -> None:
        name = SHARD_PATTERN.format(len(self.shards))
        self._file = open(self.folder / name, "wb")  # noqa: SIM115 - stays open across write() calls
        self._hash = hashlib.sha256()
        self._count = 0
        self.shards.append({"file": name, "num_tokens": 0, "sha256": ""})

    def _close(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self.shards[-1]["num_tokens"] = self._count
        self.shards[-1]["sha256"] = self._hash.hexdigest()

    def write(self, ids: np.ndarray) -> None:
        data = np.ascontiguousarray(ids, dtype=self.dtype)
        while data.size:
            if self._file is None:
                self._open()
            take = min(self.shard_tokens - self._count, data.size)
            raw = data[:take].tobytes()
            self._file.write(raw)
            self._hash.update(raw)
            self._count += take
            self.total += take
            data = data[take:]
            if self._count == self.shard_tokens:
                self._close()

    def close(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ------------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(docs: Iterable[str], vocab_size: int, *, eos_token: str = EOS_TOKEN, progress: bool = True):
    """A byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer and decoder, no prefix space) trained on
    `docs`, with `eos_token` as its only special token (id 0). May end up smaller than `vocab_size` when
    the corpus has fewer distinct merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def _load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise DataError(f"cannot load tokenizer {path}: {_first_line(e)}") from None


# -------------------------------------------------------------------------------------------- prepare


def _existing_state(out_dir: Path) -> str:
    """ "absent", "empty" (an empty folder), "complete" (has meta.json); raises for anything else."""
    if not out_dir.exists():
        return "absent"
    if not out_dir.is_dir():
        raise DataError(f"output path {out_dir} exists and is not a directory")
    if (out_dir / META_FILE).is_file():
        return "complete"
    if any(out_dir.iterdir()):
        raise DataError(
            f"output directory {out_dir} exists, is not empty and holds no {META_FILE} (not a fastgrow data "
            "directory); refusing to replace it, choose another path"
        )
    return "empty"


def _check_out_dir(out_dir: Path, overwrite: bool) -> str:
    state = _existing_state(out_dir)
    if state == "complete" and not overwrite:
        raise option_error(
            FileExistsError,
            lambda o: f"output directory {out_dir} already holds prepared data; pass {o} to replace it",
            "overwrite=True",
            "--overwrite",
        )
    return state


def _install(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished temp dir into place (replacing an old complete one only when overwrite)."""
    state = _check_out_dir(out_dir, overwrite)  # again: something may have appeared meanwhile
    if state == "complete":
        old = out_dir.with_name(f"{out_dir.name}.old-{secrets.token_hex(4)}")
        os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            os.replace(old, out_dir)  # put the previous data back
            raise
        fsync_dir(out_dir.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if state == "empty":
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)


def prepare(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    vocab_size: int = 4096,
    text_field: str = "text",
    max_bytes: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    eos_token: str = EOS_TOKEN,
) -> dict[str, Any]:
    """Read `source`, train a byte-level BPE of `vocab_size` (or load `tokenizer`, a tokenizer.json that
    must contain `eos_token`; `vocab_size` is then ignored), write token shards + tokenizer.json +
    meta.json into `out_dir` atomically, and return the metadata dict. See the module docstring."""
    from tqdm.auto import tqdm

    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
        raise ValueError(f"max_bytes must be a positive integer or None, got {max_bytes!r}")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    if not text_field:
        raise ValueError("text_field must not be empty")
    if tokenizer is None and (
        isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_TRAINED_VOCAB
    ):
        raise ValueError(f"vocab_size must be an integer >= {MIN_TRAINED_VOCAB} (256 bytes + EOS), got {vocab_size!r}")
    out_dir = Path(out_dir)
    parts, described = resolve_sources(source)
    tok = None
    if tokenizer is not None:
        tok = _load_tokenizer(Path(tokenizer))
        if tok.token_to_id(eos_token) is None:
            raise DataError(f"tokenizer {tokenizer} has no {eos_token!r} token (set eos_token to its EOS token)")
    _check_out_dir(out_dir, overwrite)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    writer = None
    try:
        # Pass 1: read and validate every source once, spilling the documents to the temp dir.
        stats = _ReadStats()
        spill = tmp / "documents.spill"
        docs = iter_documents(parts, text_field, max_bytes, stats)
        with tqdm(desc="read", unit="doc", disable=not progress) as bar:
            _spill_documents(docs, spill, on_document=bar.update)
        if stats.documents == 0:
            where = ", ".join(d.get("path") or d.get("name", "?") for d in described)
            raise DataError(f"no text found in {where} (all documents empty or skipped)")

        # Tokenizer: trained on the spilled documents, or the given file copied byte for byte.
        tok_path = tmp / TOKENIZER_FILE
        if tok is None:
            tok = train_tokenizer(_read_spill(spill), vocab_size, eos_token=eos_token, progress=progress)
            tok.save(str(tok_path))
        else:
            shutil.copyfile(tokenizer, tok_path)
        fsync_file(tok_path)
        # Text that literally contains the EOS string must not become the EOS id.
        tok.encode_special_tokens = True
        eos_id = tok.token_to_id(eos_token)
        real_vocab = tok.get_vocab_size(with_added_tokens=True)
        dtype = token_dtype(real_vocab)

        # Pass 2: encode in batches; every document is followed by EOS.
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we do not use.
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
        writer = _ShardWriter(tmp, dtype, shard_tokens)
        with tqdm(desc="encode", total=stats.bytes, unit="B", unit_scale=True, disable=not progress) as bar:
            for batch in _spill_batches(spill):
                encs = encode(batch, add_special_tokens=False)
                lengths = [len(e.ids) + 1 for e in encs]
                ids = np.empty(sum(lengths), dtype=np.int64)
                pos = 0
                for e, n in zip(encs, lengths):
                    ids[pos : pos + n - 1] = e.ids
                    ids[pos + n - 1] = eos_id
                    pos += n
                if ids.size and int(ids.max()) >= real_vocab:  # would silently wrap in a narrow dtype
                    raise DataError(f"tokenizer produced id {int(ids.max())} >= its vocab size {real_vocab}")
                writer.write(ids)
                bar.update(sum(len(d.encode("utf-8")) for d in batch))
        shards = writer.close()
        spill.unlink()

        meta: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dtype": dtype.name,
            "byte_order": "little",
            "vocab_size": real_vocab,
            "eos_id": eos_id,
            "eos_token": eos_token,
            "num_tokens": writer.total,
            "num_documents": stats.documents,
            "num_bytes": stats.bytes,
            "shard_tokens": shard_tokens,
            "shards": shards,
            "tokenizer": {
                "file": TOKENIZER_FILE,
                "sha256": sha256_file(tok_path),
                "trained": tokenizer is None,
                "requested_vocab_size": vocab_size if tokenizer is None else None,
            },
            "sources": described,
            "text_field": text_field,
            "max_bytes": max_bytes,
            "truncated": stats.truncated,
            "skipped_files": stats.skipped_files,
            "skipped_records": stats.skipped_records,
            "fastgrow_version": _version(),
        }
        write_json_durable(tmp / META_FILE, meta, indent=2)  # last: its presence marks the directory complete
        fsync_dir(tmp)
        _install(tmp, out_dir, overwrite)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def describe(meta: dict[str, Any], out_dir: str | Path | None = None) -> str:
    """One line summarising a prepare result (for the CLI), e.g.
    ``9,376,117 tokens (1,758 documents, 31.5 MB of text) in 1 shard, vocab 4096 (uint16) -> data/stdlib``."""
    n_shards = len(meta["shards"])
    mb = meta["num_bytes"] / 1e6
    line = (
        f"{meta['num_tokens']:,} tokens ({meta['num_documents']:,} documents, {mb:.1f} MB of text) in "
        f"{n_shards} shard{'s' if n_shards != 1 else ''}, vocab {meta['vocab_size']} ({meta['dtype']})"
    )
    return line if out_dir is None else f"{line} -> {out_dir}"


def _version() -> str:
    from fastgrow import __version__

    return __version__
