"""Shard format v1: the one contract between the teacher service and the trainer.

    from storage import open_shard_set, ShardSetWriter, ShardSetMetadata, Sample

See `storage.schema` for the row layout and metadata, `storage.codec` for the encoding.
"""

from storage.batches import IGNORE_INDEX, Batch, collate, iter_batches, padding_waste
from storage.codec import DEFAULT_CODEC, get_codec
from storage.manifest import Manifest, ShardInfo, read_manifest
from storage.reader import ShardSet, VerifyReport, decode_table, open_shard_set, verify_shard_set
from storage.schema import (
    ARROW_SCHEMA,
    FORMAT_VERSION,
    Sample,
    ShardFormatError,
    ShardSetMetadata,
    content_sample_id,
    expected_positions,
    first_position,
)
from storage.writer import ShardSetWriter, commit_shards, encode_table, write_shard

__all__ = [
    "ARROW_SCHEMA",
    "DEFAULT_CODEC",
    "FORMAT_VERSION",
    "IGNORE_INDEX",
    "Batch",
    "Manifest",
    "Sample",
    "ShardFormatError",
    "ShardInfo",
    "ShardSet",
    "ShardSetMetadata",
    "ShardSetWriter",
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
    "open_shard_set",
    "padding_waste",
    "read_manifest",
    "verify_shard_set",
    "write_shard",
]
