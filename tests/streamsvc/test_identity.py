"""Who is asking: API keys, sessions and the client's address (C10)."""

from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.utils import timezone

from resilience.models import ApiKey
from streamsvc.errors import ApiError
from streamsvc.identity import client_ip, identify, parse_networks

PROXIES = parse_networks(["10.0.0.0/8", "192.168.1.1/32"])


def test_c10_forwarded_for_is_ignored_from_an_untrusted_peer() -> None:
    assert client_ip("203.0.113.9", "1.2.3.4", PROXIES) == "203.0.113.9"


def test_c10_trusted_proxy_gives_the_right_most_untrusted_hop() -> None:
    assert client_ip("10.0.0.5", "198.51.100.7", PROXIES) == "198.51.100.7"
    chain = "198.51.100.7, 192.168.1.1"
    assert client_ip("10.0.0.5", chain, PROXIES) == "198.51.100.7"


def test_c10_prepending_a_fake_hop_does_not_change_the_client() -> None:
    real = client_ip("10.0.0.5", "198.51.100.7", PROXIES)
    forged = client_ip("10.0.0.5", "6.6.6.6, 198.51.100.7", PROXIES)
    assert forged == real == "198.51.100.7"


def test_c10_garbage_hops_fall_back_to_the_peer() -> None:
    assert client_ip("10.0.0.5", "not-an-ip", PROXIES) == "10.0.0.5"
    assert client_ip("10.0.0.5", "10.0.0.6, 10.0.0.7", PROXIES) == "10.0.0.6"


def headers(**values: str) -> dict[str, str]:
    return {key.replace("_", "-"): value for key, value in values.items()}


@pytest.fixture
def alice(transactional_db: Any) -> Any:
    return get_user_model().objects.create_user("alice", password="pw-alice-123")


async def test_a_valid_api_key_identifies_its_owner(alice: Any) -> None:
    key, raw = await _issue(alice)
    who = await identify("127.0.0.1", headers(authorization=f"Bearer {raw}"), (), "v1")
    assert (who.user_id, who.api_key_id, who.ip) == (alice.pk, key.pk, "127.0.0.1")
    assert who.caller == f"user:{alice.pk}"


async def _issue(user: Any) -> tuple[ApiKey, str]:
    from asgiref.sync import sync_to_async

    return await sync_to_async(ApiKey.issue)(user)


async def test_invalid_and_revoked_keys_are_unauthorized(alice: Any) -> None:
    with pytest.raises(ApiError) as caught:
        await identify("127.0.0.1", headers(authorization="Bearer nope"), (), "v1")
    assert (caught.value.status, caught.value.code) == (401, "unauthorized")

    key, raw = await _issue(alice)
    key.revoked_at = timezone.now()
    await key.asave()
    with pytest.raises(ApiError):
        await identify("127.0.0.1", headers(authorization=f"Bearer {raw}"), (), "v2")


async def test_a_malformed_authorization_header_is_unauthorized(
    transactional_db: Any,
) -> None:
    with pytest.raises(ApiError, match="Bearer"):
        await identify("127.0.0.1", headers(authorization="Basic abc"), (), "v1")


async def test_anonymous_requests_are_refused_when_auth_is_required(
    transactional_db: Any, settings: Any
) -> None:
    settings.STREAMSVC = {**settings.STREAMSVC, "REQUIRE_AUTH": True}
    with pytest.raises(ApiError) as caught:
        await identify("127.0.0.1", {}, (), "v1")
    assert caught.value.code == "unauthorized"
    settings.STREAMSVC = {**settings.STREAMSVC, "REQUIRE_AUTH": False}
    assert (await identify("127.0.0.1", {}, (), "v1")).user_id is None


async def test_a_logged_in_session_is_its_user(alice: Any) -> None:
    from asgiref.sync import sync_to_async
    from django.test import Client

    client = Client()
    await sync_to_async(client.login)(username="alice", password="pw-alice-123")
    session = client.cookies["sessionid"].value
    who = await identify("127.0.0.1", headers(cookie=f"sessionid={session}"), (), "v")
    assert who.user_id == alice.pk


def test_apikey_create_prints_only_the_key(alice: Any, capsys: Any) -> None:
    call_command("apikey", "create", "alice")
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(ApiKey.PREFIX)
    stored = ApiKey.objects.get(user=alice)
    assert lines[0] not in (stored.key_hash, stored.prefix)


def _log_in(username: str, password: str) -> Any:
    from django.test import Client

    client = Client()
    assert client.login(username=username, password=password)
    return client


def _change_password(user: Any, password: str) -> None:
    user.set_password(password)
    user.save()


async def test_a_session_is_anonymous_once_its_user_changes_password(
    alice: Any, settings: Any
) -> None:
    from asgiref.sync import sync_to_async

    client = await sync_to_async(_log_in)("alice", "pw-alice-123")
    cookie = headers(cookie=f"sessionid={client.cookies['sessionid'].value}")
    assert (await identify("127.0.0.1", cookie, (), "before")).user_id == alice.pk

    await sync_to_async(_change_password)(alice, "pw-alice-456")
    assert (await identify("127.0.0.1", cookie, (), "after")).user_id is None
    settings.STREAMSVC = {**settings.STREAMSVC, "REQUIRE_AUTH": True}
    with pytest.raises(ApiError) as caught:
        await identify("127.0.0.1", cookie, (), "after")
    assert (caught.value.status, caught.value.code) == (401, "unauthorized")


@pytest.mark.parametrize(
    "engine",
    [
        "django.contrib.sessions.backends.signed_cookies",
        "django.contrib.sessions.backends.cache",
    ],
)
async def test_a_session_is_read_from_the_configured_engine(
    alice: Any, settings: Any, engine: str
) -> None:
    from asgiref.sync import sync_to_async

    settings.SESSION_ENGINE = engine
    client = await sync_to_async(_log_in)("alice", "pw-alice-123")
    session = client.cookies["sessionid"].value
    who = await identify("127.0.0.1", headers(cookie=f"sessionid={session}"), (), "e")
    assert who.user_id == alice.pk


def test_logout_and_password_change_move_the_policy_version(
    alice: Any, redis: Any
) -> None:
    from resilience import redis_client
    from resilience.policies import VERSION_KEY

    def version() -> bytes | None:
        return redis.get(redis_client.key(VERSION_KEY))

    client = _log_in("alice", "pw-alice-123")  # saves last_login only
    before = version()
    client.logout()
    after_logout = version()
    _change_password(alice, "pw-alice-456")
    assert len({before, after_logout, version()}) == 3


def test_a_lookup_that_straddles_a_version_change_is_not_kept() -> None:
    from streamsvc.identity import TTLCache

    cache = TTLCache()
    cache.get("slow", "v1")  # a lookup starts under v1 ...
    cache.get("other", "v2")  # ... another request sees v2 meanwhile
    cache.put("slow", 7, "v1")
    assert cache.get("slow", "v2") == (False, None)
    cache.put("slow", 8, "v2")
    assert cache.get("slow", "v2") == (True, 8)


def test_a_password_changed_from_another_process_moves_the_version(
    transactional_db: Any, redis: Any
) -> None:
    # `manage.py shell` (like changepassword) never imports the stream path:
    # the app config must connect the receivers there too.
    import subprocess
    import sys

    from resilience import redis_client
    from resilience.policies import VERSION_KEY
    from tests.conftest import ROOT, live_env

    get_user_model().objects.create_user("carol", password="pw-carol-123")
    before = redis.get(redis_client.key(VERSION_KEY))
    code = (
        "from django.contrib.auth import get_user_model; "
        "u = get_user_model().objects.get(username='carol'); "
        "u.set_password('pw-carol-456'); u.save()"
    )
    subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=ROOT,
        env=live_env(),
        check=True,
        timeout=60,
    )
    assert redis.get(redis_client.key(VERSION_KEY)) != before


def test_creating_a_user_announces_nothing(transactional_db: Any, redis: Any) -> None:
    # Nobody can have a new user cached; `make run` creates its demo user
    # before Redis is up, where an announcement would only log a warning.
    from resilience import redis_client
    from resilience.policies import VERSION_KEY

    before = redis.get(redis_client.key(VERSION_KEY))
    user = get_user_model().objects.create_user("dave", password="pw-dave-123")
    assert redis.get(redis_client.key(VERSION_KEY)) == before
    user.set_password("pw-dave-456")
    user.save()
    assert redis.get(redis_client.key(VERSION_KEY)) != before


def test_an_anonymous_logout_announces_nothing(
    transactional_db: Any, redis: Any
) -> None:
    # Django signals a logout even for an anonymous request (any logout
    # view a project adds would let anyone send it); only a real logout
    # clears caches, since each announcement reloads every process's policies.
    from importlib import import_module

    from django.conf import settings
    from django.contrib.auth import logout
    from django.contrib.auth.models import AnonymousUser
    from django.test import RequestFactory

    from resilience import redis_client
    from resilience.policies import VERSION_KEY

    before = redis.get(redis_client.key(VERSION_KEY))
    for _ in range(3):
        request = RequestFactory().post("/logout/")
        request.session = import_module(settings.SESSION_ENGINE).SessionStore()
        request.user = AnonymousUser()
        logout(request)
    assert redis.get(redis_client.key(VERSION_KEY)) == before
