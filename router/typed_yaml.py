"""Frozen dataclasses from parsed YAML, type-checked field by field (router/config.py's loader).

``build_section(cls, data, source, section)`` makes ``cls`` from a mapping: unknown keys are
errors naming the known ones, and every value is checked against the field's annotation
(``coerce_field``): Optional and unions, lists and tuples of a type, nested dataclasses, Enums
by value, and bool / int / float / str (an int is a fine float; a bool is not an int). Every
error is a ``ValueError`` naming the file and the field, e.g. ``deploy.yaml: replicas.num_cpus:
expected a number, got 'two'``.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, Union


def reject_unknown(data: dict, known: set[str], source: str, section: str) -> None:
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        where = f"{section}." if section else ""
        raise ValueError(f"{source}: unknown key(s) {', '.join(where + k for k in unknown)}; "
                         f"known keys{' in ' + section if section else ''}: {sorted(known)}")


def build_section(cls: type, data: Any, source: str, section: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ValueError(f"{source}: {section} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    reject_unknown(data, names, source, section)
    kwargs = {k: coerce_field(v, cls, k, source, section) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{source}: {section}: {exc}") from None


def coerce_field(value: Any, cls: type, name: str, source: str, section: str) -> Any:
    """Checks ``value`` against the declared type of ``cls.name`` (ints for floats are fine)."""
    hint = typing.get_type_hints(cls)[name]
    where = f"{section}.{name}" if section else name
    try:
        return _coerce_to(value, hint)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {where}: {exc}") from None


def _coerce_to(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce_to(value, arg)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        item = typing.get_args(hint)[0] if typing.get_args(hint) else Any
        items = [_coerce_to(v, item) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {value!r}")
        return build_section(hint, value, "<nested>", hint.__name__)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise ValueError(f"expected one of {[m.value for m in hint]}, got {value!r}") from None
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r}")
