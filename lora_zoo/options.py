"""Typed option dataclasses: one checker for every config in the project.

Every setting lives in exactly one dataclass field (a method's layer config, its
training schedule's config, an optimizer's options, ``TrainConfig``,
``ExperimentConfig``); its default is the field's default and its help text the
field's ``metadata["help"]`` (``option(default, "help")``). ``check_fields``
coerces and checks each field against its annotation, so YAML files, ``--set``
pairs and command-line flags all go through the same rules and every error is
one line naming the option:

- ``bool``: only true/false (a quoted ``"false"`` is refused, never read as true);
- ``int``: integers only (``2.5`` and ``true`` are refused);
- ``float``: numbers, or numeric strings such as ``"1e-3"`` (YAML 1.1 reads ``1e-3`` as a string);
- ``str`` (an integer is taken as its digits: ``run_name: 16``), ``Literal[...]`` (one of the listed values), ``Optional[...]`` (also null),
  ``Union[...]`` (the first alternative that accepts the value, in the written order),
  ``tuple[T, ...]`` (a list, or a comma-separated string whose parts are read as YAML scalars:
  ``"0,1,2"`` is three integers), ``dict``.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal, Mapping, Union

import yaml


def option(default, help: str = "", affects_result: bool = True):
    """A dataclass field with a default and a help text (shown by ``main.py --help``).

    ``affects_result=False`` marks bookkeeping (paths, devices, logging, caches): settings that change
    how a run goes, not its numbers, so result tables never split rows by them.
    """
    metadata = {"help": help, "affects_result": affects_result}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class OptionError(ValueError):
    """An option has a value of the wrong type or range; the message is one line naming it."""


def _describe(kind) -> str:
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        return repr(choices[0]) if len(choices) == 1 else "one of " + ", ".join(repr(v) for v in choices)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(k) for k in typing.get_args(kind))
    if origin is tuple:
        return "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
            type(None): "null"}.get(kind, getattr(kind, "__name__", str(kind)))


def coerce(name: str, value: Any, kind) -> Any:
    """``value`` converted to the annotation ``kind``; ``OptionError`` naming ``name`` otherwise."""
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if origin in (Union, types.UnionType):
        for alternative in typing.get_args(kind):
            try:
                return coerce(name, value, alternative)
            except OptionError:
                continue
        raise OptionError(f"{name} must be {_describe(kind)}, got {value!r}")
    if origin is Literal:
        for choice in typing.get_args(kind):
            if value == choice and type(value) is type(choice):
                return choice
        raise OptionError(f"{name} must be {_describe(kind)}, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):  # "0,1,2": each part read as YAML reads a scalar, so it is the number 0
            value = [_list_item(part.strip()) for part in value.split(",") if part.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise OptionError(f"{name} must be a list, got {value!r}")
        args = typing.get_args(kind)
        item = args[0] if args else Any
        if len(args) > 1 and args[1] is not Ellipsis:
            if len(value) != len(args):
                raise OptionError(f"{name} must be a list of {len(args)} values, got {value!r}")
            return tuple(coerce(name, v, k) for v, k in zip(value, args))
        return tuple(coerce(name, v, item) for v in value)
    if kind is type(None) or kind in (bool, int, float, str):
        return _scalar(name, value, kind)
    if kind is dict or origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
    elif dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if isinstance(value, Mapping):
            return from_mapping(kind, value, name)
    else:
        raise TypeError(f"{name}: unsupported option annotation {kind!r}")
    raise OptionError(f"{name} must be {_describe(kind)}, got {value!r}")


def _scalar(name: str, value, kind):
    """``value`` as None, a bool, an int, a float (ints and numeric text too) or a str (an int too: run_name 16)."""
    if kind is type(None) and value is None:
        return None
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    if kind is str and (isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))):
        return str(value)
    raise OptionError(f"{name} must be {_describe(kind)}, got {value!r}")


def yaml_value(text: str):
    """A value as typed on a command line (a flag, ``--set``, a grid) or in a list: read as YAML reads it,
    with ``1e-3``-style numbers (text to YAML 1.1) read as floats; text YAML cannot read stays text."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _list_item(text: str):
    value = yaml_value(text)
    return value if isinstance(value, (int, float, bool, str)) else text


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(obj, prefix: str = "") -> None:
    """Coerce every field of the dataclass instance ``obj`` to its annotation, in place."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, coerce(prefix + f.name, getattr(obj, f.name), hints[f.name]))


@dataclasses.dataclass
class Options:
    """Base of every option dataclass: fields are checked against their annotations when built."""

    def __post_init__(self):
        check_fields(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        return from_mapping(cls, values, cls.__name__)


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def from_mapping(cls, values: Mapping[str, Any], what: str = ""):
    """``cls(**values)`` with a one-line error listing the valid names for an unknown key."""
    known = field_names(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise OptionError(f"unknown option(s) {', '.join(unknown)}{' for ' + what if what else ''}; "
                          f"expected some of {', '.join(sorted(known))}")
    return cls(**values)
