"""The one error type for anything wrong in a config a user wrote."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value a user can fix.

    The message always names the dotted key, the offending value and what is allowed,
    e.g. ``backbone.num_kv_heads: got 3, expected a divisor of backbone.num_heads=4``.
    """

    def __init__(self, key: str, value: Any, expected: str, *, message: str | None = None):
        self.key = key
        self.value = value
        self.expected = expected
        super().__init__(message or f"{key}: got {value!r}, expected {expected}")
