"""The ground floor: every file the tool writes goes through here. Atomic writes: a file or
directory appears complete under its name, or not at all; a full disk is one line; one helper
hashes a file. Imports nothing of ecoflap but its errors, so every layer can use it.

Everything is first written to a temporary sibling of the target (same directory, so the final
``rename`` stays on one file system and is atomic) and renamed over the target on success; on
any failure the temporary is removed and the target is left as it was.  What ends up at the
target has the permissions a plain ``open()`` / ``mkdir()`` would give it under the current
umask (files ``0o666 & ~umask``, directories ``0o777 & ~umask``), not the private modes
``mkstemp`` / ``mkdtemp`` create.

Outputs (checkpoint directories) get three more guarantees:

- the final rename never replaces what it did not check: without ``replace`` it is exclusive
  (Linux ``renameat2(RENAME_NOREPLACE)``; elsewhere an empty placeholder made with ``mkdir``,
  which only one process can create, is swapped for the finished directory), and with
  ``replace`` the old output is exchanged for the new one only once the new one is complete;
- every temporary name carries its owner (``.NAME.ecoflap-PID@HOST.XXXX.tmp``), so the next
  run to the same output removes the ones whose owner on this host is dead (:func:`clean_stale`);
- :func:`output_lock` lets one run at a time write an output (an ``flock`` the kernel drops when
  the process dies, so a killed run never leaves a lock that blocks the next one).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ecoflap_cli.errors import ArtifactError

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
#: errors that mean "renameat2 or this flag is not available here", not "the rename failed"
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


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


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:48] or "host"


def _temp_name(target: Path) -> str:
    """The prefix of a temporary sibling of ``target``, naming its owner (pid and host)."""
    return f".{target.name}.ecoflap-{os.getpid()}@{_host()}."


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def clean_stale(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries of ``target`` left by killed runs; return what was removed.

    Only entries named by :func:`_temp_name` whose owner ran on this host and is dead are removed;
    a live owner's, another host's, or anything else is left alone.
    """
    target = Path(target)
    owned = re.compile(rf"^\.{re.escape(target.name)}\.ecoflap-(\d+)@([A-Za-z0-9-]+)\..*\.(tmp|old)$")
    removed: list[Path] = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = owned.match(entry.name)
        if match is None or match[2] != _host() or pid_alive(int(match[1])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the call or the flag is not supported.

    Raises OSError (FileExistsError for an existing ``dst`` under RENAME_NOREPLACE) otherwise.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError):
        return False
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if call(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(dst))


def rename_noreplace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename directory ``src`` to ``dst`` only if ``dst`` does not exist (FileExistsError if it does).

    Atomic with ``renameat2(RENAME_NOREPLACE)``; where that is missing, ``mkdir(dst)`` reserves
    the name (only one process can create it) and ``src`` replaces the empty placeholder.
    """
    src, dst = Path(src), Path(dst)
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    os.mkdir(dst)  # FileExistsError when taken
    try:
        os.rename(src, dst)  # replaces only an empty directory: ours, unless someone wrote into it
    except OSError:
        with _suppress_oserror():
            os.rmdir(dst)
        raise


@contextmanager
def _suppress_oserror() -> Iterator[None]:
    try:
        yield
    except OSError:
        pass


@contextmanager
def atomic_file(path: str | os.PathLike[str], replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; write the file there.

    On a normal exit the temporary file is fsynced, given the default file mode and renamed over
    ``path`` (created with its parents if missing).  On an exception it is removed and ``path`` is
    untouched.  The yielded file exists (empty); a writer may also replace it.  Without
    ``replace`` the final step is exclusive (a hard link, which fails on an existing name): a
    ``path`` that appeared meanwhile (another run) raises ArtifactError and is left as it is.
    """
    target = Path(path)
    with disk_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=_temp_name(target), suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            _fsync_file(tmp)
            os.chmod(tmp, default_mode())
            if replace or not _link_new(tmp, target):
                os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.unlink(missing_ok=True)  # linked: the temporary name goes, the file stays under ``target``
        _fsync_dir(target.parent)


def _link_new(tmp: Path, target: Path) -> bool:
    """Give ``tmp`` the name ``target`` only if that name is free; False where hard links are not
    supported (the caller falls back to a rename). ArtifactError if ``target`` exists."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise ArtifactError(
            f"{target} appeared while this run was writing it (another run?): it was left as it is "
            "(pass --overwrite to replace it)"
        ) from None
    except OSError as exc:
        if exc.errno in _UNSUPPORTED or exc.errno in (errno.EPERM, errno.EXDEV, errno.EMLINK):
            return False
        raise
    return True


def write_atomic(path: str | os.PathLike[str], data: bytes, replace: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`; ``replace`` False: exclusively)."""
    with atomic_file(path, replace) as tmp:
        tmp.write_bytes(data)


@contextmanager
def atomic_dir(path: str | os.PathLike[str], replace: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; fill it, and it becomes ``path`` on success.

    On a normal exit every entry inside gets the default mode (directories ``0o777 & ~umask``,
    files ``0o666 & ~umask``) and the directory is renamed to ``path``.  With ``replace`` an
    existing ``path`` is exchanged for the new directory and deleted after; without it the rename
    is exclusive and an existing ``path`` (say, made by a concurrent run) raises ArtifactError,
    leaving it untouched.  On an exception the temporary directory is deleted and ``path`` is
    untouched.  Files inside are not fsynced one by one.
    """
    target = Path(path)
    with disk_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(target)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_name(target), suffix=".tmp", dir=target.parent))
        try:
            yield tmp
            publish_modes(tmp)
            if replace:
                _swap_in(tmp, target)
            else:
                _rename_new(tmp, target)
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


def _rename_new(tmp: Path, target: Path) -> None:
    try:
        rename_noreplace(tmp, target)
    except FileExistsError:
        raise ArtifactError(
            f"output {target} appeared while this run was writing it (another run?): it was left as it "
            "is and this run's result discarded (pass --overwrite to replace it)"
        ) from None


def _swap_in(tmp: Path, target: Path) -> None:
    """Make ``tmp`` the ``target``: exchange the two atomically if ``target`` exists, delete the old.

    Without ``renameat2(RENAME_EXCHANGE)`` the old ``target`` is moved aside (under an owned
    temporary name, so a killed run's leftover is cleaned later) before ``tmp`` takes its place.
    """
    if not target.exists():
        tmp.rename(target)
        return
    try:
        exchanged = _renameat2(tmp, target, _RENAME_EXCHANGE)
    except FileNotFoundError:  # the old target went away meanwhile
        exchanged = False
    if exchanged:
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old output
        return
    old = Path(tempfile.mkdtemp(prefix=_temp_name(target), suffix=".old", dir=target.parent))
    old.rmdir()
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.ecoflap-lock")


@contextmanager
def output_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the write lock of output ``path`` (one run at a time); ArtifactError if another holds it.

    An ``flock`` on ``.NAME.ecoflap-lock`` beside the output: the kernel drops it when its process
    dies, so a killed run never blocks the next one.  The lock file is removed on release, and so
    are the output's parent directories the lock had to create, if they are still empty (a run that
    fails leaves no empty ``a/b/`` behind for ``-o a/b/out``).  Where ``fcntl`` is missing
    (Windows) nothing is locked and the exclusive rename alone decides.
    """
    created = _make_dirs(_lock_path(Path(path)).parent)
    try:
        with _held_lock(path):
            yield
    finally:
        for directory in reversed(created):  # innermost first; stops at the first one in use
            try:
                directory.rmdir()
            except OSError:
                break


def _make_dirs(directory: Path) -> list[Path]:
    """``mkdir -p directory``; the directories this call created, outermost first."""
    missing: list[Path] = []
    probe = directory
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    directory.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


@contextmanager
def _held_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """The ``flock`` of :func:`output_lock`, in an existing directory."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock = _lock_path(Path(path))
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, default_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ArtifactError(
                f"another ecoflap run{holder} is writing {path}: wait for it, or choose another --output"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its previous holder removed while we waited to open it
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}@{_host()}\n".encode())
        yield
    finally:
        with _suppress_oserror():
            lock.unlink()
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text else ""


# --- disk full: one line, whatever library raised it -------------------------------------------

#: errors that mean the file system cannot take what is written, and how they read
DISK_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EFBIG: "the file is too large for the file system",
}
#: how Rust libraries (safetensors, tokenizers) quote the OS error inside their own exceptions
_QUOTED_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class DiskError(ArtifactError):
    """Writing an output failed because its file system is full, over quota or read-only."""

    exit_code = 4  # as an OSError reported by the CLI
    #: the errno behind it (one of :data:`DISK_ERRNOS`)
    code: int = errno.ENOSPC


def disk_error_code(exc: BaseException) -> int | None:
    """The errno of :data:`DISK_ERRNOS` behind ``exc`` or an exception it was raised from: an
    OSError's own, or the ``(os error N)`` that safetensors' SafetensorError quotes; else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = current.errno if isinstance(current, OSError) else None
        if code is None:
            match = _QUOTED_OS_ERROR.search(str(current))
            code = int(match[1]) if match else None
        if code in DISK_ERRNOS:
            return code
        current = current.__cause__ or current.__context__
    return None


@contextmanager
def disk_errors(target: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a full, over-quota or read-only file system met inside the ``with`` (an OSError, or a
    library's own exception quoting it) into one :class:`DiskError` line naming ``target``."""
    try:
        yield
    except Exception as exc:
        code = exc.code if isinstance(exc, DiskError) else disk_error_code(exc)
        if code is None:
            raise
        # the outermost writer names the output: not a file inside its temporary directory
        error = DiskError(
            f"{DISK_ERRNOS[code]} while writing {target}: nothing was written (free some space, "
            "or choose an output on another file system)"
        )
        error.code = code
        raise error from None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks (the one helper for hashing a file)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
