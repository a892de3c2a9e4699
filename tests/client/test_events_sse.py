"""The SSE parser: messages as the WHATWG standard reads them, whatever the chunking."""

from __future__ import annotations

import pytest

from psik_api_client._sse import ServerSentEvent, SSEParser

FRAMES = (
    "retry: 1000\n\n"
    ": heartbeat\n\n"
    'id: 7\nevent: status\ndata: {"a": 1}\n\n'
    "data: two\ndata: lines\n\n"
    ": dropped: subscriber too slow, resume with Last-Event-ID\n"
)
EXPECTED = [
    ServerSentEvent("status", '{"a": 1}', "7"),
    ServerSentEvent("message", "two\nlines", "7"),  # the id stays until replaced
]


def feed_all(parser: SSEParser, chunks: list[bytes]) -> list[ServerSentEvent]:
    return [message for chunk in chunks for message in parser.feed(chunk)]


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_messages_survive_any_chunking_and_line_ending(eol: str, size: int) -> None:
    body = FRAMES.replace("\n", eol).encode()
    parser = SSEParser()
    got = feed_all(parser, [body[i : i + size] for i in range(0, len(body), size)])
    assert got == EXPECTED
    assert parser.retry == 1000
    assert parser.comment == "dropped: subscriber too slow, resume with Last-Event-ID"


def test_a_cr_lf_split_across_chunks_is_one_line_end() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: x\r") == []
    assert parser.feed(b"\n\r") == [ServerSentEvent("message", "x", None)]
    assert parser.feed(b"\ndata: y\r\n\r\n") == [ServerSentEvent("message", "y", None)]


def test_a_utf8_character_split_across_chunks_is_put_back_together() -> None:
    body = "data: café ☃\n\n".encode()
    cut = body.index("☃".encode()) + 1
    parser = SSEParser()
    assert parser.feed(body[:cut]) == []
    assert parser.feed(body[cut:]) == [ServerSentEvent("message", "café ☃", None)]


def test_leading_bom_unknown_fields_and_empty_messages_are_ignored() -> None:
    parser = SSEParser()
    got = parser.feed(b"\xef\xbb\xbfdata: a\n\nevent: x\n\nfoo: bar\nretry: soon\ndata\n\n")
    assert got == [ServerSentEvent("message", "a", None), ServerSentEvent("message", "", None)]
    assert parser.retry is None


def test_field_values_lose_one_leading_space_only() -> None:
    parser = SSEParser()
    assert parser.feed(b"data:no space\ndata:  two\nid:3\n\n") == [
        ServerSentEvent("message", "no space\n two", "3")
    ]


def test_an_unfinished_message_is_not_dispatched() -> None:
    parser = SSEParser()
    assert parser.feed(b"id: 1\ndata: half") == []
