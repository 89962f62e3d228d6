"""The ResilienceError tree: why a request was not admitted or was stopped.

::

    ResilienceError (code, status, retry_after)
    └── one subclass per admission answer, added by each layer

Each error knows its public ``code`` (README table), the HTTP ``status`` it
gets at admission and, where honest, ``retry_after`` in whole seconds.
"""

import math


class ResilienceError(Exception):
    code = "internal_error"
    status = 503

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    @property
    def retry_after_seconds(self) -> int | None:
        """``retry_after`` rounded up to whole seconds, at least 1."""
        if self.retry_after is None:
            return None
        return max(1, math.ceil(self.retry_after))
