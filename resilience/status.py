"""What the status page shows, gathered from Redis as plain data."""

import time
from typing import Any

from . import redis_client, stats
from .circuit_breaker import BreakerState, CircuitBreaker
from .queue_request_handler import alive_workers, waiting_key


def queue_status() -> dict[str, Any]:
    client: Any = redis_client.sync_client()
    depth = int(client.zcard(waiting_key()))
    oldest = client.zrange(waiting_key(), 0, 0, withscores=True)
    now_ms = redis_client.time_ms(client.time())
    wait = (now_ms - oldest[0][1]) / 1000 if oldest else 0.0
    workers = alive_workers()
    return {
        "depth": depth,
        "oldest_wait_seconds": round(max(0.0, wait), 1),
        "workers": len(workers),
        "busy_workers": workers.count("busy"),
    }


def breaker_row(state: BreakerState) -> dict[str, Any]:
    """Return what the status page and metrics show of one breaker."""
    return {
        "provider": state.provider,
        "state": state.state,
        "failures": state.failures,
        "window_calls": state.window_calls,
        "window_failures": state.window_failures,
        "next_probe_at": state.next_probe_at,
    }


def breaker_status() -> list[dict[str, Any]]:
    """Return every enabled provider's breaker (blocking: reads the database)."""
    from .models import BreakerPolicy

    # Each with its own policy: reading the state moves an open breaker to
    # half-open once *its* recovery time has passed.
    rows = BreakerPolicy.objects.filter(provider__enabled=True).select_related(
        "provider"
    )
    with redis_client.counted_as("status"):
        return [
            breaker_row(CircuitBreaker(row.provider.name, row.as_policy()).state())
            for row in rows.order_by("provider__order", "provider__name")
        ]


def snapshot() -> dict[str, Any]:
    """Return one status snapshot (blocking: call from a thread)."""
    now = time.time()
    return {
        "now": now,
        "queue": queue_status(),
        "transitions": stats.recent_transitions(),
        "history": stats.history(now),
    }
