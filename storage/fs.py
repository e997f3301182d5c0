"""Resolving a shard-set location (local path or any pyarrow.fs URI such as s3://...)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(location: str | os.PathLike[str]) -> bool:
    """True for a URI (`s3://bucket/set`, `file:///x`), False for a local path."""
    return "://" in os.fspath(location)


def resolve(
    location: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None
) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URI; local paths become absolute."""
    text = os.fspath(location)
    if filesystem is not None:
        return filesystem, text
    if is_uri(text):
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), str(Path(text).absolute())


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


_TMP_PREFIX = ".tmp-"
# `.tmp-<pid>@<host>-<name>`: the writer's process and host, so a later writer can tell a
# dead writer's leftover from a live writer's file. (`.tmp-<pid>-<name>`: older writers.)
_TMP_NAME = re.compile(r"^\.tmp-(\d+)(?:@([^/]*?))?-(.+)$")


def _host() -> str:
    return socket.gethostname().replace("-", "_").replace("/", "_") or "localhost"


def temp_name(name: str) -> str:
    return f"{_TMP_PREFIX}{os.getpid()}@{_host()}-{name}"


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` so that readers see either the old object or the whole new one.

    Local: temp file in the same directory, fsync, rename, fsync the directory (a crash at
    any instant leaves either no file or the whole file). A failed write (a full disk, an
    unwritable folder) removes its temp file and raises OSError naming `path`. Object
    stores: a single PUT is already atomic, so write in place.
    """
    if is_local(fs):
        directory = os.path.dirname(path)
        tmp = os.path.join(directory, temp_name(os.path.basename(path)))
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                # `[Errno 28] No space left on device` alone names no file.
                raise OSError(exc.errno, exc.strerror or str(exc), path) from exc
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temp_files(fs: pafs.FileSystem, root: str) -> list[str]:
    """Temp files in `root` left by a writer of THIS host that is no longer running (killed,
    or an older version that did not clean up). Another host's temp files are never stale
    here: its writer may be alive."""
    if not is_local(fs) or not os.path.isdir(root):
        return []
    out = []
    for name in sorted(os.listdir(root)):
        m = _TMP_NAME.match(name)
        if m is None:
            continue
        host = m.group(2)
        if host is not None and host != _host():
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        out.append(os.path.join(root, name))
    return out


def remove_stale_temp_files(fs: pafs.FileSystem, root: str) -> list[str]:
    """Remove `stale_temp_files(root)`; return the paths removed."""
    removed = []
    for path in stale_temp_files(fs, root):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    return removed
