"""Start a real Redis server for the test session, before Django loads.

Loaded with ``-p tests.redis_plugin`` so that its hook runs before
pytest-django imports the settings, which read ``REDIS_URL``.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from streamsvc.embedded_redis import EmbeddedRedis

_state: dict[str, object] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="streamsvc-test-"))
    server = EmbeddedRedis(workdir / "redis", persist=False)
    server.start()
    _state.update(server=server, workdir=workdir)
    os.environ["REDIS_URL"] = server.url
    os.environ["STREAMSVC_TEST_DB"] = str(workdir / "test.sqlite3")
    os.environ["STREAMSVC_VAR_DIR"] = str(workdir / "var")
    (workdir / "var" / "static").mkdir(parents=True)
    os.environ.setdefault("POLICY_REFRESH_SECONDS", "0.05")


def pytest_unconfigure(config: pytest.Config) -> None:
    server = _state.get("server")
    if isinstance(server, EmbeddedRedis):
        server.stop()
    workdir = _state.get("workdir")
    if isinstance(workdir, Path):
        shutil.rmtree(workdir, ignore_errors=True)


def redis_server() -> EmbeddedRedis:
    """Return the session's Redis server (to pause or restart it)."""
    server = _state["server"]
    assert isinstance(server, EmbeddedRedis)
    return server


def workdir() -> Path:
    path = _state["workdir"]
    assert isinstance(path, Path)
    return path
