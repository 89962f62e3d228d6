"""The admin login: limited per client IP, and usable while Redis is down."""

from typing import Any

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db


def attempt(client: Client) -> int:
    response = client.post("/admin/login/", {"username": "x", "password": "y"})
    return response.status_code


def test_repeated_login_attempts_are_limited_per_ip(redis: Any, settings: Any) -> None:
    # An hour's window: five quick attempts almost never straddle its edge
    # (django-ratelimit's windows are fixed, not sliding).
    settings.STREAMSVC = {**settings.STREAMSVC, "LOGIN_RATE": "3/h"}
    client = Client()
    codes = [attempt(client) for _ in range(5)]
    assert codes[:3] == [200, 200, 200]
    assert codes[3:] == [429, 429]
    other = Client(REMOTE_ADDR="10.9.9.9")
    assert attempt(other) == 200


def test_the_login_page_still_renders(redis: Any) -> None:
    response = Client().get("/admin/login/")
    assert response.status_code == 200
    assert b"csrfmiddlewaretoken" in response.content


def test_login_fails_open_when_redis_is_down(
    redis: Any, settings: Any, caplog: Any
) -> None:
    from django.contrib.auth import get_user_model

    from tests.redis_plugin import redis_server

    get_user_model().objects.create_superuser("ops", password="ops-pass-123")
    settings.STREAMSVC = {**settings.STREAMSVC, "LOGIN_RATE": "1/m"}
    server = redis_server()
    server.stop()
    try:
        client = Client()
        for _ in range(3):
            assert attempt(client) == 200
        response = client.post(
            "/admin/login/?next=/admin/",
            {"username": "ops", "password": "ops-pass-123"},
        )
        assert response.status_code == 302
    finally:
        server.start()
    warnings = [r for r in caplog.records if "failing open" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize("path", ["/", "/metrics", "/status/"])
def test_plain_pages_are_limited_per_ip_but_probes_are_not(
    redis: Any, settings: Any, path: str
) -> None:
    settings.STREAMSVC = {**settings.STREAMSVC, "PAGE_RATE": "3/h"}
    client = Client(REMOTE_ADDR="127.0.0.1")
    codes = [client.get(path).status_code for _ in range(4)]
    assert 429 not in codes[:3]
    refused = client.get(path)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused["Retry-After"]) <= 3600
    assert Client(REMOTE_ADDR="127.0.0.2").get(path).status_code != 429
    for probe in ("/healthz", "/readyz"):
        assert all(client.get(probe).status_code == 200 for _ in range(5))
