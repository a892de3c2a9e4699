"""The client checks a spec mapping exactly as the server will (core's
``JobSpec.validate_input``), so a value the server would refuse fails before sending."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from psik_api_client import Client, InvalidRequestError


def _never(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"nothing should be sent: {request.method} {request.url}")


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"script": "t", "resources": {"duration": "3"}}, "duration"),
        ({"script": "t", "resources": {"exclusive_node_use": 0}}, "exclusive_node_use"),
        ({"script": "t", "environment": {"A=B": "x"}}, "environment"),
        ({"script": "t", "resources": {"node_count": 2**31}}, "node_count"),
    ],
)
def test_a_spec_the_server_would_refuse_is_refused_before_sending(spec: dict[str, Any], field: str) -> None:
    with (
        Client("http://testserver", transport=httpx.MockTransport(_never)) as api,
        pytest.raises(InvalidRequestError) as caught,
    ):
        api.submit(spec)
    assert isinstance(caught.value, ValueError) and field in str(caught.value)
