"""`fastgrow prepare`: turn text into token shards that `fastgrow.loader` reads.

Public API
----------
``prepare(source, out_dir=None, *, tokenizer=None, vocab_size=None, text_field="text", max_bytes=None,
overwrite=False, progress=True, shard_tokens=DEFAULT_SHARD_TOKENS, eos_token=EOS_TOKEN, skip_missing=False,
val_fraction=0.02, seed=0, doc_chars=DEFAULT_DOC_CHARS) -> dict``
    Read documents, train (or load) a tokenizer, write token shards and metadata; returns the metadata.
``default_out_dir(source) -> Path``  ``data/<name of the first source>`` (used when out_dir is None).
``describe(meta, out_dir=None) -> str``  one line summarising a prepared directory.
``token_dtype(vocab_size) -> numpy.dtype``  ``<u2`` when every id fits (vocab <= 65536), else ``<u4``.
``DataError``  ``ValueError`` subclass raised for bad input (binary file, missing field, no text, ...).

Sources and documents: see `fastgrow.sources` (stdlib, files and folders of text / .jsonl / .json /
.parquet, optionally .gz/.bz2/.xz/.zst compressed, and hf:NAME[:CONFIG][@SPLIT]). A text file longer than
``doc_chars`` characters is split into documents at blank lines.

Passes, memory and disk: documents are streamed, never held whole. Training a tokenizer reads the sources
once for the BPE trainer and once more to encode (local files are simply read again). Only a Hugging Face
Hub source, which would be downloaded twice, is spilled to a temporary file in the output's temp folder
(removed when encoding ends). With ``tokenizer`` given there is one pass. Encoding runs in batches of
about 8 MB through the tokenizer's parallel ``encode_batch`` while a reader thread parses the next batch.

Validation split: each document is drawn for validation with probability ``val_fraction`` by a
``random.Random(seed)`` stream (one draw per document, in source order), so the split is deterministic
and spread over all sources. Validation documents are written after all training documents; meta.json's
``split`` records ``{"method": "documents", "val_fraction", "seed", "val_documents", "val_tokens"}`` and
the loader takes the last ``val_tokens`` tokens as validation. When the draw gives no validation document,
no training document, or a validation share outside [val_fraction / 4, 2 * val_fraction] of the tokens
(a tiny corpus of a few large documents), the split is ``{"method": "tail", ...}`` with the reason and a
warning: the loader then cuts ``data.val_fraction`` of the stream's end, as for folders prepared before
splits existed.

Output directory (format version 1)
    ``tokens-00000.bin ...``  raw little-endian token ids (dtype from ``token_dtype``); each document is
                              followed by the EOS id; at most ``shard_tokens`` tokens per shard; the token
                              stream is the shards concatenated in order (training documents, then
                              validation documents).
    ``tokenizer.json``        the ``tokenizers`` tokenizer (byte-level BPE when trained here).
    ``meta.json``             written last: format/format_version, dtype, byte_order, vocab_size, eos_id,
                              eos_token, num_tokens, num_documents, num_bytes (UTF-8 bytes of text),
                              shards [{file, num_tokens, sha256}], tokenizer {file, sha256, trained,
                              requested_vocab_size}, split, sources, text_field, max_bytes, truncated,
                              skipped_files, skipped_records, split_files, doc_chars, fastgrow_version.

Atomicity: everything is built in ``<out_dir>.tmp-<random>`` next to ``out_dir`` (fsynced, meta.json last)
and renamed into place; on any error (a full disk included: one line naming the path and the cause) the
temp dir is removed. A complete ``out_dir`` (one with meta.json) is only replaced when ``overwrite=True``;
a directory without meta.json that is not empty is never replaced.

Options: ``max_bytes`` caps the UTF-8 text taken (documents in source order; the last one is cut at a
character boundary). ``vocab_size`` (default 4096) is for a trained tokenizer only: passing it with
``tokenizer`` is an error. A trained tokenizer may end up smaller than ``vocab_size`` on a small corpus:
meta.json records the real size and a warning says so. Options that no source uses (``text_field`` or
``skip_missing`` without a structured source, ``doc_chars`` without a text file) are warned about.
Warnings go to stderr as ``fastgrow: warning: ...`` lines (or to ``warn``).

Errors (one line each, naming the thing): missing source / tokenizer path -> ``FileNotFoundError``; a
complete ``out_dir`` without ``overwrite`` -> ``FileExistsError``; no input files, no text, a binary or
non-UTF-8 text file, an unreadable file, a record without ``text_field`` (unless ``skip_missing``), a
tokenizer without ``eos_token`` (the message lists its special tokens) -> ``DataError``; bad option values
-> ``ValueError``; an I/O failure while writing -> ``fastgrow.fsutil.IOFailure``.

Determinism: the same sources, options and library versions give byte-identical shards and meta.json
(no timestamps are recorded).

``datasets`` and ``tokenizers`` are imported inside the functions that need them, so importing this module
(and ``fastgrow.loader``, which uses its constants) works on machines without ``datasets``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastgrow.errors import option_error
from fastgrow.fsutil import IOFailure, fsync_dir, fsync_file, io_cause, io_errors, sha256_file, write_json_durable
from fastgrow.sources import (
    DEFAULT_DOC_CHARS,
    DataError,
    Part,
    ReadStats,
    describe_sources,
    iter_documents,
    parse_hf_source,
    resolve_sources,
    source_name,
    stdlib_files,
)
from fastgrow.token_writer import (
    SHARD_PATTERN,
    SplitWriter,
    batches,
    prefetch,
    read_spill,
    spill_documents,
    split_record,
)

FORMAT_NAME = "fastgrow-tokens"
FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_SHARD_TOKENS = 2**26
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_VAL_FRACTION = 0.02
# Smallest trainable byte-level BPE: the 256 byte symbols plus the EOS special token.
MIN_TRAINED_VOCAB = 257

__all__ = [
    "SHARD_PATTERN",
    "DataError",
    "describe",
    "default_out_dir",
    "parse_hf_source",
    "prepare",
    "sha256_file",
    "stdlib_files",
    "token_dtype",
    "train_tokenizer",
]


def token_dtype(vocab_size: int) -> np.dtype:
    """The on-disk dtype for token ids below `vocab_size`: little-endian uint16 if they fit, else uint32."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if vocab_size <= 2**16:
        return np.dtype("<u2")
    if vocab_size <= 2**32:
        return np.dtype("<u4")
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def default_out_dir(source: str | os.PathLike | Sequence[str | os.PathLike]) -> Path:
    """`data/<name>` for the first source (`data/stdlib`, `data/input` for input.txt, `data/corpus` for
    corpus/ or corpus.jsonl.gz, `data/TinyStories` for hf:roneneldan/TinyStories)."""
    first = source if isinstance(source, (str, os.PathLike)) else next(iter(source), "data")
    return Path("data") / source_name(first)


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
        lines = str(e).strip().splitlines()
        raise DataError(f"cannot load tokenizer {path}: {type(e).__name__}: {lines[0] if lines else ''}") from None


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
        import json

        try:
            held = describe_sources(json.loads((out_dir / META_FILE).read_text())["sources"])
        except (OSError, ValueError, KeyError, TypeError):
            held = "unknown sources"
        raise option_error(
            FileExistsError,
            lambda o: (
                f"output directory {out_dir} already holds data prepared from {held}; choose another "
                f"output directory, or pass {o} to replace it"
            ),
            "overwrite=True",
            "--overwrite",
        )
    return state


def _install(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished temp dir into place (replacing an old complete one only when overwrite)."""
    state = _check_out_dir(out_dir, overwrite)  # again: something may have appeared meanwhile
    with io_errors("install", out_dir):
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


def _stderr_warning(message: str) -> None:
    print(f"fastgrow: warning: {message}", file=sys.stderr)


def _special_tokens(tok) -> list[str]:
    try:
        return sorted(t.content for t in tok.get_added_tokens_decoder().values() if t.special)
    except AttributeError:  # tokenizers < 0.19
        return []


def _check_options(tokenizer, vocab_size, max_bytes, shard_tokens, text_field, val_fraction, seed, doc_chars) -> None:
    def positive(v: Any) -> bool:
        return not isinstance(v, bool) and isinstance(v, int) and v >= 1

    if max_bytes is not None and not positive(max_bytes):
        raise ValueError(f"max_bytes must be a positive integer or None, got {max_bytes!r}")
    if not positive(shard_tokens):
        raise ValueError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    if not positive(doc_chars):
        raise ValueError(f"doc_chars must be a positive integer, got {doc_chars!r}")
    if text_field is not None and not text_field:
        raise ValueError("text_field must not be empty")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in [0, 0.5), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if tokenizer is not None and vocab_size is not None:
        raise ValueError(
            f"vocab_size ({vocab_size}) is for training a tokenizer and would be ignored with tokenizer="
            f"{tokenizer}; drop one of them (--vocab-size / --tokenizer)"
        )
    if tokenizer is None and vocab_size is not None and (not positive(vocab_size) or vocab_size < MIN_TRAINED_VOCAB):
        raise ValueError(f"vocab_size must be an integer >= {MIN_TRAINED_VOCAB} (256 bytes + EOS), got {vocab_size!r}")
    if vocab_size is not None and vocab_size > 2**32:
        raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def _unused_options(parts: list[Part], text_field, skip_missing, doc_chars, warn) -> None:
    structured = any(p.structured for p in parts)
    if text_field is not None and not structured:
        warn(f"text_field={text_field!r} (--text-field) is ignored: no jsonl/json/parquet/hf source")
    if skip_missing and not structured:
        warn("skip_missing (--skip-missing) is ignored: no jsonl/json/parquet/hf source")
    if doc_chars != DEFAULT_DOC_CHARS and all(p.structured for p in parts):
        warn(f"doc_chars={doc_chars} (--doc-chars) is ignored: no text file source")


def prepare(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | Path | None = None,
    *,
    tokenizer: str | Path | None = None,
    vocab_size: int | None = None,
    text_field: str | None = None,
    max_bytes: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    eos_token: str = EOS_TOKEN,
    skip_missing: bool = False,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    doc_chars: int = DEFAULT_DOC_CHARS,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Read `source`, train a byte-level BPE of `vocab_size` (default 4096) or load `tokenizer` (a
    tokenizer.json that must contain `eos_token`), write token shards + tokenizer.json + meta.json into
    `out_dir` (default `default_out_dir(source)`) atomically, and return the metadata dict. See the
    module docstring."""
    from tqdm.auto import tqdm

    warn = warn or _stderr_warning
    _check_options(tokenizer, vocab_size, max_bytes, shard_tokens, text_field, val_fraction, seed, doc_chars)
    out_dir = default_out_dir(source) if out_dir is None else Path(out_dir)
    parts, described = resolve_sources(source)
    _unused_options(parts, text_field, skip_missing, doc_chars, warn)
    field = text_field or "text"
    requested_vocab = vocab_size if vocab_size is not None else DEFAULT_VOCAB_SIZE
    tok = None
    if tokenizer is not None:
        tok = _load_tokenizer(Path(tokenizer))
        if tok.token_to_id(eos_token) is None:
            raise DataError(
                f"tokenizer {tokenizer} has no {eos_token!r} token; pass its end-of-text token with --eos-token "
                f"(eos_token=...); its special tokens: {_special_tokens(tok)}"
            )
    _check_out_dir(out_dir, overwrite)

    with io_errors("create a temporary folder in", out_dir.parent):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    writer: SplitWriter | None = None
    try:
        read_opts = {"skip_missing": skip_missing, "doc_chars": doc_chars}

        def documents(stats: ReadStats) -> Iterator[str]:
            return iter_documents(parts, field, max_bytes, stats, **read_opts)

        tok_path = tmp / TOKENIZER_FILE
        first = None
        spill = None
        if tok is None:
            # Pass 1: the BPE trainer reads the documents. A Hub source is spilled (read once, not downloaded
            # twice); local files are read again in pass 2.
            first = ReadStats()
            docs = documents(first)
            if any(p.kind == "hf" for p in parts):
                spill = tmp / "documents.spill"
                with tqdm(desc="read", unit="doc", disable=not progress) as bar:
                    spill_documents(_counted(docs, bar), spill)
                docs = read_spill(spill)
            tok = train_tokenizer(docs, requested_vocab, eos_token=eos_token, progress=progress)
            _no_text(first, described)
            with io_errors("write", tok_path):
                tok_path.write_text(tok.to_str(pretty=True), encoding="utf-8")
        else:
            with io_errors("write", tok_path):
                shutil.copyfile(tokenizer, tok_path)
        with io_errors("write", tok_path):
            fsync_file(tok_path)
        # Text that literally contains the EOS string must not become the EOS id.
        tok.encode_special_tokens = True
        eos_id = tok.token_to_id(eos_token)
        real_vocab = tok.get_vocab_size(with_added_tokens=True)
        if tokenizer is None and real_vocab < requested_vocab:
            warn(
                f"the trained tokenizer has {real_vocab} tokens, fewer than the {requested_vocab} asked for "
                "(the corpus has no more distinct merges); meta.json records the real size"
            )
        dtype = token_dtype(real_vocab)

        # Pass 2: encode in batches (parallel in the tokenizer, the next batch read meanwhile); every
        # document is followed by EOS; validation documents are drawn as they pass.
        stats = ReadStats()
        source_docs = read_spill(spill) if spill is not None else documents(stats)
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we do not use.
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
        writer = SplitWriter(tmp, dtype, shard_tokens, val_fraction, seed)
        with tqdm(desc="encode", unit="doc", disable=not progress) as bar:
            for batch in prefetch(batches(source_docs)):
                writer.write_batch(encode(batch, add_special_tokens=False), eos_id, real_vocab)
                bar.update(len(batch))
        if spill is not None:
            spill.unlink()
            stats = first
        elif first is not None and (first.documents, first.bytes) != (stats.documents, stats.bytes):
            raise DataError(
                f"the sources changed while prepare read them ({first.documents} documents / {first.bytes} bytes "
                f"in the first pass, {stats.documents} / {stats.bytes} in the second); run it again"
            )
        _no_text(stats, described)
        shards = writer.finish()
        split, note = split_record(writer, writer.shards.total, seed)
        if note:
            warn(note)

        meta: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dtype": dtype.name,
            "byte_order": "little",
            "vocab_size": real_vocab,
            "eos_id": eos_id,
            "eos_token": eos_token,
            "num_tokens": writer.shards.total,
            "num_documents": stats.documents,
            "num_bytes": stats.bytes,
            "shard_tokens": shard_tokens,
            "shards": shards,
            "tokenizer": {
                "file": TOKENIZER_FILE,
                "sha256": sha256_file(tok_path),
                "trained": tokenizer is None,
                "requested_vocab_size": requested_vocab if tokenizer is None else None,
            },
            "split": split,
            "sources": described,
            "text_field": field,
            "max_bytes": max_bytes,
            "truncated": stats.truncated,
            "skipped_files": stats.skipped_files,
            "skipped_records": stats.skipped_records,
            "split_files": stats.split_files,
            "doc_chars": doc_chars,
            "fastgrow_version": _version(),
        }
        if stats.skipped_records:
            warn(f"skipped {stats.skipped_records} records without a {field!r} field (--skip-missing)")
        write_json_durable(tmp / META_FILE, meta, indent=2)  # last: its presence marks the directory complete
        fsync_dir(tmp)
        _install(tmp, out_dir, overwrite)
    except BaseException as e:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, (IOFailure, FileNotFoundError, FileExistsError)):
            raise IOFailure(f"cannot write {out_dir}: {io_cause(e)}", e.errno) from e
        raise
    return meta


def _counted(docs: Iterable[str], bar) -> Iterator[str]:
    for doc in docs:
        bar.update(1)
        yield doc


def _no_text(stats: ReadStats, described: list[dict]) -> None:
    if stats.documents == 0:
        raise DataError(f"no text found in {describe_sources(described)} (all documents empty or skipped)")


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
