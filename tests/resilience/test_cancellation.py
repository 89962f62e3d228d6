"""A cancellation turned into a Redis error by a client still stops the loop."""

import asyncio
import contextlib
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from resilience.streams import cancel_and_wait, raise_if_cancelling


async def read_like_redis_py() -> None:
    # redis-py may answer a cancelled read by disconnecting and raising a
    # connection error: the CancelledError itself is gone.
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        raise RedisConnectionError("Connection closed") from None


async def retrying_loop(guarded: bool, rounds: list[int], stop: list[bool]) -> None:
    while not stop:  # the test's own way out if the guard fails
        rounds.append(1)
        try:
            await read_like_redis_py()
        except RedisConnectionError as exc:
            if guarded:
                raise_if_cancelling(exc)
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("guarded", [True, False])
async def test_only_a_guarded_retry_loop_ends_when_cancelled(guarded: bool) -> None:
    rounds: list[int] = []
    stop: list[bool] = []
    task = asyncio.ensure_future(retrying_loop(guarded, rounds, stop))
    await asyncio.sleep(0.05)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=0.5)
    stop.append(True)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    # Unguarded, the cancellation is swallowed and the loop goes round again.
    assert (bool(done), len(rounds) == 1) == (guarded, guarded)


async def test_a_task_not_being_cancelled_goes_on() -> None:
    raise_if_cancelling(RuntimeError("a plain Redis error"))


async def swallows_one_cancellation(ended: list[bool]) -> None:
    # As a Redis client may lose a cancellation during a blocking read: the
    # first one is eaten and the task blocks again in its next read.
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(30)
    try:
        await asyncio.sleep(30)
    finally:
        ended.append(True)


async def test_a_single_cancel_can_leave_a_task_running() -> None:
    # The hazard cancel_and_wait exists for (a CI run hung on it).
    ended: list[bool] = []
    task = asyncio.ensure_future(swallows_one_cancellation(ended))
    await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=0.3)
    assert not done
    await cancel_and_wait(task, every=0.05)
    assert ended == [True]


async def test_cancel_and_wait_ends_a_task_that_swallowed_a_cancellation() -> None:
    ended: list[bool] = []
    task = asyncio.ensure_future(swallows_one_cancellation(ended))
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await cancel_and_wait(task, every=0.05)
    assert task.cancelled()
    assert ended == [True]


async def test_cancel_and_wait_passes_on_the_callers_own_cancellation() -> None:
    ended: list[bool] = []
    stubborn = asyncio.ensure_future(swallows_one_cancellation(ended))
    await asyncio.sleep(0)
    stopper = asyncio.ensure_future(cancel_and_wait(stubborn, every=0.2))
    await asyncio.sleep(0.05)
    stopper.cancel()  # the caller is cancelled while it waits
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(stopper, timeout=5)
    # It still saw its task to the end before passing the cancellation on.
    assert ended == [True]


async def test_cancel_and_wait_retrieves_the_tasks_errors() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    task = asyncio.ensure_future(fails())
    await asyncio.sleep(0)
    await cancel_and_wait(task)  # no raise, and no "never retrieved" warning
    assert isinstance(task.exception(), ValueError)


async def test_an_error_a_task_ends_with_while_stopped_is_logged(caplog: Any) -> None:
    async def breaks_on_cancel() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    task = asyncio.ensure_future(breaks_on_cancel())
    await asyncio.sleep(0)
    with caplog.at_level("WARNING", logger="resilience.streams"):
        await cancel_and_wait(task)
    assert "cleanup failed" in caplog.text
