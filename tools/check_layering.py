#!/usr/bin/env python3
"""Check MegaDual's dependency direction by parsing imports (no module is executed).

    python tools/check_layering.py            # the repository this file lives in
    python tools/check_layering.py ROOT       # ROOT holds megadual/ (and optionally tools/)

Rules (DESIGN.md, "Dependency direction"):

1. A module never imports a module of a higher layer (`LAYERS` below; the most specific
   prefix wins). Imports inside functions count too: a lazy import is still a dependency.
   Imports under `if TYPE_CHECKING:` count as well; type-only edges upward are still edges.
2. Some packages are narrower than their layer (`ONLY_IMPORTS`): `data` imports only
   `config`; `config` uses only yaml, the standard library and `fs`; `ops` only torch.
3. `import deepspeed` only in `DEEPSPEED_ALLOWED` (the L3 wrappers and `train`).
4. Hugging Face state-dict key names (string literals starting with `HF_KEY_PREFIXES`)
   only in modules named `hf_adapter.py`.
5. Every module under megadual/ is in the layer map (a new package gets a layer on purpose).
6. Scripts in tools/ use public names only (no `megadual._x` module or `_name` import).

Prints one line per violation, `path:line: message`, and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "megadual"

# Module prefix -> (layer, label). A module takes the entry of its longest matching prefix.
# Package __init__ files are mapped at the layer of their lowest child: importing
# megadual.distributed.topology runs megadual/distributed/__init__.py first.
LAYERS: dict[str, tuple[int, str]] = {
    "megadual": (0, "package root"),
    "megadual._C": (0, "compiled extension"),
    "megadual.config": (0, "config"),
    # Import-time fix for the CUDA-only torchvision wheel next to a CPU torch (torch only).
    "megadual._compat": (0, "compat"),
    # Crash-safe file and directory writes (stdlib only).
    "megadual.fs": (0, "fs"),
    "megadual.ops": (0, "ops"),
    "megadual.distributed": (1, "distributed package"),
    "megadual.distributed.topology": (1, "distributed.topology"),
    "megadual.distributed.comm": (1, "distributed.comm"),
    "megadual.distributed.tensor_parallel": (1, "distributed.tensor_parallel"),
    "megadual.models": (2, "models"),
    "megadual.losses": (2, "losses"),
    "megadual.data": (2, "data"),
    "megadual.distributed.pipeline": (3, "distributed.pipeline"),
    "megadual.distributed.pipeline_mllm": (3, "distributed.pipeline_mllm"),
    "megadual.distributed.deepspeed_config": (3, "distributed.deepspeed_config"),
    "megadual.distributed.runtime": (3, "distributed.runtime"),
    "megadual.train": (4, "train"),
    "megadual.inference": (4, "inference"),
    # Offline data pipelines that run trained models (token extraction): beside train/inference.
    "megadual.pipeline": (4, "pipeline"),
    # Memory and throughput of training layouts, from models built on the meta device.
    "megadual.plan": (4, "plan"),
    "megadual.cli": (5, "cli"),
    "megadual.__main__": (5, "cli"),
    # The embedded end-to-end job behind `megadual demo`: an application like the CLI.
    "megadual.demo": (5, "demo"),
    # Starts subcommands under the `deepspeed` launcher (a subprocess; no deepspeed import).
    "megadual.launch": (5, "launch"),
    # Checkpoint conversion (reads training checkpoints, writes HF / init checkpoints): a tool.
    "megadual.convert": (5, "convert"),
}

# Packages narrower than their layer. "internal": the megadual modules they may import
# (prefixes); "external": the non-stdlib top-level packages they may import (None: any).
ONLY_IMPORTS: dict[str, dict[str, tuple[str, ...] | None]] = {
    "megadual.config": {"internal": ("megadual.config", "megadual.fs"), "external": ("yaml",)},
    "megadual.ops": {"internal": ("megadual.ops", "megadual._C"), "external": ("torch",)},
    "megadual.data": {"internal": ("megadual.config", "megadual.data", "megadual.fs"), "external": None},
    "megadual.fs": {"internal": (), "external": ()},
}

# The only modules allowed to import deepspeed (prefixes).
DEEPSPEED_ALLOWED: tuple[str, ...] = (
    "megadual.distributed.pipeline",
    "megadual.distributed.pipeline_mllm",
    "megadual.distributed.deepspeed_config",
    "megadual.distributed.runtime",
    "megadual.train",
    # Consolidates ZeRO partitions with DeepSpeed's own zero_to_fp32.
    "megadual.convert",
)

# String literals that look like Hugging Face Qwen2 state-dict keys.
# ("lm_head." is not among them: MegaDual's own output projection has that name too.)
HF_KEY_PREFIXES: tuple[str, ...] = ("model.layers.", "model.embed_tokens", "self_attn.")
HF_ADAPTER_FILENAME = "hf_adapter.py"

# Every top-level module may import these internal modules regardless of ONLY_IMPORTS:
# importing any submodule runs the package root anyway.
_ALWAYS_OK = ("megadual",)


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def _lookup(table: dict, module: str):
    """The value of the longest key of `table` that is `module` or a package prefix of it.

    The bare package name matches only itself (megadual/__init__.py): otherwise every new
    top-level module would silently land in layer 0 instead of being reported as unmapped.
    """
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in table and (key != PACKAGE or module == PACKAGE):
            return key, table[key]
    return None, None


def _has_prefix(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _iter_py(directory: Path):
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]):
    """Yield (line, imported module) once per pair for every import in the tree, functions included."""
    seen: set[tuple[int, str]] = set()
    for line, target in _raw_imports(tree, module, is_package, known):
        if (line, target) not in seen:
            seen.add((line, target))
            yield line, target


def _raw_imports(tree: ast.AST, module: str, is_package: bool, known: set[str]):
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(p for p in base_parts + ([node.module] if node.module else []) if p)
            else:
                base = node.module or ""
            for alias in node.names:
                # `from pkg import sub` imports the module pkg.sub when it exists.
                sub = f"{base}.{alias.name}"
                yield node.lineno, (sub if sub in known else base)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def _imported_names(tree: ast.AST):
    """Yield (line, module, name) for `from module import name` (absolute imports only)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            for alias in node.names:
                yield node.lineno, node.module, alias.name


def _parse(path: Path, rel: str, violations: list[Violation]):
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as exc:
        violations.append(Violation(rel, exc.lineno or 0, f"cannot parse: {exc.msg}"))
        return None


def check_package(root: Path) -> list[Violation]:
    """All violations of rules 1-5 in `root/megadual`, and of rule 6 in `root/tools`.

    Args:
        root: directory containing the `megadual` package.

    Returns:
        Violations, in file order.
    """
    root = Path(root)
    pkg_dir = root / PACKAGE
    if not pkg_dir.is_dir():
        raise FileNotFoundError(f"no {PACKAGE}/ package under {root}")
    files = list(_iter_py(pkg_dir))
    known = {_module_name(root, p) for p in files}
    stdlib = set(sys.stdlib_module_names)
    violations: list[Violation] = []

    for path in files:
        rel = path.relative_to(root).as_posix()
        module = _module_name(root, path)
        tree = _parse(path, rel, violations)
        if tree is None:
            continue
        _, entry = _lookup(LAYERS, module)
        if entry is None:
            violations.append(Violation(rel, 1, f"{module} is not in the layer map: add it to LAYERS in {__file__}"))
            continue
        layer, label = entry
        only_key, only = _lookup(ONLY_IMPORTS, module)

        for line, target in _imports(tree, module, path.name == "__init__.py", known):
            top = target.split(".")[0]
            if top == "deepspeed" and not _has_prefix(module, DEEPSPEED_ALLOWED):
                violations.append(Violation(
                    rel, line, f"{module} imports {target}: deepspeed may be imported only in "
                    f"{', '.join(DEEPSPEED_ALLOWED)}"))
            if top == PACKAGE:
                _, t_entry = _lookup(LAYERS, target)
                if t_entry is not None and t_entry[0] > layer:
                    violations.append(Violation(
                        rel, line, f"{module} (L{layer} {label}) imports {target} (L{t_entry[0]} {t_entry[1]}): "
                        "lower layers never import higher ones"))
                if only is not None and target not in _ALWAYS_OK and not _has_prefix(target, only["internal"]):
                    violations.append(Violation(
                        rel, line, f"{module} imports {target}: {only_key} may import only "
                        f"{', '.join(only['internal'])} from {PACKAGE}"))
            elif (only is not None and only["external"] is not None and top and top not in stdlib
                  and top not in only["external"]):
                if top != "deepspeed":  # already reported above
                    allowed = ", ".join(only["external"]) or "nothing"
                    violations.append(Violation(
                        rel, line, f"{module} imports {target}: {only_key} may use only the standard library "
                        f"and {allowed}"))

        if path.name != HF_ADAPTER_FILENAME:
            for node in ast.walk(tree):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                        and node.value.startswith(HF_KEY_PREFIXES)):
                    violations.append(Violation(
                        rel, node.lineno, f"Hugging Face key name {node.value!r} outside an {HF_ADAPTER_FILENAME} "
                        "module: keep the key mapping in the adapter"))

    tools_dir = root / "tools"
    if tools_dir.is_dir():
        for path in _iter_py(tools_dir):
            rel = path.relative_to(root).as_posix()
            tree = _parse(path, rel, violations)
            if tree is None:
                continue
            for line, target in _imports(tree, "tools." + path.stem, False, known):
                if target.split(".")[0] == PACKAGE and any(p.startswith("_") for p in target.split(".")[1:]):
                    violations.append(Violation(rel, line, f"tool imports private module {target}: use public names"))
            for line, mod, name in _imported_names(tree):
                if mod.split(".")[0] == PACKAGE and name.startswith("_"):
                    violations.append(Violation(
                        rel, line, f"tool imports private name {name} from {mod}: use public names"))
    return violations


def main(argv: list[str] | None = None) -> int:
    """Check the tree; print violations; return 1 if any, else 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parent.parent),
                        help="directory holding megadual/ (default: this repository)")
    args = parser.parse_args(argv)
    try:
        violations = check_package(Path(args.root))
    except FileNotFoundError as exc:
        print(f"check_layering: error: {exc}", file=sys.stderr)
        return 2
    for v in violations:
        print(v)
    if violations:
        print(f"check_layering: {len(violations)} violation(s)", file=sys.stderr)
        return 1
    print("check_layering: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
