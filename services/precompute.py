"""One precompute job: score a dataset with the teacher and write a resumable shard set.

This module owns the steps every precompute mode shares: `todi.services.ray_precompute` runs
the same job on a Ray cluster through them, and `todi.services.jobs` queues jobs and
dispatches each to one mode or the other (`run_job`). `run_precompute` runs one job in this
process:

1. reads the existing set at `out` (if any): its sample ids in whole (committed) shards are
   done and are skipped, so a re-run computes only what is missing and every sample ends up
   exactly once, whether the last run finished, was cancelled, or was killed with SIGKILL;
2. a cheap first pass over the rows (tokenization only) gives the totals and catches bad
   rows and duplicate ids before the teacher runs;
3. the second pass sends batches of at most `batch_tokens` tokens to `backend.topk`, keeps
   rows first_position .. L-2 of each TopK (the stored positions, see `todi.storage.schema`) and
   writes through `storage.ShardSetWriter`, which commits a shard every
   `positions_per_shard` positions; the set is marked complete at the end.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from todi.common.errors import TodiError
from todi.services.config import JobSpec
from todi.services.datasets import EncodedRow, EncodeStats, encode_rows, read_rows
from todi.services.targets import TargetRequest
from todi.storage import (
    DEFAULT_CODEC,
    NoManifestError,
    Sample,
    ShardSetMetadata,
    ShardSetWriter,
    commit_shards,
    first_position,
    open_shard_set,
)
from todi.storage.fs import is_uri

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE_STATES = ("queued", "running")
LOCK_NAME = ".todi-job.lock"


class JobError(TodiError, ValueError):
    """A job that cannot run as asked (conflicting output, bad backend output)."""


class JobPathError(JobError):
    """An output (or dataset) path outside the allowed root: `..`, absolute, symlink escape."""


class JobLimitError(JobError):
    """Too many queued/running jobs (HTTP 429)."""


class JobConflictError(JobError):
    """Another job (or a set written by one) with different parameters owns this output."""


class JobNotFoundError(TodiError, KeyError):
    """No job with this id."""

    def __str__(self) -> str:
        return f"no job {self.args[0]!r}"


class JobProgress(BaseModel):
    """The state of one job, as `GET /v1/jobs/{id}` shows it."""

    job_id: str
    state: JobState = "queued"
    name: str | None = None
    dataset: str = ""
    out: str = ""
    sequences_done: int = 0
    sequences_total: int | None = None  # None until the first pass has counted
    tokens_done: int = 0
    tokens_total: int | None = None
    resumed_sequences: int = 0  # already in the set when this run started
    tokens_per_second: float = 0.0  # this run's teacher throughput (tokens of sequences)
    eta_seconds: float | None = None
    shards: int = 0
    truncated: int = 0
    empty_rows: int = 0
    empty_row_numbers: list[int] = Field(default_factory=list)
    dropped_long_prompt: int = 0
    dropped_row_numbers: list[int] = Field(default_factory=list)
    duplicates: int = 0
    error: str | None = None
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def apply_stats(self, stats: EncodeStats) -> None:
        self.truncated = stats.truncated
        self.empty_rows = stats.empty
        self.empty_row_numbers = list(stats.empty_rows)
        self.dropped_long_prompt = stats.dropped_long_prompt
        self.dropped_row_numbers = list(stats.dropped_rows)
        self.duplicates = stats.duplicates


# ----------------------------------------------------------------------------------------
# The steps every mode shares
# ----------------------------------------------------------------------------------------


def shard_metadata(info: Any, spec: JobSpec) -> ShardSetMetadata:
    """The shard-set metadata for a job run by a backend with `info` (a TeacherInfo)."""
    return teacher_shard_metadata(
        info, top_k=spec.top_k, temperature=spec.temperature, request=spec.target_request()
    )


def teacher_shard_metadata(
    info: Any,
    *,
    top_k: int,
    temperature: float,
    codec: str = DEFAULT_CODEC,
    request: TargetRequest | None = None,
) -> ShardSetMetadata:
    """The metadata of a set written from a backend with `info` (a TeacherInfo): top-k, or
    what `request` keeps."""
    sampled = request is not None and request.targets == "sampled"
    return ShardSetMetadata(
        teacher_model=info.model,
        teacher_fingerprint=info.weights_sha256,
        tokenizer_sha256=info.tokenizer_sha256,
        vocab_size=info.vocab_size,
        top_k=top_k,
        temperature=temperature,
        logprobs_mode=info.logprobs_mode,
        backend=info.backend,
        codec=codec,
        targets=request.targets if request is not None else "topk",
        draws=request.draws if request is not None else 0,
        sample_seed=request.sample_seed if sampled else None,
        candidates=None if not sampled or info.full_distribution else int(info.max_top_k),
        retemper_temperatures=request.retemper if request is not None else (),
    )


def check_spec(backend: Any, spec: JobSpec) -> None:
    """Raise BackendError unless `backend` can run `spec` (its k, T and targets)."""
    backend.validate([[0, 0]], max(spec.top_k, 1), spec.temperature)
    request = spec.target_request()
    if request.needs_full_distribution:
        backend.check_targets(request)


def normalized_spec(spec: JobSpec) -> JobSpec:
    """The spec with absolute local paths (what the manifest records and compares)."""
    update = {
        name: str(Path(value).absolute())
        for name, value in (("dataset", spec.dataset), ("out", spec.out))
        if not is_uri(value)
    }
    return spec.model_copy(update=update)


def effective_max_len(spec: JobSpec, info: Any) -> int:
    """max_seq_len, capped by what the backend accepts (longer rows are cut and counted)."""
    limit = int(info.max_model_len)
    return min(spec.max_seq_len, limit) if spec.max_seq_len else limit


def existing_sample_ids(spec: JobSpec, metadata: ShardSetMetadata) -> set[str]:
    """Ids in the whole shards of the set at `spec.out` (empty if none), after checking that
    the set was written by the same kind of job (same signature and job identity)."""
    if not (Path(spec.out) / "manifest.json").exists() and not is_uri(spec.out):
        return set()
    try:
        shard_set = open_shard_set(spec.out)
    except NoManifestError:
        return set()
    diffs = shard_set.signature.signature_differences(metadata)
    if diffs:
        raise JobConflictError(
            f"{spec.out}: holds a shard set written with another teacher signature "
            f"(existing != this job): {'; '.join(diffs)}; choose another output",
            field="out",
        )
    recorded = shard_set.manifest.job or {}
    diffs = spec.identity_differences(recorded)
    if diffs:
        raise JobConflictError(
            f"{spec.out}: holds a shard set written by a different job (existing != this "
            f"job): {'; '.join(diffs)}; resume it with the same parameters or choose another "
            f"output",
            field="out",
        )
    return shard_set.sample_ids()


def job_rows(
    spec: JobSpec, tokenizer: Any, max_len: int, stats: EncodeStats
) -> Iterator[EncodedRow]:
    """The job's dataset, read and tokenized the way every pass over it must see it."""
    return encode_rows(
        read_rows(spec.dataset),
        tokenizer,
        max_seq_len=max_len,
        chat_template=spec.chat_template,
        stats=stats,
    )


def count_rows(
    spec: JobSpec, tokenizer: Any, max_len: int, done: set[str]
) -> tuple[EncodeStats, int, int]:
    """First pass: (stats, sequences already done, their tokens). Tokenization only."""
    stats = EncodeStats()
    done_seqs = done_tokens = 0
    for row in job_rows(spec, tokenizer, max_len, stats):
        if row.sample_id in done:
            done_seqs += 1
            done_tokens += row.num_tokens
    return stats, done_seqs, done_tokens


def to_samples(rows: list[EncodedRow], results: list[Any], top_k: int) -> list[Sample]:
    """Samples from rows and their TopK (L-1 rows each): keep rows first_position .. L-2."""
    if len(results) != len(rows):
        raise JobError(f"backend returned {len(results)} results for {len(rows)} sequences")
    samples = []
    for row, res in zip(rows, results, strict=True):
        want = (row.num_tokens - 1, top_k)
        if tuple(res.ids.shape) != want or tuple(res.logprobs.shape) != want:
            raise JobError(
                f"backend returned top-k of shape {tuple(res.ids.shape)} for sample "
                f"{row.sample_id!r}, expected {want}"
            )
        fp = first_position(row.prompt_len)
        samples.append(
            Sample(
                sample_id=row.sample_id,
                input_ids=row.input_ids,
                prompt_len=row.prompt_len,
                topk_ids=np.ascontiguousarray(res.ids[fp:], dtype=np.int32),
                topk_logprobs=np.ascontiguousarray(res.logprobs[fp:], dtype=np.float32),
            )
        )
    return samples


class Coverage:
    """Teacher mass of the candidate sets the draws came from (1.0 with the full vocabulary):
    what the manifest's job record reports as `coverage`."""

    def __init__(self) -> None:
        self.positions = 0
        self.total = 0.0
        self.least = 1.0
        self.below = 0  # positions under 99.9 %

    def add(self, covered: np.ndarray) -> None:
        if covered.size:
            self.positions += int(covered.size)
            self.total += float(covered.sum())
            self.least = min(self.least, float(covered.min()))
            self.below += int((covered < 0.999).sum())

    def merge(self, other: dict[str, Any]) -> None:
        n = int(other.get("positions", 0))
        if n:
            self.positions += n
            self.total += float(other["mean"]) * n
            self.least = min(self.least, float(other["min"]))
            self.below += int(other["below_999"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "positions": self.positions,
            "mean": self.total / self.positions if self.positions else 1.0,
            "min": self.least,
            "below_999": self.below,
        }


def score(
    backend: Any, rows: list[EncodedRow], spec: JobSpec, coverage: Coverage | None = None
) -> list[Sample]:
    """The samples of `rows` as the job's targets ask (one backend call)."""
    request = spec.target_request()
    seqs = [r.input_ids for r in rows]
    if not request.needs_full_distribution:
        return to_samples(rows, backend.topk(seqs, spec.top_k, spec.temperature), spec.top_k)
    results = backend.targets(
        seqs,
        request,
        spec.temperature,
        keys=[r.sample_id for r in rows],
        starts=[first_position(r.prompt_len) for r in rows],
    )
    if len(results) != len(rows):
        raise JobError(f"backend returned {len(results)} results for {len(rows)} sequences")
    samples = []
    for row, t in zip(rows, results, strict=True):
        if coverage is not None:
            coverage.add(t.covered)
        samples.append(
            Sample(
                sample_id=row.sample_id,
                input_ids=row.input_ids,
                prompt_len=row.prompt_len,
                topk_ids=t.topk_ids,
                topk_logprobs=t.topk_logprobs,
                draws=t.draws,
                tail_logz=t.tail_logz,
            )
        )
    return samples


def batched(rows: Any, batch_tokens: int) -> Any:
    """Group rows into lists whose token sum is <= batch_tokens (a longer row goes alone)."""
    batch: list[EncodedRow] = []
    tokens = 0
    for row in rows:
        if batch and tokens + row.num_tokens > batch_tokens:
            yield batch
            batch, tokens = [], 0
        batch.append(row)
        tokens += row.num_tokens
    if batch:
        yield batch


class Clock:
    """tokens/s and ETA for the work done in this run."""

    def __init__(self, progress: JobProgress) -> None:
        self.progress = progress
        self.start = time.monotonic()
        self.tokens = 0

    def add(self, sequences: int, tokens: int) -> None:
        p = self.progress
        self.tokens += tokens
        p.sequences_done += sequences
        p.tokens_done += tokens
        elapsed = max(time.monotonic() - self.start, 1e-9)
        p.tokens_per_second = self.tokens / elapsed
        if p.tokens_total is not None and p.tokens_per_second > 0:
            p.eta_seconds = max(p.tokens_total - p.tokens_done, 0) / p.tokens_per_second


@contextlib.contextmanager
def output_lock(out: str) -> Iterator[None]:
    """Hold an exclusive lock on the output set while a job writes it (local paths).

    Two writers of the same set at once could both compute a sample missing from the
    manifest and commit it twice; the lock makes the second one fail fast instead. It is a
    flock, so the kernel drops it when the holder dies (kill -9 included).
    """
    if is_uri(out):
        yield  # object stores: the caller (one driver) is the only writer
        return
    import fcntl

    Path(out).mkdir(parents=True, exist_ok=True)
    fd = os.open(os.path.join(out, LOCK_NAME), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobConflictError(
                f"out: {out} is being written by another running job (lock {LOCK_NAME})",
                field="out",
            ) from None
        yield
    finally:
        os.close(fd)


def start_progress(
    spec: JobSpec, on_progress: Callable[[JobProgress], None] | None
) -> tuple[JobProgress, Callable[[], None]]:
    """A running job's progress record and the callback that reports a copy of it."""
    progress = JobProgress(
        job_id=spec.job_id or "local",
        name=spec.name,
        dataset=spec.dataset,
        out=spec.out,
        state="running",
        started_at=time.time(),
    )

    def report() -> None:
        if on_progress is not None:
            on_progress(progress.model_copy(deep=True))

    return progress, report


def prepare(
    spec: JobSpec, info: Any, on_progress: Callable[[JobProgress], None] | None
) -> tuple[ShardSetMetadata, int, JobProgress, Callable[[], None]]:
    """(metadata, max_len, progress, report) of a job about to run with a teacher `info`."""
    progress, report = start_progress(spec, on_progress)
    return shard_metadata(info, spec), effective_max_len(spec, info), progress, report


def job_record_of(spec: JobSpec, info: Any) -> dict[str, Any]:
    """What the manifest records about the job that writes the set (its `job` field)."""
    return {**spec.model_dump(mode="json"), "teacher": info.model, "backend": info.backend}


def commit_end(
    spec: JobSpec,
    metadata: ShardSetMetadata,
    job_record: dict[str, Any],
    stats: EncodeStats,
    progress: JobProgress,
    complete: bool,
) -> None:
    """Commit the set at the end of a run (finished or not; the whole shards written so far
    are already in it); only a finished pass records the dataset's stats and `complete`."""
    if complete:
        job_record["stats"] = stats.to_dict()
    manifest = commit_shards(spec.out, metadata, complete=complete, job=job_record)
    progress.shards = len(manifest.shards)


def finish(progress: JobProgress, report: Callable[[], None], complete: bool) -> JobProgress:
    """Mark a run that stopped without an error succeeded (complete) or cancelled; report it."""
    progress.state = "succeeded" if complete else "cancelled"
    progress.eta_seconds = 0.0 if complete else None
    progress.finished_at = time.time()
    report()
    return progress


def run_precompute(
    spec: JobSpec,
    backend: Any,
    *,
    on_progress: Callable[[JobProgress], None] | None = None,
    cancel: threading.Event | None = None,
    count_totals: bool = True,
) -> JobProgress:
    """Run one precompute job in this process (see the module docstring).

    Returns the final JobProgress with state "succeeded" or "cancelled" (a cancelled job
    leaves a valid set with complete=false). Raises DatasetError, BackendError,
    JobConflictError or ShardFormatError on bad input; the whole shards written before the
    error stay committed, so a fixed re-run resumes. `on_progress` gets a copy of the
    progress after the first pass and after every backend call.
    """
    spec = normalized_spec(spec)
    check_spec(backend, spec)  # refuse k / T / targets before any work
    metadata, max_len, progress, report = prepare(spec, backend.info, on_progress)
    with output_lock(spec.out):
        return _precompute(spec, backend, metadata, max_len, progress, report, cancel,
                           count_totals)  # fmt: skip


def _precompute(
    spec: JobSpec,
    backend: Any,
    metadata: ShardSetMetadata,
    max_len: int,
    progress: JobProgress,
    report: Callable[[], None],
    cancel: threading.Event | None,
    count_totals: bool,
) -> JobProgress:
    done = existing_sample_ids(spec, metadata)
    if count_totals:
        stats, done_seqs, done_tokens = count_rows(spec, backend.tokenizer, max_len, done)
        progress.sequences_total, progress.tokens_total = stats.sequences, stats.tokens
        progress.sequences_done = progress.resumed_sequences = done_seqs
        progress.tokens_done = done_tokens
        progress.apply_stats(stats)
    report()

    job_record = job_record_of(spec, backend.info)
    writer = ShardSetWriter(
        spec.out, metadata, positions_per_shard=spec.positions_per_shard, job=job_record
    )
    stats = EncodeStats()
    clock = Clock(progress)
    coverage = Coverage()
    complete = False
    try:
        todo = (
            row
            for row in job_rows(spec, backend.tokenizer, max_len, stats)
            if row.sample_id not in done
        )
        for rows in batched(todo, spec.batch_tokens):
            if cancel is not None and cancel.is_set():
                break
            writer.write_many(score(backend, rows, spec, coverage))
            job_record["coverage"] = coverage.to_dict()
            clock.add(len(rows), sum(r.num_tokens for r in rows))
            progress.shards = len(writer.manifest.shards)
            report()
        else:
            complete = True
    except BaseException:
        # The whole samples already computed stay committed: a fixed re-run resumes there.
        with contextlib.suppress(Exception):
            writer.flush()
        raise
    # Cancelled or finished: commit what is buffered; only a finished pass is complete.
    writer.flush()
    commit_end(spec, metadata, job_record, stats, progress, complete)
    if not count_totals:
        progress.apply_stats(stats)
    return finish(progress, report, complete)
