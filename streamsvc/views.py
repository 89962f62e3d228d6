"""Plain Django views: the demo page and the health probes."""

import functools
import logging
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.contrib import admin
from django.db import connection
from django.db.utils import DatabaseError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import ensure_csrf_cookie
from django_ratelimit.core import get_usage, is_ratelimited
from redis.exceptions import RedisError

from resilience import conf, redis_client

from .identity import client_ip

logger = logging.getLogger(__name__)


def login_client_ip(group: str, request: HttpRequest) -> str:
    """django-ratelimit key: the client's real address (C10 rules)."""
    return client_ip(
        request.META.get("REMOTE_ADDR", ""),
        request.META.get("HTTP_X_FORWARDED_FOR", ""),
        settings.TRUSTED_PROXIES,
    )


View = Callable[..., HttpResponse]


def page_limited(view: View) -> View:
    """Limit a plain synchronous view per client IP (``PAGE_RATE``).

    django-ratelimit with a fixed window, enough for pages and scrapes; the
    stream endpoint has the token buckets instead. Over the limit: 429 JSON
    ``rate_limited`` with ``Retry-After`` (the rest of the window). With
    Redis down it fails open like the admin login.
    """

    @functools.wraps(view)
    def limited(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        usage = get_usage(
            request,
            group="pages",
            key=login_client_ip,
            rate=conf.text("PAGE_RATE"),
            increment=True,
        )
        if usage is not None and usage["should_limit"]:
            wait = max(1, int(usage["time_left"]))
            response = JsonResponse(
                {"error": {"code": "rate_limited", "retry_after": wait,
                           "message": f"too many requests; retry in {wait} s"}},
                status=429,
            )  # fmt: skip
            response["Retry-After"] = str(wait)
            return response
        return view(request, *args, **kwargs)

    return limited


def guarded_login(request: HttpRequest, **kwargs: Any) -> HttpResponse:
    """The admin login, limited per client IP; a fixed window is enough here."""
    limited = is_ratelimited(
        request,
        group="admin-login",
        key=login_client_ip,
        rate=conf.text("LOGIN_RATE"),
        method="POST",
        increment=True,
    )
    if limited:
        logger.warning("admin login: rate limited")
        return HttpResponse(
            "Too many login attempts; wait a minute and try again.",
            status=429,
            content_type="text/plain",
        )
    return admin.site.login(request, **kwargs)


@page_limited
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
    _log_change(down)
    if down:
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


_last_down: list[str] = []


def _log_change(down: list[str]) -> None:
    # Probes come every few seconds: one WARNING per change, not per probe.
    if down == _last_down:
        return
    if down:
        logger.warning("readyz: %s unreachable", ", ".join(down))
    else:
        logger.warning("readyz: ready again")
    _last_down[:] = down


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
