"""Method registry: one decorator line registers an adapter class under a name.

Adding a method means writing one module that defines an ``AdapterLinear``
subclass decorated with ``@register_method("name")`` and adding its import to
``lora_zoo/__init__.py`` (the single registry line).
"""
from __future__ import annotations

_METHODS: dict[str, type] = {}


def register_method(name: str):
    """Class decorator that registers an adapter class under ``name``."""

    def decorator(cls):
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"adapter method {name!r} is already registered by {_METHODS[name].__name__}")
        cls.method_name = name
        _METHODS[name] = cls
        return cls

    return decorator


def list_methods() -> list[str]:
    """Names of every registered adapter method, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> type:
    """The adapter class registered as ``name``; a one-line error lists the known names otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown adapter method {name!r}; expected one of {', '.join(list_methods())}") from None
