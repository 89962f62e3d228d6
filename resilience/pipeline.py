"""The streaming pipeline: one request against its providers, as events.

The direct path and the queue worker both run ``stream_events``. For each
provider in turn (the chosen one, then the others in order) it asks the
retry strategy for the stream: every attempt passes through that provider's
circuit breaker, and transient failures are retried with backoff only until
the first item arrives. An open breaker or retries exhausted before the
first item move the request to the next provider; once text has been sent,
a failure ends the stream with ``upstream_error`` and nothing is retried or
sent twice (shared/CASES.md C12).
"""

import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import replace

from llm.base import ChatRequest, Finish, StreamItem, TextDelta
from llm.errors import LLMError, PermanentError

from . import events
from .circuit_breaker import CircuitOpen
from .events import StreamEvent
from .policies import ProviderEntry
from .retry_strategy import Retrier, RetryPolicy

logger = logging.getLogger(__name__)


class _Unavailable:
    """Why no provider answered, for the final ``provider_unavailable``."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.waits: list[float] = []

    def add(self, provider: str, reason: str, wait: float | None) -> None:
        self.reasons.append(f"{provider}: {reason}")
        if wait is not None:
            self.waits.append(wait)

    def event(self) -> StreamEvent:
        wait = min(self.waits) if self.waits else None
        retry = None if wait is None else max(1, math.ceil(wait))
        message = "no provider could answer (" + "; ".join(self.reasons) + ")"
        return events.error("provider_unavailable", message, retry)


def _is_finish(item: StreamItem) -> bool:
    return isinstance(item, Finish)


async def stream_events(
    request: ChatRequest,
    candidates: Sequence[ProviderEntry],
    request_id: str,
    retry: RetryPolicy | None = None,
    item_timeout: float = 60.0,
    retrier: Retrier | None = None,
) -> AsyncGenerator[StreamEvent, None]:
    """Yield ``start``, ``token``s and exactly one ``done`` or ``error``.

    ``start`` is sent with the first thing a provider answers, so it names
    the provider that really answers. ``item_timeout`` bounds the silence
    between two items. Every provider stream is closed on every exit,
    cancellation included.
    """
    retrier = retrier or Retrier(retry)
    unavailable = _Unavailable()
    for index, entry in enumerate(candidates):
        asked = request if index == 0 else for_fallback(request, entry)
        outcome = _ProviderRun(asked, entry, request_id)
        try:
            async for event in outcome.events(retrier, item_timeout):
                yield event
            return
        except CircuitOpen as exc:
            unavailable.add(entry.config.name, "circuit open", exc.retry_after)
        except LLMError as exc:
            if outcome.started or isinstance(exc, PermanentError):
                yield outcome.failure(exc)
                return
            unavailable.add(entry.config.name, exc.message, exc.retry_after)
        except Exception:
            logger.exception("stream %s: unexpected failure", request_id)
            yield events.error("internal_error", "the stream failed unexpectedly")
            return
    yield unavailable.event()


def for_fallback(request: ChatRequest, entry: ProviderEntry) -> ChatRequest:
    """Adapt a request to a fallback provider.

    The model a client names belongs to the provider it asked for (another
    provider would refuse it with a 404), so a fallback answers with its own
    default model; ``max_tokens`` is capped at what the fallback allows.
    """
    limit = entry.adapter.max_tokens_limit
    max_tokens = request.max_tokens
    if max_tokens is not None:
        max_tokens = min(max_tokens, limit)
    return replace(request, model=None, max_tokens=max_tokens)


class _ProviderRun:
    """One provider's attempt at the request, as events."""

    def __init__(
        self, request: ChatRequest, entry: ProviderEntry, request_id: str
    ) -> None:
        self.request = request
        self.entry = entry
        self.request_id = request_id
        self.started = False

    async def events(
        self, retrier: Retrier, item_timeout: float
    ) -> AsyncIterator[StreamEvent]:
        adapter = self.entry.adapter
        model = self.request.model or adapter.default_model
        stream = retrier.stream(
            lambda: adapter.stream(self.request),
            self.entry.breaker,
            is_end=_is_finish,
            item_timeout=item_timeout,
        )
        async with aclosing(stream):  # type: ignore[type-var]
            async for item in stream:
                if not self.started:
                    self.started = True
                    yield events.start(self.request_id, self.entry.config.name, model)
                if isinstance(item, TextDelta):
                    yield events.token(item.text)
                elif isinstance(item, Finish):
                    yield events.done(item.finish_reason, item.usage.as_dict())
                    return
        code = "upstream_error" if self.started else "provider_unavailable"
        yield events.error(code, "the provider stream ended without finishing")

    def failure(self, exc: LLMError) -> StreamEvent:
        # The provider's own words may quote the prompt: DEBUG only.
        logger.info(
            "stream %s: provider %s failed (%s, status %s)",
            self.request_id,
            self.entry.config.name,
            type(exc).__name__,
            exc.status,
        )
        logger.debug("stream %s: provider said %s", self.request_id, exc.message)
        if self.started:
            return events.error("upstream_error", f"provider failed: {exc.message}")
        return events.error("provider_rejected", f"provider refused: {exc.message}")
