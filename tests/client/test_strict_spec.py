"""The client checks a spec mapping exactly as the server will (core's
``JobSpec.validate_input``), so a value the server would refuse fails before sending."""

from __future__ import annotations

from typing import Any

import httpx
import pydantic
import pytest

from psik_api_client import Client, InvalidRequestError
from psik_api_core import JobSpec


def _never(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"nothing should be sent: {request.method} {request.url}")


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"script": "t", "resources": {"duration": "3"}}, "duration"),
        ({"script": "t", "resources": {"exclusive_node_use": 0}}, "exclusive_node_use"),
        ({"script": "t", "environment": {"A=B": "x"}}, "environment"),
        ({"script": "t", "resources": {"node_count": 2**31}}, "node_count"),
        ({"script": "t", "resources": {"duration": 10**5000}}, "duration"),
        # What reaches a filesystem call, a command line or a request line, as the server.
        ({"script": "t", "directory": "/tmp/a\x00b"}, "directory"),
        ({"script": "t", "callback": "http://127.0.0.1:9/\r\nX-Injected: 1"}, "callback"),
        ({"script": "t", "name": "a\x00"}, "name"),
        ({"script": "t\x00"}, "script"),
        # A lone surrogate is no character: it cannot be sent as UTF-8, nor stored.
        ({"script": "t", "name": "\ud800"}, "name"),
        ({"script": "t\udc00"}, "script"),
        ({"script": "t", "directory": "/tmp/\ud800"}, "directory"),
        ({"script": "t", "environment": {"A": "\ud800"}}, "environment"),
        ({"script": "t", "attributes": {"\ud800": "x"}}, "attributes"),
        ({"script": "t", "cb_secret": "\ud800"}, "cb_secret"),
    ],
)
def test_a_spec_the_server_would_refuse_is_refused_before_sending(spec: dict[str, Any], field: str) -> None:
    with (
        Client("http://testserver", transport=httpx.MockTransport(_never)) as api,
        pytest.raises(InvalidRequestError) as caught,
    ):
        api.submit(spec)
    assert isinstance(caught.value, ValueError) and field in str(caught.value)


@pytest.mark.parametrize(
    ("text", "loc", "kind"),
    [
        (b'\xef\xbb\xbf{"script": "t"}', (), "json_invalid"),
        (b'{"script": NaN}', (), "json_invalid"),
        (b'{"script": "t", "script": "u"}', ("script",), "value_error"),
        (
            b'{"script": "t", "resources": {"duration": ' + b"9" * 4301 + b"}}",
            ("resources", "duration"),
            "value_error",
        ),
        (b'{"script": "t", "name": "\\ud800"}', ("name",), "value_error"),
        (b'{"script": "t", "directory": "/a\\u0000b"}', ("directory",), "value_error"),
        (b"[]", (), "value_error"),
    ],
)
def test_json_text_is_checked_with_the_servers_parser(text: bytes, loc: tuple[str, ...], kind: str) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        JobSpec.validate_input(text)
    (error,) = caught.value.errors()
    assert (error["loc"], error["type"]) == (loc, kind)
