"""``ApiError``: how the server's code refuses a request. It carries a core
:class:`~psik_api_core.ProblemCode` (and any HTTP headers, e.g. ``Allow`` or
``Retry-After``); ``problems`` turns it into ``application/problem+json``."""

from __future__ import annotations

from typing import Any

from psik_api_core import FieldError, Problem, ProblemCode


class ApiError(Exception):
    """An error with a problem code; the server turns it into problem+json."""

    def __init__(
        self,
        code: ProblemCode,
        detail: str,
        *,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}
        self.extensions = extensions

    def problem(self, instance: str | None = None) -> Problem:
        return Problem(
            title=self.code.problem_title,
            status=self.code.status,
            detail=self.detail,
            instance=instance,
            code=self.code.value,
            errors=self.errors,
            **self.extensions,
        )


class StartupError(Exception):
    """The server cannot start; the message names what is wrong and where
    (an unusable prefix or index), for one line on stderr instead of a traceback."""
