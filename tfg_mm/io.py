"""Atomic file writes: nothing already written is ever left half-written.

Every checkpoint, history and report is written to a temporary sibling and renamed into place,
so an interrupted run leaves either the old file or the new one, never a truncated file.

Permissions follow the umask, as a plain ``open`` / ``mkdir`` would: files ``0666 & ~umask``, folders
``0777 & ~umask`` (``tempfile.mkstemp`` / ``mkdtemp`` would make them 0600 / 0700, unreadable to the
rest of a lab group or cluster project). The temporary names are created with those modes, so the
kernel applies the umask (and a folder's default ACL) itself; what other libraries write into an
:func:`atomic_dir` is given the same modes before the folder is renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from tfg_mm.errors import StorageError

#: The errors a full, over-quota, read-only or failing disk gives (what :func:`storage_error` turns into the
#: project's error): ENOSPC, EDQUOT, EFBIG, EROFS, EIO.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})
#: The same, as libraries with their own I/O (safetensors, torch) word them.
_STORAGE_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "read-only file system")


def _size(n: int | None) -> str:
    if n is None:
        return "an unknown number of bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def storage_error(exc: BaseException, path: str | os.PathLike, needed: int | None = None) -> StorageError | None:
    """The project's error for a write of ``path`` that failed for lack of space (or on a read-only / failing
    disk), naming the folder, the bytes needed and free, and the fix; None for any other error."""
    code = getattr(exc, "errno", None)
    text = str(exc).lower()
    if code not in STORAGE_ERRNOS and not any(t in text for t in _STORAGE_TEXTS):
        return None
    path = Path(path)
    folder = next((p for p in (path.parent, *path.parents) if p.exists()), path.parent)
    try:
        usage = shutil.disk_usage(folder)
        free = f"{_size(usage.free)} free of {_size(usage.total)}"
    except OSError:
        free = "free space unknown"
    reason = os.strerror(code) if isinstance(code, int) else str(exc).splitlines()[0][:200]
    return StorageError(
        f"Cannot write {path}: {reason}. Its folder {folder} has {free}; this write needed {_size(needed)}. "
        "Nothing already written was changed (every file is replaced atomically: the previous version, if any, is "
        "intact). Fix: free space on that disk (old runs' checkpoints under runs/*/checkpoints, pip / torch / "
        "Hugging Face caches), or write elsewhere (another `run_dir`, or TFG_MM_CACHE_DIR / TFG_MM_REPORTS_DIR), "
        "then rerun the same command: an interrupted run resumes from its last saved epoch."
    )


def _fsync_dir(path: Path) -> None:
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


def _follow_umask(root: Path, granted: int) -> None:
    """Give everything under ``root`` the modes a plain ``open`` / ``mkdir`` would: libraries that write
    through their own temporary files (safetensors 0.8 writes ``model.safetensors`` as 0600) do not.

    ``granted`` is the mode the kernel gave ``root`` when it was made with ``mkdir(root, 0o777)``: the umask
    (or the parent folder's default ACL) already applied, so it is neither read nor changed here."""
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):  # links have no mode of their own; never chmod their target
                continue
            executable = os.path.isdir(path) or os.stat(path).st_mode & 0o111
            os.chmod(path, (0o777 if executable else 0o666) & granted)


def _create_sibling(path: Path, create: Callable[[Path], int | None]) -> tuple[Path, int | None]:
    """A new, unique ``.<name>.<random>.tmp`` next to ``path``, made by ``create`` (which must fail
    with ``FileExistsError`` when the name is taken, as ``O_EXCL`` and ``mkdir`` do)."""
    for _ in range(100):
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return candidate, create(candidate)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {path}")


def _new_file(path: Path) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    return os.open(path, flags, 0o666)  # the umask applies


def _new_dir(path: Path) -> None:
    os.mkdir(path, 0o777)  # the umask applies


def probe_writable(folder: str | os.PathLike) -> None:
    """Create and remove a temporary file in ``folder``: raises ``PermissionError`` (or another
    ``OSError``) now, when the folder cannot be written, instead of at the first result."""
    tmp, fd = _create_sibling(Path(folder) / "write-probe", _new_file)
    os.close(fd)
    os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling renamed into place; a full disk is a
    :class:`~tfg_mm.errors.StorageError` naming the folder, and the previous file stays as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, fd = _create_sibling(path, _new_file)
    except OSError as exc:
        error = storage_error(exc, path, len(data))
        if error is None:
            raise
        raise error from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        error = storage_error(exc, path, len(data))
        if error is not None:
            raise error from exc
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serialisable")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` atomically when the block succeeds.

    On failure the temporary directory is removed and ``path`` is left untouched. An existing
    ``path`` is moved aside and only deleted once the new one is in place.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, _ = _create_sibling(path, _new_dir)
    except OSError as exc:
        error = storage_error(exc, path)
        if error is None:
            raise
        raise error from exc
    granted = stat.S_IMODE(os.stat(tmp).st_mode) & 0o777  # 0o777 & ~umask, as the kernel applied it
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        error = storage_error(exc, path)
        if error is not None:  # safetensors / torch writing into the folder found the disk full
            raise error from exc
        raise
    _follow_umask(tmp, granted)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def json_safe(value: Any) -> Any:
    """Plain JSON values: tensors / numpy to Python, tuples to lists, NaN / ±inf to None."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
