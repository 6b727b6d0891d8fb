"""The `megadual` command: help for every subcommand, config show/check, one-line errors."""

import os
import subprocess
import sys

import pytest
import yaml

from megadual import cli
from megadual.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEBUG_LM = os.path.join(REPO, "configs", "debug", "lm.yaml")


def _command_paths(commands, prefix=()):
    for cmd in commands:
        path = prefix + (cmd.name,)
        yield path
        yield from _command_paths(cmd.subcommands, path)


ALL_COMMANDS = list(_command_paths(cli.COMMANDS))


def test_main_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: megadual")
    for cmd in cli.COMMANDS:
        assert cmd.name in out and cmd.help in out


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=" ".join)
def test_each_subcommand_has_help(path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*path, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: megadual {' '.join(path)}")


def test_config_show_prints_resolved_yaml(capsys, tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("run:\n  seed: 5\n")
    rc = cli.main(["config", "show", "--config", DEBUG_LM, "--config", str(extra), "--set", "optim.lr=1e-4"])
    assert rc == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["optim"]["lr"] == 1e-4 and shown["run"]["seed"] == 5
    # What `show` prints is itself a config that loads to the same object.
    (tmp_path / "shown.yaml").write_text(yaml.safe_dump(shown))
    assert load_config(tmp_path / "shown.yaml") == load_config([DEBUG_LM, extra], ["optim.lr=1e-4"])


def test_config_check_prints_ok(capsys):
    assert cli.main(["config", "check", "-c", DEBUG_LM]) == 0
    assert capsys.readouterr().out.strip() == "ok"


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["config", "check", "-c", DEBUG_LM, "--set", "backbone.num_layer=3"], "backbone.num_layer"),
        (["config", "check", "-c", DEBUG_LM, "--set", "parallel.pp=2", "--set", "parallel.zero_stage=3"],
         "parallel.zero_stage"),
        (["config", "check", "-c", "does/not/exist.yaml"], "config file not found: does/not/exist.yaml"),
        (["config", "check", "-c", DEBUG_LM, "--set", "nonsense"], "has no '='"),
        (["config", "check"], "--config"),  # required argument
        (["no-such-command"], "invalid choice"),
        ([], "choose a command"),
        (["config"], "choose a command: show, check"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, fragment, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse usage errors exit from inside parse_args
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("megadual: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert fragment in err and "Traceback" not in err


def test_debug_env_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("MEGADUAL_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["config", "check", "-c", "does/not/exist.yaml"])


def test_every_handler_names_an_existing_module_and_function():
    # Checked without importing heavy handler modules: find_spec only locates the file.
    import importlib.util

    def leaves(commands):
        for cmd in commands:
            yield from leaves(cmd.subcommands) if cmd.subcommands else [cmd]

    for cmd in leaves(cli.COMMANDS):
        module, _, func = cmd.handler.partition(":")
        assert func, f"{cmd.name}: handler {cmd.handler!r} is not 'module:function'"
        assert importlib.util.find_spec(module) is not None, f"{cmd.name}: no module {module}"
        if module == "megadual.cli":
            assert callable(cli._resolve(cmd.handler))


def test_real_process_help_is_fast_and_does_not_import_torch():
    code = (
        "import sys\n"
        "from megadual.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = [m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "config" in done.stdout
    # `python -m megadual` is the same command, with a real process exit code.
    done = subprocess.run([sys.executable, "-m", "megadual", "config", "check", "-c", "nope.yaml"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == "megadual: error: config file not found: nope.yaml\n"
