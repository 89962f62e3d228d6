"""The LLMError tree: every provider failure is one of these.

::

    LLMError
    ├── TransientError          worth retrying, counts against the breaker
    │   ├── ProviderTimeout
    │   ├── ProviderConnectionError
    │   ├── ProviderServerError     5xx (and 408)
    │   ├── ProviderRateLimited     429
    │   └── ProviderStreamError     error payload or cut-off stream after a 200
    └── PermanentError          the caller's or operator's problem
        └── ProviderRejected        400/401/403/404/422

Adapters map third-party errors (httpx, JSON) to these at one boundary.
"""


class LLMError(Exception):
    """A provider call failed; ``status`` and ``retry_after`` when known."""

    transient = False

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.status = status
        self.retry_after = retry_after


class TransientError(LLMError):
    """A failure that may pass: retry it, and count it against the breaker."""

    transient = True


class PermanentError(LLMError):
    """A refusal that will repeat: never retried; to the breaker it is no failure
    (the provider answered, so it counts as a success)."""


class ProviderTimeout(TransientError):
    """The provider did not connect or answer in time."""


class ProviderConnectionError(TransientError):
    """The connection to the provider failed or broke."""


class ProviderServerError(TransientError):
    """The provider answered with a 5xx status."""


class ProviderRateLimited(TransientError):
    """The provider answered 429; ``retry_after`` says when to come back."""


class ProviderStreamError(TransientError):
    """The stream broke after a 200: an error payload, bad data or no end."""


class ProviderRejected(PermanentError):
    """The provider refused the request itself (its 4xx)."""
