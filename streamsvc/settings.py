"""Django settings for streamsvc.

Every value an operator may need to change comes from the environment; the
README lists each variable. The defaults are safe for local use on
127.0.0.1 and nothing else: production sets ``DJANGO_SECRET_KEY``,
``DJANGO_ALLOWED_HOSTS`` and ``DJANGO_SECURE=1`` (behind HTTPS).
"""

import ipaddress
import os
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("STREAMSVC_VAR_DIR", BASE_DIR / "var"))


def env_bool(name: str, default: bool) -> bool:
    """Read a boolean environment variable, refusing values we cannot parse."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0), got {raw!r}")


def env_number(name: str, default: float) -> float:
    """Read a positive number from the environment."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise ImproperlyConfigured(f"{name} must be positive, got {raw!r}")
    return value


def env_list(name: str, default: str) -> list[str]:
    """Read a comma-separated list from the environment."""
    raw = os.environ.get(name, default)
    return [item.strip() for item in raw.split(",") if item.strip()]


DEBUG = env_bool("DJANGO_DEBUG", False)
SECURE = env_bool("DJANGO_SECURE", False)

_LOCAL_KEY = "insecure-local-only-key-set-DJANGO_SECRET_KEY-in-production-0123456789"
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", _LOCAL_KEY)
if SECURE and SECRET_KEY == _LOCAL_KEY:
    raise ImproperlyConfigured("DJANGO_SECRET_KEY must be set when DJANGO_SECURE=1")

ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")

# Proxies whose X-Forwarded-For we believe (comma-separated CIDRs). Daphne's
# --proxy-headers trusts the left-most hop, which the client writes; we
# read the right-most untrusted hop instead (streamsvc.identity).
try:
    TRUSTED_PROXIES = tuple(
        ipaddress.ip_network(cidr, strict=False)
        for cidr in env_list("TRUSTED_PROXIES", "")
    )
except ValueError as exc:
    raise ImproperlyConfigured(f"TRUSTED_PROXIES: {exc}") from None

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "django_rq",
    "llm",
    "resilience",
    "streamsvc",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "streamsvc.urls"
ASGI_APPLICATION = "streamsvc.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}", conn_max_age=60
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several processes (daphne, workers, tests) share one SQLite file: wait
    # for a lock instead of failing at once.
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 20
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    test_db = os.environ.get("STREAMSVC_TEST_DB")
    if test_db:
        DATABASES["default"]["TEST"] = {"NAME": test_db}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Serve straight from the app folders when collectstatic has not run (local
# use); production runs collectstatic and gets compressed, hashed files.
WHITENOISE_USE_FINDERS = True
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedStaticFilesStorage",
    },
}

# Redis holds every piece of shared state: buckets, leases, breaker state,
# the RQ queue and the channel layer.
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6390/0")
# Every Redis call on the request path gives up after this long and is then
# handled as "Redis unreachable" by the layer's policy.
REDIS_TIMEOUT_SECONDS = env_number("REDIS_TIMEOUT_SECONDS", 0.5)
REDIS_KEY_PREFIX = os.environ.get("REDIS_KEY_PREFIX", "streamsvc")

CHANNEL_LAYERS: dict[str, dict[str, Any]] = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            # The layer's receive blocks in BZPOPMIN for up to 5 s, so its
            # read timeout must be longer; the consumer bounds its own calls
            # with REDIS_TIMEOUT_SECONDS (C21).
            "hosts": [
                {
                    "address": REDIS_URL,
                    "socket_connect_timeout": REDIS_TIMEOUT_SECONDS,
                    "socket_timeout": 8,
                }
            ],
            "prefix": f"{REDIS_KEY_PREFIX}:asgi",
        },
    },
}

# Our worker class refreshes its registration every 10 s, so the status page
# and the queue's wait estimate count only live workers.
RQ = {"WORKER_CLASS": "resilience.queue_consumer_worker.StreamWorker"}

RQ_QUEUES = {
    "streams": {"URL": REDIS_URL, "DEFAULT_TIMEOUT": 900},
    "default": {"URL": REDIS_URL},
}

CACHES = {
    "default": {
        "BACKEND": "streamsvc.cache.FailOpenRedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": f"{REDIS_KEY_PREFIX}:cache",
        "OPTIONS": {
            "socket_timeout": REDIS_TIMEOUT_SECONDS,
            "socket_connect_timeout": REDIS_TIMEOUT_SECONDS,
        },
    },
}

# /metrics: a bearer token, or a client address in these networks.
METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "")
try:
    METRICS_ALLOWED_NETWORKS = tuple(
        ipaddress.ip_network(cidr, strict=False)
        for cidr in env_list("METRICS_ALLOWED_NETWORKS", "127.0.0.1/32,::1/128")
    )
except ValueError as exc:
    raise ImproperlyConfigured(f"METRICS_ALLOWED_NETWORKS: {exc}") from None

# The admin login stays usable while Redis is down (streamsvc.cache).
RATELIMIT_FAIL_OPEN = True
RATELIMIT_USE_CACHE = "default"

STREAMSVC: dict[str, Any] = {
    # Longest conversation, in characters of message content, that we accept.
    "MAX_PROMPT_CHARS": int(env_number("MAX_PROMPT_CHARS", 32000)),
    # Comment heartbeat interval while nothing else is sent (shared/CASES C02).
    "HEARTBEAT_SECONDS": env_number("HEARTBEAT_SECONDS", 15),
    # How often each process asks Redis whether policies changed.
    "POLICY_REFRESH_SECONDS": env_number("POLICY_REFRESH_SECONDS", 0.5),
    # A provider silent this long mid-request ends the stream with an error.
    "PROVIDER_IDLE_SECONDS": env_number("PROVIDER_IDLE_SECONDS", 60),
    # Refuse anonymous stream requests (no API key, no login) with 401.
    "REQUIRE_AUTH": env_bool("REQUIRE_AUTH", False),
    # Admin login attempts per client IP (django-ratelimit, fixed window).
    "LOGIN_RATE": os.environ.get("LOGIN_RATE", "10/m"),
    # Requests per client IP to the plain pages: the chat page, /status/ and
    # /metrics (django-ratelimit, fixed window). Probes are not limited.
    "PAGE_RATE": os.environ.get("PAGE_RATE", "120/m"),
}

if SECURE:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env_bool("DJANGO_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = int(env_number("DJANGO_HSTS_SECONDS", 31536000))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True

LOG_LEVEL = os.environ.get("LOG_LEVEL", "INFO").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "line": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "line"},
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django": {"level": "INFO"},
        "daphne": {"level": "WARNING"},
        "asyncio": {"level": "WARNING"},
        # One INFO line per upstream request is noise beside our own lines.
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
    },
}
