"""Every Lua script survives Redis forgetting it (restart, SCRIPT FLUSH)."""

from typing import Any

from resilience import redis_client
from resilience.redis_client import LuaScript

INCR_BY = LuaScript("return redis.call('INCRBY', KEYS[1], ARGV[1])", "test")


async def test_a_known_script_costs_one_request(redis: Any) -> None:
    sends: list[int] = []
    assert await INCR_BY.run(["n"], [2], on_send=lambda: sends.append(1)) == 2
    sends.clear()
    assert await INCR_BY.run(["n"], [3], on_send=lambda: sends.append(1)) == 5
    assert sends == [1]


async def test_a_flushed_script_is_sent_whole_once_then_cached_again(
    redis: Any,
) -> None:
    await INCR_BY.run(["n"], [1])
    redis.script_flush()
    sends: list[int] = []
    assert await INCR_BY.run(["n"], [1], on_send=lambda: sends.append(1)) == 2
    assert sends == [1, 1]  # EVALSHA refused, then EVAL
    assert redis.script_exists(INCR_BY.sha) == [True]
    sends.clear()
    assert await INCR_BY.run(["n"], [1], on_send=lambda: sends.append(1)) == 3
    assert sends == [1]


def test_the_synchronous_run_recovers_from_a_flush_too(redis: Any) -> None:
    redis.script_flush()
    assert INCR_BY.run_sync(["m"], [4], redis_client.sync_client()) == 4
    assert INCR_BY.run_sync(["m"], [1]) == 5


async def test_the_layers_scripts_run_after_a_flush(redis: Any) -> None:
    # Each layer's script file loads and runs against a Redis that has
    # never seen it (the state after a Redis restart).
    from resilience.queue_request_handler import RESERVE, START

    redis.script_flush()
    keys = ["w", "c", "hb", "cancel"]
    assert await RESERVE.run(keys[:2], ["r1", 10, 10, 60_000]) == [1, 1]
    assert await START.run(keys, ["r1", 5000]) == 1
    assert redis.get("hb") == b"running"
    assert redis.script_exists(RESERVE.sha, START.sha) == [True, True]
