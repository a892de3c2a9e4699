"""A job's files (its working directory), blocking: callers run these in worker threads.

The one name the routes and :class:`.files_service.FileService` use for them; each idea
lives in its own module:

* :mod:`.jobpaths`: which paths a request may name, the job's root, and the walk from it
  with ``O_NOFOLLOW`` that no symlink swapped in can lead out of (the security core,
  read it first); opening and listing what is there;
* :mod:`.writes`: atomic uploads and deletes, through that walk;
* :mod:`.preconditions`: ETag and Last-Modified, ``If-Match`` and ``If-None-Match``;
* :mod:`.ranges`: the ``Range`` of a download;
* :mod:`.checksums`: the SHA-256 cache and its background hashing.
"""

from __future__ import annotations

from .checksums import ChecksumCache
from .jobpaths import (
    CHUNK,
    MAX_DEPTH,
    MAX_PATH,
    MAX_SEGMENT,
    TEMP_PREFIX,
    Made,
    NotADirectory,
    Root,
    file_info,
    invalid,
    joined,
    leaves_root,
    list_dir,
    not_found,
    open_entry,
    open_root,
    resolve,
    split_path,
    split_raw_path,
    walk,
)
from .preconditions import Preconditions, etag, exists_already, last_modified, precondition_failed
from .ranges import Unsatisfiable, parse_range
from .writes import Upload, begin_upload, current_stat, delete

__all__ = [
    "CHUNK",
    "MAX_DEPTH",
    "MAX_PATH",
    "MAX_SEGMENT",
    "TEMP_PREFIX",
    "ChecksumCache",
    "Made",
    "NotADirectory",
    "Preconditions",
    "Root",
    "Unsatisfiable",
    "Upload",
    "begin_upload",
    "current_stat",
    "delete",
    "etag",
    "exists_already",
    "file_info",
    "invalid",
    "joined",
    "last_modified",
    "leaves_root",
    "list_dir",
    "not_found",
    "open_entry",
    "open_root",
    "parse_range",
    "precondition_failed",
    "resolve",
    "split_path",
    "split_raw_path",
    "walk",
]
