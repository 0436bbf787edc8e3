"""prepare at scale and its sharp edges: big text files split into documents, compressed sources, the
document-level validation split across sources, missing fields, EOS/vocab options, output folders, a full disk."""

from __future__ import annotations

import bz2
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("datasets")

from test_data import decode_docs, make_text, no_leftovers  # noqa: E402

from fastgrow.data import DataError, default_out_dir, prepare  # noqa: E402
from fastgrow.loader import BatchLoader, TokenData  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KW = dict(vocab_size=300, progress=False)


def paragraphs(seed: int, n: int) -> str:
    return "".join(make_text(seed + i, 40) + "\n" for i in range(n))  # blank line after each paragraph


def test_a_big_text_file_is_split_at_blank_lines(tmp_path):
    text = paragraphs(0, 120)
    (tmp_path / "input.txt").write_text(text)
    meta = prepare(tmp_path / "input.txt", tmp_path / "out", doc_chars=2000, val_fraction=0, **KW)
    docs = decode_docs(tmp_path / "out")
    assert "".join(docs) == text  # nothing lost or added, in order
    assert len(docs) == meta["num_documents"] > len(text) // 2000
    assert all(len(d) <= 2000 for d in docs)
    assert all(d.endswith("\n\n") for d in docs[:-1])  # cut after a blank line
    assert meta["split_files"] == 1 and meta["split"]["method"] == "tail"
    # A file below the bound stays one document (source code is never cut).
    meta = prepare(tmp_path / "input.txt", tmp_path / "whole", doc_chars=len(text), val_fraction=0, **KW)
    assert meta["num_documents"] == 1 and meta["split_files"] == 0


def test_compressed_sources(tmp_path):
    zstd = pytest.importorskip("zstandard")
    texts = [make_text(i, 200) for i in range(6)]
    with gzip.open(tmp_path / "a.txt.gz", "wt") as f:
        f.write(texts[0])
    rows = "".join(json.dumps({"text": t}) + "\n" for t in texts[1:3])
    (tmp_path / "b.jsonl.bz2").write_bytes(bz2.compress(rows.encode()))
    rows = "".join(json.dumps({"text": t}) + "\n" for t in texts[3:5])
    (tmp_path / "c.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(rows.encode()))
    with gzip.open(tmp_path / "d.json.gz", "wt") as f:
        json.dump([{"text": texts[5]}], f)
    srcs = [tmp_path / n for n in ("a.txt.gz", "b.jsonl.bz2", "c.jsonl.zst", "d.json.gz")]
    prepare(srcs, tmp_path / "out", val_fraction=0, **KW)
    assert decode_docs(tmp_path / "out") == texts


def test_validation_documents_are_drawn_across_all_sources(tmp_path):
    srcs = []
    for s in range(3):
        p = tmp_path / f"src{s}.jsonl"
        p.write_text(
            "".join(
                json.dumps({"text": f"source {s} doc {i}: " + make_text(s * 1000 + i, 24)}) + "\n" for i in range(150)
            )
        )
        srcs.append(p)
    meta = prepare(srcs, tmp_path / "out", val_fraction=0.1, seed=7, **KW)
    split = meta["split"]
    assert split["method"] == "documents" and split["seed"] == 7
    docs = decode_docs(tmp_path / "out")
    val = docs[len(docs) - split["val_documents"] :]  # validation documents end the stream
    assert {d.split(" doc ")[0] for d in val} == {"source 0", "source 1", "source 2"}
    assert 20 <= len(val) <= 70  # about 10% of 450
    # The draw is the documented one: random.Random(seed), one draw per document in source order.
    import random

    rng = random.Random(7)
    order = [f"source {s} doc {i}:" for s in range(3) for i in range(150)]
    expected_val = [d for d in order if rng.random() < 0.1]
    assert [d.split(" ")[0] + " " + d.split(" ")[1] + " doc " + d.split(" ")[3] for d in val] == expected_val
    # The loader's validation split is exactly those documents' tokens, whatever data.val_fraction says.
    td = TokenData.open(tmp_path / "out")
    train, v = td.split(0.02)
    assert len(v) == split["val_tokens"] and len(train) + len(v) == td.num_tokens
    assert int(td.read(len(train) - 1, 1)[0]) == meta["eos_id"]  # the cut is on a document boundary
    BatchLoader(td, split="val", batch_size=2, seq_len=16, val_fraction=0.02, seed=0).next_batch()
    # Deterministic, and the seed matters.
    assert prepare(srcs, tmp_path / "again", val_fraction=0.1, seed=7, **KW) == meta
    assert prepare(srcs, tmp_path / "other", val_fraction=0.1, seed=8, **KW)["split"] != split
    # Folders prepared before splits existed: the loader cuts val_fraction off the end, as before.
    m = json.loads((tmp_path / "out" / "meta.json").read_text())
    del m["split"]
    (tmp_path / "out" / "meta.json").write_text(json.dumps(m))
    assert len(TokenData.open(tmp_path / "out").split(0.1)[1]) == round(td.num_tokens * 0.1)


def test_missing_fields_and_empty_files(tmp_path):
    jl = tmp_path / "x.jsonl"
    jl.write_text('{"text": "fine text here"}\n{"body": "no text field"}\n{"text": "more"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: field 'text' is missing \(fields: \['body'\]\).*--skip-missing"):
        prepare(jl, tmp_path / "o", **KW)
    warned: list[str] = []
    meta = prepare(jl, tmp_path / "o", skip_missing=True, warn=warned.append, **KW)
    assert meta["skipped_records"] == 1 and meta["num_documents"] == 2
    assert any("skipped 1 records" in w for w in warned)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"no text found in .*empty\.jsonl"):
        prepare(tmp_path / "empty.jsonl", tmp_path / "e", **KW)
    assert no_leftovers(tmp_path) == []


def test_eos_vocab_and_ignored_options(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    (tmp_path / "d.txt").write_text(make_text(3, 300))
    vocab = {w: i for i, w in enumerate(sorted(set(make_text(3, 300).split())))}
    vocab["[UNK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    tok.save(str(tmp_path / "tok.json"))
    with pytest.raises(
        DataError, match=r"no '<\|endoftext\|>' token; pass its end-of-text token with --eos-token.*'</s>'"
    ):
        prepare(tmp_path / "d.txt", tmp_path / "o", tokenizer=tmp_path / "tok.json", progress=False)
    meta = prepare(
        tmp_path / "d.txt", tmp_path / "o", tokenizer=tmp_path / "tok.json", eos_token="</s>", progress=False
    )
    assert meta["eos_token"] == "</s>" and meta["eos_id"] == tok.token_to_id("</s>")
    with pytest.raises(ValueError, match=r"vocab_size \(4096\) .* would be ignored with tokenizer="):
        prepare(
            tmp_path / "d.txt",
            tmp_path / "o2",
            tokenizer=tmp_path / "tok.json",
            eos_token="</s>",
            vocab_size=4096,
            progress=False,
        )
    warned: list[str] = []
    meta = prepare(
        tmp_path / "d.txt", tmp_path / "o3", vocab_size=1_000_000, text_field="body", progress=False, warn=warned.append
    )
    assert any(f"has {meta['vocab_size']} tokens, fewer than the 1000000 asked for" in w for w in warned), warned
    assert any("text_field='body' (--text-field) is ignored" in w for w in warned), warned


def test_output_folder_from_the_first_source(tmp_path):
    assert default_out_dir("stdlib") == Path("data/stdlib")
    assert default_out_dir(["my_corpus/", "stdlib"]) == Path("data/my_corpus")
    assert default_out_dir("/x/input.txt") == Path("data/input")
    assert default_out_dir("/x/web.jsonl.gz") == Path("data/web")
    assert default_out_dir("hf:roneneldan/TinyStories@train") == Path("data/TinyStories")
    corpus = tmp_path / "my_corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(make_text(1, 400))
    cmd = [sys.executable, "-m", "fastgrow.cli", "prepare", "my_corpus", "--vocab-size", "300", "--quiet"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "data" / "my_corpus" / "meta.json").is_file() and not (tmp_path / "data" / "stdlib").exists()
    with pytest.raises(FileExistsError, match="already holds data prepared from " + str(corpus)):
        prepare(corpus, tmp_path / "data" / "my_corpus", **KW)


def test_full_disk_during_prepare_is_one_line(tmp_path, small_tmpfs):
    mnt = small_tmpfs
    (tmp_path / "c.txt").write_text(paragraphs(5, 2000))  # about 400 kB of text, more tokens than fit
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    (mnt / "filler").write_bytes(b"\0" * (free - 100_000))
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastgrow.cli",
            "prepare",
            str(tmp_path / "c.txt"),
            "--out",
            str(mnt / "data"),
            "--vocab-size",
            "300",
            "--quiet",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith(f"fastgrow: error: cannot write {mnt}/data") and "No space left on device" in p.stderr
    assert sorted(x.name for x in mnt.iterdir()) == ["filler"]  # nothing half-written


def test_the_loader_refuses_paths_leaving_the_data_folder(tmp_path):
    (tmp_path / "d.txt").write_text(make_text(2, 300))
    out = tmp_path / "out"
    prepare(tmp_path / "d.txt", out, **KW)
    (tmp_path / "secret.txt").write_text("secret")
    meta = json.loads((out / "meta.json").read_text())
    for bad in ("../secret.txt", str(tmp_path / "secret.txt")):
        meta["tokenizer"]["file"] = bad
        (out / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(DataError, match="leaves its folder"):
            TokenData.open(out)
    meta["tokenizer"]["file"] = "tokenizer.json"
    (out / "meta.json").write_text(json.dumps(meta))
    (out / "tokenizer.json").unlink()
    (out / "tokenizer.json").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(DataError, match="symlink that leaves"):
        TokenData.open(out)
