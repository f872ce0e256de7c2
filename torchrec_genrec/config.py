"""Dataclass configs loaded from TOML files and overridden from the command line.

A recipe's config is a tree of dataclasses; a TOML file sets any subset of its fields
and ``--set section.field=value`` overrides them. Unknown keys and wrongly typed values
are errors that name the key, the file and the closest valid key, so a typo never
silently falls back to a default.

Example::

    @dataclasses.dataclass
    class Train:
        epochs: int = 10

    @dataclasses.dataclass
    class Recipe:
        train: Train = dataclasses.field(default_factory=Train)

    cfg = load_config(Recipe, "apps/configs/x.toml", ["train.epochs=3"])
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import tomllib
import typing
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the recipe's config."""


def check_ranges(prefix: str, config: Any, rules: Dict[str, Any]) -> None:
    """Checks numeric fields of ``config`` against ``rules``: field -> ``(low, high)``
    bounds (``None`` for open; ``low`` inclusive, ``high`` exclusive) — raises ConfigError
    naming ``prefix.field``, the value and the allowed range.

    Example::

        check_ranges("model", cfg, {"dropout": (0.0, 1.0), "num_blocks": (1, None)})
    """
    for name, (low, high) in rules.items():
        value = getattr(config, name)
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if (low is not None and v < low) or (high is not None and v >= high):
                allowed = (f">= {low}" if high is None else f"in [{low}, {high})" if low is not None
                           else f"< {high}")
                raise ConfigError(f"{prefix}.{name} must be {allowed}, got {value!r}")


def _field_types(cls: type) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _all_keys(cls: type, prefix: str = "") -> List[str]:
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() == "none" and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, where)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key} = {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, key, where) for v in value]
        return tuple(items) if origin is tuple else items
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{where}: {key} = {value!r} is not one of {[m.value for m in tp]}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1e6 written in TOML is a float
        raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
    return value


def _unknown(key: str, cls: type) -> ConfigError:
    keys = _all_keys(cls)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} Valid keys: {', '.join(keys)}")


def _apply(obj: Any, values: Dict[str, Any], where: str, prefix: str = "", root: Optional[type] = None) -> Any:
    root = root or type(obj)
    types = _field_types(type(obj))
    updates = {}
    for name, value in values.items():
        key = prefix + name
        if name not in types:
            err = _unknown(key, root)
            raise ConfigError(f"{where}: {err}")
        tp = types[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {key} is a section; write [{key}] or {key}.field = ...")
            updates[name] = _apply(getattr(obj, name), value, where, key + ".", root)
        else:
            updates[name] = _coerce(value, tp, key, where)
    try:
        return dataclasses.replace(obj, **updates)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (ValueError, TypeError) as e:  # a config's own checks (__post_init__)
        raise ConfigError(f"{where}: {e}") from None


def _parse_override(text: str) -> Dict[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # bare words are strings: data.dataset=movielens-100k
    nested: Dict[str, Any] = {}
    node = nested
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return nested


def read_toml(path: str, what: str = "config file") -> Dict[str, Any]:
    """A TOML file as a dict.

    Raises:
        ConfigError: the file does not exist (called ``what`` in the message) or is not TOML.
    """
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load_config(cls: Type[T], path: Optional[str] = None, overrides: Sequence[str] = ()) -> T:
    """Builds ``cls()`` and applies a TOML file, then ``key=value`` overrides, in order.

    Args:
        cls (Type[T]): a dataclass whose fields all have defaults.
        path (Optional[str]): a TOML file.
        overrides (Sequence[str]): ``section.field=value``; values are TOML literals
            (``3``, ``1e-3``, ``true``, ``[10, 50]``) or bare strings.

    Returns:
        T: the config.

    Raises:
        ConfigError: unknown key (with the closest valid one), wrong type, bad TOML.
    """
    cfg = cls()
    if path is not None:
        cfg = _apply(cfg, read_toml(path), path)
    for text in overrides:
        cfg = _apply(cfg, _parse_override(text), f"--set {text}")
    return cfg


def from_dict(cls: Type[T], values: Dict[str, Any], where: str = "config") -> T:
    """Builds ``cls()`` updated by a nested dict (e.g. the ``config`` a run recorded)."""
    return _apply(cls(), values, where)


def to_dict(cfg: Any) -> Dict[str, Any]:
    """A JSON/TOML-friendly dict of a config (enums as their values)."""

    def convert(v: Any) -> Any:
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(dataclasses.asdict(cfg))
