"""Training data: shard set checks, a Ray Data source, and the per-worker epoch stream.

Data order is a pure function of (seed, epoch, rank, world size), so `--resume` and restarts
after a failure replay it exactly and skip to the saved position:

1. `build_dataset`: a Ray Dataset over the shard files listed in the manifest (the project's
   own reader: footers are checked against the manifest), in an order shuffled once with
   `seed`, one read task per file, each row group one block. Ray Train splits it across the
   workers with `streaming_split(equal=True)`; with `preserve_order` execution the split is
   deterministic (each block goes to the worker with the fewest rows so far) and every
   worker gets the same number of rows (at most `workers - 1` rows of an epoch are left out).
2. `epoch_batches` (in each worker): the rows stream through a shuffle buffer and length
   buckets seeded with (seed, epoch, rank): each epoch visits the worker's rows in a new order.
   Buckets of `bucket_buffer` rows are sorted by length and cut into micro-batches (so
   padding stays small), and the micro-batches of a bucket are emitted in random order.
3. Micro-batches are *plans* (raw rows: ids and the still-encoded top-k bytes); only the
   ones trained on are decoded (`decode_rows`), so skipping to a position costs no decoding
   and the shuffle buffer holds compact rows.

Memory is bounded by the shuffle buffer + one bucket of raw rows + Ray Data's prefetch.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import pyarrow as pa

from todi.common.errors import TodiError, first_line
from todi.storage import (
    IGNORE_INDEX,
    Batch,
    ShardFormatError,
    ShardSet,
    ShardSetMetadata,
    collate,
    decode_table,
    open_shard_set,
    verify_shard_set,
)
from todi.storage.batches import plan_batches
from todi.storage.retemper import temperature_index

if TYPE_CHECKING:
    from todi.trainer.student import StudentInfo


class DataError(TodiError, ValueError):
    """A shard set that cannot be trained on as asked; the message names both sides."""


class RawRow(NamedTuple):
    """One shard row, not yet decoded: its columns as plain Python values (whatever columns
    the set's codec uses; the top-k stays encoded until the row is trained on)."""

    sample_id: str
    length: int  # tokens in the sequence
    values: dict[str, Any]


# ------------------------------------------------------------------------------------------
# Pre-flight checks


def open_for_training(
    location: str, *, verify: bool = True, allow_incomplete: bool = False
) -> ShardSet:
    """Open a shard set, refusing one that is unreadable, corrupt, empty or incomplete.

    `verify` reads every listed shard and checks its size, sha256, footer and rows (the same
    check as `todi shards verify`); without it only the manifest is read."""
    try:
        shard_set = open_shard_set(location)
    except (ShardFormatError, OSError) as exc:
        raise DataError(f"shard set {location} cannot be opened: {exc}") from None
    if verify:
        report = verify_shard_set(location)
        if not report.ok:
            more = f" (+{len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
            raise DataError(f"shard set {location} failed verification: {report.problems[0]}{more}")
    if not shard_set.complete and not allow_incomplete:
        raise DataError(
            f"shard set {location} is marked incomplete (its writer did not finish: "
            f"{shard_set.num_rows} rows in {len(shard_set.shards)} shards); finish the "
            "precompute job, or pass --allow-incomplete to train on what is there"
        )
    if shard_set.num_rows == 0:
        raise DataError(f"shard set {location} has no rows")
    return shard_set


@dataclass(frozen=True)
class Pairing:
    """What the checks settled: the temperature, and the vocabulary the losses run over."""

    temperature: float
    vocab_limit: int  # student softmax over head rows [0, vocab_limit): the real tokens
    top_k: int


def check_pairing(
    meta: ShardSetMetadata, student: StudentInfo, temperature: float | None = None
) -> Pairing:
    """Refuse a student that does not match the shard set; every message names both values.

    Rules:
    - tokenizer: the student's `tokenizer_fingerprint` must equal the set's tokenizer_sha256
      (same text -> same ids; nothing else makes the teacher's ids mean anything).
    - vocabulary (padded heads, e.g. 151936 vs 152064 rows for a 151665-token tokenizer):
      V_tok = len(tokenizer) ids are real tokens, head rows >= V_tok are padding. The
      student's head (V_s rows) and the set's vocab_size (V_t, the teacher's head) may
      differ, but both must cover the tokenizer: V_s >= V_tok and V_t >= V_tok. The student
      softmax (CE and divergence) then runs over the first V_tok rows only: the padding rows
      are masked out (as if their logits were -inf), get no gradient and stay as they were;
      the exported model keeps its V_s rows. A stored teacher id >= V_tok (the teacher
      ranking a padding row into its top-k) stops training with an error naming the sample.
      The teacher's own mass on padding rows, if any, is part of its tail bucket.
    - temperature: the set's (applied by the teacher when it wrote the log-probs), or one of
      the set's `retemper_temperatures` (re-tempered exactly, `todi.storage.retemper`); any
      other is refused, naming the ones the set can serve.
    """
    if student.tokenizer_sha256 != meta.tokenizer_sha256:
        raise DataError(
            f"tokenizer mismatch: the shard set was written with tokenizer sha256 "
            f"{meta.tokenizer_sha256[:16]}… but the student's is "
            f"{student.tokenizer_sha256[:16]}… (the student must use the teacher's tokenizer)"
        )
    v_tok, v_s, v_t = student.tokenizer_size, student.vocab_size, meta.vocab_size
    if v_s < v_tok or v_t < v_tok:
        side = "student head" if v_s < v_tok else "shard set"
        raise DataError(
            f"vocabulary mismatch: shard set vocab_size {v_t} vs student head {v_s} rows; "
            f"the {side} is smaller than the tokenizer ({v_tok} tokens). Rule: both may "
            "exceed the tokenizer size (padding rows) but neither may be smaller"
        )
    if temperature is not None:
        try:
            temperature_index(meta, temperature)
        except ShardFormatError as exc:
            raise DataError(f"temperature mismatch: --temperature {first_line(exc)}") from None
    chosen = meta.temperature if temperature is None else float(temperature)
    return Pairing(temperature=chosen, vocab_limit=v_tok, top_k=meta.top_k)


def padding_row(ids: Any, vocab_limit: int | None) -> int | None:
    """The largest id of `ids` when it is a padding row of a padded head (>= vocab_limit),
    else None. `ids`: token ids of any shape, a numpy array or a torch tensor (may be empty).

    The vocabulary rule (`check_pairing`) keeps the softmax to the first `vocab_limit` rows;
    an id past them (an input, or a teacher top-k id) would be a token the student can never
    predict, so every reader of teacher ids refuses it through this one test."""
    if vocab_limit is None or ids is None:
        return None
    empty = ids.numel() == 0 if hasattr(ids, "numel") else ids.size == 0
    if empty:
        return None
    top = int(ids.max())
    return top if top >= vocab_limit else None


# ------------------------------------------------------------------------------------------
# Ray Data source


def shuffled_files(shard_set: ShardSet, seed: int) -> list:
    """The manifest's shards in an order that depends on `seed` only."""
    shards = list(shard_set.shards)
    random.Random(f"todi-files:{seed}").shuffle(shards)
    return shards


def _make_datasource(shard_set: ShardSet, shards: list):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ShardSetDatasource(Datasource):
        """One read task per shard file (manifest order given), one block per row group."""

        def get_name(self) -> str:
            return "TodiShards"

        def estimate_inmemory_data_size(self) -> int:
            return sum(s.bytes for s in shards) * 2

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
            tasks = []
            for info in shards:

                def read(info=info) -> Iterator[pa.Table]:
                    # Every failure names the file in one line (pyarrow's page-checksum
                    # error names none); a ShardFormatError is data, never retried.
                    pf = shard_set.open_shard_file(info)
                    for i in range(pf.num_row_groups):
                        try:
                            group = pf.read_row_group(i)
                        except (pa.ArrowException, OSError) as exc:
                            raise ShardFormatError(
                                f"{shard_set.path(info)}: row group {i} is unreadable "
                                f"({first_line(exc)})"
                            ) from None
                        yield group.replace_schema_metadata(None)

                meta = BlockMetadata(
                    num_rows=info.rows,
                    size_bytes=int(info.bytes * 2),
                    exec_stats=None,
                    input_files=[info.file],
                )
                tasks.append(ReadTask(read, meta))
            return tasks

    return ShardSetDatasource()


def build_dataset(shard_set: ShardSet, *, seed: int, read_cpus: float = 0.0):
    """Ray Dataset of raw shard rows (file order shuffled with `seed`).

    Read tasks ask for `read_cpus` CPUs (default 0: they only fetch and unzip Parquet; the
    decoding runs in the training workers), so reading never waits for CPUs that Ray Train
    has reserved for the workers."""
    import ray

    source = _make_datasource(shard_set, shuffled_files(shard_set, seed))
    return ray.data.read_datasource(source, num_cpus=read_cpus)


def raw_rows(table: pa.Table | pa.RecordBatch) -> tuple[pa.Schema, list[RawRow]]:
    """(schema, rows) of a block; rows are Python copies, so the shuffle buffer never pins
    whole Arrow blocks."""
    values = table.to_pylist()
    rows = [RawRow(v["sample_id"], len(v["input_ids"]), v) for v in values]
    return table.schema, rows


# ------------------------------------------------------------------------------------------
# The per-worker epoch stream


@dataclass(frozen=True)
class LoaderSettings:
    batch_size: int
    max_tokens: int | None
    shuffle_buffer: int
    bucket_buffer: int
    seed: int


def epoch_rng(seed: int, epoch: int, rank: int) -> random.Random:
    return random.Random(f"todi-data:{seed}:{epoch}:{rank}")


def epoch_batches(
    rows: Iterable[RawRow], settings: LoaderSettings, *, epoch: int, rank: int
) -> Iterator[list[RawRow]]:
    """Micro-batch plans for one epoch of one worker: a pure function of the rows' order and
    (seed, epoch, rank). Every row appears in exactly one plan."""
    return plan_batches(
        rows,
        length=lambda r: r.length,
        batch_size=settings.batch_size,
        max_tokens=settings.max_tokens,
        shuffle_buffer=settings.shuffle_buffer,
        bucket_buffer=settings.bucket_buffer,
        rng=epoch_rng(settings.seed, epoch, rank),
    )


def decode_rows(
    rows: list[RawRow],
    meta: ShardSetMetadata,
    schema: pa.Schema,
    *,
    pad_id: int,
    vocab_limit: int | None = None,
    temperature: float | None = None,
) -> Batch:
    """Decode a micro-batch plan into a padded `Batch` (validated like any shard read).

    `vocab_limit`: ids at or above it (padding rows of a padded head) are refused.
    `temperature`: the training temperature (re-tempered when it is not the set's)."""
    table = pa.Table.from_pylist([r.values for r in rows], schema=schema)
    samples = decode_table(table, meta, "training batch")
    if vocab_limit is not None and vocab_limit < meta.vocab_size:
        for s in samples:
            drawn = None if s.draws is None else s.draws.ids
            bad = [t for t in (padding_row(s.input_ids, vocab_limit),
                               padding_row(s.topk_ids, vocab_limit),
                               padding_row(drawn, vocab_limit)) if t is not None]  # fmt: skip
            if bad:
                top = max(bad)
                raise DataError(
                    f"sample {s.sample_id!r}: id {top} is a padding row of the head "
                    f"(>= tokenizer size {vocab_limit}); the vocabulary rule allows only "
                    "real tokens as inputs and teacher top-k ids"
                )
    return collate(samples, pad_id=pad_id, meta=meta, temperature=temperature)


def dummy_batch(k: int, pad_id: int) -> Batch:
    """A 1 x 2 batch with no counted position: lets a worker whose data ran out still take
    part in a synchronized backward (its loss and gradients are exactly zero)."""
    import torch

    return Batch(
        input_ids=torch.full((1, 2), pad_id, dtype=torch.long),
        attention_mask=torch.ones((1, 2), dtype=torch.long),
        labels=torch.full((1, 2), IGNORE_INDEX, dtype=torch.long),
        topk_ids=torch.zeros((1, 2, k), dtype=torch.long),
        topk_logprobs=torch.zeros((1, 2, k), dtype=torch.float32),
        sample_ids=[],
    )


def padding_counts(batch: Batch) -> tuple[int, int]:
    """(real tokens, padded slots) of a batch."""
    return int(batch.attention_mask.sum()), int(batch.attention_mask.numel())


def micro_batches_per_epoch(rows_per_worker: int, batch_size: int) -> int:
    """Exact with a fixed batch size and whole-batch buckets (see TrainConfig)."""
    return -(-rows_per_worker // batch_size)
