"""How a typed message between domains crosses a channel (the vocabulary: messages.py).

A message is a frozen dataclass registered under its wire name (`@message`); on the
wire it is one JSON object: {"type": NAME, ...its fields}, plus the channel's own
"id"/"reply_to". `decode` checks everything against the dataclass's type hints: an
unknown type, a missing or unexpected field, or a field of the wrong type is a
MessageError that says which message and which field.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any, ClassVar, TypeVar

M = TypeVar("M", bound="Message")


class MessageError(ValueError):
    """A message that is not one of ours, or not well formed."""


class Message:
    """Base of every message; subclasses are dataclasses registered with @message."""

    TYPE: ClassVar[str]

    def encode(self) -> dict[str, Any]:
        return {"type": self.TYPE, **_plain(dataclasses.asdict(self))}  # type: ignore[call-overload]


_REGISTRY: dict[str, type[Message]] = {}


@typing.dataclass_transform()
def message(name: str) -> typing.Callable[[type[M]], type[M]]:
    """Register a message dataclass under its wire name."""

    def register(cls: type[M]) -> type[M]:
        if name in _REGISTRY:
            raise ValueError(f"message type {name!r} registered twice")
        cls.TYPE = name
        _REGISTRY[name] = cls
        return dataclasses.dataclass(frozen=True)(cls)

    return register


def decode(data: object, *expected: type[M]) -> M:
    """The message in `data` (a decoded JSON object); MessageError if it is none of `expected`
    (any registered message when none are given)."""
    if not isinstance(data, dict):
        raise MessageError(f"a message is a JSON object, not {type(data).__name__}")
    name = data.get("type")
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None or (expected and cls not in expected):
        wanted = ", ".join(c.TYPE for c in expected) if expected else "a known message type"
        raise MessageError(f"unexpected message type {name!r}; expected {wanted}")
    fields = {k: v for k, v in data.items() if k not in ("type", "id", "reply_to")}
    return typing.cast(M, _build(cls, fields, cls.TYPE))


def _build(cls: type, fields: dict[str, Any], where: str) -> Any:
    hints = _hints(cls)
    unknown = set(fields) - set(hints)
    if unknown:
        raise MessageError(f"{where}: unexpected field(s) {', '.join(sorted(unknown))}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in fields:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MessageError(f"{where}: field {f.name!r} is missing")
            continue
        values[f.name] = _check(hints[f.name], fields[f.name], f"{where}.{f.name}")
    return cls(**values)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _check(arg, value, where)
            except MessageError:
                continue
        raise MessageError(f"{where}: {value!r:.60} is not {hint}")
    if hint is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, list):
            return [_check(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {k: _check(args[1], v, f"{where}[{k!r}]") for k, v in value.items()}
    elif isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            pass
    elif dataclasses.is_dataclass(hint):
        if isinstance(value, dict):
            return _build(hint, value, where)  # type: ignore[arg-type]
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if type(value) is int:
            return value
    elif isinstance(value, hint):
        return value
    raise MessageError(f"{where}: {value!r:.60} is not {getattr(hint, '__name__', hint)}")


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
