"""Redis connections for the resilience layers.

Every call on the request path uses the short ``REDIS_TIMEOUT_SECONDS``
timeout, so a Redis that accepts connections but stops answering shows up
as ``RedisError`` within that bound instead of a hung request.
"""

import asyncio
import weakref
from functools import lru_cache
from typing import Any

import redis
import redis.asyncio as aioredis
from django.conf import settings

_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis]
_async_clients = weakref.WeakKeyDictionary()


def key(*parts: object) -> str:
    """Return a key under the project's prefix: ``key("a", 1)`` → ``p:a:1``."""
    return ":".join([settings.REDIS_KEY_PREFIX, *map(str, parts)])


def time_ms(reply: tuple[Any, Any]) -> int:
    """Return a Redis ``TIME`` reply (seconds, microseconds) in milliseconds."""
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) // 1000


def _timeout() -> float:
    return float(settings.REDIS_TIMEOUT_SECONDS)


@lru_cache(maxsize=1)
def sync_client() -> redis.Redis:
    """Return the process's synchronous client (admin, commands, workers)."""
    return redis.Redis.from_url(
        settings.REDIS_URL, socket_timeout=_timeout(), socket_connect_timeout=_timeout()
    )


def async_client() -> aioredis.Redis:
    """Return the running event loop's asyncio client."""
    loop = asyncio.get_running_loop()
    client = _async_clients.get(loop)
    if client is None:
        client = aioredis.Redis.from_url(
            settings.REDIS_URL,
            socket_timeout=_timeout(),
            socket_connect_timeout=_timeout(),
        )
        _async_clients[loop] = client
    return client


async def aclose_async_client() -> None:
    """Close the running loop's client (the end of an RQ job's loop)."""
    client = _async_clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.aclose()


def reset_clients() -> None:
    """Forget cached clients, e.g. after the Redis URL changed in tests."""
    sync_client.cache_clear()
    _async_clients.clear()


async def run_script(source: str, keys: list[str], args: list[Any]) -> Any:
    """Run a Lua script on the loop's client (EVALSHA, loading it if needed)."""
    script: Any = async_client().register_script(source)
    return await script(keys=keys, args=args)
