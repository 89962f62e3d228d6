"""The streaming pipeline: one request against one provider, as events.

The direct path and the queue worker both run ``stream_events``; later
layers wrap the provider call (breaker, retries, fallback) here so that
both paths behave alike.
"""

import asyncio
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

from llm.base import ChatProvider, ChatRequest, Finish, TextDelta
from llm.errors import LLMError, PermanentError, ProviderTimeout

from . import events
from .events import StreamEvent

logger = logging.getLogger(__name__)


async def stream_events(
    request: ChatRequest,
    provider: ChatProvider,
    request_id: str,
    item_timeout: float = 60.0,
) -> AsyncGenerator[StreamEvent, None]:
    """Yield ``start``, ``token``s and exactly one ``done`` or ``error``.

    ``start`` is sent with the first thing the provider answers, so it
    names the provider that really answers. ``item_timeout`` bounds the
    silence between two items: a provider that hangs ends in ``error``.
    The provider stream is closed on every exit, cancellation included.
    """
    started = False
    model = request.model or provider.default_model
    try:
        async with aclosing(provider.stream(request)) as stream:  # type: ignore[type-var]
            while True:
                item = await _next_item(stream, item_timeout, provider.name)
                if item is None:
                    yield _cut_off(started)
                    return
                if not started:
                    started = True
                    yield events.start(request_id, provider.name, model)
                if isinstance(item, TextDelta):
                    yield events.token(item.text)
                elif isinstance(item, Finish):
                    yield events.done(item.finish_reason, item.usage.as_dict())
                    return
    except LLMError as exc:
        yield _failure(exc, started, request_id)
    except Exception:
        logger.exception("stream %s: unexpected failure", request_id)
        yield events.error("internal_error", "the stream failed unexpectedly")


async def _next_item(
    stream: AsyncIterator[TextDelta | Finish], timeout: float, provider: str
) -> TextDelta | Finish | None:
    try:
        async with asyncio.timeout(timeout):
            return await anext(stream, None)
    except TimeoutError:
        raise ProviderTimeout(
            f"no data from the provider for {timeout:g} s", provider=provider
        ) from None


def _cut_off(started: bool) -> StreamEvent:
    code = "upstream_error" if started else "provider_unavailable"
    return events.error(code, "the provider stream ended without finishing")


def _failure(exc: LLMError, started: bool, request_id: str) -> StreamEvent:
    logger.info(
        "stream %s: provider %s failed (%s)", request_id, exc.provider, exc.message
    )
    if started:
        return events.error("upstream_error", f"provider failed: {exc.message}")
    if isinstance(exc, PermanentError):
        return events.error("provider_rejected", f"provider refused: {exc.message}")
    retry = None if exc.retry_after is None else max(1, math.ceil(exc.retry_after))
    return events.error(
        "provider_unavailable", f"provider failed: {exc.message}", retry
    )
