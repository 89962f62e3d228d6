"""The in-process policy cache: no database per request, changes within 1 s."""

import asyncio
import subprocess
import sys
import time
from typing import Any

import pytest
from django.conf import settings

from llm.models import Provider
from resilience.policies import PolicyCache, bump_version
from tests.conftest import ROOT, live_env

WATCHER = """
import asyncio, time, django
django.setup()
from resilience.policies import policy_cache

async def main():
    first = (await policy_cache.aget()).provider("simulated").config.options
    print("ready", first.get("ttft_ms"), flush=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        snap = await policy_cache.aget()
        seen = snap.provider("simulated").config.options.get("ttft_ms")
        if seen != first.get("ttft_ms"):
            print("seen", seen, time.time(), flush=True)
            return
        await asyncio.sleep(0.01)
    print("never", flush=True)

asyncio.run(main())
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.timeout(60)
def test_a_change_reaches_another_process_within_one_second(
    transactional_db: Any, redis: Any
) -> None:
    Provider.objects.update_or_create(
        name="simulated", defaults={"kind": "simulated", "options": {"ttft_ms": 1}}
    )
    env = live_env(
        POLICY_REFRESH_SECONDS="0.5", DJANGO_SETTINGS_MODULE="streamsvc.settings"
    )
    watcher = subprocess.Popen(
        [sys.executable, "-c", WATCHER],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline().split() == ["ready", "1"]
        changed_at = time.time()
        provider = Provider.objects.get(name="simulated")
        provider.options = {"ttft_ms": 2}
        provider.save()
        line = watcher.stdout.readline().split()
    finally:
        watcher.kill()
        watcher.wait()
    assert line[:2] == ["seen", "2"]
    assert float(line[2]) - changed_at < 1.0


async def test_steady_requests_read_no_database_and_redis_once_per_interval(
    transactional_db: Any, redis: Any
) -> None:
    cache = PolicyCache()
    await cache.aget()
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        for _ in range(20):
            await cache.aget()
        await asyncio.sleep(0.01)
    interval = float(settings.STREAMSVC["POLICY_REFRESH_SECONDS"])
    assert cache.loads == 1
    assert 1 <= cache.version_reads <= 1.0 / interval + 2


async def test_a_version_change_reloads_once(transactional_db: Any, redis: Any) -> None:
    clock = Clock()
    cache = PolicyCache(clock=clock, poll=False)
    await cache.aget()
    bump_version()
    clock.now += 10
    stale = await cache.aget()
    assert stale.version != (await cache.arefresh()).version
    await cache.aget()
    assert cache.loads == 2


async def test_a_failing_reload_keeps_serving_the_last_snapshot(
    transactional_db: Any, redis: Any
) -> None:
    from tests.redis_plugin import redis_server

    cache = PolicyCache()
    first = await cache.aget()
    server = redis_server()
    server.stop()
    try:
        await asyncio.sleep(0.3)
        started = time.monotonic()
        assert await cache.aget() is first
        assert time.monotonic() - started < 0.1
    finally:
        server.start()


async def test_unchanged_providers_keep_their_adapter_across_reloads(
    transactional_db: Any, redis: Any
) -> None:
    await Provider.objects.aupdate_or_create(name="simulated", kind="simulated")
    clock = Clock()
    cache = PolicyCache(clock=clock, poll=False)
    before = (await cache.aget()).provider("simulated")
    await Provider.objects.acreate(name="other", kind="simulated")
    clock.now += 10
    after = await cache.arefresh()
    assert after.provider("other") is not None
    kept = after.provider("simulated")
    assert kept is not None and kept.adapter is before.adapter


async def test_a_provider_switched_off_leaves_service_at_the_next_reload(
    transactional_db: Any, redis: Any
) -> None:
    # Only `enabled` changes, so the adapter and breaker are reused; the
    # entry must still carry the new row.
    await Provider.objects.aupdate_or_create(name="simulated", kind="simulated")
    await Provider.objects.acreate(name="other", kind="simulated")
    clock = Clock()
    cache = PolicyCache(clock=clock, poll=False)
    before = await cache.aget()
    assert before.provider("simulated") is not None
    await Provider.objects.filter(name="simulated").aupdate(enabled=False)
    await asyncio.to_thread(bump_version)
    clock.now += 10
    after = await cache.arefresh()
    assert after.provider("simulated") is None
    assert [e.config.name for e in after.enabled_providers()] == ["other"]
    kept = next(e for e in after.providers if e.config.name == "simulated")
    first = before.provider("simulated")
    assert first is not None and kept.breaker is first.breaker
