"""Resolving a shard-set location (local path or any pyarrow.fs URI such as s3://...)."""

from __future__ import annotations

import os
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


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` so that readers see either the old object or the whole new one.

    Local: temp file in the same directory, fsync, rename, fsync the directory (a crash at
    any instant leaves either no file or the whole file). Object stores: a single PUT is
    already atomic, so write in place.
    """
    if is_local(fs):
        directory = os.path.dirname(path)
        tmp = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(path)}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)
