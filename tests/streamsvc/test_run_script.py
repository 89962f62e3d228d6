"""`make run`'s supervisor: honours PORT, REDIS_URL and WORKERS; stops cleanly."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib

from resilience.connection_pool_manager import HASH_TAG
from resilience.redis_client import key
from streamsvc.embedded_redis import free_port
from tests.conftest import ROOT, live_env, wait_until
from tests.sse_client import chat, stream

pytestmark = pytest.mark.timeout(90)

# A minute of tokens: a stream outlives any stop unless something ends it.
SLOW = {"ttft_ms": 0, "length": 300, "tokens_per_second": 5}


def start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "scripts/run.py"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
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


def descendants(pid: int) -> list[int]:
    """Return every process below ``pid``, whichever of its threads forked it."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in map(int, children.read_text().split()):
            found += [child, *descendants(child)]
    return found


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


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


def stream_until_stopped(url: str, text: str) -> None:
    with contextlib.suppress(httpx.HTTPError):
        stream(url, chat(text, max_tokens=300), timeout=60)


def sigterm(run: subprocess.Popen[bytes]) -> None:
    run.send_signal(signal.SIGTERM)


def ctrl_c(run: subprocess.Popen[bytes]) -> None:
    # A terminal sends SIGINT to its whole foreground process group.
    os.killpg(run.pid, signal.SIGINT)


@pytest.mark.parametrize("interrupt", [sigterm, ctrl_c], ids=["sigterm", "ctrl-c"])
def test_stop_ends_a_worker_busy_with_a_queued_stream_and_its_work_horse(
    interrupt: Callable[[subprocess.Popen[bytes]], None],
    providers: Callable[..., None],
    redis: Any,
    tmp_path: Path,
) -> None:
    providers(
        {"name": "simulated", "options": SLOW},
        pool={"global_max": 1, "per_user_max": 1},
    )
    port = free_port()
    env = live_env(PORT=str(port), WORKERS="1", STREAMSVC_VAR_DIR=str(tmp_path))
    run = start(env, tmp_path / "run.log")
    url = f"http://127.0.0.1:{port}"
    holder = threading.Thread(target=stream_until_stopped, args=(url, "holder"))
    queued = threading.Thread(target=stream_until_stopped, args=(url, "queued"))
    try:
        assert wait_until(lambda: "chat:" in (tmp_path / "run.log").read_text(), 40)
        assert wait_until(lambda: len(redis.keys("rq:worker:*")) == 1, 20)
        holder.start()
        assert wait_until(lambda: redis.zcard(key(HASH_TAG, "global")) == 1)
        queued.start()
        # Daphne, the worker and its work horse: the queued job is running.
        assert wait_until(lambda: len(descendants(run.pid)) == 3, 20)
        before = descendants(run.pid)
    finally:
        started = time.monotonic()
        interrupt(run)
        code = run.wait(20)
        took = time.monotonic() - started
    assert code == 0
    assert wait_until(lambda: all(gone(pid) for pid in before), 3)
    # Not the 10 s a warm shutdown gets before SIGKILL; 2 s on a quiet machine.
    assert took < 8
    holder.join(10)
    queued.join(10)
