"""fastgrow.data.prepare: sources, tokenizer, shards, metadata, atomicity and errors (CPU, small corpora)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

# prepare needs `datasets`; the GPU machine does not have it (the loader tests still run there).
pytest.importorskip("datasets")

from fastgrow import data as fdata  # noqa: E402
from fastgrow import token_writer  # noqa: E402
from fastgrow.data import (  # noqa: E402
    EOS_TOKEN,
    DataError,
    describe,
    parse_hf_source,
    prepare,
    sha256_file,
    stdlib_files,
    token_dtype,
)
from fastgrow.loader import TokenData  # noqa: E402
from fastgrow.sources import check_text_file  # noqa: E402

WORDS = [
    "the",
    "model",
    "grows",
    "in",
    "place",
    "while",
    "training",
    "goes",
    "on",
    "and",
    "the",
    "optimizer",
    "keeps",
    "its",
    "moments",
]
WORDS += [
    "so",
    "the",
    "loss",
    "recovers",
    "quickly",
    "after",
    "each",
    "growth",
    "event",
    "def",
    "return",
    "class",
    "import",
    "self",
    "value",
]

VOCAB = 320


def make_text(seed: int, n_words: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(max(1, n_words // 12)):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)) + rng.choice([".", ":", "!", "", " ü€"]))
    return "\n".join(lines) + "\n"


def stream(meta: dict, out: Path) -> np.ndarray:
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    return np.concatenate([np.fromfile(out / s["file"], dtype=dtype) for s in meta["shards"]])


def decode_docs(out: Path) -> list[str]:
    """Split the token stream on EOS and decode each document (byte-level BPE is lossless)."""
    from tokenizers import Tokenizer

    meta = json.loads((out / "meta.json").read_text())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = stream(meta, out).astype(np.int64)
    assert ids[-1] == meta["eos_id"], "every document, the last included, ends with EOS"
    ends = np.flatnonzero(ids == meta["eos_id"])
    docs, start = [], 0
    for e in ends:
        docs.append(tok.decode(ids[start:e].tolist(), skip_special_tokens=False))
        start = e + 1
    return docs


def no_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def txt_corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """A folder of text files (+ things the walker must skip); returns it and the docs in walk order."""
    root = tmp_path_factory.mktemp("corpus")
    docs = {
        "a.txt": make_text(1, 3000),
        "c.py": "def f(x):\n    return x + 1  # <|endoftext|> inside text stays text\n" * 40,
        "sub/b.md": make_text(2, 2500),
        "sub/z.txt": "",  # empty documents are skipped
    }
    for name, text in docs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / ".hidden.txt").write_text("never read")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "c.cpython-311.pyc").write_bytes(b"\x00\x01binary")
    return root, [docs["a.txt"], docs["c.py"], docs["sub/b.md"]]


@pytest.fixture(scope="module")
def prepared(txt_corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prep") / "txt"
    meta = prepare(txt_corpus[0], out, vocab_size=VOCAB, progress=False, shard_tokens=1000)
    return out, meta


def test_token_dtype_choice():
    assert token_dtype(1) == np.dtype("<u2")
    assert token_dtype(4096) == np.dtype("<u2")
    assert token_dtype(65536) == np.dtype("<u2")  # ids 0..65535 fit
    assert token_dtype(65537) == np.dtype("<u4")
    assert token_dtype(2**32) == np.dtype("<u4")
    for bad in (0, -3, True, 2.5, 2**32 + 1):
        with pytest.raises(ValueError):
            token_dtype(bad)


def test_txt_folder_roundtrip_and_meta(txt_corpus, prepared):
    _, docs = txt_corpus
    out, meta = prepared
    assert decode_docs(out) == docs  # sorted walk order, hidden/__pycache__/empty skipped, exact text
    assert meta["format"] == "fastgrow-tokens" and meta["format_version"] == 1
    assert meta["dtype"] == "uint16" and meta["byte_order"] == "little"
    assert meta["num_documents"] == 3
    assert meta["num_bytes"] == sum(len(d.encode()) for d in docs)
    assert meta["vocab_size"] <= VOCAB and meta["tokenizer"]["trained"] is True
    assert meta["fastgrow_version"] and meta["sources"][0]["kind"] == "path"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["meta.json", "tokenizer.json"] + [s["file"] for s in meta["shards"]]
    )
    assert no_leftovers(out.parent) == []
    # Shards: at most shard_tokens each, sizes and checksums as recorded.
    assert len(meta["shards"]) > 1 and all(s["num_tokens"] <= 1000 for s in meta["shards"])
    assert sum(s["num_tokens"] for s in meta["shards"]) == meta["num_tokens"]
    for s in meta["shards"]:
        assert (out / s["file"]).stat().st_size == 2 * s["num_tokens"]
        assert sha256_file(out / s["file"]) == s["sha256"]
    assert sha256_file(out / "tokenizer.json") == meta["tokenizer"]["sha256"]
    assert json.loads((out / "meta.json").read_text()) == meta
    assert describe(meta, out).startswith(f"{meta['num_tokens']:,} tokens (3 documents, ")
    # The literal EOS string inside c.py is encoded as text: exactly one EOS id per document.
    ids = stream(meta, out)
    assert int((ids == meta["eos_id"]).sum()) == 3 and int(ids.max()) < meta["vocab_size"]
    # The tokenizer is a byte-level BPE with the EOS special token.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.token_to_id(EOS_TOKEN) == meta["eos_id"]
    assert type(tok.pre_tokenizer).__name__ == "ByteLevel" and type(tok.decoder).__name__ == "ByteLevel"
    # And the loader reads what prepare wrote.
    td = TokenData.open(out)
    assert td.num_tokens == meta["num_tokens"] and td.eos_id == meta["eos_id"]
    assert np.array_equal(td.read(0, td.num_tokens), ids)


def test_prepare_is_deterministic(txt_corpus, prepared, tmp_path):
    out, meta = prepared
    meta2 = prepare(txt_corpus[0], tmp_path / "again", vocab_size=VOCAB, progress=False, shard_tokens=1000)
    assert meta2 == meta
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


def test_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"id": i, "content": make_text(10 + i, 300), "lang": "en"} for i in range(6)]
    recs[2]["content"] = None  # a null text is skipped and counted (with skip_missing)
    jl = tmp_path / "part1.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in recs[:4]))
    pqf = tmp_path / "part2.parquet"
    pq.write_table(pa.Table.from_pylist(recs[4:]), pqf)
    with pytest.raises(DataError, match=r"part1\.jsonl:3: field 'content' is null.*--skip-missing"):
        prepare([jl, pqf], tmp_path / "out", text_field="content", vocab_size=300, progress=False)
    warned = []
    meta = prepare(
        [jl, pqf],
        tmp_path / "out",
        text_field="content",
        vocab_size=300,
        progress=False,
        skip_missing=True,
        warn=warned.append,
    )
    assert any("skipped 1 records without a 'content' field" in w for w in warned), warned
    expected = [r["content"] for r in recs if r["content"] is not None]
    assert decode_docs(tmp_path / "out") == expected
    assert meta["num_documents"] == 5 and meta["skipped_records"] == 1 and meta["text_field"] == "content"
    assert [s["kind"] for s in meta["sources"]] == ["path", "path"]


def test_stdlib_with_max_bytes(tmp_path):
    root, files = stdlib_files()
    assert files and all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    assert stdlib_files()[1] == files  # a fixed order
    assert files != sorted(files)  # shuffled, so a max_bytes slice samples the whole library
    meta = prepare("stdlib", tmp_path / "std", vocab_size=300, max_bytes=40_000, progress=False)
    assert meta["num_bytes"] == 40_000 and meta["max_bytes"] == 40_000 and meta["truncated"]
    assert meta["sources"][0]["kind"] == "stdlib" and meta["sources"][0]["files"] == len(files)
    # The documents are the first stdlib files in that order, the last one cut to fit the cap.
    first = [t for t in (f.read_text(encoding="utf-8") for f in files[:40]) if t]
    got = decode_docs(tmp_path / "std")
    assert got[:-1] == first[: len(got) - 1]
    assert first[len(got) - 1].startswith(got[-1]) and got[-1] != first[len(got) - 1]


def test_max_bytes_cuts_at_character_boundary(tmp_path):
    (tmp_path / "d.txt").write_text("aé" * 10)  # 3 bytes per pair
    meta = prepare(tmp_path / "d.txt", tmp_path / "out", vocab_size=260, max_bytes=5, progress=False)
    assert decode_docs(tmp_path / "out") == ["aéa"]  # 4 bytes: the next é would need 6
    assert meta["num_bytes"] == 4


def test_given_tokenizer(prepared, tmp_path):
    from tokenizers import Tokenizer

    out, meta = prepared
    src = tmp_path / "other.txt"
    src.write_text(make_text(99, 500))
    meta2 = prepare(src, tmp_path / "out", tokenizer=out / "tokenizer.json", progress=False)
    assert meta2["tokenizer"]["trained"] is False and meta2["tokenizer"]["requested_vocab_size"] is None
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    assert meta2["tokenizer"]["sha256"] == meta["tokenizer"]["sha256"]
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = stream(meta2, tmp_path / "out").tolist()
    assert ids == tok.encode(src.read_text()).ids + [meta["eos_id"]]


def test_uint32_when_vocab_exceeds_uint16(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["[UNK]"] = 70_000
    vocab[EOS_TOKEN] = 70_001
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([EOS_TOKEN])
    tok.save(str(tmp_path / "big.json"))
    (tmp_path / "doc.txt").write_text("w1 w65535 w65536 w69999 nope")
    meta = prepare(tmp_path / "doc.txt", tmp_path / "out", tokenizer=tmp_path / "big.json", progress=False)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_002 and meta["eos_id"] == 70_001
    assert stream(meta, tmp_path / "out").tolist() == [1, 65535, 65536, 69999, 70_000, 70_001]
    td = TokenData.open(tmp_path / "out")
    assert td.read(0, 6).tolist() == [1, 65535, 65536, 69999, 70_000, 70_001]


@pytest.mark.parametrize("where", ["shard", "meta"])
def test_failure_mid_write_leaves_nothing(txt_corpus, tmp_path, monkeypatch, where):
    if where == "shard":
        real = token_writer.ShardWriter.write
        calls = []

        def write(self, ids):
            calls.append(1)
            if len(calls) == 2:  # after part of the stream is on disk
                raise OSError("simulated disk failure")
            real(self, ids)

        monkeypatch.setattr(token_writer.ShardWriter, "write", write)
        monkeypatch.setattr(token_writer, "ENCODE_BATCH_DOCS", 1)
    else:

        def write_json(path, obj, indent=1):
            Path(path).write_text('{"format": "fastgrow-to')  # half a file, then the crash
            raise OSError("simulated crash while writing meta.json")

        monkeypatch.setattr(fdata, "write_json_durable", write_json)
    with pytest.raises(OSError, match="simulated"):
        prepare(txt_corpus[0], tmp_path / "out", vocab_size=VOCAB, progress=False)
    assert list(tmp_path.iterdir()) == []  # no out_dir, no temp dir


def test_overwrite(txt_corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    (tmp_path / "one.txt").write_text(make_text(5, 400))
    first = prepare(tmp_path / "one.txt", out, vocab_size=300, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare(txt_corpus[0], out, vocab_size=300, progress=False)
    assert json.loads((out / "meta.json").read_text()) == first
    # A failed overwrite keeps the old data.
    monkeypatch.setattr(fdata, "write_json_durable", lambda p, o, indent=1: (_ for _ in ()).throw(OSError("simulated")))
    with pytest.raises(OSError, match="simulated"):
        prepare(txt_corpus[0], out, vocab_size=300, progress=False, overwrite=True)
    monkeypatch.undo()
    assert json.loads((out / "meta.json").read_text()) == first
    second = prepare(txt_corpus[0], out, vocab_size=300, progress=False, overwrite=True)
    assert second["num_documents"] == 3 and json.loads((out / "meta.json").read_text()) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.txt", "out"]  # old copy and temp dir gone
    TokenData.open(out)


def test_existing_non_data_dirs(tmp_path):
    (tmp_path / "d.txt").write_text("some text here")
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare(tmp_path / "d.txt", empty, vocab_size=260, progress=False)  # an empty folder is simply used
    assert (empty / "meta.json").is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(DataError, match="not a fastgrow data"):
            prepare(tmp_path / "d.txt", mine, vocab_size=260, progress=False, overwrite=overwrite)
    assert (mine / "precious.txt").read_text() == "keep me"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        prepare(tmp_path / "d.txt", tmp_path / "afile", vocab_size=260, progress=False)


def test_input_errors(tmp_path):
    kw = dict(vocab_size=260, progress=False)
    with pytest.raises(FileNotFoundError, match="nope"):
        prepare(tmp_path / "nope", tmp_path / "o", **kw)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="no input files"):
        prepare(tmp_path / "emptydir", tmp_path / "o", **kw)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    with pytest.raises(DataError, match="no text"):
        prepare(tmp_path / "blank", tmp_path / "o", **kw)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "a.txt").write_text("fine text")
    (bin_dir / "b.dat").write_bytes(b"abc\x00\x01\x02")
    with pytest.raises(DataError, match=r"b\.dat.*NUL"):
        prepare(bin_dir, tmp_path / "o", **kw)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt.*UTF-8"):
        prepare(tmp_path / "latin1.txt", tmp_path / "o", **kw)
    # unreadable: a dangling symlink inside a folder (we run as root, so chmod would not stop a read)
    ln = tmp_path / "ln"
    ln.mkdir()
    os.symlink(tmp_path / "gone.txt", ln / "x.txt")
    with pytest.raises(DataError, match=r"cannot read input file .*x\.txt"):
        prepare(ln, tmp_path / "o", **kw)
    assert not (tmp_path / "o").exists() and no_leftovers(tmp_path) == []


def test_missing_field_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    kw = dict(vocab_size=260, progress=False)
    jl = tmp_path / "x.jsonl"
    jl.write_text('{"body": "a", "id": 1}\n')
    with pytest.raises(DataError, match=r"x\.jsonl.*'text'.*\['body', 'id'\]"):
        prepare(jl, tmp_path / "o", **kw)
    pqf = tmp_path / "y.parquet"
    pq.write_table(pa.Table.from_pylist([{"content": "a"}]), pqf)
    with pytest.raises(DataError, match=r"y\.parquet.*'text'.*\['content'\]"):
        prepare(pqf, tmp_path / "o", **kw)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl"):
        prepare(bad, tmp_path / "o", **kw)
    num = tmp_path / "num.jsonl"
    num.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match=r"num\.jsonl.*not text"):
        prepare(num, tmp_path / "o", **kw)


def test_option_and_tokenizer_errors(tmp_path):
    from tokenizers import Tokenizer, models

    (tmp_path / "d.txt").write_text("text")
    with pytest.raises(ValueError, match="vocab_size"):
        prepare(tmp_path / "d.txt", tmp_path / "o", vocab_size=100, progress=False)
    with pytest.raises(ValueError, match="max_bytes"):
        prepare(tmp_path / "d.txt", tmp_path / "o", max_bytes=0, progress=False)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        prepare(tmp_path / "d.txt", tmp_path / "o", tokenizer=tmp_path / "none.json", progress=False)
    Tokenizer(models.WordLevel(vocab={"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "t.json"))
    with pytest.raises(DataError, match="no '<|endoftext|>' token"):
        prepare(tmp_path / "d.txt", tmp_path / "o", tokenizer=tmp_path / "t.json", progress=False)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot load tokenizer"):
        prepare(tmp_path / "d.txt", tmp_path / "o", tokenizer=tmp_path / "junk.json", progress=False)
    assert not (tmp_path / "o").exists()


def test_parse_hf_source():
    assert parse_hf_source("hf:roneneldan/TinyStories") == ("roneneldan/TinyStories", None, "train")
    assert parse_hf_source("hf:wikitext:wikitext-2-raw-v1@validation") == (
        "wikitext",
        "wikitext-2-raw-v1",
        "validation",
    )
    assert parse_hf_source("hf:org/ds@train[:1%]") == ("org/ds", None, "train[:1%]")
    for bad in ("hf:", "hf:@train", "hf:name:@train", "hf:name@"):
        with pytest.raises(DataError, match="hf:NAME"):
            parse_hf_source(bad)


def test_hf_source_code_path(tmp_path, monkeypatch):
    """Everything up to the Hub: load_dataset is called with the parsed name/config/split, streaming."""
    import datasets

    jl = tmp_path / "hub.jsonl"
    jl.write_text("".join(json.dumps({"story": make_text(i, 200)}) + "\n" for i in range(3)))
    real = datasets.load_dataset
    calls = []

    def fake(path, name=None, **kw):
        calls.append((path, name, kw))
        return real("json", data_files=[str(jl)], split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    meta = prepare("hf:someone/stories:cfg@train", tmp_path / "out", text_field="story", **dict(vocab_size=280))
    assert calls == [("someone/stories", "cfg", {"split": "train", "streaming": True})]
    assert meta["sources"] == [{"kind": "hf", "name": "someone/stories", "config": "cfg", "split": "train"}]
    assert meta["num_documents"] == 3
    with pytest.raises(DataError, match=r"someone/stories.*'text'.*\['story'\]"):
        prepare("hf:someone/stories:cfg", tmp_path / "out2", vocab_size=280, progress=False)

    def offline(path, name=None, **kw):
        raise ConnectionError("Couldn't reach 'x' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="cannot load Hugging Face dataset 'x'.*ConnectionError"):
        prepare("hf:x", tmp_path / "out3", vocab_size=280, progress=False)
    assert no_leftovers(tmp_path) == []


def test_text_check_is_chunk_safe(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("aé€😀b" * 5)  # multi-byte characters straddle every 3-byte chunk boundary
    assert check_text_file(f, chunk=3) is None
    f.write_bytes(b"abcdefg\x00h")
    assert "NUL bytes (byte 7" in check_text_file(f, chunk=3)
    f.write_bytes("aé".encode() + b"\xff" + b"zz")
    assert "not valid UTF-8 (byte 3:" in check_text_file(f, chunk=2)
    f.write_bytes("ab€".encode()[:-1])  # truncated final character
    assert "not valid UTF-8 (byte 2:" in check_text_file(f, chunk=3)
