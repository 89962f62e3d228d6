"""A provider with no network: deterministic text at a configured pace.

It serves the demo with no configuration and lets tests and operators
inject faults (``fault`` option) to watch the resilience layers work.
"""

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from .base import ChatRequest, Finish, StreamItem, TextDelta, Usage
from .errors import (
    ProviderRateLimited,
    ProviderRejected,
    ProviderServerError,
    ProviderStreamError,
)

Sleep = Callable[[float], Awaitable[None]]

FAULTS = (
    "none",
    "fail_before_first_token",
    "fail_after_tokens",
    "hang",
    "rate_limited",
    "server_error",
    "bad_request",
)

DEFAULTS: dict[str, Any] = {
    "model": "simulated-1",
    "ttft_ms": 200,
    "tokens_per_second": 25.0,
    "length": 40,
    "max_tokens": 4096,
    "fault": "none",
    "fail_after_tokens": 5,
    "retry_after_seconds": 5.0,
}

_WORDS = [
    "streams",
    "tokens",
    "arrive",
    "steadily",
    "while",
    "the",
    "breaker",
    "watches",
    "every",
    "provider",
    "and",
    "the",
    "pool",
    "keeps",
    "its",
    "leases",
    "fresh",
    "so",
    "queued",
    "requests",
    "wait",
    "their",
    "turn",
    "until",
    "a",
    "worker",
    "picks",
    "them",
    "up",
    "and",
    "answers",
    "with",
    "care",
]


def simulated_text(request: ChatRequest, count: int) -> list[str]:
    """Return ``count`` tokens chosen by the prompt, the same every time."""
    prompt = "\n".join(m.content for m in request.messages)
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")
    start = seed % len(_WORDS)
    words = [_WORDS[(start + i * 7) % len(_WORDS)] for i in range(count)]
    return [word if i == 0 else " " + word for i, word in enumerate(words)]


class SimulatedProvider:
    """Stream ``length`` tokens (or ``max_tokens`` if fewer) after ``ttft_ms``."""

    kind = "simulated"

    def __init__(
        self, name: str, options: dict[str, Any], sleep: Sleep = asyncio.sleep
    ) -> None:
        self.name = name
        self.options = {**DEFAULTS, **options}
        self.default_model = str(self.options["model"])
        self.max_tokens_limit = int(self.options["max_tokens"])
        self._sleep = sleep

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        return self._stream(request)

    async def _stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        fault = self.options["fault"]
        self._refuse_at_once(fault)
        await self._sleep(self.options["ttft_ms"] / 1000)
        if fault == "hang":
            await asyncio.Event().wait()
        if fault == "fail_before_first_token":
            raise ProviderServerError(
                "simulated failure before the first token",
                provider=self.name,
                status=500,
            )

        natural = int(self.options["length"])
        count = min(natural, request.max_tokens or natural)
        interval = 1 / float(self.options["tokens_per_second"])
        for index, token in enumerate(simulated_text(request, count)):
            if (
                fault == "fail_after_tokens"
                and index >= self.options["fail_after_tokens"]
            ):
                raise ProviderStreamError(
                    "simulated failure mid-stream", provider=self.name
                )
            if index:
                await self._sleep(interval)
            yield TextDelta(token)

        prompt_tokens = sum(len(m.content.split()) for m in request.messages)
        yield Finish(
            "length" if count < natural else "stop",
            Usage(prompt_tokens, count, prompt_tokens + count),
        )

    def _refuse_at_once(self, fault: str) -> None:
        if fault == "rate_limited":
            raise ProviderRateLimited(
                "simulated rate limit",
                provider=self.name,
                status=429,
                retry_after=float(self.options["retry_after_seconds"]),
            )
        if fault == "server_error":
            raise ProviderServerError(
                "simulated server error", provider=self.name, status=503
            )
        if fault == "bad_request":
            raise ProviderRejected(
                "simulated bad request", provider=self.name, status=400
            )
