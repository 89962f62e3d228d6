"""shared/CASES.md C13: the provider-stream parser."""

import pytest

from llm.sse import SSEParser


def parse(pieces: list[bytes]) -> list[tuple[str, str]]:
    parser = SSEParser()
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.close()
    return [(event.event, event.data) for event in events]


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_c13_four_byte_emoji_split_one_and_three_bytes_is_reassembled() -> None:
    emoji = "🦜".encode()
    pieces = [b"data: a" + emoji[:1], emoji[1:] + b"b\n\n"]
    assert parse(pieces) == [("message", "a🦜b")]


def test_c13_cjk_character_split_two_and_one_bytes_is_reassembled() -> None:
    cjk = "漢".encode()
    pieces = [b"data: " + cjk[:2], cjk[2:] + b"\n\n"]
    result = parse(pieces)
    assert result == [("message", "漢")]
    assert "\ufffd" not in result[0][1]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7])
def test_c13_any_split_of_mixed_text_never_yields_a_replacement_character(
    size: int,
) -> None:
    text = "héllo 🦜 世界 ok"
    stream = f"data: {text}\r\n\r\ndata: second\r\r".encode()
    result = parse(split_every(stream, size))
    assert result == [("message", text), ("message", "second")]


def test_c13_crlf_and_cr_line_endings_frame_events() -> None:
    stream = b"data: one\r\n\r\ndata: two\r\rdata: three\n\n"
    assert [data for _, data in parse([stream])] == ["one", "two", "three"]


def test_c13_crlf_split_between_chunks_is_one_line_ending() -> None:
    assert parse([b"data: one\r", b"\n\r", b"\ndata: two\n\n"]) == [
        ("message", "one"),
        ("message", "two"),
    ]


def test_c13_data_without_a_space_after_the_colon() -> None:
    assert parse([b"data:x\n\n"]) == [("message", "x")]


def test_c13_two_data_lines_are_joined_by_a_newline() -> None:
    assert parse([b"data: first\ndata: second\n\n"]) == [("message", "first\nsecond")]


def test_c13_comment_lines_are_ignored() -> None:
    assert parse([b": keep-alive\n\ndata: x\n: inner\n\n"]) == [("message", "x")]


def test_c13_last_event_without_a_trailing_blank_line_is_dispatched() -> None:
    assert parse([b"data: a\n\ndata: [DONE]"]) == [
        ("message", "a"),
        ("message", "[DONE]"),
    ]


def test_event_names_and_ids_are_kept() -> None:
    parser = SSEParser()
    events = parser.feed(b"id: 7\nevent: token\ndata: {}\n\n")
    assert (events[0].event, events[0].id, events[0].data) == ("token", "7", "{}")
