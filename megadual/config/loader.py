"""Strict YAML -> dataclass loading, `--set` overrides, and dumping the resolved config.

The schema is the dataclasses in `schema.py`; this module knows nothing about any one
section. Conversion is driven by each field's type hint:

    int, float (YAML ints accepted), bool, str, Any, Optional[X], Literal[...],
    list[X], tuple[X, ...], tuple[X, Y], dict[str, X], nested dataclasses

Every error is a `ConfigError` naming the dotted key (`backbone.num_layers`,
`optim.betas[1]`) and what was expected. Only yaml and the standard library are imported,
so `import megadual.config` stays cheap.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Iterable, Sequence, Union

import yaml

from megadual.fs import write_atomic

from .errors import ConfigError
from .schema import Config

PathLike = Union[str, "os.PathLike[str]"]

_NoneType = type(None)
_MISSING = dataclasses.MISSING


# --------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` / `3e5` / `1.0e5` as floats and rejects duplicate keys.

    PyYAML implements YAML 1.1, whose float pattern needs a dot and a signed exponent;
    `lr: 1e-4` would otherwise arrive as the string "1e-4". A duplicated key would
    silently keep the last value, which hides typos in long files.
    """

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # the base class raises its own error for unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r} (first at line {seen[key].line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)
# Appended after PyYAML's own float resolver; it never matches a plain integer, so ints stay ints.
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text with the strict loader.

    Args:
        text: YAML source.
        source: a name for error messages (a file path, or e.g. "--set optim.lr=...").

    Returns:
        The parsed value (None for an empty document).

    Raises:
        ConfigError: on a syntax error or a duplicate key, naming `source` and the line.
    """
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        multiline = "\n" in text.strip()
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None and multiline else source
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        context_mark = getattr(exc, "context_mark", None)
        if context and context_mark is not None and multiline:
            # The problem mark is where the parser gave up (often end of file); the context
            # mark is where the unfinished construct started, usually the line to fix.
            context += f" started at line {context_mark.line + 1}"
        detail = f"{context}: {problem}" if context else problem
        raise ConfigError(source, None, "valid YAML", message=f"{where}: invalid YAML ({detail})") from None


def _read_yaml_file(path: PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise FileNotFoundError(f"config path is a directory, not a YAML file: {path}") from None
    data = parse_yaml(text, source=path)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            path, data, "a mapping of sections at the top level", message=f"{path}: expected a mapping of "
            f"sections (run:, backbone:, ...) at the top level, got {type(data).__name__}"
        )
    return dict(data)


# --------------------------------------------------------------------------- schema walking


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    # schema.py uses `from __future__ import annotations`: field.type is a string there.
    return typing.get_type_hints(cls)


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _strip_optional(tp: Any) -> Any:
    """X for Optional[X]; the type itself otherwise."""
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not _NoneType]
        if len(args) == 1:
            return args[0]
    return tp


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _describe(tp: Any) -> str:
    """Human wording of a type hint, for 'expected ...' in errors."""
    if tp is Any:
        return "any value"
    if tp is _NoneType:
        return "null"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a finite number"
    if tp is str:
        return "a string"
    if _is_section(tp):
        return f"a mapping with keys {', '.join(f.name for f in _init_fields(tp))}"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        parts = [_describe(a) for a in args if a is not _NoneType]
        text = " or ".join(parts)
        return f"{text} or null" if _NoneType in args else text
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list (each item {_describe(args[0])})" if args else "a list"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list (each item {_describe(args[0])})"
        return f"a list of {len(args)} items [{', '.join(_describe(a) for a in args)}]"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unknown_key(cls: type, prefix: str, key: Any, value: Any, *, origin: str = "") -> ConfigError:
    allowed = [f.name for f in _init_fields(cls)]
    dotted = _join(prefix, str(key))
    hint = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    where = f"in section '{prefix}'" if prefix else "at the top level"
    msg = f"unknown key '{dotted}'{origin}"
    if hint:
        msg += f"; did you mean '{_join(prefix, hint[0])}'?"
    msg += f" Allowed keys {where}: {', '.join(allowed)}"
    return ConfigError(dotted, value, f"one of the keys {', '.join(allowed)}", message=msg)


# --------------------------------------------------------------------------- conversion


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check `value` (from YAML) against the type hint `tp` and return the typed value."""
    if tp is Any:
        return copy.deepcopy(value)
    if _is_section(tp):
        return _build(tp, value, key)
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    if _is_union(tp):
        if value is None and _NoneType in args:
            return None
        members = [a for a in args if a is not _NoneType]
        if len(members) == 1:
            try:
                return _convert(members[0], value, key)
            except ConfigError as exc:
                if exc.key != key:  # the error is inside the value (a nested key): keep it
                    raise
        else:
            for member in members:
                try:
                    return _convert(member, value, key)
                except ConfigError:
                    continue
        raise ConfigError(key, value, _describe(tp))

    if origin is typing.Literal:
        # `type(...) is` as well as `==`: True == 1 and 1 == 1.0 must not pass for Literal[1].
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return allowed
        raise ConfigError(key, value, _describe(tp))

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, _describe(tp))
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, value, _describe(tp))
    if tp is float:
        # inf and nan are YAML floats too (.inf, .nan); no setting here means anything by them.
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(key, value, _describe(tp))
    if tp is str:
        if isinstance(value, str):
            return value
        expected = _describe(tp)
        if isinstance(value, bool):
            expected += " (quote it: YAML reads yes/no/on/off/true/false unquoted as booleans)"
        raise ConfigError(key, value, expected)

    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, _describe(tp))
        if origin is list:
            item_tp = args[0] if args else Any
            return [_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if not args:
            return tuple(copy.deepcopy(value))
        if len(value) != len(args):
            raise ConfigError(key, list(value), _describe(tp))
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))

    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, value, _describe(tp))
        key_tp, val_tp = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            k2 = _convert(key_tp, k, f"{key} (key {k!r})")
            out[k2] = _convert(val_tp, v, _join(key, str(k)))
        return out

    if tp is _NoneType:
        if value is None:
            return None
        raise ConfigError(key, value, "null")
    raise TypeError(f"config schema: unsupported field type {tp!r} at {key}")  # a schema bug, not a user error


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, strictly."""
    if not isinstance(data, Mapping):
        keys = ", ".join(f.name for f in _init_fields(cls))
        raise ConfigError(prefix or "<root>", data, f"a mapping with keys {keys}")
    hints = _hints(cls)
    fields = {f.name: f for f in _init_fields(cls)}
    for k, v in data.items():
        if k not in fields:
            raise _unknown_key(cls, prefix, k, v)
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(key, None, _describe(hints[name]),
                              message=f"{key} is required ({_describe(hints[name])}); add it to the config")
    return cls(**kwargs)


# --------------------------------------------------------------------------- merging and overrides


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """`base` updated by `update`, recursing where both sides hold a mapping (later wins)."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split one `--set` argument, `a.b.c=value`, into its key path and YAML-parsed value.

    Args:
        text: e.g. "backbone.hidden_size=128" or "optim.betas=[0.8, 0.9]".

    Returns:
        (["backbone", "hidden_size"], 128). An empty value (`a.b=`) is null.

    Raises:
        ConfigError: no '=', or an empty key component.
    """
    if "=" not in text:
        raise ConfigError(text, text, "KEY=VALUE",
                          message=f"override {text!r} has no '=': write it as KEY=VALUE, e.g. backbone.hidden_size=128")
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(key, text, "a dotted key such as optim.lr",
                          message=f"override {text!r}: the key {key!r} is not a dotted key such as optim.lr")
    return parts, parse_yaml(raw, source=f"--set {text}")


def _check_override_path(parts: list[str], text: str) -> None:
    """Raise a ConfigError if `parts` does not name a field of the schema."""
    cls: Any = Config
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        names = {f.name for f in _init_fields(cls)}
        if part not in names:
            raise _unknown_key(cls, prefix, part, None, origin=f" (from --set {text})")
        tp = _strip_optional(_hints(cls)[part])
        if i == len(parts) - 1:
            return
        if _is_section(tp):
            cls = tp
        elif typing.get_origin(tp) is dict or tp is Any:
            return  # free-form below this point (e.g. deepspeed passthrough keys)
        else:
            dotted = ".".join(parts[: i + 1])
            raise ConfigError(dotted, text, "a section",
                              message=f"override {text!r}: {dotted} is a value ({_describe(tp)}), not a section; "
                              f"set it directly, e.g. {dotted}=...")


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `--set` overrides to a raw (not yet typed) config mapping.

    Args:
        data: merged YAML mapping.
        overrides: strings `a.b.c=value`; the value is parsed as YAML (so `[0.8, 0.9]`
            is a list, `1e-4` a float, `null` None).

    Returns:
        A new mapping; intermediate sections are created when absent.

    Raises:
        ConfigError: malformed override or a key not in the schema (named with its dotted key).
    """
    out = copy.deepcopy(dict(data))
    for text in overrides:
        parts, value = parse_override(text)
        _check_override_path(parts, text)
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), Mapping):
                node[part] = {}  # absent or null section: the override creates it
            node[part] = dict(node[part])
            node = node[part]
        node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------- public API


def config_from_dict(data: Mapping[str, Any], *, validate: bool = True) -> Config:
    """Build and validate a `Config` from a plain mapping (as parsed from YAML).

    Args:
        data: nested mapping; sections may be absent (defaults) or null (optional sections).
        validate: run `Config.validate()` for cross-field checks.

    Returns:
        The typed config.

    Raises:
        ConfigError: unknown key, wrong type, missing required value, impossible combination.
    """
    cfg = _build(Config, data, "")
    if validate:
        cfg.validate()
    return cfg


def section_from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build one section dataclass of the schema strictly from a mapping and validate it.

    Used where a section travels on its own (e.g. a saved tokenizer's config.json).

    Args:
        cls: the section's dataclass, e.g. `TokenizerConfig`.
        data: its mapping.
        prefix: the dotted key errors should name (default: the section's own default prefix).

    Raises:
        ConfigError: unknown key, wrong type, missing value or impossible combination.
    """
    section = _build(cls, data, prefix)
    if hasattr(section, "validate"):
        section.validate(prefix) if prefix else section.validate()
    return section


def load_config(path_or_paths: PathLike | Sequence[PathLike], overrides: Iterable[str] | None = ()) -> Config:
    """Load YAML files (merged in order, later wins, deep-merged by section), apply overrides.

    Args:
        path_or_paths: one path or a sequence of paths.
        overrides: `--set` strings, `a.b.c=value`, applied after all files.

    Returns:
        The validated `Config`.

    Raises:
        FileNotFoundError: a file does not exist (named in the message).
        ConfigError: YAML syntax error (file:line), unknown key, wrong type, missing
            required value, bad override, or an impossible combination.
    """
    if isinstance(path_or_paths, (str, os.PathLike)):
        paths: list[PathLike] = [path_or_paths]
    else:
        paths = list(path_or_paths)
    merged: dict[str, Any] = {}
    for path in paths:
        merged = _deep_merge(merged, _read_yaml_file(path))
    if overrides is None:
        overrides = ()
    elif isinstance(overrides, str):  # a lone string would otherwise be iterated per character
        overrides = [overrides]
    merged = apply_overrides(merged, overrides)
    return config_from_dict(merged)


def _plain(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, recursively: only YAML-safe types remain."""
    if _is_section(type(value)):
        return {f.name: _plain(getattr(value, f.name)) for f in _init_fields(type(value))}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain nested dicts/lists/scalars (tuples become lists).

    Args:
        cfg: a config (or any section).

    Returns:
        A mapping that `config_from_dict` turns back into an equal config.
    """
    return _plain(cfg)


def config_to_yaml(cfg: Config) -> str:
    """The config as YAML text, sections in schema order, every field written out.

    Args:
        cfg: the resolved config.

    Returns:
        YAML that `load_config` reads back into an equal config.
    """
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)


def dump_config(cfg: Config, path: PathLike) -> None:
    """Write the resolved config as YAML, atomically (megadual.fs.write_atomic).

    Args:
        cfg: the resolved config.
        path: destination file; its directory is created if needed.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    text = "# Resolved MegaDual config (every field). Reload with megadual.config.load_config.\n"
    write_atomic(path, text + config_to_yaml(cfg))
