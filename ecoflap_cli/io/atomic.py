"""Atomic writes: a file or directory appears complete under its name, or not at all.

Everything is first written to a temporary sibling of the target (same directory, so the final
``rename`` stays on one file system and is atomic) and renamed over the target on success; on
any failure the temporary is removed and the target is left as it was.  What ends up at the
target has the permissions a plain ``open()`` / ``mkdir()`` would give it under the current
umask (files ``0o666 & ~umask``, directories ``0o777 & ~umask``), not the private modes
``mkstemp`` / ``mkdtemp`` create.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode ``open()`` (``0o666``) or ``mkdir()`` (``0o777``) gives a new entry under the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable; best effort (not every platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(target: Path) -> str:
    return f".{target.name}."


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; write the file there.

    On a normal exit the temporary file is fsynced, given the default file mode and renamed over
    ``path`` (created with its parents if missing).  On an exception it is removed and ``path`` is
    untouched.  The yielded file exists (empty); a writer may also replace it.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_temp_name(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


@contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; fill it, and it replaces ``path`` on success.

    On a normal exit every entry inside gets the default mode (directories ``0o777 & ~umask``,
    files ``0o666 & ~umask``) and the directory is renamed to ``path``; an existing ``path`` is
    moved aside first and deleted after.  On an exception the temporary directory is deleted and
    ``path`` is untouched.  Files inside are not fsynced one by one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_name(target), suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        publish_modes(tmp)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)


def publish_modes(directory: Path) -> None:
    """Give ``directory`` and everything under it the default modes of a new entry."""
    file_mode, dir_mode = default_mode(), default_mode(directory=True)
    for entry in [directory, *directory.rglob("*")]:
        if not entry.is_symlink():
            entry.chmod(dir_mode if entry.is_dir() else file_mode)


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, moving an existing ``target`` aside and deleting it after."""
    if not target.exists():
        tmp.rename(target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
