"""Who is asking: API key, session user, and the client's real address.

Lookups that need the database run in a worker thread of their own
(``thread_sensitive=False``), never on the one shared thread Channels uses
for ORM calls, so a slow lookup for one caller cannot stall other streams
(shared/CASES.md C20). Results are cached briefly per process and dropped
whenever the policy version moves. Revoking a key, logging out, changing a
password or deactivating a user bumps that version (``POLICY_REFRESH_SECONDS``
later every process sees it; the app config connects the receivers in every
process); a bulk ``QuerySet.update()`` sends no signal and takes
``CACHE_SECONDS`` at the latest.
"""

import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from importlib import import_module
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import (
    BACKEND_SESSION_KEY,
    HASH_SESSION_KEY,
    SESSION_KEY,
    get_user_model,
    load_backend,
)
from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.utils.crypto import constant_time_compare

from resilience import conf
from resilience.models import ApiKey, hash_key
from resilience.policies import bump_version

from .errors import ApiError

logger = logging.getLogger(__name__)

CACHE_SECONDS = 30.0
CACHE_LIMIT = 10_000

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Identity:
    """The caller of one request; ``ip`` is always known."""

    ip: str
    user_id: int | None = None
    api_key_id: int | None = None

    @property
    def caller(self) -> str:
        """The subject of per-caller limits: the user, else the client IP."""
        return f"user:{self.user_id}" if self.user_id is not None else f"ip:{self.ip}"


def parse_networks(raw: Sequence[str]) -> tuple[Network, ...]:
    """Parse CIDRs (``TRUSTED_PROXIES``); a bad entry is a ValueError."""
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in raw)


def _trusted(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_ip(peer: str, forwarded_for: str, trusted: Sequence[Network]) -> str:
    """Return the client's address (shared/CASES.md C10).

    ``X-Forwarded-For`` is believed only when the direct peer is a trusted
    proxy, and then read from the right: the right-most hop that is not a
    trusted proxy is the client. Hops to its left were written by the client
    itself and prove nothing, so prepending fakes changes nothing.
    """
    if not forwarded_for or not _trusted(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            return _normalise(hop) or peer
    return (_normalise(hops[0]) if hops else None) or peer


def _normalise(address: str) -> str | None:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return None


class TTLCache:
    """A small per-process cache of lookups, dropped wholesale when full."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._items: dict[str, tuple[float, Any]] = {}
        self.version: str | None = None

    def get(self, key: str, version: str | None) -> tuple[bool, Any]:
        if version != self.version:
            self._items.clear()
            self.version = version
        hit = self._items.get(key)
        if hit is None or hit[0] < self._clock():
            return False, None
        return True, hit[1]

    def put(self, key: str, value: Any, version: str | None) -> None:
        # A lookup that straddled a version change may have read the old
        # state (a password not yet changed): keep it out of the new era.
        if version != self.version:
            return
        if len(self._items) >= CACHE_LIMIT:
            self._items.clear()
        self._items[key] = (self._clock() + CACHE_SECONDS, value)


_keys = TTLCache()
_sessions = TTLCache()


def _lookup_key(raw: str) -> tuple[int, int] | None:
    key = (
        ApiKey.objects.filter(key_hash=hash_key(raw), revoked_at__isnull=True)
        .select_related("user")
        .first()
    )
    if key is None or not key.user.is_active:
        return None
    return key.pk, key.user_id


def _lookup_session(session_key: str) -> int | None:
    """Return the session's user id, verified as ``auth.get_user`` would.

    The session is read from the configured ``SESSION_ENGINE``; the user
    comes from the backend that logged it in (``ModelBackend`` refuses
    inactive users), and the session's auth hash must match the user's, so a
    password change logs the session out here as it does in Django.

    Note: this only reads. ``get_user`` would also flush a stale session, or
    cycle the key of one signed with a ``SECRET_KEY_FALLBACKS`` secret; a
    stream response cannot hand the browser a new session cookie, so that
    rotation is left to the next page Django serves.
    """
    session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    try:
        user_id = get_user_model()._meta.pk.to_python(session[SESSION_KEY])
        backend_path = session[BACKEND_SESSION_KEY]
    except KeyError:
        return None
    if backend_path not in settings.AUTHENTICATION_BACKENDS:
        return None
    user = load_backend(backend_path).get_user(user_id)
    if user is None or not _hash_matches(user, session.get(HASH_SESSION_KEY)):
        return None
    return int(user.pk)


def _hash_matches(user: Any, session_hash: str | None) -> bool:
    if not hasattr(user, "get_session_auth_hash"):
        return True  # a user model without session hashes, as in get_user
    if not session_hash:
        return False
    hashes = [user.get_session_auth_hash(), *user.get_session_auth_fallback_hash()]
    return any(constant_time_compare(session_hash, known) for known in hashes)


def forget_identities(**kwargs: Any) -> None:
    """Make every process drop its cached lookups once the write commits.

    Connected to logout and to saves and deletes of the user model, so a
    logout, a password change or a deactivation reaches the stream path
    within ``POLICY_REFRESH_SECONDS`` instead of ``CACHE_SECONDS``. The
    price is one policy reload per process per refresh, however many users
    log out in it. Saving only ``last_login`` (every login does) changes
    nobody's access.
    """
    if kwargs.get("update_fields") == frozenset({"last_login"}):
        return
    if kwargs.get("signal") is user_logged_out:
        if kwargs.get("user") is None:
            return  # an anonymous "logout": nobody to forget
        request = kwargs.get("request")
        if request is not None and hasattr(request, "session"):
            # Django flushes the session only after this signal: delete it
            # first, so a lookup racing the announcement finds it gone.
            request.session.delete()
    if kwargs.get("created"):
        # A new user is in nobody's cache (and `make run` creates its demo
        # user before Redis is up, where announcing would only warn).
        return
    transaction.on_commit(bump_version)


user_logged_out.connect(forget_identities, dispatch_uid="identity-logout")
post_save.connect(
    forget_identities, sender=settings.AUTH_USER_MODEL, dispatch_uid="identity-save"
)
post_delete.connect(
    forget_identities, sender=settings.AUTH_USER_MODEL, dispatch_uid="identity-del"
)


async def _cached(
    cache: TTLCache, token: str, version: str | None, lookup: Callable[[str], Any]
) -> Any:
    cache_key = hash_key(token)
    hit, value = cache.get(cache_key, version)
    if not hit:
        value = await sync_to_async(lookup, thread_sensitive=False)(token)
        cache.put(cache_key, value, version)
    return value


def _bearer(authorization: str) -> str:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "Authorization must be 'Bearer <key>'")
    return token.strip()


def _session_key(cookie_header: str) -> str | None:
    try:
        cookies = SimpleCookie(cookie_header)
    except CookieError:
        return None
    morsel = cookies.get(settings.SESSION_COOKIE_NAME)
    return morsel.value if morsel else None


async def identify(
    peer: str,
    headers: dict[str, str],
    trusted: Sequence[Network],
    version: str | None,
) -> Identity:
    """Return the request's ``Identity`` or raise 401 ``unauthorized``."""
    ip = client_ip(peer, headers.get("x-forwarded-for", ""), trusted)
    authorization = headers.get("authorization", "")
    if authorization:
        found = await _cached(_keys, _bearer(authorization), version, _lookup_key)
        if found is None:
            raise ApiError(401, "unauthorized", "the API key is invalid or revoked")
        return Identity(ip, user_id=found[1], api_key_id=found[0])
    session = _session_key(headers.get("cookie", ""))
    if session:
        user_id = await _cached(_sessions, session, version, _lookup_session)
        if user_id is not None:
            return Identity(ip, user_id=user_id)
    if conf.flag("REQUIRE_AUTH"):
        raise ApiError(401, "unauthorized", "an API key or a login is required")
    return Identity(ip)
