"""How a global batch and the validation windows are shared by ranks (in-process, no process group)."""

from __future__ import annotations

import pytest
import torch

from fastgrow.loader import BatchLoader, TokenData, batch_split, shard_val_batches


@pytest.mark.parametrize(
    ("batch", "accum", "world", "want"),
    [
        # (per_rank, micro, micro_steps), worked out by hand from the documented rule
        (4, 1, 1, (4, 4, 1)),
        (4, 3, 1, (12, 4, 3)),
        (4, 2, 2, (4, 4, 1)),
        (4, 3, 2, (6, 3, 2)),  # 6 per rank; the largest divisor of 6 that is <= 4 is 3
        (16, 1, 8, (2, 2, 1)),
        (5, 2, 2, (5, 5, 1)),
        (7, 2, 2, (7, 7, 1)),
        (3, 8, 4, (6, 3, 2)),
    ],
)
def test_batch_split(batch, accum, world, want):
    s = batch_split(batch, accum, world)
    assert (s.per_rank, s.micro, s.micro_steps) == want
    assert s.global_seqs == batch * accum == s.per_rank * world
    assert [s.rank_range(r) for r in range(world)] == [(r * s.per_rank, (r + 1) * s.per_rank) for r in range(world)]


def test_batch_split_that_does_not_divide_names_both_settings():
    with pytest.raises(ValueError, match=r"data.batch_size x train.grad_accum = 6 x 1 = 6 .* 4 ranks"):
        batch_split(6, 1, 4)


def _loader(tiny_data, batch_size):
    return BatchLoader(
        TokenData.open(tiny_data), split="train", batch_size=batch_size, seq_len=32, val_fraction=0.02, seed=5
    )


def test_one_rank_reads_exactly_the_batches_of_grad_accum_next_batch_calls(tiny_data):
    old, new = _loader(tiny_data, 4), _loader(tiny_data, 4)
    split = batch_split(4, 3, 1)
    for _ in range(old.num_windows // 12 + 3):  # into the second epoch (a new shuffled order)
        want = [old.next_batch() for _ in range(3)]
        got = new.next_step(split, 0)
        assert len(got) == 3
        for (x0, y0), (x1, y1) in zip(want, got):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert old.state_dict() == new.state_dict() and new.epoch == 1


@pytest.mark.parametrize(("batch", "accum", "world"), [(4, 2, 2), (4, 3, 2), (6, 1, 3), (4, 1, 4)])
def test_ranks_read_disjoint_slices_of_the_one_process_batch_and_share_its_cursor(tiny_data, batch, accum, world):
    one = _loader(tiny_data, batch)
    ranks = [_loader(tiny_data, batch) for _ in range(world)]
    split = batch_split(batch, accum, world)
    for _ in range(3):
        want = torch.cat([one.next_batch()[0] for _ in range(accum)])
        parts = [torch.cat([x for x, _ in ld.next_step(split, r)]) for r, ld in enumerate(ranks)]
        assert all(len(p) == split.per_rank for p in parts)
        assert torch.equal(torch.cat(parts), want)  # rank r holds rows [r * per_rank, (r + 1) * per_rank)
        assert all(ld.state_dict() == one.state_dict() for ld in ranks)


@pytest.mark.parametrize(("n", "bs", "world"), [(3, 4, 2), (2, 4, 3), (1, 2, 4), (2, 5, 2)])
def test_validation_shards_cover_every_window_once_with_equal_forward_counts(n, bs, world):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 9, (bs, 6), generator=g), torch.randint(0, 9, (bs, 6), generator=g)) for _ in range(n)]
    shards = [shard_val_batches(batches, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # same number of forward passes on every rank
    real = [(x, y) for s in shards for x, y, rows in s if rows]
    assert all(rows == len(x) or rows == 0 for s in shards for x, _, rows in s)
    assert torch.equal(torch.cat([x for x, _ in real]), torch.cat([b[0] for b in batches]))
    assert torch.equal(torch.cat([y for _, y in real]), torch.cat([b[1] for b in batches]))
    assert all(len(x) <= bs for s in shards for x, _, _ in s)


def test_ranks_split_the_data_verification(tmp_path):
    """Rank r hashes shards r, r + W, ...: together they check every shard once."""
    import hashlib
    import json

    import numpy as np

    shards = []
    for i in range(3):
        toks = np.arange(100, dtype="<u2") + i
        (tmp_path / f"s{i}.bin").write_bytes(toks.tobytes())
        shards.append({"file": f"s{i}.bin", "num_tokens": 100, "sha256": hashlib.sha256(toks.tobytes()).hexdigest()})
    meta = {"format": "fastgrow-tokens", "format_version": 1, "dtype": "uint16", "vocab_size": 200, "eos_id": 0}
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "num_tokens": 300, "shards": shards}))
    raw = bytearray((tmp_path / "s1.bin").read_bytes())
    raw[0] ^= 1
    (tmp_path / "s1.bin").write_bytes(bytes(raw))  # shard 1 is corrupt
    TokenData.open(tmp_path, share=(0, 2))  # shards 0 and 2
    with pytest.raises(ValueError, match="s1.bin: checksum mismatch"):
        TokenData.open(tmp_path, share=(1, 2))
    with pytest.raises(ValueError, match="s1.bin: checksum mismatch"):
        TokenData.open(tmp_path)
