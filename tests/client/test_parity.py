"""``Client`` and ``AsyncClient`` are one API in two bodies: the same public methods,
with the same parameters, each awaited (or async-iterated) where the sync one returns."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

from psik_api_client import NOT_GIVEN, AsyncClient, Client
from psik_api_client._base import BaseClient

#: The one name that differs, as in httpx: ``close`` is ``aclose`` in the async body.
RENAMED = {"close": "aclose"}


def public_methods(cls: type) -> dict[str, Callable[..., Any]]:
    return {
        name: member
        for name, member in vars(cls).items()
        if not name.startswith("_") and inspect.isfunction(member)
    }


SYNC = public_methods(Client)
ASYNC = public_methods(AsyncClient)


def shape(func: Callable[..., Any]) -> list[tuple[str, Any, Any, Any]]:
    """Each parameter's name, kind, default and annotation (a string: annotations are
    postponed in the client's modules)."""
    return [(p.name, p.kind, p.default, p.annotation) for p in inspect.signature(func).parameters.values()]


def test_the_same_public_methods() -> None:
    assert sorted(RENAMED.get(name, name) for name in SYNC) == sorted(ASYNC)


@pytest.mark.parametrize("name", sorted(SYNC))
def test_the_same_parameters(name: str) -> None:
    sync, async_ = SYNC[name], ASYNC[RENAMED.get(name, name)]
    assert shape(sync) == shape(async_)
    returns = inspect.signature(sync).return_annotation
    async_returns = inspect.signature(async_).return_annotation
    assert not inspect.iscoroutinefunction(sync)
    if returns.startswith("Iterator["):
        # An iterator in one body is an async iterator in the other, not a coroutine.
        assert not inspect.iscoroutinefunction(async_)
        assert async_returns == "Async" + returns
    else:
        assert inspect.iscoroutinefunction(async_)
        assert async_returns == returns


def test_the_same_constructor() -> None:
    sync = [(p.name, p.kind, p.default) for p in inspect.signature(Client.__init__).parameters.values()]
    async_ = [
        (p.name, p.kind, p.default) for p in inspect.signature(AsyncClient.__init__).parameters.values()
    ]
    assert sync == async_


@pytest.mark.parametrize("name", sorted(set(SYNC) - set(RENAMED)))
def test_every_operation_takes_the_per_call_options(name: str) -> None:
    params = inspect.signature(SYNC[name]).parameters
    # wait/wait_all: ``timeout`` is how long to wait, so the request timeout is renamed.
    timeout = params.get("request_timeout") or params["timeout"]
    if name not in ("wait", "wait_all"):
        assert timeout.name == "timeout"
    assert timeout.kind is inspect.Parameter.KEYWORD_ONLY
    assert timeout.default is NOT_GIVEN
    assert params["extra_headers"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["extra_headers"].default is None


@pytest.mark.parametrize("cls", [Client, AsyncClient, BaseClient])
def test_every_public_name_has_a_docstring(cls: type) -> None:
    assert cls.__doc__
    for name, member in vars(cls).items():
        if not name.startswith("_") and (inspect.isfunction(member) or isinstance(member, property)):
            assert member.__doc__, f"{cls.__name__}.{name}"


#: Job files and logs (issue 7): each written once as a flow, on both clients.
FILES_AND_LOGS = [
    "upload",
    "upload_dir",
    "download",
    "list_files",
    "delete_file",
    "logs",
    "read_log",
    "follow_log",
]


@pytest.mark.parametrize("name", FILES_AND_LOGS)
def test_the_file_and_log_methods_are_on_both_clients(name: str) -> None:
    assert name in SYNC and name in ASYNC
    # One flow builds the requests of both: neither body holds the logic.
    assert "_flow(" in inspect.getsource(SYNC[name]) and "_flow(" in inspect.getsource(ASYNC[name])


def test_follow_log_is_an_iterator_in_both_worlds() -> None:
    assert inspect.signature(SYNC["follow_log"]).return_annotation == "Iterator[bytes]"
    assert inspect.signature(ASYNC["follow_log"]).return_annotation == "AsyncIterator[bytes]"
    assert not inspect.iscoroutinefunction(ASYNC["follow_log"])


@pytest.mark.parametrize("name", ["token", "token_key"])
def test_the_token_methods_are_on_both_clients(name: str) -> None:
    assert name in SYNC and name in ASYNC
    assert "_flow(" in inspect.getsource(SYNC[name]) and "_flow(" in inspect.getsource(ASYNC[name])


@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_both_clients_take_a_token_and_a_certified_identity(cls: type) -> None:
    params = inspect.signature(cls.__init__).parameters
    for name in ("token", "cert_dir"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[name].default is None
