"""Frozen dataclasses from plain mappings: strict keys ("did you mean"), type coercion, range checks, and errors
that name the key and the file. The pipeline schema lives in config/schema.py; student params use `build` directly."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import field
from typing import Any, Callable

import yaml

from .errors import KdcacheError


class ConfigError(KdcacheError):
    """A config file or override is wrong; the message names the file and the key."""


Check = Callable[[Any], "str | None"]  # a value -> what is wrong with it, or None


def setting(default: Any = dataclasses.MISSING, help: str = "", check: Check | None = None, **kw: Any) -> Any:
    """A dataclass field with a help line and an optional range check (mutable defaults via default_factory)."""
    meta = {"help": help, **({"check": check} if check else {})}
    if isinstance(default, (dict, list)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


# ------------------------------------------------------------------------------------------- range checks

def _finite(v: Any) -> bool:
    return not isinstance(v, float) or math.isfinite(v)


def _rule(rule: str, ok: Callable[[Any], bool]) -> Check:
    """A check whose `rule` text also goes into the configuration reference."""
    def check(v: Any) -> str | None:
        return None if v is None or ok(v) else f"must be {rule}"
    check.rule = rule  # type: ignore[attr-defined]
    return check


def at_least(low: float) -> Check:
    return _rule(f">= {low:g}", lambda v: _finite(v) and v >= low)


def above(low: float) -> Check:
    return _rule(f"> {low:g}", lambda v: _finite(v) and v > low)


def between(low: float, high: float) -> Check:
    return _rule(f"in [{low:g}, {high:g}]", lambda v: _finite(v) and low <= v <= high)


def one_of(*choices: Any) -> Check:
    return _rule(f"one of {', '.join(map(str, choices))}", lambda v: v in choices)


def in_registry(registry: typing.Mapping[str, Any]) -> Check:
    """A name registered in `registry` when the value is checked (registries grow after import: a new head)."""
    class InRegistry:
        @property
        def rule(self) -> str:
            return f"one of {', '.join(registry)}"

        def __call__(self, v: Any) -> str | None:
            return None if v is None or v in registry else f"must be {self.rule}"
    return InRegistry()


def matches(pattern: str, rule: str) -> Check:
    """A string that matches the regular expression `pattern` (whole string)."""
    return _rule(rule, lambda v: isinstance(v, str) and re.fullmatch(pattern, v) is not None)


def each(check: Check) -> Check:
    """Apply `check` to every item of a tuple value."""
    def run(v: Any) -> str | None:
        for i, x in enumerate(v or ()):
            problem = check(x)
            if problem:
                return f"item {i} ({x!r}) {problem}"
        return None
    run.rule = f"each {getattr(check, 'rule', '')}"  # type: ignore[attr-defined]
    return run


def nonempty(check: Check) -> Check:
    def run(v: Any) -> str | None:
        return "must not be empty" if not v else check(v)
    run.rule = f"non-empty, {getattr(check, 'rule', '')}"  # type: ignore[attr-defined]
    return run


# ------------------------------------------------------------------------------------------------ building

def expand_env(value: str) -> str:
    """Expand ${VAR} and ${VAR:-default} in a string."""
    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(3)
        return os.environ.get(name) or (default if default is not None else m.group(0))
    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(tp: Any, value: Any, where: str, src: str) -> Any:
    """Turn a YAML value into the annotated type, or raise a ConfigError naming the key."""
    inner, optional = _strip_optional(tp)
    if value is None:
        if optional or tp is Any:  # (an untyped value, e.g. a nested data setting, is checked where it is built)
            return None
        raise ConfigError(f"{src}: `{where}` must not be null")
    if dataclasses.is_dataclass(inner):
        return build(inner, value, where, src)
    origin = typing.get_origin(inner)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        (item_tp, *_rest) = typing.get_args(inner)
        return tuple(_coerce(item_tp, v, f"{where}[{i}]", src) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: `{where}` must be a mapping, got {type(value).__name__}")
        _k, v_tp = typing.get_args(inner)
        return {str(k): _coerce(v_tp, v, f"{where}.{k}", src) for k, v in value.items()}
    if inner is Any:
        return value
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner is float and isinstance(value, str):  # YAML 1.1 reads `1e30` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if inner is str and isinstance(value, str):
        return expand_env(value)
    if not isinstance(value, inner) or (inner is int and isinstance(value, bool)):
        raise ConfigError(f"{src}: `{where}` must be {inner.__name__}, got {value!r}")
    return value


def build(cls: type, data: Any, where: str = "", src: str = "<config>") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys name the closest valid key, bad values their range."""
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: `{where or cls.__name__}` must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean `{join_key(where, close[0])}`?" if close else \
                f"; valid keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"{src}: unknown key `{join_key(where, key)}`{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = value = _coerce(hints[name], data[name], join_key(where, name), src)
            problem = f.metadata.get("check", lambda v: None)(value)
            if problem:
                raise ConfigError(f"{src}: `{join_key(where, name)}` = {value!r} {problem}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{src}: missing required key `{join_key(where, name)}`")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{src}: {e}") from None


def join_key(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def apply_override(raw: dict, assignment: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to a raw config mapping, in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. tasks.sentiment.cache.batch_size=32")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: `{'.'.join(parts[:i + 1])}` is not a mapping")
        node = nxt
    node[parts[-1]] = yaml.safe_load(value)


def to_dict(cfg: Any) -> Any:
    """A config as plain JSON/YAML data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg
