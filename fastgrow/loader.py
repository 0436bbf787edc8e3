"""Read prepared token shards and cut deterministic, resumable batches from them.

Public API
----------
``TokenData.open(data_dir, *, verify=True) -> TokenData``
    Reads ``meta.json`` (written by ``fastgrow prepare``, see ``fastgrow.data``), memory-maps the shards
    with numpy (nothing is copied), and when ``verify`` checks every shard's size and sha256 (and the
    tokenizer's). Attributes: ``data_dir``, ``meta``, ``vocab_size``, ``eos_id``, ``num_tokens``, ``dtype``,
    ``tokenizer_path``. ``read(start, n)`` copies ``n`` tokens of the stream (across shard boundaries);
    ``split(val_fraction) -> (train_view, val_view)``: validation is the end of the stream, contiguous:
    the prepared document-level split's ``val_tokens`` when meta.json has one (prepare writes the
    validation documents last), else the LAST ``round(num_tokens * val_fraction)`` tokens (at least 1,
    folders prepared before splits existed); training is everything before it.
``BatchLoader(data, *, split, batch_size, seq_len, val_fraction, seed)``
    ``next_batch() -> (x, y)``: int64 CPU tensors ``[batch_size, seq_len]``, ``y`` is ``x`` shifted by
    one. The view is cut into ``num_windows = (len(view) - 1) // seq_len`` windows; window ``i`` is the
    ``seq_len + 1`` tokens starting at ``i * seq_len`` (so windows overlap by the one target token and
    never leave their split: train and validation tokens are disjoint). Order: for ``split="train"`` epoch
    ``e`` visits the windows in ``numpy.random.default_rng([seed, e]).permutation(num_windows)``; for
    ``"val"`` in index order. Batches take the next ``batch_size`` windows of that endless sequence, so an
    epoch boundary may fall inside a batch. ``state_dict()`` is a JSON-serialisable cursor (epoch,
    position, and seq_len/batch_size/seed/num_windows/split/val_fraction/num_tokens, checked by
    ``load_state_dict`` so a resume with other settings fails with a clear error); resuming from it gives
    exactly the batches the uninterrupted loader would have given. ``val_batches(n)``: ``n`` fixed batches
    from the validation split (windows spread evenly over it), the same on every call, independent of the
    cursor.
``batch_split(batch_size, grad_accum, world_size) -> BatchSplit`` and ``BatchLoader.next_step(split, rank)``
    Several ranks (torchrun) share one global batch of ``batch_size * grad_accum`` sequences per optimizer
    step: the loader hands out the step's ``global_seqs`` windows in the order above (one process would
    read them as ``grad_accum`` batches of ``batch_size``), rank r takes the contiguous slice
    ``[r * per_rank, (r + 1) * per_rank)`` and cuts it into ``micro_steps`` micro-batches of ``micro``
    rows (the largest divisor of per_rank that is at most batch_size, so a rank never runs a bigger
    forward pass than one process would). Every rank advances the same cursor past the whole global
    batch, so the cursor (and a checkpoint of it) does not depend on the world size; with one rank,
    ``next_step`` returns exactly the ``grad_accum`` batches ``next_batch`` would.
    ``shard_val_batches(batches, rank, world_size)``: the validation windows cut the same way, as
    ``(x, y, rows)`` with the same number of forward passes on every rank (``rows = 0``: filler).

Errors: a missing directory or meta.json -> ``FileNotFoundError`` telling to run ``fastgrow prepare``; a
corrupt shard -> ``ValueError`` naming it ("checksum mismatch" / "size mismatch"); a split too small for
one window -> ``ValueError`` saying how many tokens are needed.

This module needs only numpy and torch (never ``datasets``/``tokenizers``), so it runs on the GPU machine.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fastgrow.data import FORMAT_NAME, FORMAT_VERSION, META_FILE, DataError, sha256_file
from fastgrow.fsutil import contained_path

if TYPE_CHECKING:
    from fastgrow.config import RunConfig

_CURSOR_VERSION = 1
_SPLITS = ("train", "val")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class TokenView:
    """The contiguous token range ``[start, stop)`` of a TokenData stream."""

    def __init__(self, data: TokenData, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= data.num_tokens:
            raise ValueError(f"bad token range [{start}, {stop}) for a stream of {data.num_tokens} tokens")
        self.data, self.start, self.stop = data, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def read(self, offset: int, n: int) -> np.ndarray:
        """Copy of tokens ``[offset, offset + n)`` of this view (offsets relative to the view)."""
        if offset < 0 or n < 0 or offset + n > len(self):
            raise IndexError(f"tokens [{offset}, {offset + n}) out of range for a view of {len(self)} tokens")
        return self.data.read(self.start + offset, n)

    def __repr__(self) -> str:
        return f"TokenView([{self.start}, {self.stop}) of {self.data.data_dir})"


class TokenData:
    """Prepared token shards, memory-mapped. Build with `TokenData.open`."""

    def __init__(self, data_dir: Path, meta: dict[str, Any], maps: list[np.ndarray]) -> None:
        self.data_dir = data_dir
        self.meta = meta
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.vocab_size = int(meta["vocab_size"])
        self.eos_id = int(meta["eos_id"])
        self.num_tokens = int(meta["num_tokens"])
        tok_file = (meta.get("tokenizer") or {}).get("file", "tokenizer.json")
        self.tokenizer_path = _inside(data_dir, tok_file)
        self._maps = maps
        # _starts[i] = stream offset of shard i's first token.
        self._starts = [0]
        for m in maps:
            self._starts.append(self._starts[-1] + len(m))

    @classmethod
    def open(cls, data_dir: str | Path, *, verify: bool = True, share: tuple[int, int] = (0, 1)) -> TokenData:
        """share = (rank, world_size): with verify, hash only shards i with i % world_size == rank (and the
        tokenizer on rank 0), so the ranks of a run check the data once between them, in parallel."""
        rank, world = share
        d = Path(data_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"data directory {d} not found; create it with `fastgrow prepare SOURCE --out {d}`")
        meta_path = d / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} not found ({d} is incomplete or not prepared); run `fastgrow prepare` to create it"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{meta_path}: unreadable metadata ({e}); re-run `fastgrow prepare`") from None
        _check_meta(meta, meta_path)
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        maps: list[np.ndarray] = []
        total = 0
        for i, shard in enumerate(meta["shards"]):
            path = _inside(d, shard["file"])
            n = int(shard["num_tokens"])
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} listed in {META_FILE} is missing; re-run `fastgrow prepare`")
            size = path.stat().st_size
            if size != n * dtype.itemsize:
                raise DataError(
                    f"shard {path}: size mismatch: {size} bytes on disk, {n * dtype.itemsize} expected "
                    f"({n} tokens of {dtype.name}); the data is corrupt, re-run `fastgrow prepare`"
                )
            if verify and i % world == rank:
                got = sha256_file(path)
                if got != shard["sha256"]:
                    raise DataError(
                        f"shard {path}: checksum mismatch (sha256 {got[:16]}..., expected "
                        f"{shard['sha256'][:16]}...); the file is corrupt, re-run `fastgrow prepare`"
                    )
            # mmap cannot map an empty file; an empty shard contributes nothing to the stream.
            maps.append(np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.empty(0, dtype))
            total += n
        if total != int(meta["num_tokens"]):
            raise DataError(f"{meta_path}: shards hold {total} tokens but num_tokens says {meta['num_tokens']}")
        data = cls(d, meta, maps)
        tok = meta.get("tokenizer", {})
        check_tok = verify and rank == 0 and bool(tok.get("sha256")) and data.tokenizer_path.is_file()
        if check_tok and sha256_file(data.tokenizer_path) != tok["sha256"]:
            raise DataError(f"tokenizer {data.tokenizer_path}: checksum mismatch; re-run `fastgrow prepare`")
        return data

    def read(self, start: int, n: int) -> np.ndarray:
        """Copy of stream tokens ``[start, start + n)`` in the on-disk dtype; may span several shards."""
        if start < 0 or n < 0 or start + n > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + n}) out of range for {self.num_tokens} tokens")
        out = np.empty(n, dtype=self.dtype)
        i = bisect.bisect_right(self._starts, start) - 1
        pos = 0
        while pos < n:
            off = start + pos - self._starts[i]
            take = min(n - pos, len(self._maps[i]) - off)
            out[pos : pos + take] = self._maps[i][off : off + take]
            pos += take
            i += 1
        return out

    @property
    def document_split(self) -> dict[str, Any] | None:
        """meta.json's document-level validation split (made by prepare), or None (legacy / tail)."""
        split = self.meta.get("split")
        return split if isinstance(split, dict) and split.get("method") == "documents" else None

    def val_tokens(self, val_fraction: float) -> int:
        """How many tokens the validation split holds: the prepared document split's `val_tokens` when the
        data has one (its documents end the stream), else `val_fraction` of the stream (at least 1)."""
        if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if self.document_split is not None:
            return int(self.document_split["val_tokens"])
        return min(self.num_tokens, max(1, round(self.num_tokens * val_fraction)))

    def split(self, val_fraction: float) -> tuple[TokenView, TokenView]:
        """(train, val): validation is the end of the stream, contiguous (see `val_tokens`)."""
        cut = self.num_tokens - self.val_tokens(val_fraction)
        return TokenView(self, 0, cut), TokenView(self, cut, self.num_tokens)

    def __repr__(self) -> str:
        return (
            f"TokenData({self.data_dir}, {self.num_tokens} tokens in {len(self._maps)} shards, "
            f"vocab {self.vocab_size}, {self.dtype.name})"
        )


def _check_meta(meta: Any, where: Path) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise DataError(f"{where} is not fastgrow token metadata; re-run `fastgrow prepare`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{where}: format_version {meta.get('format_version')!r} is not supported (this fastgrow reads "
            f"{FORMAT_VERSION}); re-run `fastgrow prepare`"
        )
    for key in ("dtype", "vocab_size", "eos_id", "num_tokens", "shards"):
        if key not in meta:
            raise DataError(f"{where}: missing key {key!r}; re-run `fastgrow prepare`")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{where}: unsupported token dtype {meta['dtype']!r} (uint16 or uint32)")
    if meta.get("byte_order", "little") != "little":
        raise DataError(f"{where}: unsupported byte order {meta['byte_order']!r}")
    for shard in meta["shards"]:
        if not isinstance(shard, dict) or not {"file", "num_tokens", "sha256"} <= set(shard):
            raise DataError(f"{where}: malformed shard entry {shard!r}")
        if not isinstance(shard["file"], str) or Path(shard["file"]).name != shard["file"]:
            raise DataError(f"{where}: shard file {shard['file']!r} must be a plain file name")
    split = meta.get("split")
    if isinstance(split, dict) and split.get("method") == "documents":
        n = split.get("val_tokens")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n < int(meta["num_tokens"]):
            raise DataError(f"{where}: split.val_tokens {n!r} must be an integer in (0, num_tokens)")
    tok = meta.get("tokenizer")
    if tok is not None and (not isinstance(tok, dict) or not isinstance(tok.get("file", ""), str)):
        raise DataError(f"{where}: malformed tokenizer entry {tok!r}")


def _inside(data_dir: Path, name: str) -> Path:
    """A file named in meta.json, which must stay inside the data folder (no '..', absolute path or
    symlink out of it: the tokenizer is copied into every checkpoint and export)."""
    try:
        return contained_path(data_dir, name, str(data_dir / META_FILE))
    except ValueError as e:
        raise DataError(str(e)) from None


class BatchLoader:
    """Deterministic, resumable (x, y) batches over one split of a TokenData. See the module docstring."""

    def __init__(
        self,
        data: TokenData,
        *,
        split: str,
        batch_size: int,
        seq_len: int,
        val_fraction: float,
        seed: int,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.seq_len = _positive_int(seq_len, "seq_len")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.data, self.split, self.val_fraction = data, split, float(val_fraction)
        train, val = data.split(val_fraction)
        self._val = val
        self.view = train if split == "train" else val
        self.num_windows = self._windows(self.view, split)
        self.epoch = 0
        self.position = 0  # index into this epoch's order of the next window to hand out
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @classmethod
    def for_run(cls, data: TokenData, cfg: RunConfig, split: str) -> BatchLoader:
        """The loader a run reads `split` with: the run's batch size, sequence length, held-out fraction
        and seed."""
        d = cfg.data
        return cls(
            data,
            split=split,
            batch_size=d.batch_size,
            seq_len=d.seq_len,
            val_fraction=d.val_fraction,
            seed=cfg.train.seed,
        )

    def _windows(self, view: TokenView, split: str) -> int:
        n = (len(view) - 1) // self.seq_len
        if n < 1:
            need = self.seq_len + 1
            hint = (
                f"at least {math.ceil(need / self.val_fraction)} tokens in total at val_fraction={self.val_fraction}"
                if split == "val"
                else f"about {math.ceil(need / (1 - self.val_fraction))} tokens in total"
            )
            raise ValueError(
                f"the {split} split has {len(view)} tokens, too few for one window of seq_len + 1 = {need} "
                f"tokens; it needs at least {need} tokens ({hint}); prepare more data or lower seq_len"
            )
        return n

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            if self.split == "train":
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            else:
                self._order = np.arange(self.num_windows)
            self._order_epoch = epoch
        return self._order

    def _next_indices(self, n: int | None = None) -> np.ndarray:
        n = self.batch_size if n is None else n
        out = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            order = self._epoch_order(self.epoch)
            take = min(n - filled, self.num_windows - self.position)
            out[filled : filled + take] = order[self.position : self.position + take]
            filled += take
            self.position += take
            if self.position == self.num_windows:
                self.epoch += 1
                self.position = 0
        return out

    def _gather(self, view: TokenView, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.seq_len
        rows = np.empty((len(windows), s + 1), dtype=np.int64)
        for r, w in enumerate(windows):
            rows[r] = view.read(int(w) * s, s + 1)
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), each int64 [batch_size, seq_len] on the CPU; advances the cursor."""
        return self._gather(self.view, self._next_indices())

    def next_step(self, split: BatchSplit, rank: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Rank `rank`'s micro-batches of the next optimizer step (see `batch_split`); advances the cursor
        past the whole global batch and reads only this rank's windows."""
        if split.global_seqs % self.batch_size:
            raise ValueError(f"a step's {split.global_seqs} sequences are not whole batches of {self.batch_size}")
        start, stop = split.rank_range(rank)
        mine = self._next_indices(split.global_seqs)[start:stop]
        m = split.micro
        return [self._gather(self.view, mine[i * m : (i + 1) * m]) for i in range(split.micro_steps)]

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def val_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`n` fixed batches from the validation split: windows spread evenly over it (repeating only when
        it has fewer than n * batch_size windows). Same result on every call; the cursor is untouched."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        if n == 0:
            return []
        nw = self._windows(self._val, "val")
        idx = np.round(np.linspace(0, nw - 1, n * self.batch_size)).astype(np.int64)
        return [self._gather(self._val, idx[i * self.batch_size : (i + 1) * self.batch_size]) for i in range(n)]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable cursor (plain ints/floats/strings)."""
        return {
            "version": _CURSOR_VERSION,
            "split": self.split,
            "epoch": int(self.epoch),
            "position": int(self.position),
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "num_windows": int(self.num_windows),
            "val_fraction": self.val_fraction,
            "num_tokens": int(self.data.num_tokens),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`; raises ValueError if it was made with other settings/data."""
        if not isinstance(state, dict):
            raise ValueError(f"data cursor must be a dict, got {type(state).__name__}")
        if state.get("version") != _CURSOR_VERSION:
            raise ValueError(f"data cursor version {state.get('version')!r} is not supported ({_CURSOR_VERSION})")
        mine = self.state_dict()
        # Most explanatory first: a changed setting is reported before the window count it changes.
        for key in ("split", "seq_len", "batch_size", "seed", "val_fraction", "num_tokens", "num_windows"):
            if key not in state:
                raise ValueError(f"data cursor is missing {key!r}")
            if state[key] != mine[key]:
                raise ValueError(
                    f"data cursor mismatch: {key} is {state[key]!r} in the saved state but {mine[key]!r} now "
                    "(resume with the same data and data settings)"
                )
        epoch, position = state.get("epoch"), state.get("position")
        if not isinstance(epoch, int) or epoch < 0 or not isinstance(position, int):
            raise ValueError(f"data cursor has a bad epoch/position: {epoch!r}/{position!r}")
        if not 0 <= position < self.num_windows:
            raise ValueError(f"data cursor position {position} is outside [0, {self.num_windows})")
        self.epoch, self.position = epoch, position


@dataclass(frozen=True)
class BatchSplit:
    """How one optimizer step's global batch is shared by `world_size` ranks (see `batch_split`)."""

    global_seqs: int  # sequences per optimizer step, over all ranks
    world_size: int
    per_rank: int  # sequences each rank processes per step
    micro: int  # rows of one forward/backward pass on a rank
    micro_steps: int  # forward/backward passes per rank per step

    def rank_range(self, rank: int) -> tuple[int, int]:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside [0, {self.world_size})")
        return rank * self.per_rank, (rank + 1) * self.per_rank


def batch_split(batch_size: int, grad_accum: int, world_size: int) -> BatchSplit:
    """Split data.batch_size x train.grad_accum sequences per step over `world_size` ranks.

    Each rank gets global / world_size sequences in micro-batches of the largest divisor of that count
    that is at most batch_size (a rank's forward pass is never bigger than one process's). Raises
    ValueError naming both settings when the global batch does not divide by the world size.
    """
    for name, v in (("data.batch_size", batch_size), ("train.grad_accum", grad_accum), ("world size", world_size)):
        _positive_int(v, name)
    total = batch_size * grad_accum
    if total % world_size:
        raise ValueError(
            f"data.batch_size x train.grad_accum = {batch_size} x {grad_accum} = {total} sequences per step "
            f"do not split evenly over {world_size} ranks; choose values whose product is a multiple of "
            f"{world_size}"
        )
    per_rank = total // world_size
    micro = max(d for d in range(1, min(batch_size, per_rank) + 1) if per_rank % d == 0)
    return BatchSplit(total, world_size, per_rank, micro, per_rank // micro)


def shard_val_batches(
    batches: list[tuple[torch.Tensor, torch.Tensor]], rank: int, world_size: int
) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Rank `rank`'s share of the validation windows as (x, y, rows) micro-batches.

    The windows of all batches, in order, are cut into world_size contiguous slices of ceil(N / world)
    (the last ones shorter, maybe empty) and each slice into micro-batches of at most the batch size.
    Every rank gets the same number of micro-batches (FSDP runs a collective in every forward pass): a
    rank with fewer windows gets filler micro-batches (one window, rows = 0) that the mean ignores.
    """
    if not batches:
        return []
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    n, bs = x.shape[0], batches[0][0].shape[0]
    per = math.ceil(n / world_size)
    start, stop = min(rank * per, n), min((rank + 1) * per, n)
    out = []
    for k in range(math.ceil(per / bs)):
        lo, hi = start + k * bs, min(start + (k + 1) * bs, stop)
        if lo < hi:
            out.append((x[lo:hi], y[lo:hi], hi - lo))
        else:
            out.append((x[:1], y[:1], 0))
    return out
