"""Plain Django views: the demo page and the health probes."""

import logging

from django.db import connection
from django.db.utils import DatabaseError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import ensure_csrf_cookie
from redis.exceptions import RedisError

from resilience import redis_client

logger = logging.getLogger(__name__)


@ensure_csrf_cookie
def chat_page(request: HttpRequest) -> HttpResponse:
    """Serve the demo chat page."""
    return render(request, "streamsvc/chat.html")


@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    """Answer 200 while the process can serve requests at all."""
    return JsonResponse({"status": "ok"})


@never_cache
def readyz(request: HttpRequest) -> JsonResponse:
    """Answer 200 when Redis and the database both answer, else 503."""
    down = [
        name
        for name, check in (("redis", _redis_ok), ("database", _db_ok))
        if not check()
    ]
    if down:
        logger.warning("readyz: %s unreachable", ", ".join(down))
        return JsonResponse(
            {
                "status": "unavailable",
                "down": down,
                "error": {
                    "code": "not_ready",
                    "message": f"unreachable: {', '.join(down)}",
                    "retry_after": None,
                },
            },
            status=503,
        )
    return JsonResponse({"status": "ready"})


def _redis_ok() -> bool:
    try:
        return bool(redis_client.sync_client().ping())
    except (RedisError, OSError):
        return False


def _db_ok() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except DatabaseError:
        return False
