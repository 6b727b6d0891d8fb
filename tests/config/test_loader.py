"""Strict YAML loading: every way a config can be wrong names the dotted key and the fix."""

import glob
import os
import textwrap

import pytest

from megadual.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_yaml,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEBUG_LM = os.path.join(REPO, "configs", "debug", "lm.yaml")

BACKBONE = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
}


def _write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _cfg(**sections):
    data = {"backbone": dict(BACKBONE)}
    for name, value in sections.items():
        data[name] = value
    return data


# --------------------------------------------------------------------------- files in configs/


@pytest.mark.parametrize(
    "path", sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)), ids=os.path.basename
)
def test_every_config_file_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_config_files_exist_and_hold_the_documented_sizes():
    dbg = load_config(DEBUG_LM)
    assert (dbg.backbone.vocab_size, dbg.backbone.hidden_size, dbg.backbone.num_layers) == (512, 64, 2)
    assert dbg.backbone.tie_embeddings and dbg.train.steps == 200 and dbg.optim.lr == 3e-3
    q3 = load_config(os.path.join(REPO, "configs", "qwen2.5-3b.yaml")).backbone
    assert (q3.hidden_size, q3.num_layers, q3.num_heads, q3.num_kv_heads, q3.tie_embeddings) == (2048, 36, 16, 2, True)
    assert q3.rope_theta == 1e6 and q3.rms_norm_eps == 1e-6
    q7 = load_config(os.path.join(REPO, "configs", "qwen2.5-7b.yaml")).backbone
    assert (q7.vocab_size, q7.hidden_size, q7.num_kv_heads, q7.tie_embeddings) == (152064, 3584, 4, False)


# --------------------------------------------------------------------------- strictness


def test_unknown_key_names_dotted_key_and_suggests(tmp_path):
    path = _write(tmp_path, """
        backbone:
          vocab_size: 512
          hidden_size: 64
          intermediate_size: 128
          num_layer: 2
          num_heads: 4
          num_kv_heads: 2
    """)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "backbone.num_layer" in msg and "did you mean 'backbone.num_layers'" in msg
    assert "hidden_size" in msg  # the allowed keys are listed
    assert info.value.key == "backbone.num_layer"


def test_unknown_top_level_section():
    with pytest.raises(ConfigError, match=r"unknown key 'bakbone'; did you mean 'backbone'\?"):
        config_from_dict({"bakbone": {}})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "section, value, key, expected",
    [
        ({"hidden_size": "64"}, None, "backbone.hidden_size", "an integer"),
        ({"hidden_size": 64.0}, None, "backbone.hidden_size", "an integer"),
        ({"hidden_size": True}, None, "backbone.hidden_size", "an integer"),  # bools are not ints
        ({"tie_embeddings": "yes please"}, None, "backbone.tie_embeddings", "true or false"),
        ({"tie_embeddings": 1}, None, "backbone.tie_embeddings", "true or false"),
        ({"rope_theta": True}, None, "backbone.rope_theta", "a finite number"),
        ({"rope_theta": float("inf")}, None, "backbone.rope_theta", "a finite number"),
        ({"rms_norm_eps": float("nan")}, None, "backbone.rms_norm_eps", "a finite number"),
        ({"head_dim": "x"}, None, "backbone.head_dim", "an integer or null"),
    ],
)
def test_wrong_type_names_key_and_expected(section, value, key, expected):
    data = _cfg()
    data["backbone"].update(section)
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert info.value.key == key
    assert key in str(info.value) and expected in str(info.value)


@pytest.mark.parametrize("setting", ["optim.lr=.inf", "optim.lr=.nan", "optim.grad_clip=.nan", "optim.lr=-.inf"])
def test_non_finite_numbers_are_refused_from_the_command_line(setting):
    key = setting.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: got .*, expected a finite number"):
        load_config(DEBUG_LM, [setting])


def test_int_is_accepted_for_float_and_becomes_float():
    cfg = config_from_dict(_cfg(optim={"lr": 1, "betas": [0, 0.5]}))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.0, 0.5) and all(isinstance(b, float) for b in cfg.optim.betas)


def test_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as info:
        config_from_dict(_cfg(optim={"schedule": "cosin"}))
    msg = str(info.value)
    assert "optim.schedule" in msg and "'constant', 'cosine', 'linear'" in msg
    # Literal[0, 1, 2, 3]: True == 1 in Python, but a bool is not a ZeRO stage.
    with pytest.raises(ConfigError, match=r"parallel.zero_stage: got True, expected one of 0, 1, 2, 3"):
        config_from_dict(_cfg(parallel={"zero_stage": True}))


def test_missing_required_value():
    data = _cfg()
    del data["backbone"]["num_heads"]
    with pytest.raises(ConfigError, match=r"backbone.num_heads is required \(an integer\)"):
        config_from_dict(data)
    with pytest.raises(ConfigError, match=r"train.seq_len is required"):
        config_from_dict(_cfg(train={"steps": 3}))


def test_optional_section_absent_or_null_is_none():
    assert config_from_dict({}).backbone is None
    assert config_from_dict({"backbone": None, "train": None}).train is None
    with pytest.raises(ConfigError, match=r"backbone: got 3, expected a mapping with keys vocab_size"):
        config_from_dict({"backbone": 3})


def test_tuple_length_and_item_types():
    with pytest.raises(ConfigError, match=r"optim.betas: got \[0.9\], expected a list of 2 items"):
        config_from_dict(_cfg(optim={"betas": [0.9]}))
    with pytest.raises(ConfigError, match=r"optim.betas\[1\]: got 'x', expected a finite number"):
        config_from_dict(_cfg(optim={"betas": [0.9, "x"]}))


def test_list_of_str_rejects_a_bare_string():
    with pytest.raises(ConfigError, match=r"data.paths: got 'a.txt', expected a list \(each item a string\)"):
        config_from_dict(_cfg(data={"source": "text-files", "paths": "a.txt"}))
    cfg = config_from_dict(_cfg(data={"source": "text-files", "paths": ["a.txt"]}))
    assert cfg.data.paths == ["a.txt"]


def test_str_field_given_a_yaml_boolean_says_to_quote_it():
    with pytest.raises(ConfigError, match=r"run.out_dir: got False, expected a string \(quote it"):
        config_from_dict({"run": {"out_dir": False}})


def test_deepspeed_passthrough_keeps_any_values():
    cfg = config_from_dict({"deepspeed": {"zero_optimization": {"overlap_comm": True}, "wall_clock_breakdown": False}})
    assert cfg.deepspeed["zero_optimization"] == {"overlap_comm": True}


# --------------------------------------------------------------------------- combinations


def test_pipeline_with_zero3_names_both_keys():
    with pytest.raises(ConfigError) as info:
        config_from_dict(_cfg(parallel={"pp": 2, "zero_stage": 3}))
    msg = str(info.value)
    assert "parallel.zero_stage" in msg and "parallel.pp" in msg


def test_kv_heads_must_divide_heads():
    data = _cfg()
    data["backbone"]["num_kv_heads"] = 3
    with pytest.raises(ConfigError, match=r"backbone.num_kv_heads: got 3, expected a divisor of backbone.num_heads=4"):
        config_from_dict(data)


# --------------------------------------------------------------------------- YAML details


@pytest.mark.parametrize(
    "text, value",
    [("1e-4", 1e-4), ("3e5", 3e5), ("1.0e5", 1e5), ("-2E-3", -2e-3), ("1_000.5", 1000.5), (".5", 0.5), ("1.5", 1.5)],
)
def test_scientific_floats_parse_as_floats(text, value):
    assert parse_yaml(f"x: {text}")["x"] == value


def test_ints_and_strings_stay_what_they_are():
    data = parse_yaml("a: 3\nb: '1e-4'\nc: 1e\nd: 0x10")
    assert data == {"a": 3, "b": "1e-4", "c": "1e", "d": 16}


def test_lr_written_as_1e_minus_4_loads(tmp_path):
    path = _write(tmp_path, "optim:\n  lr: 1e-4\n")
    assert load_config(path).optim.lr == 1e-4


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = _write(tmp_path, "run:\n  seed: 1\n  out_dir: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(path + ":") and "invalid YAML" in msg
    assert f"{path}:4:" in msg or f"{path}:3:" in msg


def test_duplicate_key_is_an_error(tmp_path):
    path = _write(tmp_path, "run:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'seed' \(first at line 2\)"):
        load_config(path)


def test_missing_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match=r"config file not found: .*nope.yaml"):
        load_config(missing)


def test_top_level_must_be_a_mapping(tmp_path):
    path = _write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match=r"expected a mapping of sections"):
        load_config(path)


# --------------------------------------------------------------------------- merging and overrides


def test_files_merge_in_order_per_section(tmp_path):
    extra = _write(tmp_path, "optim:\n  lr: 1e-3\nrun:\n  seed: 7\n", name="extra.yaml")
    cfg = load_config([DEBUG_LM, extra])
    base = load_config(DEBUG_LM)
    assert cfg.optim.lr == 1e-3 and cfg.run.seed == 7
    # Deep merge: the rest of each section comes from the first file.
    assert cfg.optim.warmup_steps == base.optim.warmup_steps == 20
    assert cfg.run.out_dir == base.run.out_dir


def test_overrides_parse_values_as_yaml():
    cfg = load_config(
        DEBUG_LM,
        overrides=["backbone.hidden_size=128", "optim.betas=[0.8,0.9]", "optim.lr=1e-4", "backbone.head_dim=null"],
    )
    assert cfg.backbone.hidden_size == 128
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.optim.lr == 1e-4
    assert cfg.backbone.head_dim is None


def test_override_of_free_form_and_absent_sections(tmp_path):
    cfg = load_config(DEBUG_LM, overrides=["deepspeed.zero_optimization.overlap_comm=true"])
    assert cfg.deepspeed == {"zero_optimization": {"overlap_comm": True}}
    # An override can create a section the files left out.
    only_run = _write(tmp_path, "run:\n  seed: 1\n")
    cfg = load_config(only_run, overrides=["train.steps=5", "train.seq_len=16"])
    assert (cfg.train.steps, cfg.train.seq_len) == (5, 16)


def test_override_unknown_key_is_named():
    with pytest.raises(ConfigError) as info:
        load_config(DEBUG_LM, overrides=["backbone.num_layer=3"])
    msg = str(info.value)
    assert "backbone.num_layer" in msg and "--set backbone.num_layer=3" in msg and "num_layers" in msg


def test_override_below_a_value_is_refused():
    with pytest.raises(ConfigError, match=r"optim.lr is a value \(a finite number\), not a section"):
        load_config(DEBUG_LM, overrides=["optim.lr.x=1"])


@pytest.mark.parametrize("bad", ["backbone.hidden_size", "=3", "backbone..hidden_size=3"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="override"):
        load_config(DEBUG_LM, overrides=[bad])


def test_override_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"backbone.hidden_size: got 'big', expected an integer"):
        load_config(DEBUG_LM, overrides=["backbone.hidden_size=big"])


# --------------------------------------------------------------------------- round trip


def test_dump_and_reload_is_equal(tmp_path):
    cfg = load_config(DEBUG_LM, overrides=["optim.lr=1e-4", "deepspeed.steps_per_print=5", "backbone.head_dim=32"])
    out = tmp_path / "run" / "config.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg
    assert not [p for p in os.listdir(out.parent) if p != "config.yaml"]  # no temp file left behind


def test_config_to_dict_is_plain_and_round_trips():
    cfg = load_config(DEBUG_LM)
    d = config_to_dict(cfg)
    assert d["optim"]["betas"] == [0.9, 0.95] and isinstance(d["optim"]["betas"], list)
    assert config_from_dict(d) == cfg


@pytest.mark.parametrize(
    "path", sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)), ids=os.path.basename
)
def test_every_config_file_round_trips(path, tmp_path):
    cfg = load_config(path)
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("setting, key", [("mllm.trainable_stage=heads", "mllm.trainable_stage"),
                                          ("mllm.code_init=tokenizer", "mllm.code_init")])
def test_pipeline_combinations_the_unified_trainer_cannot_run_fail_config_check(setting, key, capsys):
    """Before: `config check` said ok; `megadual train` refused only after its processes started."""
    from megadual.cli import main

    argv = ["config", "check", "-c", os.path.join(REPO, "configs", "debug", "mllm.yaml"), "--set", "parallel.pp=2",
            "--set", "parallel.zero_stage=1", "--set", setting, "--set", "mllm.tokenizer_path=/nowhere"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{key}: got" in err and "parallel.pp=2" in err and len(err.strip().splitlines()) == 1


def test_pipeline_from_a_backbone_only_init_checkpoint_fails_config_check(tmp_path, capsys):
    """Before: `config check` said ok (it read no checkpoint); `megadual train` refused at start."""
    from megadual.cli import main
    from megadual.convert.writers import write_init_checkpoint
    from megadual.models.qwen2 import build_qwen2

    mllm_config = os.path.join(REPO, "configs", "debug", "mllm.yaml")
    backbone = load_config(mllm_config).backbone
    write_init_checkpoint([build_qwen2(backbone, seed=0).state_dict()], backbone, str(tmp_path / "init"))
    argv = ["config", "check", "-c", mllm_config, "--set", f"train.init_from={tmp_path / 'init'}"]
    assert main(argv) == 0  # pp=1 starts the backbone from it
    assert main([*argv, "--set", "parallel.pp=2", "--set", "parallel.zero_stage=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["megadual: error: parallel.pp: got 2, expected 1 when train.init_from is a backbone-only "
                   "checkpoint (pipeline stages do not yet load parts of the model)"]
