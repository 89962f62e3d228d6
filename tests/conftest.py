import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib
from django.conf import settings

from resilience import redis_client
from resilience.policies import policy_cache
from streamsvc.embedded_redis import free_port
from tests import redis_plugin
from tests.fake_openai import FakeOpenAI

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def redis() -> Iterator[redis_lib.Redis]:
    """A client of the session's real Redis server, emptied before the test."""
    client = redis_lib.Redis.from_url(settings.REDIS_URL)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _fresh_policy_cache() -> Iterator[None]:
    policy_cache.invalidate()
    yield
    policy_cache.invalidate()
    redis_client.reset_clients()


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI().start()
    yield server
    server.stop()


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``check`` until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


class LiveServer:
    """A real daphne process serving ``streamsvc.asgi`` on a free port."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = redis_plugin.workdir() / f"daphne-{self.port}.log"
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "LiveServer":
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "daphne",
                    "-b",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "streamsvc.asgi:application",
                ],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if not wait_until(self._healthy, timeout=30):
            self.stop()
            raise RuntimeError(f"daphne did not start:\n{self.log.read_text()}")
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def live_env(**overrides: str) -> dict[str, str]:
    db = settings.DATABASES["default"]["NAME"]
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{db}",
        "HEARTBEAT_SECONDS": "0.5",
        "PROVIDER_IDLE_SECONDS": "5",
        "POLICY_REFRESH_SECONDS": "0.05",
        "LOG_LEVEL": "INFO",
        **overrides,
    }
    env.pop("STREAMSVC_TEST_DB", None)
    return env


@pytest.fixture(scope="session")
def daphne(django_db_setup: Any, django_db_blocker: Any) -> Iterator[LiveServer]:
    server = LiveServer(live_env()).start()
    yield server
    server.stop()


@pytest.fixture
def providers(transactional_db: Any, redis: redis_lib.Redis) -> Callable[..., None]:
    """Replace the provider rows and set policies; live servers see it in 0.3 s.

    ``pool``, ``queue`` and ``rate_limits`` keyword arguments set those
    policies; by default the pool is roomy and no rate limit applies.
    """
    from llm.models import Provider
    from resilience.models import (
        BreakerPolicy,
        PoolPolicy,
        QueuePolicy,
        RateLimitPolicy,
        RetryPolicy,
    )

    def configure(
        *rows: dict[str, Any],
        pool: dict[str, Any] | None = None,
        queue: dict[str, Any] | None = None,
        rate_limits: list[dict[str, Any]] | None = None,
        retry: dict[str, Any] | None = None,
        breakers: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        Provider.objects.all().delete()
        for order, row in enumerate(rows):
            Provider.objects.create(
                **{"kind": "simulated", "order": order, "enabled": True, **row}
            )
        PoolPolicy(**{"global_max": 100, "per_user_max": 100, **(pool or {})}).save()
        QueuePolicy(**(queue or {})).save()
        RateLimitPolicy.objects.all().delete()
        for limit in rate_limits or []:
            RateLimitPolicy.objects.create(**limit)
        fast = {"base_delay_seconds": 0.05, "max_delay_seconds": 0.2}
        RetryPolicy(**{**fast, **(retry or {})}).save()
        for name, values in (breakers or {}).items():
            BreakerPolicy.objects.filter(provider__name=name).update(**values)
        time.sleep(0.3)

    return configure


@pytest.fixture
def workers(
    transactional_db: Any, redis: redis_lib.Redis
) -> Iterator[Callable[..., list[subprocess.Popen[bytes]]]]:
    """Start ``rqworker streams`` processes for one test; returns them."""
    started: list[subprocess.Popen[bytes]] = []

    def start(count: int = 1) -> list[subprocess.Popen[bytes]]:
        env = live_env(DJANGO_SETTINGS_MODULE="streamsvc.settings")
        new = [subprocess.Popen(
            [sys.executable, "manage.py", "rqworker", "streams"], cwd=ROOT,
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ) for _ in range(count)]  # fmt: skip
        started.extend(new)
        assert wait_until(lambda: len(redis.keys("rq:worker:*")) >= count, 20)
        return new

    yield start
    for process in started:
        process.terminate()
    for process in started:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:  # busy with a job: warm shutdown
            process.kill()
            process.wait(10)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    """Attach the live server's log tail to a failing test's report."""
    report = yield
    server = getattr(item, "funcargs", {}).get("daphne")
    if report.failed and isinstance(server, LiveServer):
        tail = "\n".join(server.log_text().splitlines()[-60:])
        report.sections.append(("daphne log (tail)", tail))
    return report
