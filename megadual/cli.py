"""The `megadual` command: a registry of subcommands with lazily imported handlers.

Adding a subcommand is one entry in `COMMANDS` below:

    Command(
        "train-lm",
        "train the backbone as a language model",
        add_arguments=add_config_arguments,          # must be cheap: runs for --help
        handler="megadual.train.lm:main",           # imported only when the command runs
    ),

`add_arguments(parser)` adds the subcommand's flags and is defined somewhere cheap to
import (this module, or `megadual.config`); `handler` is a "module:function" string,
so `megadual --help` never imports torch or DeepSpeed. The handler receives the parsed
`argparse.Namespace` and returns an exit code (None means 0). Subcommands taking a
config use `add_config_arguments` and call `megadual.config.config_from_args(args)`.
A group of subcommands (`megadual config show|check`) is a `Command` with `subcommands`.

Errors a user can cause (bad flags, `ConfigError`/`ValueError`/`FileNotFoundError` from a
handler) print one line, `megadual: error: ...`, and exit 2. Set MEGADUAL_DEBUG=1 to get
the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, NoReturn, Optional, Sequence

from megadual import __version__
from megadual.config import add_config_arguments, config_from_args, config_to_yaml

PROG = "megadual"
EXIT_USAGE = 2

# Errors a user can cause and fix; anything else is a bug and keeps its traceback.
# (ConfigError is a ValueError.) OSError covers the user's paths and disks: missing, existing,
# a directory or not, unwritable, full; the messages name the path and the cause.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


@dataclass(frozen=True)
class Command:
    """One subcommand (or a group of them).

    Args:
        name: the word on the command line.
        help: one line for `megadual --help`.
        add_arguments: adds this command's arguments to its parser; must be cheap.
        handler: "module:function" run with the parsed Namespace; imported lazily.
        subcommands: for a group (e.g. `config`): its children; then no handler.
        description: longer text for `megadual NAME --help` (defaults to `help`).
    """

    name: str
    help: str
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None
    handler: Optional[str] = None
    subcommands: tuple["Command", ...] = ()
    description: Optional[str] = None


# --------------------------------------------------------------------------- handlers kept here


def _config_show(args: argparse.Namespace) -> int:
    """Print the resolved config (files merged, overrides applied, validated) as YAML."""
    sys.stdout.write(config_to_yaml(config_from_args(args)))
    return 0


def _config_check(args: argparse.Namespace) -> int:
    """Validate the config (and a unified model's init checkpoint against it); print "ok"."""
    cfg = config_from_args(args)
    if cfg.mllm is not None and cfg.train is not None and cfg.train.init_from:
        from megadual.train.mllm import unified_init_from

        unified_init_from(cfg)
    print("ok")
    return 0


def _add_train_lm_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run.out_dir")


def _add_synth_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory for the shards and manifest.json")
    parser.add_argument("--num", type=int, default=4096, help="number of images (default: 4096)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="scene seed; use another for a held-out set (default: 0)")
    parser.add_argument("--shard-size", dest="shard_size", type=int, default=1000,
                        help="images per tar shard (default: 1000)")
    parser.add_argument("--combinations", choices=("seen", "all"), default="seen",
                        help="seen: a training set, without the attribute combinations held out for "
                             "compositional tests; all: a held-out set with every combination (default: seen)")


def _add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="append", required=True, metavar="PATH",
                        help="a .tar shard, a directory of shards, or an image folder with NAME.txt captions; repeatable")
    parser.add_argument("--out", required=True, help="output directory: token shards, .parts/, manifest.json")
    parser.add_argument("--tokenizer", required=True, help="a DualTokenizer directory (written by save_pretrained)")
    parser.add_argument("--text-tokenizer", dest="text_tokenizer", default="bytes",
                        help="'bytes' (debug) or a local Hugging Face tokenizer directory (default: bytes)")
    parser.add_argument("--format", choices=["auto", "webdataset", "folder"], default="auto",
                        help="input kind (default: auto, webdataset when a path is or holds .tar files)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=64, help="images per forward (default: 64)")
    parser.add_argument("--num-workers", dest="num_workers", type=int, default=2,
                        help="DataLoader workers decoding images (default: 2)")
    parser.add_argument("--folder-shard-size", dest="folder_shard_size", type=int, default=1000,
                        help="images per input (and output) shard when reading folders (default: 1000)")
    parser.add_argument("--on-corrupt", dest="on_corrupt", choices=["skip", "raise"], default="skip",
                        help="skip and list unreadable inputs in the manifest, or stop (default: skip)")
    parser.add_argument("--device", help="cpu or cuda (default: this rank's GPU when there is one)")
    parser.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")


def _add_to_hf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="a training run directory or a MegaDual init checkpoint")
    parser.add_argument("--out", required=True, help="the Hugging Face directory to write")
    parser.add_argument("--tag", help="checkpoint tag, e.g. step_000100 (default: the newest complete one)")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="cast the weights (default: keep)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be written; write nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--visual-tokenizer", dest="visual_tokenizer",
                        help="unified model: DualToken tokenizer dir (default: mllm.tokenizer_path)")
    parser.add_argument("--text-tokenizer", dest="text_tokenizer",
                        help="unified model: 'bytes' or a HF tokenizer dir (default: mllm.text_tokenizer)")
    parser.set_defaults(action="to-hf")


def _add_from_hf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, help="a local HF Qwen2/Qwen2.5 directory, or a unified-model export")
    parser.add_argument("--out", required=True, help="the MegaDual init checkpoint to write")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of the training run (any pp works)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(action="from-hf")


def _add_reshard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="a training run directory or a MegaDual init checkpoint")
    parser.add_argument("--out", required=True, help="the MegaDual init checkpoint to write")
    parser.add_argument("--tp", type=int, required=True, help="the new tensor-parallel degree (any pp works)")
    parser.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(action="reshard")


def _add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="a stage-2 run directory, or its `convert to-hf` export")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    _add_inference_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True, help="a caption; repeat for a batch")
    parser.add_argument("--out", required=True, help="PNG path (OUT_i.png for several prompts)")
    parser.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: mllm.cfg_scale)")
    parser.add_argument("--temperature", type=float, help="0 = greedy (default: mllm.temperature)")
    parser.add_argument("--top-k", dest="top_k", type=int, help="keep the k most likely codes (default: mllm.top_k)")
    parser.add_argument("--top-p", dest="top_p", type=float, help="nucleus sampling (default: mllm.top_p)")


def _add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    _add_inference_arguments(parser)
    parser.add_argument("--image", action="append", required=True, help="an image file; repeat for a batch")
    parser.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the cluster")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--gpu-memory", default="80GiB", help="memory per GPU (default 80GiB)")
    parser.add_argument("--reserve", default="2GiB",
                        help="per-GPU memory a run cannot use: CUDA context, NCCL, allocator slack (default 2GiB)")
    parser.add_argument("--gpu-tflops", type=float, default=989.0, help="peak TFLOP/s per GPU (default 989: H100 bf16)")
    parser.add_argument("--mfu", type=float, default=0.45, help="model FLOPs utilisation to assume (default 0.45)")
    parser.add_argument("--search", action="store_true", help="rank every layout of --gpus, not only the config's")
    parser.add_argument("--top", type=int, default=10, help="layouts in the table and the PNG (default 10)")
    parser.add_argument("--caption-tokens", type=int, default=64, help="unified model: text tokens per image (64)")
    parser.add_argument("--doc-len", type=int, help="packed document length for attention FLOPs "
                        "(default: seq_len; unified model: one image and its caption)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--png", metavar="PATH", help="also draw stacked memory per rank of the ranked layouts")


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    parser.add_argument("--quick", action="store_true", help="a short smoke version of every stage")
    parser.add_argument("--force", action="store_true", help="redo finished stages instead of reusing them")


# --------------------------------------------------------------------------- the registry

COMMANDS: list[Command] = [
    Command(
        "config",
        "inspect and validate YAML configs",
        subcommands=(
            Command(
                "show",
                "print the resolved config (files merged in order, --set applied) as YAML",
                add_arguments=add_config_arguments,
                handler="megadual.cli:_config_show",
            ),
            Command(
                "check",
                "validate a config (types, unknown keys, combinations); prints 'ok'",
                add_arguments=add_config_arguments,
                handler="megadual.cli:_config_check",
            ),
        ),
    ),
    Command(
        "train-lm",
        "train the Qwen2 backbone as a language model (DeepSpeed)",
        add_arguments=_add_train_lm_arguments,
        handler="megadual.train.lm:main",
    ),
    Command(
        "synth-data",
        "write synthetic shape images as webdataset shards",
        add_arguments=_add_synth_data_arguments,
        handler="megadual.data.synthetic_images:main",
    ),
    Command(
        "extract",
        "pre-extract DualToken codes into token shards",
        add_arguments=_add_extract_arguments,
        handler="megadual.pipeline.extract:main",
    ),
    Command(
        "train-tokenizer",
        "train the DualToken visual tokenizer",
        add_arguments=_add_train_lm_arguments,
        handler="megadual.train.tokenizer:main",
    ),
    Command(
        "train",
        "stage-2 training of the unified model (DeepSpeed)",
        add_arguments=_add_train_lm_arguments,
        handler="megadual.train.mllm:main",
    ),
    Command("generate", "text-to-image with a trained unified model (CFG)", add_arguments=_add_generate_arguments,
            handler="megadual.inference.mllm:generate_main"),
    Command("caption", "caption images with a trained unified model", add_arguments=_add_caption_arguments,
            handler="megadual.inference.mllm:caption_main"),
    Command(
        "convert",
        "checkpoints to and from Hugging Face; reshard",
        subcommands=(
            Command("to-hf", "any checkpoint -> a Hugging Face directory",
                    add_arguments=_add_to_hf_arguments, handler="megadual.convert.commands:main"),
            Command("from-hf", "a HF directory -> a MegaDual init checkpoint",
                    add_arguments=_add_from_hf_arguments, handler="megadual.convert.commands:main"),
            Command("reshard", "a checkpoint -> another tensor-parallel degree",
                    add_arguments=_add_reshard_arguments, handler="megadual.convert.commands:main"),
        ),
    ),
    Command("plan", "per-rank memory and speed of cluster layouts",
            add_arguments=_add_plan_arguments, handler="megadual.plan.command:main"),
    Command(
        "demo",
        "the embedded end-to-end run on CPU; writes OUT/report.md",
        add_arguments=_add_demo_arguments,
        handler="megadual.demo:main",
    ),
]


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line: `megadual: error: ... (see '... --help')`."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: error: {_one_line(message)} (see '{self.prog} --help')\n")


def _add_commands(subparsers, commands: Sequence[Command], path: str) -> None:
    for cmd in commands:
        parser = subparsers.add_parser(
            cmd.name, help=cmd.help, description=cmd.description or cmd.help, prog=f"{path} {cmd.name}"
        )
        if cmd.subcommands:
            children = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
            _add_commands(children, cmd.subcommands, f"{path} {cmd.name}")
            parser.set_defaults(_group=parser, _choices=[c.name for c in cmd.subcommands], _handler=None)
        else:
            if cmd.handler is None:
                raise TypeError(f"Command {cmd.name!r} has neither a handler nor subcommands")
            if cmd.add_arguments is not None:
                cmd.add_arguments(parser)
            parser.set_defaults(_group=None, _handler=cmd.handler)


def build_parser(commands: Optional[Sequence[Command]] = None) -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand.

    Args:
        commands: the registry to build from (default `COMMANDS`).

    Returns:
        An ArgumentParser; parsed namespaces carry `_handler` ("module:function" or None).
    """
    parser = _Parser(
        prog=PROG,
        description="MegaDual: train DualToken-style unified vision-language models.",
        epilog=f"Run '{PROG} COMMAND --help' for a command's options. MEGADUAL_DEBUG=1 shows tracebacks.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = COMMANDS if commands is None else commands
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    _add_commands(sub, commands, PROG)
    parser.set_defaults(_group=parser, _choices=[c.name for c in commands], _handler=None)
    return parser


def _resolve(handler: str) -> Callable[[argparse.Namespace], Optional[int]]:
    module_name, _, func_name = handler.partition(":")
    if not func_name:
        raise TypeError(f"handler {handler!r} must be 'module:function'")
    return getattr(importlib.import_module(module_name), func_name)


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in str(text).strip().splitlines() if line.strip()) or "(no message)"


def _debug() -> bool:
    return os.environ.get("MEGADUAL_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `megadual` console script.

    Args:
        argv: arguments without the program name (default: sys.argv[1:]).

    Returns:
        The exit code (0 ok; 2 usage or config error). `--help` and argument errors raise
        SystemExit, as argparse does; the console script passes it through.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args._handler is None:
        args._group.error(f"choose a command: {', '.join(args._choices)}")
    try:
        result = _resolve(args._handler)(args)
    except USER_ERRORS as exc:
        if _debug():
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if _debug():
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0 if result is None else int(result)


if __name__ == "__main__":
    sys.exit(main())
