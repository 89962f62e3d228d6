"""The staff-only live status page and the SSE feed behind it."""

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.shortcuts import render
from redis.exceptions import RedisError

from resilience import redis_client, stats, status
from resilience.connection_pool_manager import AsyncConnectionPool
from resilience.policies import policy_cache

from .sse import dumps
from .views import page_limited

logger = logging.getLogger(__name__)

FEED_SECONDS = 1.0


@page_limited
@staff_member_required
def status_page(request: HttpRequest) -> HttpResponse:
    """Serve the page; it reads ``/status/events``."""
    return render(request, "streamsvc/status.html")


async def status_events(request: HttpRequest) -> HttpResponseBase:
    """Stream a status snapshot every second to staff."""
    user = await request.auser()
    if not (user.is_active and user.is_staff):
        return JsonResponse(
            {"error": {"code": "forbidden", "message": "staff only",
                       "retry_after": None}},
            status=403,
        )  # fmt: skip
    response = StreamingHttpResponse(_feed(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


# Reads occupancy only; the streams' own pool lives in streamsvc.consumers.
status_pool = AsyncConnectionPool()


async def _pool_status() -> dict[str, Any]:
    policy = (await policy_cache.aget()).pool
    occupancy = await status_pool.occupancy(top=5)
    return {
        "in_use": occupancy.global_in_use,
        "global_max": policy.global_max,
        "per_user_max": policy.per_user_max,
        "busiest": [
            {"caller": usage.caller, "in_use": usage.in_use}
            for usage in occupancy.busiest
        ],
    }


async def _breakers() -> list[dict[str, Any]]:
    # The policy cache's breakers: no database query per snapshot.
    entries = (await policy_cache.aget()).enabled_providers()
    with redis_client.counted_as("status"):
        states = await asyncio.gather(*(entry.breaker.state() for entry in entries))
    return [status.breaker_row(state) for state in states]


async def _snapshot() -> dict[str, Any]:
    data = await sync_to_async(status.snapshot, thread_sensitive=False)()
    data["pool"] = await _pool_status()
    data["breakers"] = await _breakers()
    levels = {
        "pool_in_use": data["pool"]["in_use"],
        "queue_depth": data["queue"]["depth"],
    }
    await sync_to_async(stats.record_levels, thread_sensitive=False)(
        data["now"], levels
    )
    return data


async def _feed() -> AsyncIterator[bytes]:
    redis_down = False
    while True:
        try:
            data = await _snapshot()
        except (RedisError, OSError) as exc:
            if not redis_down:
                logger.warning("status: Redis unreachable (%s)", exc)
            redis_down = True
            yield b'event: status\ndata: {"error": "redis unreachable"}\n\n'
        else:
            if redis_down:
                logger.warning("status: Redis reachable again")
            redis_down = False
            yield f"event: status\ndata: {dumps(data)}\n\n".encode()
        await asyncio.sleep(FEED_SECONDS)
