"""Per-call options: what every public method accepts besides its own arguments.

As in the Stainless SDKs, ``timeout=`` and ``extra_headers=`` override the client's
settings for one call. A left-out timeout is :data:`NOT_GIVEN` (the client's default),
which is not None: ``timeout=None`` means no timeout at all, as in httpx.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

import httpx

from ._exceptions import InvalidRequestError
from ._inputs import checked_headers


class NotGiven:
    """The type of :data:`NOT_GIVEN`: an argument that was left out, where None has a
    meaning of its own."""

    def __bool__(self) -> Literal[False]:
        return False

    def __repr__(self) -> str:
        return "NOT_GIVEN"


#: The default of ``timeout=``: use the client's timeout.
NOT_GIVEN: Final = NotGiven()

#: ``timeout=``: seconds for every phase, an ``httpx.Timeout``, or None for no timeout.
TimeoutArg = float | httpx.Timeout | None


@dataclass(frozen=True)
class RequestOptions:
    """The per-call options of one public method call, applied to each of its requests."""

    timeout: TimeoutArg | NotGiven = NOT_GIVEN
    extra_headers: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        checked_headers(self.extra_headers, argument="extra_headers=")
        timeout = self.timeout
        if isinstance(timeout, NotGiven | httpx.Timeout) or timeout is None:
            return
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise InvalidRequestError(
                f"timeout= is seconds > 0, an httpx.Timeout or None (no timeout), not {timeout!r}"
            )
        if math.isinf(timeout):
            raise InvalidRequestError("timeout=inf: pass timeout=None for no timeout")

    def timeout_for(self, default: httpx.Timeout) -> httpx.Timeout:
        """The timeout of this call's requests: the one given, else ``default``."""
        return default if isinstance(self.timeout, NotGiven) else httpx.Timeout(self.timeout)


#: No per-call options: the client's own settings.
DEFAULT_OPTIONS: Final = RequestOptions()
