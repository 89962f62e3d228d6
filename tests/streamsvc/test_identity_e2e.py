"""Identity end to end: sessions and keys as the stream endpoint sees them."""

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from resilience.models import ApiKey
from tests.conftest import LiveServer, live_env
from tests.sse_client import StreamResult, chat, stream

pytestmark = pytest.mark.timeout(90)

Configure = Callable[..., None]
QUICK = {"ttft_ms": 0, "length": 2, "tokens_per_second": 500}
SIMULATED = {"name": "simulated", "options": QUICK}
# Changes reach every process within POLICY_REFRESH_SECONDS (0.05 s on the
# live servers, 1 s at most in production); allow slack for a busy machine.
PROPAGATION_DEADLINE = 2.0


@pytest.fixture(scope="module")
def guarded(django_db_setup: Any) -> Iterator[LiveServer]:
    """A daphne that refuses anonymous stream requests (REQUIRE_AUTH)."""
    server = LiveServer(live_env(REQUIRE_AUTH="1")).start()
    yield server
    server.stop()


def limit(name: str, scope: str, capacity: int) -> dict[str, Any]:
    # Each test names its own buckets: a live server remembers "empty until
    # T" per bucket in process, which a Redis flush does not reset.
    return {
        "name": name,
        "scope": scope,
        "capacity": capacity,
        "refill_per_second": 0.01,
    }


def user(name: str, **fields: Any) -> Any:
    return get_user_model().objects.create_user(
        name, password=f"pw-{name}-123", **fields
    )


def bearer(raw: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {raw}"}


def log_in(name: str) -> Client:
    client = Client()
    assert client.login(username=name, password=f"pw-{name}-123")
    return client


def session_headers(server: LiveServer, client: Client) -> dict[str, str]:
    """Headers a browser logged in as ``client`` sends, CSRF token included."""
    csrf = httpx.get(server.url + "/").cookies["csrftoken"]
    session = client.cookies["sessionid"].value
    return {
        "Cookie": f"sessionid={session}; csrftoken={csrf}",
        "X-CSRFToken": csrf,
    }


def unauthorized(result: StreamResult) -> bool:
    return result.status == 401 and result.body["error"]["code"] == "unauthorized"


def refused_within(server: LiveServer, sent: dict[str, str]) -> float:
    """Poll until a stream request is refused 401; return how long it took."""
    started = time.monotonic()
    while time.monotonic() - started < PROPAGATION_DEADLINE:
        result = stream(server.url, chat(), headers=sent)
        if unauthorized(result):
            return time.monotonic() - started
        assert result.status == 200
        time.sleep(0.05)
    pytest.fail(f"still admitted {PROPAGATION_DEADLINE} s after the change")


def test_a_user_bucket_is_shared_by_a_session_and_a_key_of_the_same_owner(
    daphne: LiveServer, providers: Configure
) -> None:
    providers(SIMULATED, rate_limits=[limit("owner-shared", "user", 1)])
    alice, bob = user("alice"), user("bob")
    _, alice_key = ApiKey.issue(alice)
    _, bob_key = ApiKey.issue(bob)

    by_session = stream(
        daphne.url, chat(), headers=session_headers(daphne, log_in("alice"))
    )
    assert by_session.status == 200
    by_key = stream(daphne.url, chat(), headers=bearer(alice_key))
    assert by_key.status == 429
    assert by_key.body["error"]["code"] == "rate_limited"
    assert stream(daphne.url, chat(), headers=bearer(bob_key)).status == 200
    assert stream(daphne.url, chat()).status == 200  # anonymous: no user bucket


def test_an_api_key_bucket_is_skipped_for_requests_without_a_key(
    daphne: LiveServer, providers: Configure
) -> None:
    providers(SIMULATED, rate_limits=[limit("per-key-only", "api_key", 1)])
    alice = user("alice")
    _, raw = ApiKey.issue(alice)

    for _ in range(3):
        assert stream(daphne.url, chat()).status == 200
    assert stream(daphne.url, chat(), headers=bearer(raw)).status == 200
    assert stream(daphne.url, chat(), headers=bearer(raw)).status == 429
    session = session_headers(daphne, log_in("alice"))
    assert stream(daphne.url, chat(), headers=session).status == 200


def test_an_invalid_key_is_unauthorized(
    daphne: LiveServer, providers: Configure
) -> None:
    providers(SIMULATED)
    result = stream(daphne.url, chat(), headers=bearer(ApiKey.PREFIX + "not-a-key"))
    assert unauthorized(result)


def test_a_key_revoked_after_use_is_refused_within_a_second(
    daphne: LiveServer, providers: Configure
) -> None:
    providers(SIMULATED)
    key, raw = ApiKey.issue(user("alice"))
    assert stream(daphne.url, chat(), headers=bearer(raw)).status == 200

    key.revoked_at = timezone.now()
    key.save(update_fields=["revoked_at"])
    assert refused_within(daphne, bearer(raw)) < PROPAGATION_DEADLINE


def test_anonymous_streams_are_refused_when_auth_is_required(
    guarded: LiveServer, providers: Configure
) -> None:
    providers(SIMULATED)
    assert unauthorized(stream(guarded.url, chat()))


def test_a_session_whose_user_changed_password_is_refused(
    guarded: LiveServer, providers: Configure
) -> None:
    providers(SIMULATED)
    alice = user("alice")
    sent = session_headers(guarded, log_in("alice"))

    alice.set_password("pw-alice-456")
    alice.save()
    assert unauthorized(stream(guarded.url, chat(), headers=sent))


def admin_post(
    server: LiveServer, sent: dict[str, str], path: str, **form: str
) -> httpx.Response:
    """Submit an admin form as the browser holding session ``sent`` would."""
    return httpx.post(server.url + path, data=form, headers=sent, timeout=10)


def test_a_password_change_in_the_admin_logs_other_sessions_out_within_a_second(
    guarded: LiveServer, providers: Configure
) -> None:
    providers(SIMULATED)
    user("alice", is_staff=True)
    laptop = session_headers(guarded, log_in("alice"))
    phone = session_headers(guarded, log_in("alice"))
    assert stream(guarded.url, chat(), headers=phone).status == 200

    changed = admin_post(
        guarded,
        laptop,
        "/admin/password_change/",
        old_password="pw-alice-123",
        new_password1="a-much-Longer-pw-4711",
        new_password2="a-much-Longer-pw-4711",
    )
    assert changed.status_code == 302
    assert refused_within(guarded, phone) < PROPAGATION_DEADLINE


def test_a_logout_in_the_admin_ends_the_session_on_the_stream_within_a_second(
    guarded: LiveServer, providers: Configure
) -> None:
    providers(SIMULATED)
    user("alice", is_staff=True)
    sent = session_headers(guarded, log_in("alice"))
    assert stream(guarded.url, chat(), headers=sent).status == 200

    assert admin_post(guarded, sent, "/admin/logout/").status_code == 200
    assert refused_within(guarded, sent) < PROPAGATION_DEADLINE
