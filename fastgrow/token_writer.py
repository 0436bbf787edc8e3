"""Writing a prepared token stream: shards with checksums, the validation side file, the reader thread.

Used by `fastgrow.data.prepare`; see its docstring for the format and the validation split.
"""

from __future__ import annotations

import hashlib
import os
import queue
import random
import struct
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fastgrow.fsutil import io_errors
from fastgrow.sources import DataError

SHARD_PATTERN = "tokens-{:05d}.bin"
# Documents handed to encode_batch at once: large enough to keep the Rust thread pool busy.
ENCODE_BATCH_DOCS = 512
ENCODE_BATCH_CHARS = 8 << 20


_LEN = struct.Struct("<Q")


def spill_documents(docs: Iterable[str], path: Path) -> None:
    """Length-prefixed UTF-8 documents, so a Hub source is downloaded once for two passes."""
    with io_errors("write", path), open(path, "wb") as f:
        for doc in docs:
            raw = doc.encode("utf-8")
            f.write(_LEN.pack(len(raw)))
            f.write(raw)


def read_spill(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:
        while header := f.read(_LEN.size):
            (n,) = _LEN.unpack(header)
            yield f.read(n).decode("utf-8")


def batches(docs: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if len(batch) >= ENCODE_BATCH_DOCS or size >= ENCODE_BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """`items`, produced by a background thread up to `depth` ahead: the reader parses JSON / decodes
    text (holding the GIL) while the caller encodes (the tokenizer releases the GIL)."""
    q: queue.Queue = queue.Queue(depth)
    done = object()
    stop = threading.Event()

    def put(x: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for x in items:
                if not put(x):
                    return
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(_Raised(e))
            return
        put(done)

    t = threading.Thread(target=run, name="prepare-reader", daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is done:
                return
            if isinstance(x, _Raised):
                raise x.exc
            yield x
    finally:
        stop.set()
        t.join(timeout=10)


# ------------------------------------------------------------------------------------------- writers


class ShardWriter:
    """Appends token ids to fixed-capacity shard files, hashing as it writes."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._hash = hashlib.sha256()
        self._count = 0
        self.total = 0

    def _path(self) -> Path:
        return self.folder / self.shards[-1]["file"]

    def _open(self) -> None:
        name = SHARD_PATTERN.format(len(self.shards))
        self.shards.append({"file": name, "num_tokens": 0, "sha256": ""})
        with io_errors("write", self._path()):
            self._file = open(self._path(), "wb")  # noqa: SIM115 - stays open across write() calls
        self._hash = hashlib.sha256()
        self._count = 0

    def _close(self) -> None:
        if self._file is None:
            return
        with io_errors("write", self._path()):
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
            with io_errors("write", self._path()):
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


class SplitWriter:
    """Training documents go straight into the shards; validation documents into a side file (about
    val_fraction of the tokens) that is appended to the shards at the end, so they end the stream."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int, val_fraction: float, seed: int) -> None:
        self.shards = ShardWriter(folder, dtype, shard_tokens)
        self.dtype = dtype
        self.val_path = folder / "validation.tokens"
        self._val = None
        self.val_fraction = val_fraction
        self.rng = random.Random(seed)
        self.documents = self.val_documents = self.val_tokens = 0

    def write_batch(self, encodings: list, eos_id: int, vocab: int) -> None:
        lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
        ids = np.empty(int(lengths.sum()), dtype=np.int64)
        pos = 0
        for e, n in zip(encodings, lengths):
            ids[pos : pos + n - 1] = e.ids
            ids[pos + n - 1] = eos_id
            pos += n
        if ids.size and int(ids.max()) >= vocab:  # would silently wrap in a narrow dtype
            raise DataError(f"tokenizer produced id {int(ids.max())} >= its vocab size {vocab}")
        val_doc = np.fromiter((self.rng.random() < self.val_fraction for _ in encodings), dtype=bool)
        self.documents += len(encodings)
        if not val_doc.any():
            self.shards.write(ids)
            return
        val_tok = np.repeat(val_doc, lengths)
        self.shards.write(ids[~val_tok])
        if self._val is None:
            with io_errors("write", self.val_path):
                self._val = open(self.val_path, "wb")  # noqa: SIM115 - closed in finish()/abort()
        with io_errors("write", self.val_path):
            self._val.write(np.ascontiguousarray(ids[val_tok], dtype=self.dtype).tobytes())
        self.val_documents += int(val_doc.sum())
        self.val_tokens += int(val_tok.sum())

    def finish(self) -> list[dict[str, Any]]:
        if self._val is not None:
            self._val.close()
            self._val = None
            with open(self.val_path, "rb") as f:
                while block := f.read(16 << 20):
                    self.shards.write(np.frombuffer(block, dtype=self.dtype))
            self.val_path.unlink()
        return self.shards.close()

    def abort(self) -> None:
        self.shards.abort()
        if self._val is not None:
            self._val.close()
            self._val = None


def split_record(w: SplitWriter, total: int, seed: int) -> tuple[dict[str, Any], str | None]:
    """meta.json's `split` and, when the document split is not usable, the warning saying why."""
    f = w.val_fraction
    share = w.val_tokens / total if total else 0.0
    if w.val_documents == 0:
        reason = "no document was drawn for validation"
    elif w.val_documents == w.documents:
        reason = "every document was drawn for validation"
    elif not f / 4 <= share <= 2 * f:
        reason = f"the {w.val_documents} documents drawn hold {share:.1%} of the tokens, not about {f:.1%}"
    else:
        split = {"method": "documents", "val_fraction": f, "seed": seed, "val_documents": w.val_documents}
        return {**split, "val_tokens": w.val_tokens}, None
    note = (
        f"no document-level validation split ({reason}; {w.documents} documents): training will hold out "
        "the end of the token stream (data.val_fraction) instead"
    )
    return {"method": "tail", "val_fraction": f, "seed": seed, "reason": reason}, note
