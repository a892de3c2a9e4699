"""SHA-256 of a job's files for the ``X-Checksum-Sha256`` of a download: cached by
version, hashed in the background when a file is too large to hash while its download
waits."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict, deque

from .paths import CHUNK

_logger = logging.getLogger(__name__)


class ChecksumCache:
    """SHA-256 of whole files, by (device, inode, size, mtime, ctime): a file that did
    not change is hashed once. Bounded (least recently used goes); thread-safe.

    A file too large to hash while its download waits is hashed by :meth:`hash_later`,
    in at most ``workers`` background threads with at most ``backlog`` files waiting:
    however many downloads ask, a version of a file is hashed once, and a file that
    keeps changing costs no more than those threads."""

    def __init__(self, size: int = 256, *, workers: int = 2, backlog: int = 8) -> None:
        self.size = size
        self.workers = workers
        self.backlog = backlog
        self._items: OrderedDict[tuple[int, ...], str] = OrderedDict()
        self._lock = threading.Lock()
        self._queue: deque[tuple[int, os.stat_result]] = deque()
        self._pending: set[tuple[int, ...]] = set()  # queued or being hashed
        self._running = 0

    @staticmethod
    def key(st: os.stat_result) -> tuple[int, ...]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def get(self, st: os.stat_result) -> str | None:
        with self._lock:
            key = self.key(st)
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, st: os.stat_result, digest: str) -> None:
        with self._lock:
            self._items[self.key(st)] = digest
            self._items.move_to_end(self.key(st))
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def checksum(self, fd: int, st: os.stat_result) -> str:
        """The SHA-256 (hex) of the first ``st.st_size`` bytes of ``fd``."""
        cached = self.get(st)
        if cached is not None:
            return cached
        h = hashlib.sha256()
        pos = 0
        while pos < st.st_size:
            chunk = os.pread(fd, min(CHUNK, st.st_size - pos), pos)
            if not chunk:
                break
            h.update(chunk)
            pos += len(chunk)
        digest = h.hexdigest()
        if os.fstat(fd).st_mtime_ns == st.st_mtime_ns:  # not written while we read
            self.put(st, digest)
        return digest

    def hash_later(self, fd: int, st: os.stat_result) -> None:
        """Have the file ``fd`` (as ``st`` saw it) hashed in the background, for the
        downloads after this one; nothing if it is hashed, queued already, or the
        backlog is full (a later download asks again)."""
        key = self.key(st)
        with self._lock:
            if key in self._items or key in self._pending or len(self._pending) >= self.backlog:
                return
            self._pending.add(key)
            self._queue.append((os.dup(fd), st))  # the download closes its own
            if self._running >= self.workers:
                return
            self._running += 1
        # Daemon threads that end when the queue is empty: nothing to stop, nothing idle.
        threading.Thread(target=self._work, name="psik-api-sha256", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._running -= 1
                    return
                fd, st = self._queue.popleft()
            try:
                self.checksum(fd, st)
            except Exception:  # the worker must go on (and be counted) whatever happened
                _logger.exception("cannot hash a job's file in the background")
            finally:
                os.close(fd)
                with self._lock:
                    self._pending.discard(self.key(st))
