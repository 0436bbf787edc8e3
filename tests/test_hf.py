"""Hugging Face interchange (fastgrow.hf) against transformers' LlamaForCausalLM: CPU, fp32, offline."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the hub: every folder here is local
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

transformers = pytest.importorskip("transformers")  # dev extra; absent on the GPU machine

from fastgrow.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from fastgrow.config import DataConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from fastgrow.grow import GrowPlan, grow  # noqa: E402
from fastgrow.hf import (  # noqa: E402
    HFConversionError,
    export_checkpoint,
    export_model,
    from_hf_state_dict,
    hf_config,
    import_checkpoint,
    load_hf_weights,
    model_config_from_hf,
    to_hf_state_dict,
    write_tokenizer_files,
)
from fastgrow.model import Transformer  # noqa: E402
from fastgrow.state import build_state  # noqa: E402

TOL = 1e-4

_M = ModelConfig
CONFIGS = {
    # odd sizes; rope_theta / eps away from HF's defaults so a dropped field shows up in the logits
    "mha": _M(vocab_size=97, dim=48, n_layers=2, n_heads=3, n_kv_heads=3, ffn_dim=100, max_seq_len=64,
              rope_theta=500.0, norm_eps=1e-3),
    "gqa": _M(vocab_size=97, dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=100, max_seq_len=64,
              rope_theta=1000.0, norm_eps=1e-5),
    "mqa": _M(vocab_size=131, dim=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=76, max_seq_len=48),
}  # fmt: skip


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights big enough that logits are O(1) (the 0.02 init makes them ~0 and every test easy)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def _fastgrow_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    _randomize(model, seed + 1)
    return model


def _load_hf(path) -> torch.nn.Module:
    model = transformers.LlamaForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", local_files_only=True
    )
    return model.eval()


def _assert_same_logits(ours: Transformer, hf_model: torch.nn.Module, vocab: int, seq: int = 37) -> None:
    tokens = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = ours(tokens).float()
        got = hf_model(input_ids=tokens).logits.float()
    assert ref.std() > 0.3, "test logits too small to detect a conversion error"
    diff = (got - ref).abs().max().item()
    assert diff <= TOL, f"max |HF - fastgrow| logits = {diff}"


def _assert_state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), f"{k} differs"


_DOCS = ["def grow(model):\n    return stack(model, 4)\n"] * 10


def _bpe(specials: list[str]):
    """A tiny byte-level BPE with the given special tokens (other EOS conventions than ours)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(_DOCS, trainer)
    return tok


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """The tokenizer `fastgrow prepare` trains (byte-level BPE, <|endoftext|> = id 0), tiny."""
    from fastgrow.data import train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(_DOCS, 300, progress=False).save(str(path))
    return path


# --- fastgrow -> HF -> fastgrow --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_matches_transformers_and_imports_back(name, tmp_path):
    cfg = CONFIGS[name]
    ours = _fastgrow_model(cfg)
    out = export_model(ours.state_dict(), cfg, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    hf_model = _load_hf(out)
    assert hf_model.config.num_key_value_heads == cfg.n_kv_heads
    _assert_same_logits(ours, hf_model, cfg.vocab_size)

    # folder -> fastgrow state dict: bit-identical
    cfg2, sd2 = from_hf_state_dict(load_hf_weights(out), json.loads((out / "config.json").read_text()))
    assert cfg2.architecture() == cfg.architecture()
    _assert_state_dicts_equal(sd2, {k: v for k, v in ours.state_dict().items()})

    # folder -> checkpoint (fresh optimizer) -> load_checkpoint: same weights, step 0, no Adam state
    ckpt = import_checkpoint(out, tmp_path / "run")
    state = load_checkpoint(ckpt)
    assert state.step == 0 and not state.optimizer.state
    assert state.config.train.out_dir == str(tmp_path / "run") and state.config.model == state.model.cfg
    assert state.model.cfg.architecture() == cfg.architecture()
    _assert_state_dicts_equal(state.model.state_dict(), ours.state_dict())


def test_hf_created_model_round_trips(tmp_path):
    """A model transformers creates itself (random init) -> import -> export: bit-identical tensors."""
    hf_cfg = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=40,
        intermediate_size=70,
        num_hidden_layers=2,
        num_attention_heads=5,
        num_key_value_heads=1,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=2000.0,  # transformers 4.x reads this, 5.x the dict below
        rope_parameters={"rope_type": "default", "rope_theta": 2000.0},
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(3)
    src = transformers.LlamaForCausalLM(hf_cfg).eval()
    _randomize(src, 11)
    src.save_pretrained(str(tmp_path / "src"))
    src_sd = load_hf_weights(tmp_path / "src")
    assert "lm_head.weight" in src_sd
    # the other layouts load_hf_weights reads: sharded safetensors (with an index) and pytorch_model.bin
    src.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _assert_state_dicts_equal(load_hf_weights(tmp_path / "sharded"), src_sd)
    (tmp_path / "bin").mkdir()
    torch.save(src_sd, tmp_path / "bin" / "pytorch_model.bin")
    _assert_state_dicts_equal(load_hf_weights(tmp_path / "bin"), src_sd)
    with pytest.raises(FileNotFoundError, match="no weights found"):
        load_hf_weights(tmp_path)

    run_cfg = RunConfig(
        model=ModelConfig(attn_backend="ref"),  # its architecture is replaced by the import's
        data=DataConfig(seq_len=16, batch_size=3),
        train=TrainConfig(lr=1e-4, min_lr=1e-5, out_dir=str(tmp_path / "run")),
    )
    ckpt = import_checkpoint(tmp_path / "src", tmp_path / "run", run_config=run_cfg)
    state = load_checkpoint(ckpt)
    assert state.config.data == run_cfg.data and state.config.train == run_cfg.train
    assert state.config.model == state.model.cfg and state.model.cfg.attn_backend == "ref"
    assert state.model.cfg.rope_theta == 2000.0 and state.model.cfg.n_kv_heads == 1
    _assert_same_logits(state.model.eval(), src, 101)

    out = export_checkpoint(ckpt, tmp_path / "back")
    _assert_state_dicts_equal(load_file(str(out / "model.safetensors")), src_sd)
    back = json.loads((out / "config.json").read_text())
    theirs = json.loads((tmp_path / "src" / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "vocab_size", "max_position_embeddings"):  # fmt: skip
        assert back[key] == theirs[key], key
    assert model_config_from_hf(back) == model_config_from_hf(theirs)

    # "grow a HF model": the imported state stacks (fresh optimizer) and the grown model exports too
    grown = grow(state, GrowPlan(depth="stack", factor=2))
    out = export_model(grown.model.state_dict(), grown.model.cfg, tmp_path / "grown")
    _assert_same_logits(grown.model.eval(), _load_hf(out), 101)


def test_grown_model_exports_and_matches(tmp_path, tokenizer_json):
    """A model grown by G_stack (fastgrow.grow, 2 -> 8 layers), checkpointed with its tokenizer, exports
    and matches transformers; importing the export back gives the grown weights bit for bit."""
    base = ModelConfig(vocab_size=300, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=100, max_seq_len=64)
    run_cfg = RunConfig(model=base, data=DataConfig(seq_len=32), train=TrainConfig(out_dir=str(tmp_path / "run")))
    small = build_state(run_cfg, device="cpu")
    _randomize(small.model, 5)
    state = grow(small, GrowPlan(depth="stack", factor=4))
    assert state.model.cfg.n_layers == 8
    grown_sd = state.model.state_dict()
    for j in range(8):  # stacking copied layer j % 2 into layer j
        w = small.model.state_dict()[f"layers.{j % 2}.attn.wqkv.weight"]
        assert torch.equal(grown_sd[f"layers.{j}.attn.wqkv.weight"], w)
    ckpt = save_checkpoint(state, tmp_path / "run", tokenizer=tokenizer_json)

    out = export_checkpoint(tmp_path / "run", tmp_path / "hf")  # a run dir resolves to its newest ckpt
    hf_model = _load_hf(out)
    assert hf_model.config.num_hidden_layers == 8
    _assert_same_logits(state.model.eval(), hf_model, 300)
    assert (out / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    back = load_checkpoint(import_checkpoint(out, tmp_path / "run2"))
    _assert_state_dicts_equal(back.model.state_dict(), grown_sd)


# --- tokenizer ---------------------------------------------------------------------------------------------


def test_tokenizer_files_load_with_autotokenizer(tmp_path, tokenizer_json):
    from tokenizers import Tokenizer

    cfg = ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=40, max_seq_len=32)
    out = export_model(_fastgrow_model(cfg).state_dict(), cfg, tmp_path / "hf", tokenizer=tokenizer_json)
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    raw = Tokenizer.from_file(str(tokenizer_json))
    eot = raw.token_to_id("<|endoftext|>")
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.bos_token_id == eot
    assert tok.model_max_length == 32
    text = "def grow(model):\n    return stack(model, 4)<|endoftext|>"
    ids = tok(text)["input_ids"]
    assert ids == raw.encode(text).ids and ids[-1] == eot
    assert tok.decode(ids, skip_special_tokens=True) == text.removesuffix("<|endoftext|>")
    config = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == gen["eos_token_id"] == eot
    assert transformers.GenerationConfig.from_pretrained(str(out)).eos_token_id == eot


def test_tokenizer_special_token_detection(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    _bpe(["</s>"]).save(str(one))
    _bpe(["<s>", "</s>"]).save(str(two))
    ids = write_tokenizer_files(one, tmp_path / "a", model_max_length=16)
    assert json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
    assert ids == {"bos_token_id": 0, "eos_token_id": 0}
    with pytest.raises(ValueError, match="2 special tokens"):
        write_tokenizer_files(two, tmp_path / "b", model_max_length=16)
    ids = write_tokenizer_files(two, tmp_path / "b", model_max_length=16, special_token="</s>")
    assert ids["eos_token_id"] == 1
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "b"), local_files_only=True)
    assert tok.eos_token == "</s>" and tok.eos_token_id == 1


def test_tokenizer_without_special_token_is_rejected_atomically(tmp_path, tokenizer_json):
    with pytest.raises(ValueError, match="<unk>"):
        write_tokenizer_files(tokenizer_json, tmp_path / "t", model_max_length=8, special_token="<unk>")
    cfg = CONFIGS["mha"]
    sd = _fastgrow_model(cfg).state_dict()
    # vocab 97 < the tokenizer's ~280 ids: the export fails and leaves nothing behind
    with pytest.raises(ValueError, match=r"has \d+ ids but the model's vocabulary has only 97"):
        export_model(sd, cfg, tmp_path / "hf", tokenizer=tokenizer_json)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_existing_dir_unless_overwrite(tmp_path):
    cfg = CONFIGS["mha"]
    sd = _fastgrow_model(cfg).state_dict()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "stale.txt").write_text("x")
    with pytest.raises(FileExistsError):
        export_model(sd, cfg, tmp_path / "hf")
    out = export_model(sd, cfg, tmp_path / "hf", overwrite=True, torch_dtype="bfloat16")
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_file(str(out / "model.safetensors"))["lm_head.weight"].dtype == torch.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp or old dirs left
    assert out.stat().st_mode & 0o777 == 0o755  # readable by others, unlike mkdtemp's 0700


# --- config -------------------------------------------------------------------------------------------------


def test_hf_config_fields_and_transformers_reads_them():
    cfg = CONFIGS["gqa"]
    c = hf_config(cfg, bos_id=1, eos_id=2)
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert c["head_dim"] == 8 and c["num_key_value_heads"] == 2 and c["tie_word_embeddings"] is False
    assert model_config_from_hf(c) == ModelConfig(**cfg.architecture())
    lc = transformers.LlamaConfig(**{k: v for k, v in c.items() if k not in ("architectures", "model_type")})
    assert lc.rope_parameters["rope_theta"] == 1000.0 and lc.rope_parameters["rope_type"] == "default"
    assert lc.rms_norm_eps == 1e-5 and lc.head_dim == 8 and lc.max_position_embeddings == 64
    with pytest.raises(ValueError, match="eos_id"):
        hf_config(cfg, bos_id=1, eos_id=97)


def test_legacy_config_fields_are_read():
    """transformers 4.x configs: top-level rope_theta, rope_scaling null, no head_dim, no kv heads."""
    c = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 50, "hidden_size": 32,
         "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 5e5,
         "rope_scaling": None, "rms_norm_eps": 1e-6, "max_position_embeddings": 128}  # fmt: skip
    m = model_config_from_hf(c)
    assert (m.n_kv_heads, m.rope_theta, m.norm_eps, m.max_seq_len) == (4, 5e5, 1e-6, 128)
    assert model_config_from_hf({**c, "rope_scaling": {"type": "default"}}).rope_theta == 5e5


_BASE = hf_config(CONFIGS["gqa"], bos_id=None, eos_id=None)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"model_type": "mistral"}, "model_type"),
        ({"architectures": ["LlamaModel"]}, "architectures"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 16}, "head_dim"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1000.0, "factor": 8.0}}, "rope_type"),
        ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5}},
            "partial_rotary_factor",
        ),  # fmt: skip
        ({"rope_theta": 10000.0}, "disagree"),
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
        ({"num_key_value_heads": 4}, "num_key_value_heads"),
        ({"hidden_size": 50}, "hidden_size"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"intermediate_size": None}, "intermediate_size"),
    ],
)
def test_unsupported_config_is_rejected_naming_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        model_config_from_hf({**_BASE, **change})


def test_state_dict_mismatches_are_rejected():
    cfg = CONFIGS["gqa"]
    hf_sd = to_hf_state_dict(_fastgrow_model(cfg).state_dict(), cfg)
    with pytest.raises(HFConversionError, match="q_proj.bias"):
        from_hf_state_dict({**hf_sd, "model.layers.0.self_attn.q_proj.bias": torch.zeros(48)}, _BASE)
    no_head = {k: v for k, v in hf_sd.items() if k != "lm_head.weight"}
    with pytest.raises(HFConversionError, match="lm_head.weight"):
        from_hf_state_dict(no_head, _BASE)
    with pytest.raises(HFConversionError, match="k_proj.weight has shape"):
        from_hf_state_dict({**hf_sd, "model.layers.1.self_attn.k_proj.weight": torch.zeros(8, 48)}, _BASE)
    # old transformers saved rotary inv_freq buffers: ignored
    extra = {**hf_sd, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)}
    assert from_hf_state_dict(extra, _BASE)[0] == ModelConfig(**cfg.architecture())
    ours = _fastgrow_model(cfg).state_dict()
    with pytest.raises(HFConversionError, match="wqkv"):
        to_hf_state_dict({k: v for k, v in ours.items() if "layers.2.attn.wqkv" not in k}, cfg)
    wrapped = {f"module._orig_mod.{k}": v for k, v in ours.items()}  # DDP around torch.compile
    _assert_state_dicts_equal(to_hf_state_dict(wrapped, cfg), to_hf_state_dict(ours, cfg))


def test_import_refuses_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_checkpoint(tmp_path, tmp_path / "run")
    (tmp_path / "config.json").write_text(json.dumps({**_BASE, "mlp_bias": True}))
    with pytest.raises(ValueError, match="mlp_bias"):
        import_checkpoint(tmp_path, tmp_path / "run")
    assert not (tmp_path / "run").exists()
