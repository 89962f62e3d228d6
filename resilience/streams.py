"""Helpers for async streams of events."""

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


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
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await source.aclose()


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
