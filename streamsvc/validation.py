"""Turn a stream request's body into a ``ChatRequest``, or say what is wrong."""

import json
from typing import Any

from llm.base import ChatRequest, Message
from resilience.policies import ProviderEntry, Snapshot

from .errors import ApiError

ROLES = ("system", "user", "assistant")
FIELDS = frozenset({"messages", "provider", "model", "max_tokens"})


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def check_content_type(content_type: str) -> None:
    """Refuse anything that does not say it is JSON."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/json, got {media or 'none'!r}",
        )


def parse_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise invalid("body must be a JSON object")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise invalid(f"unknown field(s): {', '.join(unknown)}")
    return data


def parse_messages(raw: Any, max_chars: int) -> tuple[Message, ...]:
    if not isinstance(raw, list) or not raw:
        raise invalid("messages must be a non-empty list")
    messages = []
    total = 0
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or set(item) != {"role", "content"}:
            raise invalid(f"messages[{index}] must be an object with role and content")
        role, content = item["role"], item["content"]
        if role not in ROLES:
            raise invalid(f"messages[{index}].role must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise invalid(f"messages[{index}].content must be a string")
        total += len(content)
        messages.append(Message(role, content))
    if not any(m.content.strip() for m in messages):
        raise invalid("messages are all empty")
    if total > max_chars:
        raise ApiError(
            413,
            "payload_too_large",
            f"messages hold {total} characters; the limit is {max_chars}",
        )
    return tuple(messages)


def choose_provider(raw: Any, snapshot: Snapshot) -> ProviderEntry:
    if raw is not None and not isinstance(raw, str):
        raise invalid("provider must be a string")
    if raw is None:
        enabled = snapshot.enabled_providers()
        if not enabled:
            raise ApiError(503, "provider_unavailable", "no provider is enabled")
        return enabled[0]
    entry = snapshot.provider(raw)
    if entry is None:
        raise ApiError(404, "unknown_provider", f"no enabled provider named {raw!r}")
    return entry


def parse_max_tokens(raw: Any, limit: int) -> int | None:
    if raw is None:
        return None
    if not isinstance(raw, int) or isinstance(raw, bool):
        raise invalid("max_tokens must be an integer")
    if raw < 1 or raw > limit:
        raise invalid(f"max_tokens must be between 1 and {limit} for this provider")
    return raw


def parse_chat_request(
    body: bytes, snapshot: Snapshot, max_chars: int
) -> tuple[ChatRequest, ProviderEntry]:
    """Return the request and the provider it asks for, or raise ``ApiError``."""
    data = parse_body(body)
    messages = parse_messages(data.get("messages"), max_chars)
    entry = choose_provider(data.get("provider"), snapshot)
    model = data.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise invalid("model must be a non-empty string")
    max_tokens = parse_max_tokens(
        data.get("max_tokens"), entry.adapter.max_tokens_limit
    )
    return ChatRequest(messages, model, max_tokens), entry
