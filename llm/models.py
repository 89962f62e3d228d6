from django.core.exceptions import ValidationError
from django.db import models

from .options import KINDS, OptionsError, clean_options


class Provider(models.Model):
    """An LLM endpoint requests may be sent to, tried in ``order``."""

    name = models.SlugField(
        max_length=64,
        unique=True,
        help_text='The name clients pass as "provider" and events report.',
    )
    kind = models.CharField(
        max_length=16,
        choices=[(kind, kind) for kind in KINDS],
        help_text="simulated: built-in text, no network. openai: any "
        "OpenAI-compatible Chat Completions endpoint.",
    )
    order = models.PositiveIntegerField(
        default=100,
        help_text="Lower is tried first when a request names no provider.",
    )
    enabled = models.BooleanField(
        default=True,
        help_text="Disabled providers receive no traffic and are unknown to clients.",
    )
    options = models.JSONField(
        default=dict,
        blank=True,
        help_text="Per-kind settings as a JSON object. simulated: ttft_ms, "
        "tokens_per_second, length, max_tokens, fault (none, "
        "fail_before_first_token, fail_after_tokens, hang, rate_limited, "
        "server_error, bad_request), fail_after_tokens, retry_after_seconds. "
        "openai: base_url, model, api_key_env, timeout_seconds, "
        "connect_timeout_seconds, max_tokens, max_connections.",
    )

    class Meta:
        ordering = ["order", "name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.kind})"

    def clean(self) -> None:
        try:
            self.options = clean_options(self.kind, self.options)
        except OptionsError as exc:
            field = "kind" if exc.key == "kind" else "options"
            raise ValidationError({field: str(exc)}) from exc
