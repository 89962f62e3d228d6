"""A cancellation turned into a Redis error by a client still stops the loop."""

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from resilience.streams import raise_if_cancelling


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
