"""The dependency direction of DESIGN.md, checked by parsing imports; and a cheap `import megadual`."""

import importlib.util
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "check_layering.py")


def _tool():
    spec = importlib.util.spec_from_file_location("check_layering", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_layering"] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def _tree(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_real_tree_respects_the_layers(capsys):
    rc = _tool().main([REPO])
    out = capsys.readouterr().out
    assert rc == 0, out


def test_fabricated_violations_are_named(tmp_path, capsys):
    root = _tree(tmp_path, {
        "megadual/__init__.py": "",
        "megadual/config/__init__.py": "",
        "megadual/config/schema.py": "import torch\n",                                 # config: yaml + stdlib only
        "megadual/data/__init__.py": "",
        "megadual/data/loader.py": "from megadual.models.qwen2 import model\n",        # data -> models
        "megadual/models/__init__.py": "",
        "megadual/models/qwen2/__init__.py": "",
        "megadual/models/qwen2/model.py": """
            def load():
                from ...train import trainer   # lazy, relative, and upward: still a violation
                return trainer
            KEY = "model.layers.0.self_attn.q_proj.weight"
        """,
        "megadual/models/qwen2/hf_adapter.py": 'KEY = "model.embed_tokens.weight"\n',  # allowed here
        "megadual/losses/__init__.py": "import deepspeed\n",                          # deepspeed outside L3/train
        "megadual/train/__init__.py": "",
        "megadual/train/trainer.py": "import deepspeed\nfrom megadual.models.qwen2 import model\n",  # both fine
        "megadual/surprise.py": "",                                                   # not in the layer map
        "tools/convert.py": "from megadual.models.qwen2.model import _private\n",
    })
    rc = _tool().main([str(root)])
    out = capsys.readouterr().out
    assert rc == 1
    lines = out.strip().splitlines()
    expect = [
        ("megadual/config/schema.py:1:", "imports torch"),
        ("megadual/data/loader.py:1:", "imports megadual.models.qwen2.model"),
        ("megadual/models/qwen2/model.py:3:", "imports megadual.train.trainer (L4 train)"),
        ("megadual/models/qwen2/model.py:5:", "'model.layers.0.self_attn.q_proj.weight'"),
        ("megadual/losses/__init__.py:1:", "imports deepspeed"),
        ("megadual/surprise.py:1:", "not in the layer map"),
        ("tools/convert.py:1:", "private name _private"),
    ]
    for where, what in expect:
        assert any(line.startswith(where) and what in line for line in lines), (where, what, out)
    assert not any(line.startswith(("megadual/models/qwen2/hf_adapter.py", "megadual/train/")) for line in lines), out
    assert len(lines) == len(expect), out


def test_tool_runs_as_a_script():
    done = subprocess.run([sys.executable, TOOL], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok" in done.stdout


def test_import_megadual_is_cheap():
    code = (
        "import sys, megadual, megadual.config\n"
        "heavy = [m for m in ('deepspeed', 'transformers', 'megadual._C', 'torch', 'torch.distributed') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
