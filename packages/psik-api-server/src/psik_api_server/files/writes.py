"""Changes to a job's files: uploads and deletes, reaching their targets only through
:mod:`psik_api_server.files.paths` (resolved, then walked with ``O_NOFOLLOW``).

Writes are atomic: a 0600 temp file beside the target (made through the directory's
descriptor), renamed into place; ``If-None-Match: *`` links instead of renaming, so a
file that appeared meanwhile is never overwritten; ``If-Match`` and ``If-None-Match``
with ETags are checked again just before the rename (:mod:`psik_api_server.files.preconditions`). Missing
parents are made 0700, and taken back when the upload fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import stat
from dataclasses import dataclass, field

from psik_api_core import FileInfo, ProblemCode

from ..errors import ApiError
from .paths import TEMP_PREFIX, Made, NotADirectory, Root, file_info, invalid, joined, resolve, walk
from .preconditions import Preconditions, exists_already

# ---- uploads ----


def current_stat(root: Root, parts: tuple[str, ...]) -> os.stat_result | None:
    """What is at ``parts`` now (a symlink's own stat), None if nothing is."""
    resolved = resolve(root, parts)
    if not resolved:
        return os.fstat(root.fd)
    try:
        parent = walk(root, resolved[:-1], shown=joined(parts))
    except (FileNotFoundError, NotADirectory):
        return None
    try:
        return os.stat(resolved[-1], dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None
    finally:
        os.close(parent)


@dataclass
class Upload:
    """One file being written: a temp file in its target's directory until
    :meth:`commit` renames it into place (or :meth:`abort` removes it)."""

    shown: str  # the path as the caller gave it (relative to the root)
    parent: int  # descriptor of the target's directory
    name: str  # the target's name in it
    temp: str
    fd: int
    size: int = 0
    sha256: hashlib._Hash = field(default_factory=hashlib.sha256)
    created: bool = True
    #: After commit: the replaced file's hard link, kept until :meth:`forget_backup`.
    backup: str | None = None
    committed: bool = False
    #: The parents this upload made: taken back if it is not committed.
    made: Made = field(default_factory=Made)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.sha256.update(data)
        self.size += len(data)

    def commit(self, *, conditions: Preconditions | None = None, keep_backup: bool = False) -> None:
        """Put the file in place, if the file there now meets ``conditions`` (412
        otherwise). ``If-None-Match: *``: 412 if something is there already (it is never
        overwritten, whatever appeared meanwhile). ``keep_backup``: keep the replaced
        file under a temp name so :meth:`rollback` can restore it. Callers hold the
        target's lock (``FileService``), so no other commit comes between the check
        and the rename."""
        os.fsync(self.fd)
        conditions = conditions or Preconditions()
        try:
            now = os.stat(self.name, dir_fd=self.parent, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        conditions.check(now, self.shown)
        if conditions.exclusive:
            try:
                here = {"src_dir_fd": self.parent, "dst_dir_fd": self.parent}
                os.link(self.temp, self.name, **here, follow_symlinks=False)
            except FileExistsError:
                raise exists_already(self.shown) from None
            os.unlink(self.temp, dir_fd=self.parent)
            self.created, self.committed = True, True
            return
        old = now
        if old is not None and stat.S_ISDIR(old.st_mode):
            raise ApiError(
                ProblemCode.conflict, f"{self.shown[:200]!r} is a directory; a file cannot replace it"
            )
        self.created = old is None
        if old is not None and keep_backup:
            backup = TEMP_PREFIX + secrets.token_hex(8)
            os.link(self.name, backup, src_dir_fd=self.parent, dst_dir_fd=self.parent, follow_symlinks=False)
            self.backup = backup
        try:
            os.replace(self.temp, self.name, src_dir_fd=self.parent, dst_dir_fd=self.parent)
        except IsADirectoryError:  # made a directory since the check above
            raise ApiError(
                ProblemCode.conflict, f"{self.shown[:200]!r} is a directory; a file cannot replace it"
            ) from None
        self.committed = True

    def rollback(self) -> None:
        """Undo a commit: the replaced file comes back, a created one goes."""
        if not self.committed:
            return
        if self.backup is not None:
            os.replace(self.backup, self.name, src_dir_fd=self.parent, dst_dir_fd=self.parent)
            self.backup = None
        else:
            try:
                st = os.stat(self.name, dir_fd=self.parent, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == _inode(os.fstat(self.fd)):  # still ours
                    os.unlink(self.name, dir_fd=self.parent)
            except FileNotFoundError:
                pass
        self.committed = False

    def forget_backup(self) -> None:
        if self.backup is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.backup, dir_fd=self.parent)
            self.backup = None

    def info(self) -> FileInfo:
        return file_info(self.shown, os.fstat(self.fd))

    def close(self) -> None:
        """Remove the temp file and the directories made for it unless committed;
        close the descriptors."""
        if not self.committed and self.fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp, dir_fd=self.parent)
            self.made.undo()
        self.made.forget()
        for fd in (self.fd, self.parent):
            if fd >= 0:
                os.close(fd)
        self.fd = self.parent = -1


def _inode(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def begin_upload(root: Root, parts: tuple[str, ...], shown: str) -> Upload:
    """A temp file (0600) beside where ``parts`` (as given) resolves; its parents are
    made (0700). 409 if a parent is a file or the target a directory."""
    resolved = resolve(root, parts)
    if not resolved:
        raise ApiError(
            ProblemCode.conflict, f"{shown[:200]!r} is the job's directory; a file cannot replace it"
        )
    made = Made()
    try:
        parent = walk(root, resolved[:-1], create=True, shown=shown, made=made)
    except NotADirectory as e:
        made.undo()
        raise ApiError(
            ProblemCode.conflict, f"cannot write {shown[:200]!r}: {str(e)[:100]!r} on its way is a file"
        ) from None
    except BaseException:
        made.undo()
        raise
    try:
        name = resolved[-1]
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise ApiError(
                    ProblemCode.conflict, f"{shown[:200]!r} is a directory; a file cannot replace it"
                )
        except FileNotFoundError:
            pass
        temp = TEMP_PREFIX + secrets.token_hex(8)
        fd = os.open(
            temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent
        )
    except BaseException:
        os.close(parent)
        made.undo()
        raise
    return Upload(shown=shown, parent=parent, name=name, temp=temp, fd=fd, made=made)


# ---- deleting ----


def delete(
    root: Root, parts: tuple[str, ...], shown: str, *, recursive: bool, directory: bool = False
) -> bool:
    """Remove what ``parts`` names (a symlink itself, never its target); a directory
    only if ``recursive`` (409 otherwise), and only a directory if ``directory`` (the
    path ended with ``/``; 400 otherwise). False if there was nothing."""
    if not parts:
        raise ApiError(ProblemCode.conflict, "the job's directory itself cannot be deleted")
    parents = resolve(root, parts[:-1])
    try:
        parent = walk(root, parents, shown=shown)
    except (FileNotFoundError, NotADirectory):
        return False
    try:
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if directory and not stat.S_ISDIR(st.st_mode):
            raise invalid(shown + "/", "ends with '/', which names a directory; this is not one")
        if stat.S_ISDIR(st.st_mode):
            if not recursive:
                raise ApiError(
                    ProblemCode.conflict,
                    f"{shown[:200]!r} is a directory; delete it with recursive=true",
                )
            # rmtree by descriptors: it never follows a symlink out of the tree.
            shutil.rmtree(name, dir_fd=parent)
        else:
            os.unlink(name, dir_fd=parent)
        return True
    finally:
        os.close(parent)
