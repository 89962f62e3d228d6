"""Retries of a provider call, before its first item reaches the client.

Only a ``TransientError`` is retried, with exponential backoff and full
jitter (a wait drawn uniformly from ``[0, min(max, base * 2**n))``, AWS's
"Full Jitter"), or exactly the provider's ``retry_after`` when it sent one.
A wait that would end past ``max_total_seconds`` since the first attempt is
not slept on: the last error is raised at once, so the caller can fall back
to another provider (shared/CASES.md C14). A ``PermanentError`` is never
retried (C08). Anything that is not an ``Exception`` (``CancelledError``,
``GeneratorExit``, ``KeyboardInterrupt``, ``SystemExit``) is never retried,
whatever the predicate, and a backoff sleep ends with it at once (C18).

Every attempt takes a breaker permit first; an open breaker ends the retries
with ``CircuitOpen``. tenacity runs the loop (``AsyncRetrying``); the wait
and the budget stop are ours so that sleep, random and clock are injected.

How the pipeline uses it: ``Retrier(policy).stream(lambda:
provider.stream(request), breaker, is_end=is_finish, item_timeout=60)``
opens the provider stream and waits for its first item with retries, then
relays the rest with none (C12), and records the breaker outcome of the
whole call: success once the end item was relayed, failure on an error
mid-stream or an end without the end item, cancelled when the consumer
closes the stream early or is cancelled (C07). A caller that needs its own
shape uses ``Retrier.open(attempt, breaker)``: it returns the attempt's
value with the still-open permit, and the caller then records exactly one
outcome with ``breaker.record(permit, exc)``.

Note: bound provider silence with ``item_timeout`` (raised inside as a
``ProviderTimeout``), not with an ``asyncio.timeout`` around the returned
generator: that one cancels the task, which the breaker can only count as a
cancellation, never as the provider's failure.
"""

import asyncio
import logging
import random as random_module
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base, wait_exponential

from llm.errors import LLMError, ProviderStreamError, ProviderTimeout, TransientError

from .circuit_breaker import AsyncCircuitBreaker, Permit

logger = logging.getLogger(__name__)

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry; ``max_attempts`` counts the first."""

    max_attempts: int = 3
    base_delay_seconds: float = 0.5
    max_delay_seconds: float = 8
    max_total_seconds: float = 20

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if min(self.base_delay_seconds, self.max_delay_seconds) < 0:
            raise ValueError("retry delays must not be negative")


@dataclass(frozen=True)
class Opened(Generic[T]):
    """An attempt's value and the permit whose outcome the caller records."""

    value: T
    permit: Permit


def is_transient(exc: BaseException) -> bool:
    """Return True for the errors worth another attempt."""
    return isinstance(exc, TransientError)


class FullJitter(wait_random_exponential):
    """tenacity's full-jitter wait, drawing from an injected ``random``."""

    def __init__(self, policy: RetryPolicy, random: Callable[[], float]) -> None:
        super().__init__(
            multiplier=policy.base_delay_seconds, max=policy.max_delay_seconds
        )
        self._random = random

    def __call__(self, retry_state: RetryCallState) -> float:
        return self._random() * wait_exponential.__call__(self, retry_state)


class ProviderHintOr(wait_base):
    """Wait the failed attempt's ``retry_after`` when it has one, else ``fallback``."""

    def __init__(self, fallback: wait_base) -> None:
        self.fallback = fallback

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, LLMError) and exc.retry_after is not None:
            return exc.retry_after
        return self.fallback(retry_state)


class OutOfBudget(stop_base):
    """Stop when the next wait would end past the budget, by our own clock."""

    def __init__(self, budget: float, clock: Callable[[], float]) -> None:
        self.budget = budget
        self.clock = clock
        self.started = clock()

    def __call__(self, retry_state: RetryCallState) -> bool:
        elapsed = self.clock() - self.started
        return elapsed + retry_state.upcoming_sleep > self.budget


class Retrier:
    """Run attempts against one provider under a ``RetryPolicy``.

    ``sleep``, ``random`` and ``clock`` default to ``asyncio.sleep``,
    ``random.random`` and ``time.monotonic``; tests inject their own.
    ``retryable`` narrows which ``Exception`` is retried; it is never asked
    about cancellations.
    """

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        *,
        sleep: Sleep = asyncio.sleep,
        random: Callable[[], float] = random_module.random,
        clock: Callable[[], float] = time.monotonic,
        retryable: Callable[[BaseException], bool] = is_transient,
    ) -> None:
        self.policy = policy or RetryPolicy()
        self._sleep = sleep
        self._random = random
        self._clock = clock
        self._retryable = retryable

    async def open(
        self, attempt: Callable[[], Awaitable[T]], breaker: AsyncCircuitBreaker
    ) -> Opened[T]:
        """Return the first attempt that succeeds, with its open permit.

        Raise the last error when attempts or budget run out, ``CircuitOpen``
        when the breaker refuses an attempt. Each failed attempt's outcome is
        recorded on the breaker here; the returned permit is the caller's.
        """
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.policy.max_attempts)
            | OutOfBudget(self.policy.max_total_seconds, self._clock),
            wait=ProviderHintOr(FullJitter(self.policy, self._random)),
            retry=retry_if_exception(self._should_retry),
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        return await retrying(_attempt_once, attempt, breaker)

    def stream(
        self,
        open_stream: Callable[[], AsyncIterator[T]],
        breaker: AsyncCircuitBreaker,
        *,
        is_end: Callable[[T], bool] | None = None,
        item_timeout: float | None = None,
    ) -> AsyncIterator[T]:
        """Return the provider's items: the first with retries, the rest without.

        ``is_end`` marks the last item of a complete stream; a stream that
        ends without it counts as a failure (it is relayed as it is, the
        caller reports the cut). ``item_timeout`` bounds each wait for an
        item and raises ``ProviderTimeout`` (retried before the first item).
        Close the returned generator (``aclosing``) to close the upstream.
        """
        relay = _Relay(open_stream, breaker, is_end, item_timeout)
        return relay.run(self)

    def _should_retry(self, exc: BaseException) -> bool:
        return isinstance(exc, Exception) and self._retryable(exc)

    def _log_retry(self, retry_state: RetryCallState) -> None:
        outcome = retry_state.outcome
        logger.debug(
            "retry: attempt %d failed (%r), next in %.3f s",
            retry_state.attempt_number,
            outcome.exception() if outcome is not None else None,
            retry_state.upcoming_sleep,
        )


async def _attempt_once(
    attempt: Callable[[], Awaitable[T]], breaker: AsyncCircuitBreaker
) -> Opened[T]:
    permit = await breaker.acquire()
    try:
        value = await attempt()
    except BaseException as exc:
        await breaker.record(permit, exc)
        raise
    return Opened(value, permit)


_END: Any = object()


async def _next(stream: AsyncIterator[T], timeout: float | None, provider: str) -> T:
    try:
        async with asyncio.timeout(timeout):
            return await anext(stream, _END)
    except TimeoutError:
        raise ProviderTimeout(
            f"no data from the provider for {timeout:g} s", provider=provider
        ) from None


async def _aclose(stream: AsyncIterator[Any]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


class _Relay(Generic[T]):
    """One guarded provider stream: retried open, then a plain relay."""

    def __init__(
        self,
        open_stream: Callable[[], AsyncIterator[T]],
        breaker: AsyncCircuitBreaker,
        is_end: Callable[[T], bool] | None,
        item_timeout: float | None,
    ) -> None:
        self.open_stream = open_stream
        self.breaker = breaker
        self.is_end = is_end
        self.item_timeout = item_timeout
        self.finished = False

    async def run(self, retrier: Retrier) -> AsyncIterator[T]:
        opened = await retrier.open(self._first, self.breaker)
        upstream, item = opened.value
        try:
            try:
                while item is not _END:
                    # Mark completion before yielding: the consumer may close
                    # us right after the end item, which is still a success.
                    self.finished = self.is_end is not None and self.is_end(item)
                    yield item
                    if self.finished:
                        break
                    item = await self._next(upstream)
            finally:
                await _aclose(upstream)
        except BaseException as exc:
            await self.breaker.record(opened.permit, None if self.finished else exc)
            raise
        await self.breaker.record(opened.permit, self._cut_off())

    async def _first(self) -> tuple[AsyncIterator[T], T]:
        upstream = self.open_stream()
        try:
            item = await self._next(upstream)
        except BaseException:
            await _aclose(upstream)
            raise
        if item is _END:
            await _aclose(upstream)
            raise ProviderStreamError(
                "the stream ended before its first item", provider=self.breaker.provider
            )
        return upstream, item

    async def _next(self, upstream: AsyncIterator[T]) -> T:
        return await _next(upstream, self.item_timeout, self.breaker.provider)

    def _cut_off(self) -> BaseException | None:
        if self.finished or self.is_end is None:
            return None
        return ProviderStreamError(
            "the stream ended without its end item", provider=self.breaker.provider
        )
