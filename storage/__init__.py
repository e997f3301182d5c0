"""Shard format v1: the one contract between the teacher service and the trainer.

    from todi.storage import open_shard_set, ShardSetWriter, ShardSetMetadata, Sample

See `todi.storage.schema` for the row layout and metadata, `todi.storage.codec` for the encoding.
"""

from typing import TYPE_CHECKING

from todi.storage.codec import DEFAULT_CODEC, get_codec, known_codecs
from todi.storage.manifest import Manifest, ShardInfo, read_manifest
from todi.storage.reader import (
    ShardSet,
    VerifyReport,
    decode_table,
    open_shard_set,
    verify_shard_set,
)
from todi.storage.schema import (
    ARROW_SCHEMA,
    FORMAT_VERSION,
    NoManifestError,
    Sample,
    ShardFormatError,
    ShardSetMetadata,
    TopK,
    content_sample_id,
    expected_positions,
    first_position,
    shard_schema,
)
from todi.storage.writer import (
    ShardSetWriter,
    commit_shards,
    encode_table,
    shard_bytes,
    write_shard,
)

if TYPE_CHECKING:
    from todi.storage.batches import IGNORE_INDEX, Batch, collate, iter_batches, padding_waste

# The batch helpers need torch; import it only when they are used, so a teacher-side process
# (or `todi shards verify`) that only reads and writes shards stays light.
_BATCHES = {"IGNORE_INDEX", "Batch", "collate", "iter_batches", "padding_waste"}


def __getattr__(name: str):
    if name in _BATCHES:
        from todi.storage import batches

        return getattr(batches, name)
    raise AttributeError(f"module 'storage' has no attribute {name!r}")


__all__ = [
    "ARROW_SCHEMA",
    "DEFAULT_CODEC",
    "FORMAT_VERSION",
    "IGNORE_INDEX",
    "Batch",
    "Manifest",
    "NoManifestError",
    "Sample",
    "ShardFormatError",
    "ShardInfo",
    "ShardSet",
    "ShardSetMetadata",
    "ShardSetWriter",
    "TopK",
    "VerifyReport",
    "collate",
    "commit_shards",
    "content_sample_id",
    "decode_table",
    "encode_table",
    "expected_positions",
    "first_position",
    "get_codec",
    "iter_batches",
    "known_codecs",
    "open_shard_set",
    "padding_waste",
    "read_manifest",
    "shard_bytes",
    "shard_schema",
    "verify_shard_set",
    "write_shard",
]
