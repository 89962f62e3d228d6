"""Supervise a local streamsvc: Redis, daphne and the RQ workers.

``make run`` calls this after the bootstrap. It honours ``PORT`` (8000),
``REDIS_URL`` (unset: start the embedded Redis under var/) and
``WORKERS`` (1). Ctrl-C, SIGTERM or a hang-up stops every child, a job
a worker is running included, within seconds; the script then exits 0. A
child that dies on its own stops the rest and exits 1.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamsvc.embedded_redis import EmbeddedRedis  # noqa: E402

# rq ignores a repeated stop signal for 1 s; see stop().
STOP_GRACE_SECONDS = 1.5
STOP_TIMEOUT_SECONDS = 10.0

Child = subprocess.Popen[bytes]

stopping = False


def on_signal(signum: int, frame: FrameType | None) -> None:
    global stopping
    stopping = True


def wait_for_http(url: str, timeout: float = 30.0) -> bool:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stopping:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def running(children: list[Child]) -> list[Child]:
    return [child for child in children if child.poll() is None]


def wait_all(children: list[Child], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while running(children) and time.monotonic() < deadline:
        time.sleep(0.05)


def stop(children: list[Child], workers: list[Child]) -> None:
    """Stop every child within seconds, the workers' work horses included.

    An RQ worker takes its first SIGTERM as a warm shutdown: it waits for
    the job its work horse (a forked child in a process group of its own)
    is running, which may stream for minutes. A second SIGTERM makes it
    kill the horse and exit, but rq ignores one that comes within 1 s of
    the first, hence the grace. SIGKILL would orphan the horse, so it is
    only the last resort.
    """
    for child in reversed(children):
        child.terminate()
    wait_all(workers, STOP_GRACE_SECONDS)
    for worker in running(workers):
        worker.terminate()
    wait_all(children, STOP_TIMEOUT_SECONDS)
    for child in running(children):
        child.kill()
        child.wait()


def main() -> int:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    port = int(os.environ.get("PORT", "8000"))
    count = int(os.environ.get("WORKERS", "1"))
    env = dict(os.environ)
    var = Path(env.get("STREAMSVC_VAR_DIR") or ROOT / "var")
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):
        # Every process writes its metrics here; /metrics sums them.
        metrics_dir = var / "prometheus"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)

    embedded = None
    if not env.get("REDIS_URL"):
        embedded = EmbeddedRedis(var / "redis", port=int(env.get("REDIS_PORT", "6390")))
        embedded.start()
        env["REDIS_URL"] = embedded.url
        print(f"redis: embedded server at {embedded.url} (data in {var / 'redis'})")
    else:
        print(f"redis: {env['REDIS_URL']}")

    def spawn(args: list[str]) -> Child:
        # A session of their own keeps a terminal's Ctrl-C (or hang-up) from
        # reaching the children directly: run.py alone signals them, in the
        # order stop() needs.
        return subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=env, start_new_session=True
        )

    children: list[tuple[str, Child]] = []
    workers: list[Child] = []
    try:
        daphne = ["-m", "daphne", "-b", "127.0.0.1", "-p", str(port)]
        children.append(("daphne", spawn([*daphne, "streamsvc.asgi:application"])))
        for index in range(count):
            workers.append(spawn(["manage.py", "rqworker", "streams"]))
            children.append((f"worker {index + 1}", workers[-1]))
        if wait_for_http(f"http://127.0.0.1:{port}/healthz"):
            print(f"\nchat:  http://127.0.0.1:{port}/")
            print(f"admin: http://127.0.0.1:{port}/admin/")
            print("Ctrl-C stops everything.\n", flush=True)
        while not stopping:
            dead = [(n, c) for n, c in children if c.poll() is not None]
            if dead:
                name, child = dead[0]
                print(f"run: {name} exited with {child.returncode}; stopping")
                return 1
            time.sleep(0.2)
        return 0
    finally:
        stop([child for _, child in children], workers)
        if embedded is not None:
            embedded.stop()
        print("run: stopped")


if __name__ == "__main__":
    sys.exit(main())
