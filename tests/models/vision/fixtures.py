"""The tiny tokenizer config the vision tests build (the debug config's model sections)."""

from __future__ import annotations

import os

from megadual.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEBUG_CONFIG = os.path.join(REPO, "configs", "debug", "tokenizer.yaml")


def debug_config(*overrides: str):
    """The root Config of configs/debug/tokenizer.yaml with `--set`-style overrides."""
    return load_config([DEBUG_CONFIG], overrides=list(overrides))
