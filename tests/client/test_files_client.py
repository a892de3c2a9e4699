"""Job files and logs, client side: uploads stream from disk, downloads resume and are
checked, a log follow picks up where a dropped connection left it. Each test runs on
``Client`` and ``AsyncClient`` (the ``connect`` fixture) against routes mocked with respx."""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import respx

import psik_api_client as pac
from client.fakes import T0, Api, FakeTime, problem
from psik_api_client._base import BaseClient, Disk, Flow
from psik_api_client._files import BLOCK, FileBody

pytestmark = pytest.mark.anyio

URL = "http://127.0.0.1:8000"
JOBID = "1693992878.203"
FILES = f"/v1/jobs/{JOBID}/files"
LOGS = f"/v1/jobs/{JOBID}/logs"
ETAG = '"1f-2a-1000-1700000000000000000"'


class Body(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body sent chunk by chunk, then cut with ``error`` if one is given."""

    def __init__(self, chunks: list[bytes], error: Exception | None = None) -> None:
        self.chunks, self.error, self.closed, self.sent = chunks, error, False, 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.sent += 1
            yield chunk
        if self.error is not None:
            raise self.error

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self:
            yield chunk

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


def dropped() -> httpx.ReadError:
    return httpx.ReadError("connection reset by peer")


def file_info(path: str, size: int) -> dict[str, object]:
    return {"name": path.rsplit("/", 1)[-1], "path": path, "type": "file", "size": size, "mtime": T0}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def router() -> respx.Router:
    return respx.Router(base_url=URL, assert_all_mocked=True)


@pytest.fixture
def api(connect: Callable[..., Api], router: respx.Router) -> Api:
    return connect(router.handler, base_url=URL)


# ---- upload ----


def stored(request: httpx.Request) -> httpx.Response:
    """The server's answer to an upload: 201 and what it stored."""
    path = request.url.path.removeprefix(FILES + "/")
    return httpx.Response(201, json=file_info(path, len(request.content)))


async def test_upload_streams_a_local_file(api: Api, router: respx.Router, tmp_path: Path) -> None:
    data = b"line\n" * 1000
    (tmp_path / "data.txt").write_bytes(data)
    route = router.put(f"{FILES}/in/data.txt").mock(side_effect=stored)
    info = await api.upload(JOBID, tmp_path / "data.txt", "in/data.txt")
    assert info == pac.FileInfo.model_validate(file_info("in/data.txt", len(data)))
    request = route.calls.last.request
    assert request.content == data
    assert request.headers["Content-Length"] == str(len(data))
    assert request.headers["Content-Type"] == "application/octet-stream"
    assert "If-None-Match" not in request.headers


async def test_upload_bytes_and_a_file_object_from_where_it_stands(api: Api, router: respx.Router) -> None:
    route = router.put(url__regex=rf"{FILES}/.*").mock(side_effect=stored)
    await api.upload(JOBID, b"raw bytes", "a.bin")
    assert route.calls.last.request.content == b"raw bytes"
    source = io.BytesIO(b"skip|the rest")
    source.seek(5)
    await api.upload(JOBID, source, "b.bin")
    assert route.calls.last.request.content == b"the rest"


async def test_no_overwrite_sends_if_none_match_and_maps_412(api: Api, router: respx.Router) -> None:
    route = router.put(f"{FILES}/data.txt").respond(
        412,
        json={"status": 412, "title": "x", "code": "precondition_failed", "detail": "data.txt exists"},
        headers={"Content-Type": "application/problem+json"},
    )
    with pytest.raises(pac.PreconditionFailedError, match=r"data\.txt exists"):
        await api.upload(JOBID, b"x", "data.txt", overwrite=False)
    assert route.calls.last.request.headers["If-None-Match"] == "*"
    assert route.call_count == 1  # a 412 is not retried


async def test_a_retried_upload_sends_the_whole_file_again(
    api: Api, router: respx.Router, tmp_path: Path, fake_time: FakeTime
) -> None:
    data = bytes(range(256)) * (BLOCK // 128)  # two blocks
    (tmp_path / "big").write_bytes(data)
    answers = iter([problem(503, "backend_unavailable", "busy")])
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        return next(answers, None) or stored(request)

    router.put(f"{FILES}/big").mock(side_effect=handler)
    await api.upload(JOBID, str(tmp_path / "big"), "big")
    assert bodies == [data, data]
    assert len(fake_time.sleeps) == 1


async def test_an_unreadable_or_odd_source_fails_before_any_request(
    api: Api, router: respx.Router, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError):
        await api.upload(JOBID, tmp_path / "missing", "x")
    with pytest.raises(IsADirectoryError):
        await api.upload(JOBID, tmp_path, "x")
    with pytest.raises(pac.InvalidRequestError, match="file path, bytes or a binary file object"):
        await api.upload(JOBID, 42, "x")
    assert api.requests == []


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("../scripts/run", "'..' segment"),
        ("a/./b", "'.' segment"),
        ("/etc/passwd", "absolute"),
        ("a//b", "empty"),
        ("a\\b", "backslash"),
        ("a\x00b", "NUL"),
        ("dir/", "ends with '/'"),
        ("", "a job file path is needed"),
        ("x" * 256, "longer than 255 bytes"),
    ],
)
async def test_a_path_that_could_leave_the_job_is_refused_before_sending(
    api: Api, path: str, why: str
) -> None:
    # httpx would resolve ".." itself: files/../start would reach another route.
    with pytest.raises(pac.InvalidRequestError, match=re.escape(why)):
        await api.upload(JOBID, b"x", path)
    with pytest.raises(pac.InvalidRequestError):
        await api.download(JOBID, path, "/nonexistent/never-written")
    assert api.requests == []


async def test_names_are_percent_encoded(api: Api, router: respx.Router) -> None:
    route = router.put(url__regex=rf"{FILES}/.*").mock(side_effect=stored)
    await api.upload(JOBID, b"x", "my dir/50%?#.txt")
    assert route.calls.last.request.url.raw_path == f"{FILES}/my%20dir/50%25%3F%23.txt".encode()


async def test_upload_dir_keeps_relative_paths(api: Api, router: respx.Router, tmp_path: Path) -> None:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "b.txt").write_text("b")
    (tmp_path / "in" / "a.txt").write_text("a")
    (tmp_path / "in" / "sub" / "c.txt").write_text("cc")
    route = router.put(url__regex=rf"{FILES}/.*").mock(side_effect=stored)
    infos = await api.upload_dir(JOBID, tmp_path / "in", "inputs/")
    assert [i.path for i in infos] == ["inputs/a.txt", "inputs/b.txt", "inputs/sub/c.txt"]
    assert [c.request.content for c in route.calls] == [b"a", b"b", b"cc"]
    infos = await api.upload_dir(JOBID, tmp_path / "in")
    assert [i.path for i in infos] == ["a.txt", "b.txt", "sub/c.txt"]
    with pytest.raises(NotADirectoryError):
        await api.upload_dir(JOBID, tmp_path / "in" / "a.txt")


async def test_file_body_reads_a_block_at_a_time_in_both_worlds(tmp_path: Path) -> None:
    data = b"x" * (2 * BLOCK + 10)
    (tmp_path / "f").write_bytes(data)
    body = FileBody.of_path(str(tmp_path / "f"))
    assert body.size == len(data) and body.replayable
    assert [len(b) for b in body] == [BLOCK, BLOCK, 10]
    assert [len(b) async for b in body] == [BLOCK, BLOCK, 10]


# ---- download ----


def whole(data: bytes, *, chunks: int = 1, checksum: str | None = None) -> httpx.Response:
    """A 200 answer carrying the whole file, in ``chunks`` pieces."""
    step = -(-len(data) // chunks)
    pieces = [data[i : i + step] for i in range(0, len(data), step)]
    headers = {"ETag": ETAG, "X-Checksum-Sha256": checksum or sha(data), "Accept-Ranges": "bytes"}
    return httpx.Response(200, headers=headers, stream=Body(pieces))


def cut(data: bytes, after: int) -> httpx.Response:
    """A 200 answer whose connection drops after the first ``after`` bytes."""
    headers = {"ETag": ETAG, "X-Checksum-Sha256": sha(data), "Content-Length": str(len(data))}
    return httpx.Response(200, headers=headers, stream=Body([data[:after]], dropped()))


def rest(data: bytes, start: int) -> httpx.Response:
    """A 206 answer carrying ``data[start:]``."""
    headers = {
        "ETag": ETAG,
        "X-Checksum-Sha256": sha(data),
        "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}",
    }
    return httpx.Response(206, headers=headers, stream=Body([data[start:]]))


async def test_download_writes_the_file_and_verifies_it(
    api: Api, router: respx.Router, tmp_path: Path
) -> None:
    data = b"result\n" * 5000
    route = router.get(f"{FILES}/out/result.txt").mock(return_value=whole(data, chunks=7))
    path = await api.download(JOBID, "out/result.txt", tmp_path / "result.txt")
    assert path == tmp_path / "result.txt" and path.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"]  # no .part, no .etag
    request = route.calls.last.request
    assert "Range" not in request.headers
    assert request.headers["Accept-Encoding"] == "identity"  # bytes as stored, for Range and checksum


async def test_download_into_a_directory_keeps_the_name(
    api: Api, router: respx.Router, tmp_path: Path
) -> None:
    router.get(f"{FILES}/out/result.txt").mock(return_value=whole(b"r"))
    assert await api.download(JOBID, "out/result.txt", tmp_path) == tmp_path / "result.txt"


async def test_a_dropped_download_resumes_with_range_and_if_range(
    api: Api, router: respx.Router, tmp_path: Path, fake_time: FakeTime
) -> None:
    data = bytes(range(256)) * 100
    route = router.get(f"{FILES}/big.bin").mock(side_effect=[cut(data, 1000), rest(data, 1000)])
    path = await api.download(JOBID, "big.bin", tmp_path / "big.bin")
    assert path.read_bytes() == data
    first, second = (c.request for c in route.calls)
    assert "Range" not in first.headers
    assert second.headers["Range"] == "bytes=1000-"
    assert second.headers["If-Range"] == ETAG
    assert len(fake_time.sleeps) == 1  # the retry policy's backoff
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]


async def test_a_download_cut_past_its_retries_resumes_in_the_next_call(
    connect: Callable[..., Api], router: respx.Router, tmp_path: Path
) -> None:
    api = connect(router.handler, base_url=URL, max_retries=0)
    data = b"0123456789" * 1000
    route = router.get(f"{FILES}/big.bin").mock(side_effect=[cut(data, 4000), rest(data, 4000)])
    with pytest.raises(pac.APIConnectionError, match="connection reset"):
        await api.download(JOBID, "big.bin", tmp_path / "big.bin")
    assert not (tmp_path / "big.bin").exists()
    assert (tmp_path / "big.bin.part").read_bytes() == data[:4000]
    assert (tmp_path / "big.bin.part.etag").read_text().strip() == ETAG
    path = await api.download(JOBID, "big.bin", tmp_path / "big.bin")
    assert path.read_bytes() == data
    assert route.calls.last.request.headers["Range"] == "bytes=4000-"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]


async def test_a_file_changed_since_the_part_is_downloaded_whole_again(
    api: Api, router: respx.Router, tmp_path: Path
) -> None:
    (tmp_path / "f.part").write_bytes(b"old bytes")
    (tmp_path / "f.part.etag").write_text('"old"\n')
    new = b"the new content"
    route = router.get(f"{FILES}/f").mock(return_value=whole(new))  # If-Range did not match: 200
    assert (await api.download(JOBID, "f", tmp_path / "f")).read_bytes() == new
    assert route.calls.last.request.headers["If-Range"] == '"old"'


async def test_an_unsatisfiable_range_starts_afresh(api: Api, router: respx.Router, tmp_path: Path) -> None:
    (tmp_path / "f.part").write_bytes(b"longer than the file is now")
    (tmp_path / "f.part.etag").write_text(ETAG)
    unsatisfiable = problem(
        416, "range_not_satisfiable", "no such range", headers={"Content-Range": "bytes */3"}
    )
    route = router.get(f"{FILES}/f").mock(side_effect=[unsatisfiable, whole(b"new")])
    assert (await api.download(JOBID, "f", tmp_path / "f")).read_bytes() == b"new"
    assert "Range" not in route.calls.last.request.headers


async def test_a_checksum_mismatch_raises_and_leaves_no_file(
    api: Api, router: respx.Router, tmp_path: Path
) -> None:
    router.get(f"{FILES}/out.dat").mock(return_value=whole(b"damaged", checksum=sha(b"original")))
    with pytest.raises(pac.ChecksumMismatchError) as info:
        await api.download(JOBID, "out.dat", tmp_path / "out.dat")
    assert (info.value.expected, info.value.actual, info.value.path) == (
        sha(b"original"),
        sha(b"damaged"),
        "out.dat",
    )
    assert "out.dat" in str(info.value) and "download it again" in str(info.value)
    assert list(tmp_path.iterdir()) == []


async def test_a_resumed_download_checks_the_whole_file(
    api: Api, router: respx.Router, tmp_path: Path
) -> None:
    data = b"abcdefghij" * 100
    (tmp_path / "f.part").write_bytes(b"X" * 300)  # not what the server has
    (tmp_path / "f.part.etag").write_text(ETAG)
    router.get(f"{FILES}/f").mock(return_value=rest(data, 300))
    with pytest.raises(pac.ChecksumMismatchError):
        await api.download(JOBID, "f", tmp_path / "f")
    assert list(tmp_path.iterdir()) == []


async def test_a_missing_file_is_not_found_and_writes_nothing(
    api: Api, router: respx.Router, tmp_path: Path
) -> None:
    router.get(f"{FILES}/nope").mock(return_value=problem(404, "not_found", "job has no file nope"))
    with pytest.raises(pac.NotFoundError, match="no file nope"):
        await api.download(JOBID, "nope", tmp_path / "nope")
    assert list(tmp_path.iterdir()) == []


# ---- list and delete ----


async def test_list_files(api: Api, router: respx.Router) -> None:
    listing = {"path": "out", "entries": [file_info("out/a", 1), file_info("out/b", 2)], "extra": 1}
    route = router.get(f"{FILES}/out").respond(200, json=listing)
    got = await api.list_files(JOBID, "out", recursive=True)
    assert [e.path for e in got.entries] == ["out/a", "out/b"] and not got.truncated
    assert route.calls.last.request.url.params["recursive"] == "true"
    router.get(FILES).respond(200, json={"path": "", "entries": [], "truncated": True})
    assert (await api.list_files(JOBID)).truncated
    assert "recursive" not in router.calls.last.request.url.params


async def test_listing_a_file_lists_that_file_without_reading_it(api: Api, router: respx.Router) -> None:
    body = Body([b"x" * 10])
    headers = {
        "Content-Type": "application/octet-stream",
        "Content-Length": "10",
        "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT",
    }
    router.get(f"{FILES}/out/a.txt").mock(return_value=httpx.Response(200, headers=headers, stream=body))
    got = await api.list_files(JOBID, "out/a.txt")
    assert [(e.name, e.path, e.type, e.size) for e in got.entries] == [("a.txt", "out/a.txt", "file", 10)]
    assert body.sent == 0 and body.closed


async def test_delete_file(api: Api, router: respx.Router) -> None:
    route = router.delete(f"{FILES}/out").respond(204)
    assert await api.delete_file(JOBID, "out", recursive=True) is None
    assert route.calls.last.request.url.params["recursive"] == "true"
    router.delete(f"{FILES}/out/").mock(return_value=problem(409, "conflict", "out is a directory"))
    with pytest.raises(pac.ConflictError, match="is a directory"):
        await api.delete_file(JOBID, "out/")


# ---- logs ----


async def test_logs_and_read_log(api: Api, router: respx.Router) -> None:
    router.get(LOGS).respond(200, json={"stdout.1": "hello\n", "stderr.1": ""})
    assert await api.logs(JOBID) == {"stdout.1": "hello\n", "stderr.1": ""}
    route = router.get(f"{LOGS}/stdout").respond(200, content=b"\xff\xfebinary\n")
    assert await api.read_log(JOBID, "stdout") == b"\xff\xfebinary\n"
    assert await api.read_log(JOBID, "stdout", tail=3) == b"\xff\xfebinary\n"
    assert dict(route.calls.last.request.url.params) == {"tail": "3"}
    await api.read_log(JOBID, "stdout", offset=10)
    assert dict(route.calls.last.request.url.params) == {"offset": "10"}


@pytest.mark.parametrize(
    ("name", "kwargs", "why"),
    [
        ("../status.csv", {}, "not a log name"),
        ("stdout.x", {}, "not a log name"),
        ("stdout", {"tail": 1, "offset": 2}, "not both"),
        ("stdout", {"tail": 0}, "tail= is an integer >= 1"),
        ("stdout", {"offset": -1}, "offset= is an integer >= 0"),
    ],
)
async def test_bad_log_reads_are_refused_before_sending(
    api: Api, name: str, kwargs: dict[str, int], why: str
) -> None:
    with pytest.raises(pac.InvalidRequestError, match=why):
        await api.read_log(JOBID, name, **kwargs)
    with pytest.raises(pac.InvalidRequestError, match=why):
        await api.follow_log(JOBID, name, **kwargs)
    assert api.requests == []


def follow_answer(chunks: list[bytes], *, drop: bool = False) -> httpx.Response:
    return httpx.Response(
        200, headers={"Content-Type": "text/plain"}, stream=Body(chunks, dropped() if drop else None)
    )


async def test_follow_log_reconnects_from_the_last_offset(
    api: Api, router: respx.Router, fake_time: FakeTime
) -> None:
    route = router.get(f"{LOGS}/stdout").mock(
        side_effect=[
            follow_answer([b"one\n", b"two\n"], drop=True),
            follow_answer([b"thr"], drop=True),
            follow_answer([b"ee\n"]),
        ]
    )
    assert await api.follow_log(JOBID, "stdout", offset=5) == [b"one\n", b"two\n", b"thr", b"ee\n"]
    params = [dict(c.request.url.params) for c in route.calls]
    assert params == [
        {"offset": "5", "follow": "true"},
        {"offset": "13", "follow": "true"},
        {"offset": "16", "follow": "true"},
    ]
    assert len(fake_time.sleeps) == 2


async def test_follow_log_gives_up_on_a_link_that_stays_down(
    api: Api, router: respx.Router, fake_time: FakeTime
) -> None:
    router.get(f"{LOGS}/stdout").mock(
        side_effect=[follow_answer([b"a"], drop=True)] + [follow_answer([], drop=True)] * 3
    )
    with pytest.raises(pac.APIConnectionError, match="connection reset"):
        await api.follow_log(JOBID, "stdout")
    # The first, then max_retries (2) counted from the last bytes that arrived.
    assert [r.url.params["offset"] for r in api.requests] == ["0", "1", "1"]
    assert len(fake_time.sleeps) == 2


async def test_follow_log_with_tail_reads_the_end_then_follows_from_it(
    api: Api, router: respx.Router
) -> None:
    tail = httpx.Response(200, headers={"X-Log-Size": "100", "Content-Length": "6"}, content=b"last\n\n")
    route = router.get(f"{LOGS}/stderr.2").mock(side_effect=[tail, follow_answer([b"new\n"])])
    assert await api.follow_log(JOBID, "stderr.2", tail=2) == [b"last\n\n", b"new\n"]
    params = [dict(c.request.url.params) for c in route.calls]
    assert params == [{"tail": "2"}, {"offset": "100", "follow": "true"}]


async def test_follow_log_with_tail_of_a_log_not_written_yet_follows_it_from_the_start(
    api: Api, router: respx.Router
) -> None:
    missing = problem(404, "not_found", "job has no log stdout.1")
    route = router.get(f"{LOGS}/stdout").mock(side_effect=[missing, follow_answer([b"hi\n"])])
    assert await api.follow_log(JOBID, "stdout", tail=10) == [b"hi\n"]
    assert dict(route.calls.last.request.url.params) == {"offset": "0", "follow": "true"}


async def test_follow_log_waits_without_a_read_timeout_unless_told(api: Api, router: respx.Router) -> None:
    router.get(f"{LOGS}/stdout").mock(side_effect=lambda request: follow_answer([b"x"]))
    await api.follow_log(JOBID, "stdout")
    assert api.requests[-1].extensions["timeout"]["read"] is None
    assert api.requests[-1].extensions["timeout"]["connect"] == 5.0
    await api.follow_log(JOBID, "stdout", timeout=7)
    assert api.requests[-1].extensions["timeout"]["read"] == 7


async def test_stopping_a_follow_early_closes_it(api: Api, router: respx.Router) -> None:
    body = Body([b"a", b"b", b"c"])
    router.get(f"{LOGS}/console").mock(return_value=httpx.Response(200, stream=body))
    got = []
    if api.is_async:
        assert isinstance(api.client, pac.AsyncClient)
        async with contextlib.aclosing(api.client.follow_log(JOBID, "console")) as achunks:
            async for chunk in achunks:
                got.append(chunk)
                break
    else:
        assert isinstance(api.client, pac.Client)
        with contextlib.closing(api.client.follow_log(JOBID, "console")) as chunks:
            for chunk in chunks:
                got.append(chunk)
                break
    assert got == [b"a"] and body.closed


# ---- the file steps ----


def thread_flow(client: BaseClient) -> Flow[int]:
    ident = yield Disk(threading.get_ident)
    assert isinstance(ident, int)
    return ident


async def test_disk_steps_run_off_the_event_loop_in_the_async_client(api: Api) -> None:
    ident = await api._drive(thread_flow(api.client))
    if api.is_async:
        assert ident != threading.get_ident()  # a worker thread: the loop never waits on a disk
    else:
        assert ident == threading.get_ident()


async def test_a_failing_disk_step_reaches_the_caller_and_closes_the_streams(
    api: Api, router: respx.Router, tmp_path: Path
) -> None:
    body = Body([b"data"])
    router.get(f"{FILES}/f").mock(return_value=httpx.Response(200, stream=body))
    with pytest.raises(FileNotFoundError):
        await api.download(JOBID, "f", tmp_path / "no-such-dir" / "f")
    assert body.closed


# ---- a download without a checksum (a large file the server has not hashed yet) ----


def unhashed(data: bytes, *, length: int | None = None, status: int = 200, start: int = 0) -> httpx.Response:
    """An answer without X-Checksum-Sha256: the server sends one only once it has it."""
    headers = {"ETag": ETAG, "Content-Length": str(len(data) - start if length is None else length)}
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data) if length is None else length}"
    return httpx.Response(status, headers=headers, stream=Body([data[start:]]))


async def test_a_download_without_a_checksum_is_checked_by_its_size(
    api: Api, router: respx.Router, tmp_path: Path
) -> None:
    data = b"big\n" * 1000
    router.get(f"{FILES}/ok.bin").mock(return_value=unhashed(data))
    assert (await api.download(JOBID, "ok.bin", tmp_path / "ok.bin")).read_bytes() == data
    router.get(f"{FILES}/short.bin").mock(return_value=unhashed(data, length=len(data) + 10))
    with pytest.raises(pac.ChecksumMismatchError, match=f"{len(data)} bytes.*{len(data) + 10}"):
        await api.download(JOBID, "short.bin", tmp_path / "short.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.bin"]


async def test_a_resumed_download_without_a_checksum_is_checked_by_the_whole_size(
    api: Api, router: respx.Router, tmp_path: Path
) -> None:
    data = b"0123456789" * 100
    (tmp_path / "f.part").write_bytes(data[:300])
    (tmp_path / "f.part.etag").write_text(ETAG)
    router.get(f"{FILES}/f").mock(return_value=unhashed(data, status=206, start=300))
    assert (await api.download(JOBID, "f", tmp_path / "f")).read_bytes() == data
    (tmp_path / "g.part").write_bytes(data[:300])
    (tmp_path / "g.part.etag").write_text(ETAG)
    router.get(f"{FILES}/g").mock(return_value=unhashed(data, status=206, start=300, length=2000))
    with pytest.raises(pac.ChecksumMismatchError):
        await api.download(JOBID, "g", tmp_path / "g")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


# ---- a directory is not downloaded ----


def listing(path: str, *, marked: bool = True) -> httpx.Response:
    """A directory's answer: its listing, as JSON (marked ``X-File-Type: dir``, or not:
    an older server)."""
    headers = {"X-File-Type": "dir"} if marked else {}
    entries = [file_info(f"{path}/a.txt", 3)]
    return httpx.Response(200, headers=headers, json={"path": path, "entries": entries, "truncated": False})


@pytest.mark.parametrize("marked", [True, False])
async def test_downloading_a_directory_is_refused_and_writes_nothing(
    api: Api, router: respx.Router, tmp_path: Path, marked: bool
) -> None:
    router.get(f"{FILES}/out").mock(return_value=listing("out", marked=marked))
    with pytest.raises(pac.InvalidRequestError, match="'out' is a directory") as info:
        await api.download(JOBID, "out", tmp_path / "out")
    assert "list_files" in str(info.value)
    with pytest.raises(pac.InvalidRequestError, match="is a directory"):
        await api.download(JOBID, "out", tmp_path)
    assert list(tmp_path.iterdir()) == []
