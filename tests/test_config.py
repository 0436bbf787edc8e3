import json

import pytest
from growth_helpers import legacy_growth_table

from fastgrow.config import (
    ConfigError,
    GrowthConfig,
    ModelConfig,
    RunConfig,
    parse_count,
    preset,
    preset_names,
)
from fastgrow.config_files import apply_overrides, load_toml
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
        ({"n_layers": -1}, "model.n_layers must be a non-negative integer"),
        ({"dim": 0}, "model.dim must be a positive integer"),
        ({"attn_backend": "magic"}, "model.attn_backend"),
        ({"dim": 12, "n_heads": 4, "n_kv_heads": 2}, "must be even for RoPE"),
    ],
)
def test_model_config_validation(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelConfig(**kwargs)


def test_overrides_parse_types_and_name_bad_keys():
    cfg = apply_overrides(preset("tiny"), ["--train.lr=1e-3", "--train.compile=true", "--growth.at_tokens=10k"])
    assert cfg.train.lr == 1e-3 and cfg.train.compile is True and cfg.growth[0].at_tokens == 10_000
    assert apply_overrides(cfg, ["--growth.at_tokens=auto"]).growth[0].at_tokens == "auto"
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
    assert cfg.model.n_layers == 6 and cfg.train.lr == 2e-4 and cfg.growth[0].at_tokens == "auto"
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


# --- growth stages: [growth] / [[growth]], overrides, legacy tables, strict settings ----------------------


def test_growth_table_is_one_stage_and_array_is_several(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[growth]\nat_tokens = 1000\nop = "stack"\nfactor = 2\n')
    cfg = load_toml(f)
    assert len(cfg.growth) == 1 and cfg.growth[0].factor == 2
    f.write_text(
        '[[growth]]\nat_tokens = "1k"\nop = "stack"\nfactor = 2\n'
        '[[growth]]\nat_tokens = 5000\nop = "width"\ntarget_dim = 256\nwidth_op = "zero"\n'
    )
    cfg = load_toml(f)
    assert [g.at_tokens for g in cfg.growth] == [1000, 5000] and cfg.growth[1].width_op == "zero"
    d = cfg.to_dict()
    assert isinstance(d["growth"], list) and d["growth"][1]["target_dim"] == 256
    assert RunConfig.from_dict(d) == cfg
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
    f.write_text("[growth]\nat_tokens = 0\n")  # the older way to say "no growth"
    assert load_toml(f).growth == ()
    assert RunConfig().to_dict()["growth"] == []


def test_legacy_growth_table_from_an_old_checkpoint():
    # factor: ignored by partial in older versions: dropped, not refused
    legacy = legacy_growth_table(at_tokens=96, op="partial", spec="1-2*3", schedule="rewarm", rewarm_steps=2)
    (g,) = RunConfig.from_dict({"growth": legacy}).growth
    assert (g.op, g.spec, g.factor, g.width_op, g.rewarm_steps) == ("partial", "1-2*3", 0, "", 2)
    assert RunConfig.from_dict({"growth": {**legacy, "at_tokens": 0}}).growth == ()


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["--growth.0.spec=12-3456*5-56"], "growth\\[0\\].spec = '12-3456\\*5-56' is not used: op 'stack'"),
        (["--growth.1.factor=3"], "growth\\[1\\].factor = 3 is not used: op 'width'"),
        (["--growth.factor=3"], "address one as --growth.N.factor"),
        (["--growth.3.op=stack"], "growth.0 .. growth.2"),
        (["--growth.1.at_tokens=50"], "growth\\[1\\].at_tokens \\(50\\) must be greater than growth\\[0\\]"),
        (["--growth.1.width_op=learn"], "growth\\[1\\].width_op must be one of"),
        (["--growth.0.rewarm_steps=5"], "growth\\[0\\].rewarm_steps = 5 is not used: schedule 'continue'"),
        (["--growth.1.schedule=restart", "--growth.1.jump_to_step=3"], "growth\\[1\\].jump_to_step = 3"),
        (["--growth.0.target_layers=8"], "growth\\[0\\].factor \\(2\\) and growth\\[0\\].target_layers \\(8\\)"),
        (["--growth.0.at_tokens=auto"], 'growth\\[0\\].at_tokens: "auto"'),
        (["--growth.2.op=stack"], "growth\\[2\\].at_tokens is required"),
        (["--growth.1.nope=1"], "unknown key 'nope' in \\[growth\\]"),
    ],
)
def test_growth_overrides_and_errors_name_the_stage(overrides, needle):
    base = apply_overrides(
        RunConfig(),
        ["--growth.at_tokens=100", "--growth.factor=2", "--growth.1.at_tokens=200", "--growth.1.op=width"]
        + ["--growth.1.target_dim=256"],
    )
    assert [g.op for g in base.growth] == ["stack", "width"]
    with pytest.raises(ConfigError, match=needle):
        apply_overrides(base, overrides)


def test_growth_overrides_address_stages():
    cfg = apply_overrides(RunConfig(), ["--growth.at_tokens=10k", "--growth.op=zero", "--growth.target_layers=4"])
    assert len(cfg.growth) == 1 and cfg.growth[0].target_layers == 4
    cfg = apply_overrides(cfg, ["--growth.factor=0", "--growth.target_layers=6"])  # the single stage
    assert cfg.growth[0].target_layers == 6
    cfg = apply_overrides(cfg, ["--growth.1.at_tokens=20k", "--growth.1.schedule=jump", "--growth.1.jump_to_step=7"])
    assert len(cfg.growth) == 2 and cfg.growth[1].jump_to_step == 7 and cfg.growth[1].op == "stack"
    cfg = apply_overrides(cfg, ["--growth.0.noise=0.1"])
    assert cfg.growth[0].noise == 0.1 and cfg.growth[1].noise == 0.0


# Which optional fields each op and each schedule policy reads, restated from the README's tables.
OP_READS = {
    "stack": {"factor", "target_layers", "noise"},
    "interpolate": {"factor", "target_layers", "noise"},
    "partial": {"spec", "target_layers", "noise"},
    "sources": {"spec", "target_layers", "noise"},
    "zero": {"factor", "target_layers", "spec", "noise"},
    "random": {"factor", "target_layers", "spec", "noise"},
    "width": set(),
}
SCHEDULE_READS = {
    "continue": set(),
    "rewarm": {"rewarm_steps"},
    "restart": {"lr", "min_lr", "warmup_steps", "horizon_steps"},
    "jump": {"jump_to_step", "rewarm_steps", "lr", "min_lr"},
}
SAMPLE = {"factor": 2, "target_layers": 8, "spec": "1-2*3", "noise": 0.1}
SCHEDULE_SAMPLE = {
    "rewarm_steps": 3,
    "lr": 1e-3,
    "min_lr": 1e-4,
    "warmup_steps": 5,
    "horizon_steps": 50,
    "jump_to_step": 7,
}


def _stage(op, schedule="continue", **kw):
    needs = {"partial": {"spec": "1-2*3"}, "sources": {"spec": "1,2,1"}, "width": {"target_dim": 256}}
    sched = {"rewarm": {"rewarm_steps": 2}, "jump": {"jump_to_step": 4}}
    return GrowthConfig(
        at_tokens=10, op=op, schedule=schedule, **{**needs.get(op, {}), **sched.get(schedule, {}), **kw}
    )


@pytest.mark.parametrize("op", sorted(OP_READS))
def test_every_field_an_op_does_not_read_is_refused(op):
    for field, value in SAMPLE.items():
        if field in OP_READS[op]:
            _stage(op, **{field: value})  # read: accepted
        else:
            with pytest.raises(ConfigError, match=f"growth.{field} = .* is not used: op '{op}'"):
                _stage(op, **{field: value})
    with pytest.raises(ConfigError, match="growth.width_op = 'zero' is not used"):
        _stage("stack" if op == "width" else op, width_op="zero")
    if op != "width":
        assert _stage(op, width_op="zero", target_ffn_dim=512).width_op == "zero"


@pytest.mark.parametrize("schedule", sorted(SCHEDULE_READS))
def test_every_field_a_schedule_does_not_read_is_refused(schedule):
    for field, value in SCHEDULE_SAMPLE.items():
        if field in SCHEDULE_READS[schedule]:
            _stage("stack", schedule, **{field: value})
        else:
            with pytest.raises(ConfigError, match=f"growth.{field} = .* is not used: schedule '{schedule}'"):
                _stage("stack", schedule, **{field: value})
