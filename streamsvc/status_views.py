"""The staff-only live status page and the SSE feed behind it."""

import asyncio
import logging
from collections.abc import AsyncIterator

from asgiref.sync import sync_to_async
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.shortcuts import render
from redis.exceptions import RedisError

from resilience import status

from .sse import dumps

logger = logging.getLogger(__name__)

FEED_SECONDS = 1.0


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


async def _feed() -> AsyncIterator[bytes]:
    while True:
        try:
            data = await sync_to_async(status.snapshot, thread_sensitive=False)()
            yield f"event: status\ndata: {dumps(data)}\n\n".encode()
        except (RedisError, OSError) as exc:
            logger.warning("status: Redis unreachable (%s)", exc)
            yield b'event: status\ndata: {"error": "redis unreachable"}\n\n'
        await asyncio.sleep(FEED_SECONDS)
