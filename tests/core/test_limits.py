"""The request limits are stated in words from their numbers, so the two cannot drift."""

from __future__ import annotations

import pytest

from psik_api_core.limits import byte_size


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (1 << 20, "1 MiB"),
        (3 << 30, "3 GiB"),
        (512 << 10, "512 KiB"),
        (1536, "1536 bytes"),
        ((1 << 20) + 1, "1048577 bytes"),
        (100, "100 bytes"),
        (0, "0 bytes"),
    ],
)
def test_byte_size(n: int, text: str) -> None:
    assert byte_size(n) == text
