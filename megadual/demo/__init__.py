"""The embedded end-to-end run behind `megadual demo` (README's `make demo`): see run.py."""

from .run import main, run_demo

__all__ = ["main", "run_demo"]
