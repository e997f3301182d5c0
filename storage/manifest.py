"""`manifest.json`: the list of whole shards, the shared metadata, and the completion flag.

The manifest is the source of truth: a reader reads exactly the shards it lists, so a shard
file that was written but never listed (a crash between the two steps) is invisible.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, ValidationError

from todi.common.validation import field_name, validation_errors
from todi.storage import fs as sfs
from todi.storage.schema import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    NoManifestError,
    ShardFormatError,
    ShardSetMetadata,
)


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str  # name relative to the set directory
    rows: int
    positions: int
    bytes: int
    sha256: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    metadata: ShardSetMetadata
    complete: bool = False
    job: dict[str, Any] | None = None  # the parameters of the job that wrote the set
    shards: list[ShardInfo] = []

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def positions(self) -> int:
        return sum(s.positions for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


def read_manifest(fs: pafs.FileSystem, root: str) -> Manifest:
    path = sfs.join(root, MANIFEST_NAME)
    try:
        raw = sfs.read_bytes(fs, path)
    except FileNotFoundError:
        raise NoManifestError(
            f"{path}: no manifest (not a shard set, or nothing written)"
        ) from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ShardFormatError(f"{path}: manifest is not valid JSON ({exc})") from None
    if isinstance(data, dict) and data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ShardFormatError(
            f"{path}: format_version {data['format_version']} is newer than this reader "
            f"({FORMAT_VERSION}); upgrade todi-distill"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = validation_errors(exc)[0]
        where = field_name(first["loc"])
        raise ShardFormatError(f"{path}: bad manifest field {where}: {first['msg']}") from None


def write_manifest(fs: pafs.FileSystem, root: str, manifest: Manifest) -> None:
    data = json.dumps(manifest.model_dump(mode="json"), indent=1).encode()
    sfs.write_bytes_atomic(fs, sfs.join(root, MANIFEST_NAME), data)


_thread_lock = threading.Lock()


@contextmanager
def manifest_lock(fs: pafs.FileSystem, root: str) -> Iterator[None]:
    """Serialize read-modify-write of the manifest between processes on a local disk.

    Object stores have no locks: there, one process (the job driver) commits all shards.
    """
    with _thread_lock:
        if not sfs.is_local(fs):
            yield
            return
        import fcntl

        fd = os.open(os.path.join(root, ".manifest.lock"), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
