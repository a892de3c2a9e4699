"""Query parameters of ``GET /v1/jobs`` and the state of a walk over its pages.

The walk does no I/O: the clients ask :meth:`Pager.next_params` for the next
request's parameters and hand each page back to :meth:`Pager.take`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from psik_api_core import LIMITS, JobState, JobSummary, Page
from psik_api_core.models import LABEL_KEY_PATTERN

from ._exceptions import InvalidRequestError
from ._inputs import path_group, path_jobid

#: ``state=`` accepts one state or several (sent as a repeated query parameter).
StateFilter = JobState | str | Iterable[JobState | str] | None

Params = list[tuple[str, str]]

#: ``label=``: ``{"key": "value"}``, or ``"key=value"`` texts (one, or several); a job
#: must have every one.
LabelFilter = Mapping[str, str] | Iterable[str] | str | None

_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)


def label_params(label: LabelFilter) -> Params:
    """``label=`` as ``label=key=value`` parameters, each checked as the server checks it."""
    if label is None:
        return []
    if isinstance(label, Mapping):
        pairs = [(key, value) for key, value in label.items()]
    else:
        texts = [label] if isinstance(label, str) else list(label)
        pairs = []
        for text in texts:
            if not isinstance(text, str) or "=" not in text:
                raise InvalidRequestError(f"a label filter is 'key=value', not {text!r}")
            key, _, value = text.partition("=")
            pairs.append((key, value))
    for key, value in pairs:
        if not (isinstance(key, str) and _LABEL_KEY.fullmatch(key)):
            raise InvalidRequestError(
                f"not a label key: {key!r} (a letter or digit, then up to 62 of letters, digits and ._/-)"
            )
        if not isinstance(value, str):
            raise InvalidRequestError(f"label {key!r}: its value is a str, not {type(value).__name__}")
    if len(pairs) > LIMITS.max_labels:
        raise InvalidRequestError(f"a list filters by at most {LIMITS.max_labels} labels, not {len(pairs)}")
    return [("label", f"{key}={value}") for key, value in pairs]


def job_query(
    *,
    state: StateFilter = None,
    backend: str | None = None,
    name: str | None = None,
    ids: Iterable[str] | None = None,
    label: LabelFilter = None,
    group: str | None = None,
) -> Params:
    """The filter parameters of a job list, in the order the server documents them."""
    params: Params = []
    if state is not None:
        states = [state] if isinstance(state, str) else list(state)
        # JobState is a str enum; send its value, not "JobState.failed".
        params += [("state", s.value if isinstance(s, JobState) else s) for s in states]
    if backend is not None:
        params.append(("backend", backend))
    if name is not None:
        params.append(("name", name))
    if ids is not None:
        if isinstance(ids, str):  # one id is not an iterable of one-character ids
            raise InvalidRequestError(f"ids= takes a list of job ids, not the string {ids!r}")
        # Checked as a path id is: the server refuses a list with a malformed one.
        id_params = [("id", path_jobid(jobid)) for jobid in ids]
        if len(id_params) > LIMITS.max_ids:
            raise InvalidRequestError(
                f"a list filters by at most {LIMITS.max_ids} ids, not {len(id_params)} "
                "(wait_all splits longer lists for you)"
            )
        params += id_params
    params += label_params(label)
    if group is not None:
        params.append(("group", path_group(group)))
    return params


def page_params(params: Params, *, limit: int | None, cursor: str | None) -> Params:
    """``params`` plus the paging parameters of one request."""
    largest = LIMITS.max_page_size
    if limit is not None and not (isinstance(limit, int) and 1 <= limit <= largest):
        raise InvalidRequestError(f"a page holds 1 to {largest} items, not {limit!r}")
    extra: Params = []
    if limit is not None:
        extra.append(("limit", str(limit)))
    if cursor is not None:
        extra.append(("cursor", cursor))
    return params + extra


class Pager:
    """Follows ``next_cursor`` from page to page, stopping after ``limit`` items in
    total (None: all of them) or when the server says there is no next page."""

    def __init__(self, params: Params, *, limit: int | None, page_size: int) -> None:
        if limit is not None and not (isinstance(limit, int) and limit >= 0):
            raise InvalidRequestError(f"limit must be an int >= 0, not {limit!r}")
        page_params(params, limit=page_size, cursor=None)  # validates page_size early
        self._params = params
        self._remaining = limit
        self._page_size = page_size
        self._cursor: str | None = None
        self._done = False

    def next_params(self) -> Params | None:
        """Parameters of the next request, or None when the walk is over."""
        if self._done or self._remaining == 0:
            return None
        size = self._page_size
        if self._remaining is not None:
            size = min(size, self._remaining)
        return page_params(self._params, limit=size, cursor=self._cursor)

    def take(self, page: Page[JobSummary]) -> list[JobSummary]:
        """Record ``page`` and return the items of it that belong to the walk."""
        items = page.items
        if self._remaining is not None:
            items = items[: self._remaining]
            self._remaining -= len(items)
        # A cursor that does not move would loop forever: treat it as the end.
        self._done = page.next_cursor is None or page.next_cursor == self._cursor
        self._cursor = page.next_cursor
        return items
