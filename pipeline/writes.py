"""Files written whole or not at all, and write failures told in one line that names the file.

Every file a run writes (checkpoints, the backbone, ``history.json``, ``curves.png``, a ``.beton``)
is written to a temporary file in the same folder, flushed to disk and renamed into place
(``os.replace`` is atomic on POSIX), so a full disk, an I/O error or a kill at any moment leaves the
previous file intact and no temporary file once the writer's clean-up runs. A failure is raised as
:class:`WriteFailed`, an ``OSError`` whose message is one line: the file, the cause, and on a full
disk (``ENOSPC``, ``EDQUOT``) how much room is left on that filesystem.

``torch.save`` into a file hides the ``OSError`` of a full disk behind a ``RuntimeError`` of its zip
writer ("[enforce fail at inline_container.cc] unexpected pos ..."); :func:`torch_save` gives the
real ``OSError`` back.
"""
from __future__ import annotations

import errno as errno_codes
import os
from pathlib import Path
from typing import BinaryIO, Callable

DISK_FULL = (errno_codes.ENOSPC, errno_codes.EDQUOT)


class WriteFailed(OSError):
    """A file could not be written; ``str()`` is one line naming it and the cause.

    Attributes:
        errno: the underlying errno (None when the cause was not an ``OSError``).
        filename: the file that was being written.
    """

    def __init__(self, message: str, errno: int | None = None, filename: str | None = None):
        super().__init__(message)
        self.errno, self.filename, self.message = errno, filename, message

    def __str__(self) -> str:
        return self.message


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def free_space(path: str | os.PathLike) -> str:
    """Room left on the filesystem holding ``path`` (or its nearest existing parent), as words:
    ``"3.2 MiB free of 4.0 MiB on /mnt/out"``; ``""`` when it cannot be told."""
    try:
        mount = _mount_point(Path(path))
        st = os.statvfs(mount)
    except OSError:
        return ""
    return f"{_mib(st.f_bavail * st.f_frsize)} free of {_mib(st.f_blocks * st.f_frsize)} on {mount}"


def _mib(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def describe(exc: BaseException) -> str:
    """The cause of a write failure in words: the OS's text for an errno (``No space left on
    device``), else the exception's first line."""
    err = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and err:
        return f"{os.strerror(err)} [errno {err}]"
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}{': ' + first if first else ''}"


def write_failed(path: str | os.PathLike, exc: BaseException, what: str = "", kept: str | os.PathLike | None = None,
                 written: int | None = None) -> WriteFailed:
    """The :class:`WriteFailed` for ``exc`` raised while writing ``path``.

    Args:
        what: what the file is (``"checkpoint"``, ``"backbone"``), put before its path.
        kept: the earlier file that is still intact, said in the message (None: nothing said).
        written: bytes written before the failure, said when known.
    """
    err = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    message = f"could not write {what + ' ' if what else ''}{path}: {describe(exc)}"
    if err in DISK_FULL:
        room = free_space(Path(path).parent)
        details = [f"{_mib(written)} of it fitted" if written else "", room]
        details = [d for d in details if d]
        if details:
            message += f" ({'; '.join(details)})"
    if kept is not None:
        message += f"; the previous {what + ' ' if what else ''}{kept} is intact"
    return WriteFailed(message, err, str(path))


class _Recorder:
    """A file object for ``torch.save`` that remembers the ``OSError`` of a failed ``write`` and
    counts the bytes written."""

    def __init__(self, f: BinaryIO):
        self.f, self.error, self.written = f, None, 0

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.written += n
        return n

    def flush(self) -> None:
        self.f.flush()


def torch_save(obj, f: BinaryIO) -> None:
    """``torch.save(obj, f)``, raising the real ``OSError`` when a write to ``f`` failed (torch's
    zip writer reports it as a ``RuntimeError``).

    Raises:
        OSError: a write failed (disk full, I/O error, ...).
        RuntimeError: any other failure of ``torch.save``.
    """
    import torch

    rec = _Recorder(f)
    try:
        torch.save(obj, rec)
    except RuntimeError:
        if rec.error is not None:
            raise rec.error from None
        raise


def temporary_path(path: str | os.PathLike) -> Path:
    """The temporary name ``path`` is written under before the rename: ``.<name>.tmp<pid>``
    beside it (hidden; one per process, so concurrent writers never share one)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_quietly(path: Path) -> None:
    """Delete ``path`` if it exists; a failure to delete (read-only filesystem) is not raised."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a complete file's data to disk (for files written by others, e.g. FFCV's writer).

    Raises:
        OSError: the flush failed (an I/O error, or space the filesystem could not allocate).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the OS allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], what: str = "",
                 check: Callable[[Path], None] | None = None) -> Path:
    """Write ``path`` whole or not at all: ``write(f)`` into :func:`temporary_path`, flush, fsync,
    optionally ``check(tmp)`` (a read-back), then an atomic rename over ``path``.

    Args:
        write: fills the binary file object it is given.
        what: what the file is, for the error message.
        check: called on the complete temporary file; whatever it raises propagates (as is) and
            ``path`` is left untouched.

    Returns:
        ``Path(path)``.

    Raises:
        WriteFailed: creating, writing, flushing or renaming failed (``OSError`` of any errno, or
            torch's ``RuntimeError`` for one, see :func:`torch_save`); ``path`` is as it was and
            the temporary file is gone.
    """
    path = Path(path)
    tmp = temporary_path(path)
    size = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            size = f.tell()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        if size is None:
            size = tmp.stat().st_size if tmp.exists() else None
        remove_quietly(tmp)
        raise write_failed(path, exc, what, kept=path if path.exists() else None, written=size) from exc
    finally:
        remove_quietly(tmp)
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "") -> Path:
    """:func:`atomic_write` of UTF-8 ``text``."""
    return atomic_write(path, lambda f: f.write(text.encode()), what)
