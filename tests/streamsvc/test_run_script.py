"""`make run`'s supervisor: honours PORT, REDIS_URL and WORKERS; stops cleanly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib

from streamsvc.embedded_redis import free_port
from tests.conftest import ROOT, live_env, wait_until
from tests.sse_client import chat, stream

pytestmark = pytest.mark.timeout(90)


def start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "scripts/run.py"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def child_pids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(child) for child in handle.read().split()]


def test_run_serves_streams_with_the_given_port_and_workers_then_stops(
    transactional_db: Any, redis: Any, tmp_path: Path
) -> None:
    from llm.models import Provider

    Provider.objects.update_or_create(
        name="simulated", defaults={"kind": "simulated", "options": {"ttft_ms": 0}}
    )
    port = free_port()
    env = live_env(PORT=str(port), WORKERS="2", STREAMSVC_VAR_DIR=str(tmp_path))
    run = start(env, tmp_path / "run.log")
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: "chat:" in (tmp_path / "run.log").read_text(), 40)
        assert f"{url}/admin/" in (tmp_path / "run.log").read_text()
        assert wait_until(lambda: len(redis.keys("rq:worker:*")) == 2, 20)
        assert stream(url, chat("hi", max_tokens=2)).last()[0] == "done"
        children = child_pids(run.pid)
        assert len(children) == 3
    finally:
        run.send_signal(signal.SIGTERM)
        code = run.wait(30)
    assert code == 0
    assert wait_until(lambda: not any(alive(pid) for pid in children), 10)
    assert "run: stopped" in (tmp_path / "run.log").read_text()


def test_run_starts_the_embedded_redis_without_redis_url(
    transactional_db: Any, tmp_path: Path
) -> None:
    port, redis_port = free_port(), free_port()
    env = live_env(
        PORT=str(port),
        WORKERS="1",
        STREAMSVC_VAR_DIR=str(tmp_path),
        REDIS_PORT=str(redis_port),
    )
    env.pop("REDIS_URL")
    run = start(env, tmp_path / "run.log")
    try:
        assert wait_until(lambda: "chat:" in (tmp_path / "run.log").read_text(), 40)
        client = redis_lib.Redis(port=redis_port)
        assert client.ping()
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert ready.status_code == 200
    finally:
        run.send_signal(signal.SIGINT)
        code = run.wait(30)
    assert code == 0
    assert (tmp_path / "redis").is_dir()
    time.sleep(0.2)
    with pytest.raises(redis_lib.ConnectionError):
        redis_lib.Redis(port=redis_port, socket_timeout=1).ping()
