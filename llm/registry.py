"""Build provider adapters from configuration rows."""

from dataclasses import dataclass
from typing import Any

from .base import ChatProvider
from .openai import OpenAIProvider
from .simulated import SimulatedProvider


@dataclass(frozen=True)
class ProviderConfig:
    """A provider row as plain data, safe to share between tasks."""

    name: str
    kind: str
    order: int
    enabled: bool
    options: dict[str, Any]


def build_provider(config: ProviderConfig) -> ChatProvider:
    """Return the adapter for ``config``; unknown kinds are a ValueError."""
    if config.kind == "simulated":
        return SimulatedProvider(config.name, config.options)
    if config.kind == "openai":
        return OpenAIProvider(config.name, config.options)
    raise ValueError(f"unknown provider kind {config.kind!r}")
