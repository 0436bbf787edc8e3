"""fastgrow.loader: shard reading/verification, splits, deterministic batches, cursor resume.

Most tests use a hand-written dataset whose token at stream position p is p (mod 65536), so every
window's content says exactly where it came from; the prepare -> loader round trip is in test_data.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastgrow.data import DataError, sha256_file
from fastgrow.loader import BatchLoader, TokenData

N_TOKENS = 10_007  # odd sizes: shards of 997 tokens, windows that straddle shard boundaries
SHARD = 997


def write_dataset(out: Path, tokens: np.ndarray, shard_tokens: int, vocab_size: int = 65536) -> Path:
    """Write shards + meta.json in prepare's format (version 1)."""
    out.mkdir(parents=True)
    dtype = np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")
    shards = []
    for i, start in enumerate(range(0, len(tokens), shard_tokens)):
        name = f"tokens-{i:05d}.bin"
        tokens[start : start + shard_tokens].astype(dtype).tofile(out / name)
        n = len(tokens[start : start + shard_tokens])
        shards.append({"file": name, "num_tokens": n, "sha256": sha256_file(out / name)})
    meta = {
        "format": "fastgrow-tokens",
        "format_version": 1,
        "dtype": dtype.name,
        "byte_order": "little",
        "vocab_size": vocab_size,
        "eos_id": 0,
        "num_tokens": int(len(tokens)),
        "num_documents": 1,
        "shards": shards,
        "tokenizer": {"file": "tokenizer.json"},
    }
    (out / "meta.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def arange_dir(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("ld") / "d", np.arange(N_TOKENS), SHARD)


def loader(data: TokenData, split: str = "train", **kw) -> BatchLoader:
    args = dict(split=split, batch_size=5, seq_len=33, val_fraction=0.1, seed=7)
    args.update(kw)
    return BatchLoader(data, **args)


def windows_of(x: torch.Tensor, seq_len: int) -> list[int]:
    """Window index of each row (rows of the arange dataset start at their stream position)."""
    assert torch.all(x[:, 0] % seq_len == 0)
    return (x[:, 0] // seq_len).tolist()


def test_open_errors(tmp_path, arange_dir):
    with pytest.raises(FileNotFoundError, match="fastgrow prepare"):
        TokenData.open(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "tokens-00000.bin").write_bytes(b"\x00\x00")
    with pytest.raises(FileNotFoundError, match=r"meta\.json.*fastgrow prepare"):
        TokenData.open(tmp_path / "half")
    bad = tmp_path / "badmeta"
    bad.mkdir()
    (bad / "meta.json").write_text('{"format": "fastgrow-tokens", "format_version": 99}')
    with pytest.raises(DataError, match="format_version 99"):
        TokenData.open(bad)
    (bad / "meta.json").write_text("{trunc")
    with pytest.raises(DataError, match="unreadable metadata"):
        TokenData.open(bad)


def test_open_and_read_across_shards(arange_dir):
    td = TokenData.open(arange_dir)
    assert td.num_tokens == N_TOKENS and td.vocab_size == 65536 and td.eos_id == 0
    assert td.tokenizer_path == arange_dir / "tokenizer.json"
    assert td.read(0, N_TOKENS).tolist() == list(range(N_TOKENS))
    assert td.read(SHARD - 3, 2 * SHARD + 6).tolist() == list(range(SHARD - 3, 3 * SHARD + 3))
    assert td.read(N_TOKENS, 0).size == 0
    with pytest.raises(IndexError):
        td.read(N_TOKENS - 2, 3)
    # the shards are memory-mapped, not loaded
    assert all(isinstance(m, np.memmap) for m in td._maps)


def test_corrupt_shard_detected(tmp_path):
    d = write_dataset(tmp_path / "d", np.arange(5000), 1000)
    raw = bytearray((d / "tokens-00002.bin").read_bytes())
    raw[100] ^= 0xFF
    (d / "tokens-00002.bin").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"tokens-00002\.bin: checksum mismatch"):
        TokenData.open(d)
    assert TokenData.open(d, verify=False).num_tokens == 5000  # sizes still match: opens unverified
    meta = json.loads((d / "meta.json").read_text())  # an empty shard (hand-made) is harmless
    (d / "tokens-00005.bin").write_bytes(b"")
    meta["shards"].append({"file": "tokens-00005.bin", "num_tokens": 0, "sha256": sha256_file(d / "tokens-00005.bin")})
    (d / "meta.json").write_text(json.dumps(meta))
    assert TokenData.open(d, verify=False).read(4990, 10).tolist() == list(range(4990, 5000))
    good = (d / "tokens-00003.bin").read_bytes()
    (d / "tokens-00003.bin").write_bytes(good[:-2])
    with pytest.raises(ValueError, match=r"tokens-00003\.bin: size mismatch"):
        TokenData.open(d, verify=False)
    (d / "tokens-00003.bin").write_bytes(good)
    (d / "tokens-00004.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokens-00004\.bin"):
        TokenData.open(d, verify=False)


def test_split_is_contiguous_tail(arange_dir):
    td = TokenData.open(arange_dir)
    train, val = td.split(0.1)
    assert len(val) == round(N_TOKENS * 0.1) and len(train) + len(val) == N_TOKENS
    assert val.read(0, len(val)).tolist() == list(range(len(train), N_TOKENS))
    assert train.read(len(train) - 1, 1).tolist() == [len(train) - 1]
    for bad in (0.0, 1.0, -0.1, "0.1"):
        with pytest.raises(ValueError, match="val_fraction"):
            td.split(bad)


def test_batches_shape_shift_and_disjoint_splits(arange_dir):
    td = TokenData.open(arange_dir)
    cut = len(td.split(0.1)[0])
    tr = loader(td)
    seen = set()
    for _ in range(tr.num_windows // tr.batch_size + 2):  # more than an epoch
        x, y = tr.next_batch()
        assert x.shape == y.shape == (5, 33) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # y is x shifted by one, also across shard boundaries
        assert int(y.max()) < cut  # the targets never reach the validation tokens
        seen.update(windows_of(x, 33))
    assert seen == set(range(tr.num_windows)) and tr.num_windows == (cut - 1) // 33
    va = loader(td, "val")
    assert va.num_windows == (N_TOKENS - cut - 1) // 33
    x, y = va.next_batch()
    assert int(x.min()) >= cut and torch.equal(y, x + 1)
    assert (x[:, 0] - cut).tolist() == [33 * i for i in range(5)]  # val batches go in order
    for vx, vy in tr.val_batches(3):
        assert int(vx.min()) >= cut and torch.equal(vy, vx + 1)


def test_deterministic_order(arange_dir):
    td = TokenData.open(arange_dir)
    a, b, c = loader(td), loader(td), loader(td, seed=8)
    xa = [a.next_batch()[0] for _ in range(6)]
    xb = [b.next_batch()[0] for _ in range(6)]
    xc = [c.next_batch()[0] for _ in range(6)]
    assert all(torch.equal(p, q) for p, q in zip(xa, xb))
    assert not all(torch.equal(p, q) for p, q in zip(xa, xc))
    # the order is numpy's Generator([seed, epoch]) permutation
    expected = np.random.default_rng([7, 0]).permutation(a.num_windows)[:30].tolist()
    assert sum((windows_of(x, 33) for x in xa), []) == expected


def test_epoch_rollover(tmp_path):
    td = TokenData.open(write_dataset(tmp_path / "d", np.arange(700), 256))
    ld = BatchLoader(td, split="train", batch_size=4, seq_len=10, val_fraction=0.05, seed=3)
    nw = ld.num_windows  # (665 - 1) // 10 = 66 windows: 16 full batches, then one spanning epochs
    assert nw == 66
    order = [w for _ in range(34) for w in windows_of(ld.next_batch()[0], 10)]  # 136 = 2 epochs + 4
    e0, e1, e2 = order[:nw], order[nw : 2 * nw], order[2 * nw :]
    assert sorted(e0) == sorted(e1) == list(range(nw)) and e0 != e1
    assert e0 == np.random.default_rng([3, 0]).permutation(nw).tolist()
    assert e1 == np.random.default_rng([3, 1]).permutation(nw).tolist()
    assert e2 == np.random.default_rng([3, 2]).permutation(nw)[:4].tolist()
    assert ld.state_dict()["epoch"] == 2 and ld.state_dict()["position"] == 4


# 272 train windows: with batch 19 an epoch ends inside batch 15; with batch 17, exactly after batch 16.
@pytest.mark.parametrize("k,bs", [(0, 19), (1, 19), (13, 19), (14, 19), (30, 19), (16, 17)])
def test_resume_gives_identical_batches(arange_dir, k, bs):
    td = TokenData.open(arange_dir)
    straight = loader(td, batch_size=bs)
    for _ in range(k):
        straight.next_batch()
    state = json.loads(json.dumps(straight.state_dict()))  # survives a JSON checkpoint
    if (k, bs) == (16, 17):
        assert (state["epoch"], state["position"]) == (1, 0)
    resumed = loader(TokenData.open(arange_dir), batch_size=bs)
    resumed.load_state_dict(state)
    for _ in range(20):
        (x1, y1), (x2, y2) = straight.next_batch(), resumed.next_batch()
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert resumed.state_dict() == straight.state_dict()


def test_resume_mismatch_errors(arange_dir, tmp_path):
    td = TokenData.open(arange_dir)
    src = loader(td)
    src.next_batch()
    state = src.state_dict()
    for kw, field in (
        (dict(seq_len=32), "seq_len"),
        (dict(batch_size=6), "batch_size"),
        (dict(seed=8), "seed"),
        (dict(split="val"), "split"),
        (dict(val_fraction=0.2), "val_fraction"),
    ):
        with pytest.raises(ValueError, match=f"data cursor mismatch: {field}"):
            loader(td, **kw).load_state_dict(state)
    other = TokenData.open(write_dataset(tmp_path / "o", np.arange(20_000), 5000))
    with pytest.raises(ValueError, match="data cursor mismatch: num_tokens is 10007 in the saved state but 20000"):
        loader(other).load_state_dict(state)
    with pytest.raises(ValueError, match="data cursor mismatch: num_windows"):
        loader(td).load_state_dict({**state, "num_windows": 5})
    with pytest.raises(ValueError, match="missing 'seed'"):
        loader(td).load_state_dict({k: v for k, v in state.items() if k != "seed"})
    with pytest.raises(ValueError, match="position"):
        loader(td).load_state_dict({**state, "position": 10**6})
    with pytest.raises(ValueError, match="version"):
        loader(td).load_state_dict({**state, "version": 2})


def test_val_batches_fixed(arange_dir):
    td = TokenData.open(arange_dir)
    tr = loader(td)
    first = tr.val_batches(4)
    tr.next_batch()
    again = tr.val_batches(4)
    other = loader(td, seed=99).val_batches(4)
    assert len(first) == 4 and tr.state_dict()["position"] == 5  # val_batches does not move the cursor
    for (a, b), (c, d), (e, f) in zip(first, again, other):
        assert torch.equal(a, c) and torch.equal(b, d) and torch.equal(a, e) and torch.equal(b, f)
    starts = torch.cat([x[:, 0] for x, _ in first]).tolist()
    assert starts == sorted(set(starts))  # 20 distinct windows spread over the 30 of the val split
    assert tr.val_batches(0) == []


def test_too_small_split(tmp_path):
    td = TokenData.open(write_dataset(tmp_path / "d", np.arange(200), 64))
    with pytest.raises(ValueError, match=r"val split has 20 tokens.*needs at least 34 tokens"):
        BatchLoader(td, split="val", batch_size=2, seq_len=33, val_fraction=0.1, seed=0)
    with pytest.raises(ValueError, match=r"train split has 180 tokens.*needs at least 257 tokens"):
        BatchLoader(td, split="train", batch_size=2, seq_len=256, val_fraction=0.1, seed=0)
    with pytest.raises(ValueError, match="split must be"):
        BatchLoader(td, split="test", batch_size=2, seq_len=8, val_fraction=0.1, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(td, split="train", batch_size=0, seq_len=8, val_fraction=0.1, seed=0)


def test_uint32_shards(tmp_path):
    toks = np.arange(70_000, 70_000 + 3000, dtype=np.int64)
    td = TokenData.open(write_dataset(tmp_path / "d", toks, 1000, vocab_size=80_000))
    x, y = BatchLoader(td, split="train", batch_size=2, seq_len=50, val_fraction=0.1, seed=0).next_batch()
    assert int(x.min()) >= 70_000 and torch.equal(y, x + 1)


def test_loader_does_not_import_datasets(arange_dir):
    code = (
        "import sys; sys.modules['datasets'] = None\n"
        "from fastgrow.loader import TokenData, BatchLoader\n"
        f"td = TokenData.open({str(arange_dir)!r})\n"
        "ld = BatchLoader(td, split='train', batch_size=2, seq_len=8, val_fraction=0.1, seed=0)\n"
        "x, y = ld.next_batch()\n"
        "assert x.shape == (2, 8)\n"
        "assert sys.modules['datasets'] is None and 'tokenizers' not in sys.modules\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
