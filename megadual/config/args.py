"""`--config` / `--set` command-line arguments, shared by every subcommand that takes a config.

Lives beside the loader (not in `megadual.cli`) so that handlers in lower layers, e.g.
`megadual.train`, can load their config from parsed arguments without importing the CLI.
"""

from __future__ import annotations

import argparse

from .loader import load_config
from .schema import Config


def add_config_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """Add `--config PATH` (repeatable, merged in order) and `--set KEY=VALUE` (repeatable).

    Args:
        parser: the subcommand's parser.
        required: whether at least one `--config` must be given.
    """
    group = parser.add_argument_group("config")
    group.add_argument(
        "--config",
        "-c",
        dest="config",
        action="append",
        metavar="PATH",
        required=required,
        default=[],
        help="YAML config file; repeat to merge several (later files win, merged per section)",
    )
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="override one value after the files, e.g. --set optim.lr=1e-4 --set optim.betas=[0.9,0.95] "
        "(VALUE is parsed as YAML)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the config named by the arguments that `add_config_arguments` added.

    Args:
        args: parsed arguments with `config` (list of paths) and `overrides` (list of KEY=VALUE).

    Returns:
        The validated `Config`.

    Raises:
        FileNotFoundError, ConfigError: as `load_config`.
    """
    return load_config(list(args.config), overrides=list(args.overrides))
