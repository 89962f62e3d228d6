"""The one interface every provider adapter implements."""

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class ChatRequest:
    """What a caller asks of a provider; ``model`` None means its default."""

    messages: tuple[Message, ...]
    model: str | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True)
class TextDelta:
    """A piece of the answer's text, never empty."""

    text: str


@dataclass(frozen=True)
class Finish:
    """The last item of every successful stream."""

    finish_reason: str
    usage: Usage = field(default_factory=Usage)


StreamItem = TextDelta | Finish


class ChatProvider(Protocol):
    """A configured provider that can stream an answer.

    ``stream`` returns an async generator of ``TextDelta`` items followed by
    exactly one ``Finish``; it raises ``LLMError`` on failure. Closing the
    generator early (``aclose``) closes the upstream connection.
    """

    name: str
    default_model: str
    max_tokens_limit: int

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]: ...
