"""Validation of a provider row's ``options``, per kind.

The admin form and ``policies import`` both call ``clean_options`` so an
operator sees the same message, naming the bad key, wherever they edit.
"""

from collections.abc import Callable
from typing import Any

from . import openai, simulated


class OptionsError(ValueError):
    """An option is unknown or has a bad value; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _positive_int(value: Any) -> bool:
    return _non_negative_int(value) and value > 0


def _text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


Check = tuple[Callable[[Any], bool], str]

SCHEMAS: dict[str, dict[str, Check]] = {
    "simulated": {
        "model": (_text, "must be a non-empty string"),
        "ttft_ms": (_non_negative_int, "must be a whole number of ms >= 0"),
        "tokens_per_second": (_positive, "must be a number > 0"),
        "length": (_positive_int, "must be a whole number > 0"),
        "max_tokens": (_positive_int, "must be a whole number > 0"),
        "fault": (
            lambda v: v in simulated.FAULTS,
            "must be one of " + ", ".join(simulated.FAULTS),
        ),
        "fail_after_tokens": (_non_negative_int, "must be a whole number >= 0"),
        "retry_after_seconds": (_positive, "must be a number > 0"),
    },
    "openai": {
        "base_url": (
            lambda v: isinstance(v, str) and v.startswith(("http://", "https://")),
            "must be an http:// or https:// URL",
        ),
        "model": (_text, "must be a non-empty string"),
        "api_key_env": (_text, "must name an environment variable"),
        "timeout_seconds": (_positive, "must be a number > 0"),
        "connect_timeout_seconds": (_positive, "must be a number > 0"),
        "max_tokens": (_positive_int, "must be a whole number > 0"),
        "max_connections": (_positive_int, "must be a whole number > 0"),
    },
}

DEFAULTS: dict[str, dict[str, Any]] = {
    "simulated": simulated.DEFAULTS,
    "openai": openai.DEFAULTS,
}

KINDS = tuple(SCHEMAS)


def clean_options(kind: str, options: Any) -> dict[str, Any]:
    """Return ``options`` checked against ``kind``'s schema, or raise."""
    if kind not in SCHEMAS:
        raise OptionsError("kind", f"unknown kind {kind!r}; use one of {KINDS}")
    if not isinstance(options, dict):
        raise OptionsError("options", "must be a JSON object")
    schema = SCHEMAS[kind]
    for key, value in options.items():
        if key not in schema:
            raise OptionsError(key, f"unknown option for kind {kind!r}")
        check, message = schema[key]
        if not check(value):
            raise OptionsError(key, f"{message}, got {value!r}")
    return dict(options)
