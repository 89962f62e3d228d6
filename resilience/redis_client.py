"""Redis connections for the resilience layers.

Every call on the request path uses the short ``REDIS_TIMEOUT_SECONDS``
timeout, so a Redis that accepts connections but stops answering shows up
as ``RedisError`` within that bound instead of a hung request.
"""

import asyncio
import hashlib
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from django.conf import settings
from prometheus_client import Counter
from redis.exceptions import NoScriptError

LUA_DIR = Path(__file__).resolve().parent / "lua"

ROUND_TRIPS = Counter(
    "streamsvc_redis_round_trips",
    "Redis round trips made by each layer, by component.",
    ["component"],
)
COMPONENTS = ("rate_limiter", "pool", "breaker", "queue", "status")
for _component in COMPONENTS:
    ROUND_TRIPS.labels(_component)

_counted_as: ContextVar[str | None] = ContextVar("counted_as", default=None)


def count_round_trip(component: str) -> None:
    """Count one request/reply exchange with Redis (a pipeline is one)."""
    ROUND_TRIPS.labels(_counted_as.get() or component).inc()


@contextmanager
def counted_as(component: str) -> Iterator[None]:
    """Count the layers' round trips made inside as ``component``.

    The status page and ``/metrics`` read breaker states through the
    breaker's own script; counted as "status", they do not pass for traffic.
    """
    token = _counted_as.set(component)
    try:
        yield
    finally:
        _counted_as.reset(token)


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


class LuaScript:
    """A Lua script run by EVALSHA, sent whole by EVAL when Redis lacks it.

    EVAL also caches the script in Redis, so the fallback costs one extra
    round trip after a Redis restart or ``SCRIPT FLUSH``, not one per call.
    """

    def __init__(self, source: str, component: str) -> None:
        self.source = source
        self.component = component
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    @classmethod
    def load(cls, name: str, component: str) -> "LuaScript":
        """Return the script in ``resilience/lua/<name>``, counted as ``component``."""
        return cls((LUA_DIR / name).read_text(), component)

    def _sent(self, on_send: Callable[[], None] | None) -> None:
        count_round_trip(self.component)
        if on_send is not None:
            on_send()

    async def run(
        self,
        keys: Sequence[str],
        args: Sequence[Any],
        client: aioredis.Redis | None = None,
        on_send: Callable[[], None] | None = None,
    ) -> Any:
        """Run on ``client`` (the loop's by default); ``on_send`` per request."""
        client = async_client() if client is None else client
        self._sent(on_send)
        try:
            reply = client.evalsha(self.sha, len(keys), *keys, *args)
            return await cast(Awaitable[Any], reply)
        except NoScriptError:
            self._sent(on_send)
            reply = client.eval(self.source, len(keys), *keys, *args)
            return await cast(Awaitable[Any], reply)

    def run_sync(
        self,
        keys: Sequence[str],
        args: Sequence[Any],
        client: redis.Redis | None = None,
    ) -> Any:
        """Run on ``client`` (the process's synchronous one by default)."""
        client = sync_client() if client is None else client
        self._sent(None)
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            self._sent(None)
            return client.eval(self.source, len(keys), *keys, *args)
