"""How large transfers overlap their I/O (issue 16), and that the overlap keeps the
guarantees: the server writes (and hashes) one piece of an upload while it receives the
next (:class:`WriteBehind`), in order, never more than one at a time, and nothing still
writes once the upload is closed; the client writes (and hashes) one block of a download
while it receives the next (:class:`BlockWriter`). The speed itself is for
bench/bench_transfer.py, not for a test."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from pathlib import Path

import pytest

from psik_api_client._files import _IOV_MAX, BlockWriter, write_block
from psik_api_server.http.files import WriteBehind

pytestmark = pytest.mark.anyio


class Gate:
    """A ``write`` that records its pieces, and blocks on the first until released."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.pieces: list[bytes] = []
        self.busy = 0
        self.most_busy = 0
        self._lock = threading.Lock()

    def __call__(self, piece: bytes) -> None:
        with self._lock:
            self.busy += 1
            self.most_busy = max(self.most_busy, self.busy)
        try:
            self.started.set()
            self.release.wait(10)
            self.pieces.append(piece)
        finally:
            with self._lock:
                self.busy -= 1


async def _started(gate: Gate) -> None:
    while not gate.started.is_set():
        await asyncio.to_thread(gate.started.wait, 0.1)


async def test_a_piece_is_written_while_the_next_is_received_in_order_one_at_a_time() -> None:
    gate = Gate()
    writer = WriteBehind(gate)
    await writer.put(b"a")  # returns while "a" is still being written
    await _started(gate)
    assert gate.pieces == [] and gate.busy == 1
    second = asyncio.ensure_future(writer.put(b"b"))
    await asyncio.sleep(0)
    assert not second.done()  # waits for "a": at most one piece is being written
    gate.release.set()
    await second
    await writer.put(b"c")
    await writer.drain()
    assert gate.pieces == [b"a", b"b", b"c"] and gate.most_busy == 1
    await writer.aclose()


async def test_a_write_error_is_raised_by_the_next_put_or_drain() -> None:
    def fail(piece: bytes) -> None:
        raise OSError(28, "No space left on device")

    writer = WriteBehind(fail)
    await writer.put(b"a")
    with pytest.raises(OSError, match="No space"):
        await writer.put(b"b")
    writer = WriteBehind(fail)
    await writer.put(b"a")
    with pytest.raises(OSError, match="No space"):
        await writer.drain()
    await writer.aclose()


async def test_a_cancelled_upload_waits_for_its_write_before_the_file_closes() -> None:
    """A request cancelled (its client gone) while a piece is written: aclose returns
    only once that write is over, so the upload's descriptor is never closed (and
    reused) under it; its error, if any, does not replace the cancellation."""
    gate = Gate()
    writer = WriteBehind(gate)

    async def upload() -> None:
        await writer.put(b"a")
        await writer.drain()

    task = asyncio.ensure_future(upload())
    await _started(gate)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gate.busy == 1  # the thread is still writing "a"
    closing = asyncio.ensure_future(writer.aclose())
    await asyncio.sleep(0)
    assert not closing.done()
    gate.release.set()
    await closing
    assert gate.busy == 0 and gate.pieces == [b"a"]


def test_a_block_is_written_from_its_pieces_in_order_and_hashed(tmp_path: Path) -> None:
    pieces = [os.urandom(n) for n in range(1, 2 * _IOV_MAX + 7)]  # more than one writev
    hasher = hashlib.sha256()
    with (tmp_path / "f").open("wb") as f:
        f.write(b"head")
        write_block(f, hasher, pieces)
    assert (tmp_path / "f").read_bytes() == b"head" + b"".join(pieces)
    assert hasher.hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()


def test_block_writer_appends_to_a_resumed_part_and_raises_a_write_error(tmp_path: Path) -> None:
    part = tmp_path / "f.part"
    part.write_bytes(b"0123")
    hasher = hashlib.sha256(b"0123")
    with part.open("ab") as f:
        writer = BlockWriter(f, hasher)
        writer.put([b"45", b"6"])
        writer.put([b"789"])
        writer.close()
    assert part.read_bytes() == b"0123456789"
    assert hasher.hexdigest() == hashlib.sha256(b"0123456789").hexdigest()

    with part.open("rb") as f:  # not writable: the write fails in the writer's thread
        writer = BlockWriter(f, hashlib.sha256())
        writer.put([b"x"])
        with pytest.raises(OSError):
            writer.close()
        writer.put([b"x"])
        writer.close(quiet=True)  # a flow cut short: waits, raises nothing
