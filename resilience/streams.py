"""Helpers for async streams of events."""

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)


async def with_heartbeats(
    source: AsyncGenerator[T, None], interval: float
) -> AsyncIterator[T | None]:
    """Yield ``source``'s items, and None whenever ``interval`` passes idle.

    The source is advanced in its own task so that waiting for a heartbeat
    never cancels a pending item. On exit (end, error, cancellation) the
    source is closed, which closes the provider stream behind it.
    """
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(source))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            finished, pending = pending, None
            try:
                item = finished.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            await cancel_and_wait(pending)
        await source.aclose()


async def cancel_and_wait(*tasks: "asyncio.Future[Any]", every: float = 2.0) -> None:
    """Cancel ``tasks`` and wait until all have ended, cancelling again as needed.

    A cancellation can be lost on its way: the Redis client may swallow one
    that lands while a blocking read (the channel layer's BZPOPMIN) is torn
    down, and the task then blocks in its next read. Awaiting it once would
    hang for good (seen in CI), so a task still running after ``every``
    seconds is cancelled again. ``every`` is longer than a Redis call may
    take (``REDIS_TIMEOUT_SECONDS``), so cleanup a task does on its way out
    (giving a half-open probe slot back) is not cut short. An error a task
    ends with while being stopped is logged; a cancellation of the caller
    meanwhile is re-raised at the end.
    """
    running = [task for task in tasks if not task.done()]
    pending = set(running)
    caught: asyncio.CancelledError | None = None
    while pending:
        for task in pending:
            task.cancel()
        try:
            _, pending = await asyncio.wait(pending, timeout=every)
        except asyncio.CancelledError as exc:
            caught = exc
    for task in tasks:
        error = None if task.cancelled() else task.exception()
        if error is not None and task in running:
            logger.warning("task ended with an error while stopped: %r", error)
    if caught is not None:
        raise caught


async def run_to_end(
    work: Callable[[], Awaitable[None]],
) -> asyncio.CancelledError | None:
    """Await ``work`` to its end through cancellations; return the last one.

    For cleanup that must finish (a lease release, a queue withdrawal) even
    when the task running it is cancelled again meanwhile; the caller
    re-raises the returned cancellation once the work is done.
    """
    future = asyncio.ensure_future(work())
    caught: asyncio.CancelledError | None = None
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError as exc:
            caught = exc
    future.result()
    return caught


def raise_if_cancelling(exc: BaseException | None = None) -> None:
    """Raise ``CancelledError`` if the current task is being cancelled.

    redis-py may answer a cancelled read with a connection error, which a
    loop that retries on Redis errors would swallow together with the
    cancellation and run on forever. Loops like that call this after each
    Redis error or call.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc
