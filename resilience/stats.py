"""Fleet-wide recent history for the status page, kept in Redis, bounded.

Each process counts in memory and flushes at most once a second, so
recording costs no Redis round trip on the request path: per-second counters
go to one hash per second (expiring after ``HISTORY_SECONDS``) and time to
first token samples to one capped list per ten seconds. Every instance
therefore shows the same picture.
"""

import asyncio
import contextlib
import logging
import time
from collections import Counter as Tally
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from . import redis_client

logger = logging.getLogger(__name__)

HISTORY_SECONDS = 300
SAMPLES_PER_BUCKET = 500
TRANSITIONS_KEPT = 50


def counters_key(second: int) -> str:
    return redis_client.key("stats", "s", second)


def ttft_key(ten_seconds: int) -> str:
    return redis_client.key("stats", "ttft", ten_seconds)


def transitions_key() -> str:
    return redis_client.key("stats", "transitions")


class StatsBuffer:
    """Count in process; flush to Redis in the background once a second."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._counts: dict[int, Tally[str]] = {}
        self._ttft: dict[int, list[float]] = {}
        self._flushed_at = 0.0
        self._flushing: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def count(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to ``name`` for the current second."""
        second = int(self._clock())
        self._counts.setdefault(second, Tally())[name] += amount
        self._maybe_flush()

    def ttft(self, seconds: float) -> None:
        """Record one time-to-first-token sample."""
        bucket = int(self._clock()) // 10
        self._ttft.setdefault(bucket, []).append(round(seconds, 4))
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if self._flushing is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        now = self._clock()
        wait = 1 - (now - self._flushed_at)
        if wait > 0:
            # Too soon: come back when the second is up, so the last counts
            # of a burst reach Redis even if no event follows them.
            if self._timer is None:
                self._timer = loop.call_later(wait, self._on_timer)
            return
        self._flushed_at = now
        self._flushing = loop.create_task(self.flush())

    def _on_timer(self) -> None:
        self._timer = None
        if self._counts or self._ttft:
            self._maybe_flush()

    async def flush(self) -> None:
        """Write what was counted since the last flush."""
        counts, self._counts = self._counts, {}
        samples, self._ttft = self._ttft, {}
        try:
            async with redis_client.async_client().pipeline(transaction=False) as pipe:
                for second, tally in counts.items():
                    for name, amount in tally.items():
                        pipe.hincrby(counters_key(second), name, amount)
                    pipe.expire(counters_key(second), HISTORY_SECONDS)
                for bucket, values in samples.items():
                    pipe.rpush(ttft_key(bucket), *values)
                    pipe.ltrim(ttft_key(bucket), -SAMPLES_PER_BUCKET, -1)
                    pipe.expire(ttft_key(bucket), HISTORY_SECONDS)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            logger.debug("stats: flush skipped (%s)", exc)
        finally:
            self._flushing = None
            if self._counts or self._ttft:
                self._maybe_flush()  # counted during this flush: come back


stats = StatsBuffer()


def record_transition(provider: str, state: str, reason: str) -> None:
    """Keep a bounded log of breaker transitions (sync; rare)."""
    entry = f"{time.time():.3f}|{provider}|{state}|{reason}"
    client: Any = redis_client.sync_client()
    with contextlib.suppress(RedisError, OSError), client.pipeline() as pipe:
        pipe.lpush(transitions_key(), entry)
        pipe.ltrim(transitions_key(), 0, TRANSITIONS_KEPT - 1)
        pipe.execute()


def record_levels(now: float, levels: dict[str, int]) -> None:
    """Keep this second's fleet-wide levels (pool in use, queue depth).

    The status feed calls this once a second with what it read from Redis,
    so the level charts fill in while any status page is open; with several
    pages open they write the same values (sync; one round trip).
    """
    client: Any = redis_client.sync_client()
    with client.pipeline(transaction=False) as pipe:
        pipe.hset(counters_key(int(now)), mapping=levels)
        pipe.expire(counters_key(int(now)), HISTORY_SECONDS)
        pipe.execute()


def recent_transitions() -> list[dict[str, Any]]:
    client: Any = redis_client.sync_client()
    entries = client.lrange(transitions_key(), 0, TRANSITIONS_KEPT - 1)
    result = []
    for raw in entries:
        at, provider, state, reason = raw.decode().split("|", 3)
        result.append(
            {"at": float(at), "provider": provider, "state": state, "reason": reason}
        )
    return result


def history(now: float, seconds: int = 180) -> dict[str, Any]:
    """Return per-second counters and TTFT percentiles for the last minutes."""
    client: Any = redis_client.sync_client()
    start = int(now) - seconds
    with client.pipeline(transaction=False) as pipe:
        for second in range(start, int(now)):
            pipe.hgetall(counters_key(second))
        rows = pipe.execute()
    series = [
        {"t": start + i, **{k.decode(): int(v) for k, v in row.items()}}
        for i, row in enumerate(rows)
    ]
    buckets = range(start // 10, int(now) // 10 + 1)
    with client.pipeline(transaction=False) as pipe:
        for bucket in buckets:
            pipe.lrange(ttft_key(bucket), 0, -1)
        lists = pipe.execute()
    per_bucket = [[float(v) for v in values] for values in lists]
    ttft_series = [
        {"t": bucket * 10, **percentiles(values)}
        for bucket, values in zip(buckets, per_bucket, strict=True)
    ]
    samples = [value for values in per_bucket for value in values]
    return {"series": series, "ttft": percentiles(samples), "ttft_series": ttft_series}


def percentiles(samples: list[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50": None, "p99": None, "count": 0}
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.5), "p99": pick(0.99), "count": len(ordered)}
