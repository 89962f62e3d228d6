"""Settings come from the environment; production passes check --deploy."""

import secrets
import subprocess
import sys

from tests.conftest import ROOT, live_env


def manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=live_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_deploy_is_clean_in_the_documented_production_configuration() -> None:
    result = manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        DJANGO_SECURE="1",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_ALLOWED_HOSTS="chat.example.com",
    )
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_secure_mode_refuses_the_local_secret_key() -> None:
    result = manage("check", DJANGO_SECURE="1")
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY must be set" in result.stderr


def test_a_bad_setting_names_itself() -> None:
    result = manage("check", TRUSTED_PROXIES="not-a-network")
    assert result.returncode != 0
    assert "TRUSTED_PROXIES" in result.stderr
    result = manage("check", HEARTBEAT_SECONDS="soon")
    assert "HEARTBEAT_SECONDS must be a number" in result.stderr


def test_a_postgresql_database_url_reaches_the_driver() -> None:
    # Nothing listens on port 1: the failure must be the connection, not a
    # missing PostgreSQL driver (DATABASE_URL may point at PostgreSQL).
    result = manage(
        "migrate",
        "--check",
        DATABASE_URL="postgres://streamsvc:secret@127.0.0.1:1/streamsvc",
    )
    assert result.returncode != 0
    assert "Error loading psycopg" not in result.stderr
    assert "127.0.0.1" in result.stderr and "port 1" in result.stderr, result.stderr
