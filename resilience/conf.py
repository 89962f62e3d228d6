"""Typed, lazy access to the ``STREAMSVC`` settings dict.

Values are read on every call so tests and operators can change settings
without a re-import; a missing or mistyped key is an ``ImproperlyConfigured``
naming it.
"""

from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


def _raw(name: str) -> Any:
    try:
        return settings.STREAMSVC[name]
    except KeyError:
        raise ImproperlyConfigured(f"STREAMSVC[{name!r}] is not set") from None


def number(name: str) -> float:
    """Return a numeric setting."""
    value = _raw(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ImproperlyConfigured(f"STREAMSVC[{name!r}] must be a number")
    return float(value)


def integer(name: str) -> int:
    """Return a whole-number setting."""
    return int(number(name))


def flag(name: str) -> bool:
    """Return a boolean setting."""
    value = _raw(name)
    if not isinstance(value, bool):
        raise ImproperlyConfigured(f"STREAMSVC[{name!r}] must be True or False")
    return value


def text(name: str) -> str:
    """Return a string setting."""
    value = _raw(name)
    if not isinstance(value, str):
        raise ImproperlyConfigured(f"STREAMSVC[{name!r}] must be a string")
    return value
