"""`/healthz` and `/readyz` against the session's real Redis and database.

Redis is stopped or paused inside a test and always brought back in a
``finally``. A stopped server refuses connections at once; a paused one
accepts them and stays silent, so only the client's socket timeout
(``REDIS_TIMEOUT_SECONDS``) ends the probe's wait.
"""

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from django.conf import settings
from django.db import connection
from django.test import Client

from resilience import redis_client
from streamsvc import views
from tests.redis_plugin import redis_server

# Scheduling noise on a busy 2-core machine, on top of the Redis timeout.
SLACK_SECONDS = 1.0
PAUSE_MS = 2000


def redis_timeout() -> float:
    return float(settings.REDIS_TIMEOUT_SECONDS)


def timed_get(path: str) -> tuple[Any, float]:
    started = time.monotonic()
    response = Client().get(path)
    return response, time.monotonic() - started


def assert_names_only(response: Any, down: list[str]) -> None:
    assert response.status_code == 503
    body = response.json()
    assert body["down"] == down
    assert body["error"]["code"] == "not_ready"
    assert body["error"]["message"] == f"unreachable: {', '.join(down)}"
    assert body["error"]["retry_after"] is None
    assert "Retry-After" not in response


@pytest.fixture(autouse=True)
def fresh_readiness_log() -> None:
    # /readyz logs changes only; each test starts from "nothing was down".
    views._last_down.clear()


@pytest.fixture
def stopped_redis() -> Iterator[None]:
    server = redis_server()
    server.stop()
    try:
        yield
    finally:
        if server.process is None or server.process.poll() is not None:
            server.start()
        redis_client.reset_clients()


@contextmanager
def redis_paused() -> Iterator[None]:
    """Pause every Redis client for ``PAUSE_MS``; return once Redis answers."""
    other = redis_lib.Redis.from_url(settings.REDIS_URL)
    other.execute_command("CLIENT", "PAUSE", PAUSE_MS)
    try:
        yield
    finally:
        # Redis may hold UNPAUSE itself until the pause expires; ``other``
        # has no socket timeout, so either way Redis answers once it returns.
        other.execute_command("CLIENT", "UNPAUSE")
        other.close()
        redis_client.reset_clients()


@pytest.fixture
def paused_redis() -> Iterator[None]:
    with redis_paused():
        yield


@pytest.mark.django_db
@pytest.mark.timeout(30)
def test_readyz_answers_200_when_redis_and_the_database_answer() -> None:
    response = Client().get("/readyz")

    assert response.status_code == 200
    assert response.json() == {"status": "ready"}
    assert "no-cache" in response["Cache-Control"]


@pytest.mark.django_db
@pytest.mark.timeout(30)
def test_readyz_names_a_stopped_redis_within_the_redis_timeout(
    stopped_redis: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="streamsvc.views"):
        response, took = timed_get("/readyz")

    assert_names_only(response, ["redis"])
    assert took < redis_timeout() + SLACK_SECONDS
    assert any("redis" in r.getMessage() for r in caplog.records)


@pytest.mark.django_db
@pytest.mark.timeout(30)
def test_readyz_answers_200_again_as_soon_as_redis_is_back(
    stopped_redis: None,
) -> None:
    refused = Client().get("/readyz")
    redis_server().start()
    back = Client().get("/readyz")

    assert refused.status_code == 503
    assert back.status_code == 200
    assert back.json() == {"status": "ready"}


@pytest.mark.django_db
@pytest.mark.timeout(30)
def test_readyz_names_a_paused_redis_within_the_redis_timeout() -> None:
    # Leave a pooled connection open first, as a live process has one.
    assert Client().get("/readyz").status_code == 200

    with redis_paused():
        response, took = timed_get("/readyz")

    assert_names_only(response, ["redis"])
    assert took < redis_timeout() + SLACK_SECONDS
    back = Client().get("/readyz")
    assert back.status_code == 200


@pytest.mark.django_db
@pytest.mark.timeout(30)
def test_healthz_answers_200_while_redis_is_stopped(stopped_redis: None) -> None:
    response, took = timed_get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert took < SLACK_SECONDS


@pytest.mark.django_db
@pytest.mark.timeout(30)
def test_healthz_answers_200_at_once_while_redis_is_paused(
    paused_redis: None,
) -> None:
    response, took = timed_get("/healthz")

    assert response.status_code == 200
    # It never asks Redis, so it does not wait for the Redis timeout.
    assert took < redis_timeout()


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(30)
def test_readyz_names_the_database_when_it_cannot_be_opened(tmp_path: Path) -> None:
    if connection.vendor != "sqlite":
        pytest.skip("points the SQLite connection at a missing directory")
    real_name = connection.settings_dict["NAME"]
    connection.close()
    connection.settings_dict["NAME"] = str(tmp_path / "missing" / "db.sqlite3")
    try:
        response = Client().get("/readyz")
    finally:
        connection.close()
        connection.settings_dict["NAME"] = real_name

    assert_names_only(response, ["database"])
    assert Client().get("/readyz").status_code == 200


@pytest.mark.django_db
@pytest.mark.timeout(30)
def test_readyz_warns_once_per_outage_not_once_per_probe(
    stopped_redis: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="streamsvc.views"):
        for _ in range(3):
            assert Client().get("/readyz").status_code == 503
    warnings = [r.getMessage() for r in caplog.records if r.name == "streamsvc.views"]
    assert warnings == ["readyz: redis unreachable"]
