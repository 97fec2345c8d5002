"""Typed configuration: dataclasses loaded from YAML plus dotted ``key=value`` overrides.

Every config section is a dataclass whose fields carry a one-line ``help`` in their metadata. Unknown
keys are errors (a typo must never silently fall back to a default), values are type-checked, and each
dataclass may define ``validate()`` for range checks.

Example:
    >>> cfg = load_config(CacheJobConfig, "configs/cache/demo.yaml", ["ray.batch_size=4"])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override is malformed; the message says which key and why."""


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with a mandatory one-line help text."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked (and converted where lossless) against type ``tp``; errors name ``key``."""
    return _coerce(value, tp, key)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: expected a value of type {getattr(tp, '__name__', tp)}, found null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, found {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {list(allowed)}, found {value!r}")
        return value
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, found {value!r}")
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, found {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, found {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, found {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as a string; accept what float() accepts
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, found {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, found {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping; unknown keys raise :class:`ConfigError`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[prefix + k for k in unknown]} in section '{prefix.rstrip('.') or cls.__name__}'; "
            f"valid keys: {sorted(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"section '{prefix.rstrip('.') or cls.__name__}': {e}") from e
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass -> plain nested dict (JSON/YAML serialisable)."""
    return dataclasses.asdict(obj)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: '{p}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Parse ``["a.b=3", "c=[1,2]"]`` into a nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. ray.batch_size=4)")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load YAML ``path`` (or defaults when None), apply dotted overrides, validate and return ``cls``."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {p}: expected a mapping at the top level, found {type(loaded).__name__}"
            )
        data = loaded
    data = _merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def config_hash(obj: Any) -> str:
    """Stable sha256 of a dataclass or mapping (sorted JSON)."""
    payload = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per key with its type, default and help: used by ``--help`` of every entry point."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            lines.append(f"{prefix}{f.name}:  [{tp.__name__}] {f.metadata.get('help', '')}")
            lines.extend(describe(tp, prefix + f.name + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "<required>"
        lines.append(f"  {prefix}{f.name}={default!r}  {f.metadata.get('help', '')}")
    return lines


PRINT_CONFIG_HELP = "print the resolved config (file + overrides + defaults) and exit"


def print_config(resolved: dict) -> None:
    """``--print-config`` of every entry point: the resolved config as YAML on stdout."""
    import yaml

    print(yaml.safe_dump(resolved, sort_keys=False), end="")
