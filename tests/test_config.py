import pytest

from fastgrow.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    apply_overrides,
    load_toml,
    parse_count,
    preset,
    preset_names,
)
from fastgrow.model import Transformer


def test_presets_match_the_paper_shapes():
    shapes = {n: (preset(n).model.n_layers, preset(n).model.dim) for n in preset_names()}
    assert shapes["410M"] == (24, 1024) and shapes["410M-base"] == (6, 1024)
    assert shapes["1.1B"] == (24, 2048) and shapes["1.1B-base"] == (6, 2048)
    assert shapes["3B"] == (32, 2560) and shapes["3B-base"] == (8, 2560)
    assert shapes["7B"] == (32, 4096) and shapes["7B-base"] == (8, 4096)
    assert preset("7b").model.ffn_dim == 11008  # case-insensitive lookup
    # Sizes land near their names (non-embedding counts are what the paper's g refers to).
    assert 0.3e9 < preset("410M").model.num_params() < 0.45e9
    assert 1.0e9 < preset("1.1B").model.num_params() < 1.25e9
    assert 6.5e9 < preset("7B").model.num_params() < 7.0e9


def test_num_params_matches_the_module():
    cfg = preset("tiny").model
    assert Transformer(cfg).num_params() == cfg.num_params()
    assert Transformer(cfg).num_params(include_embeddings=False) == cfg.num_params(include_embeddings=False)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"dim": 100, "n_heads": 3}, "divisible by model.n_heads"),
        ({"n_heads": 4, "n_kv_heads": 3}, "must divide model.n_heads"),
        ({"n_layers": 0}, "model.n_layers must be a positive integer"),
        ({"attn_backend": "magic"}, "model.attn_backend"),
        ({"dim": 12, "n_heads": 4, "n_kv_heads": 2}, "must be even for RoPE"),
    ],
)
def test_model_config_validation(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelConfig(**kwargs)


def test_overrides_parse_types_and_name_bad_keys():
    cfg = apply_overrides(preset("tiny"), ["--train.lr=1e-3", "--train.compile=true", "--growth.at_tokens=10k"])
    assert cfg.train.lr == 1e-3 and cfg.train.compile is True and cfg.growth.at_tokens == 10_000
    assert apply_overrides(cfg, ["--growth.at_tokens=auto"]).growth.at_tokens == "auto"
    with pytest.raises(ConfigError, match="unknown key 'lrr' in \\[train\\]"):
        apply_overrides(cfg, ["--train.lrr=1"])
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        apply_overrides(cfg, ["--trian.lr=1"])
    with pytest.raises(ConfigError, match="train.max_steps must be an integer"):
        apply_overrides(cfg, ["--train.max_steps=abc"])
    with pytest.raises(ConfigError, match="train.min_lr must be in"):
        apply_overrides(cfg, ["--train.min_lr=1.0"])
    with pytest.raises(ConfigError, match="--section.key=value"):
        apply_overrides(cfg, ["lr=3"])


def test_toml_with_preset_and_errors(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('preset = "410M-base"\n[train]\nlr = 2e-4\nmax_steps = 7\n[growth]\nat_tokens = "auto"\n')
    cfg = load_toml(f)
    assert cfg.model.n_layers == 6 and cfg.train.lr == 2e-4 and cfg.growth.at_tokens == "auto"
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    f.write_text("[train]\nlr = -1\n")
    with pytest.raises(ConfigError, match="train.lr must be > 0"):
        load_toml(f)
    f.write_text("[training]\nlr = 1\n")
    with pytest.raises(ConfigError, match="unknown config section \\[training\\]"):
        load_toml(f)
    f.write_text("[train\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_toml(f)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_toml(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    "text, value",
    [
        ("410M", 410_000_000),
        ("1.1B", 1_100_000_000),
        ("300B", 300_000_000_000),
        ("2e12", 2_000_000_000_000),
        ("4096", 4096),
        ("10k", 10_000),
        (123, 123),
    ],
)
def test_parse_count(text, value):
    assert parse_count(text) == value


def test_parse_count_rejects_garbage():
    with pytest.raises(ValueError, match="cannot parse"):
        parse_count("lots")
    with pytest.raises(ValueError):
        parse_count("-5")
