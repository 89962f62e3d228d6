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
