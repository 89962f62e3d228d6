"""A Redis cache that reports a lost Redis as misses instead of raising.

django-ratelimit guards the admin login with this cache. When Redis is down
the login must still work (operators need the admin most during an outage),
so errors become misses and django-ratelimit, with ``RATELIMIT_FAIL_OPEN``,
lets the request through. A WARNING is logged once per outage.
"""

import logging
from typing import Any

from django.core.cache.backends.redis import RedisCache
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)


class FailOpenRedisCache(RedisCache):
    _down = False

    def _guard(self, default: Any, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            result = call(*args, **kwargs)
        except (RedisError, OSError) as exc:
            if not FailOpenRedisCache._down:
                logger.warning("cache: Redis unreachable, failing open (%s)", exc)
            FailOpenRedisCache._down = True
            return default
        if FailOpenRedisCache._down:
            logger.warning("cache: Redis reachable again")
            FailOpenRedisCache._down = False
        return result

    def add(self, *args: Any, **kwargs: Any) -> bool:
        return bool(self._guard(False, super().add, *args, **kwargs))

    def get(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard(kwargs.get("default"), super().get, *args, **kwargs)

    def incr(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard(None, super().incr, *args, **kwargs)

    def set(self, *args: Any, **kwargs: Any) -> None:
        self._guard(None, super().set, *args, **kwargs)
