"""`--ray` precompute: Ray Data over the encoded rows, a pool of teacher actors writing shards.

    driver:  rows --encode_rows--> staging Parquet files of the rows still to do, each about
             `positions_per_shard` positions (= one future shard)
    Ray Data: from_items(staging files) .map_batches(TeacherActor,
             compute=ActorPoolStrategy(size=num_actors))
    actor:   staging file -> backend.topk (batch_tokens per call) -> storage.write_shard
             -> storage.commit_shards  (one whole shard per file, committed by the actor)
    driver:  streams the per-shard results (progress, cancel), then marks the set complete.

One engine per actor (on a cluster with GPUs each reserves tensor x pipeline parallel size GPUs:
`actor_resources`). The driver tokenizes
(rules of `todi.services.datasets`), skips the ids already in whole shards of the output set, and
stages only the rows still to do, so a re-run (after a cancel, a crash, or a killed driver)
computes exactly the missing samples, as `todi.services.precompute.run_precompute` does; the
two modes resume each other's sets. The actors commit their own shards (the manifest update is
lock-protected), so finished work survives a dead driver.

The output must be a path every node sees (local disk for one node, a shared filesystem for
a cluster): the staging folder lives inside the output set (`<out>/.staging-<id>/`; readers
only read manifest-listed files) and is removed when the job completes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from todi.services.config import JobSpec
from todi.services.datasets import EncodeStats
from todi.services.precompute import (
    Clock,
    Coverage,
    JobError,
    JobProgress,
    batched,
    commit_end,
    existing_sample_ids,
    finish,
    job_record_of,
    job_rows,
    normalized_spec,
    output_lock,
    prepare,
    score,
    shard_metadata,
)
from todi.storage import ShardInfo, ShardSetMetadata, commit_shards, expected_positions, write_shard
from todi.storage.fs import is_uri

STAGING_PREFIX = ".staging-"
_STAGING_FILE_ROWS = 16_384


class TeacherActor:
    """One teacher engine; turns a batch of encoded rows into one committed shard."""

    def __init__(
        self,
        backend: str,
        model: str,
        backend_options: dict[str, Any],
        spec_json: dict[str, Any],
        metadata_json: dict[str, Any],
        commit: bool,
    ) -> None:
        self.spec = JobSpec.model_validate(spec_json)
        self.metadata = ShardSetMetadata.model_validate(metadata_json)
        self.commit = commit
        self.backend = _actor_backend(backend, model, backend_options)
        mine = shard_metadata(self.backend.info, self.spec)
        diffs = mine.signature_differences(self.metadata)
        if diffs:
            raise JobError(
                f"ray actor: this actor's teacher differs from the job's (actor != job): "
                f"{'; '.join(diffs)}"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """batch["path"]: staging files; each becomes one shard."""
        shards, sequences, tokens, coverage = [], [], [], []
        for path in batch["path"]:
            self.coverage = Coverage()
            info, n, t = self._one(str(path))
            shards.append(info.model_dump_json())
            sequences.append(n)
            tokens.append(t)
            coverage.append(json.dumps(self.coverage.to_dict()))
        return {
            "shard": np.array(shards),
            "sequences": np.array(sequences, dtype=np.int64),
            "tokens": np.array(tokens, dtype=np.int64),
            "coverage": np.array(coverage),
        }

    def _one(self, path: str) -> tuple[ShardInfo, int, int]:
        import pyarrow.parquet as pq

        from todi.services.datasets import EncodedRow

        table = pq.read_table(path)
        rows = [
            EncodedRow(sid, np.asarray(ids, dtype=np.int32), int(plen), -1)
            for sid, ids, plen in zip(
                table.column("sample_id").to_pylist(),
                table.column("input_ids").to_pylist(),
                table.column("prompt_len").to_pylist(),
                strict=True,
            )
        ]
        samples = []
        for chunk in batched(rows, self.spec.batch_tokens):
            samples.extend(score(self.backend, chunk, self.spec, self.coverage))
        info = write_shard(self.spec.out, samples, self.metadata)
        if self.commit:
            commit_shards(self.spec.out, self.metadata, [info])
        return info, len(rows), sum(r.num_tokens for r in rows)


def _actor_backend(backend: str, model: str, options: dict[str, Any]) -> Any:
    """The backend inside a Ray worker. Several actors may share a node, so a vLLM CPU engine
    must not pin its threads to the cores of the whole machine (`cpu_engine_env`): it runs
    unbound with the OMP_NUM_THREADS Ray gives a worker (its num_cpus)."""
    from todi.services.backends import create_backend

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    return create_backend(backend, model, **options)


def engine_gpus(backend: str, options: dict[str, Any]) -> int:
    """GPUs one teacher engine uses: for vLLM, tensor_parallel_size x pipeline_parallel_size
    of its `engine_args` (`todi serve -o engine_args='{"tensor_parallel_size": 4}'`); 1 for
    the other backends (hf runs on one device; remote uses none of the cluster's, but an
    actor that holds one does no harm and keeps the accounting simple)."""
    if backend != "vllm":
        return 1
    args = options.get("engine_args") or {}
    return int(args.get("tensor_parallel_size", 1)) * int(args.get("pipeline_parallel_size", 1))


def actor_resources(
    backend: str,
    options: dict[str, Any],
    *,
    node_gpus: list[float],
    num_actors: int,
    actor_num_cpus: float | None = None,
    actor_num_gpus: float | None = None,
) -> dict[str, Any]:
    """The Ray resources of one teacher actor (`num_cpus`, `num_gpus`), checked against the
    cluster's GPUs (`node_gpus`: per alive node) before anything starts.

    On a cluster with GPUs an actor reserves what its engine needs (`engine_gpus`) unless
    `actor_num_gpus` says otherwise; on one without, none. One engine runs on one node (its
    tensor/pipeline workers are processes of the actor), so it must fit on a node; and the
    pool must fit in the cluster: Ray would otherwise wait for GPUs that never come."""
    total = float(sum(node_gpus))
    per = (
        actor_num_gpus
        if actor_num_gpus is not None
        else (engine_gpus(backend, options) if total else 0)
    )
    if per and per > max(node_gpus, default=0):
        raise JobError(
            f"ray: one teacher engine needs {per:g} GPUs (tensor x pipeline parallel size), "
            f"but no node of the cluster has that many (GPUs per node: {sorted(node_gpus)})"
        )
    if per and num_actors * per > total:
        raise JobError(
            f"ray: {num_actors} teacher actors x {per:g} GPUs each = {num_actors * per:g} GPUs, "
            f"the cluster has {total:g}: use --num-actors {int(total // per)} or fewer"
        )
    args: dict[str, Any] = {"num_cpus": actor_num_cpus if actor_num_cpus is not None else 1}
    if per:
        args["num_gpus"] = per
    return args


def actor_engine_options(backend: str, options: dict[str, Any], num_gpus: float) -> dict[str, Any]:
    """The backend options an actor starts its engine with: a vLLM engine over several GPUs
    runs its workers as processes of the actor (`distributed_executor_backend="mp"`) on the
    GPUs Ray assigned to the actor, instead of asking Ray for a placement group of its own
    (which would reserve the same GPUs a second time)."""
    if backend != "vllm" or num_gpus <= 1:
        return options
    args = dict(options.get("engine_args") or {})
    args.setdefault("distributed_executor_backend", "mp")
    return {**options, "engine_args": args}


def _probe_info(backend: str, model: str, options: dict[str, Any], remote_args: dict) -> Any:
    """Start the backend once in a Ray task to learn its TeacherInfo (fingerprints, limits)."""
    import ray

    @ray.remote(**remote_args)
    def probe() -> dict[str, Any]:
        with _actor_backend(backend, model, options) as b:
            return b.info.to_dict()

    from todi.services.backends import TeacherInfo

    data = ray.get(probe.remote())
    temps = data.get("temperatures")
    data["temperatures"] = None if temps is None else tuple(temps)
    return TeacherInfo(**data)


def _stage(
    spec: JobSpec, tokenizer: Any, max_len: int, done: set[str], staging: Path
) -> tuple[EncodeStats, int, int, int, int]:
    """Write the rows still to do as Parquet files under `staging`, one file per shard
    (about `positions_per_shard` positions), so the rows spread over many Ray Data blocks.

    Returns (stats, todo sequences, todo tokens, todo positions, done tokens).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            pa.field("sample_id", pa.string()),
            pa.field("input_ids", pa.list_(pa.int32())),
            pa.field("prompt_len", pa.int32()),
        ]
    )
    staging.mkdir(parents=True)
    stats = EncodeStats()
    todo_seqs = todo_tokens = todo_positions = done_tokens = 0
    buf: list[Any] = []
    buf_positions = 0
    files = 0

    def flush() -> None:
        nonlocal buf, buf_positions, files
        if not buf:
            return
        table = pa.table(
            {
                "sample_id": pa.array([r.sample_id for r in buf], pa.string()),
                "input_ids": pa.array([r.input_ids for r in buf], pa.list_(pa.int32())),
                "prompt_len": pa.array([r.prompt_len for r in buf], pa.int32()),
            },
            schema=schema,
        )
        pq.write_table(table, staging / f"rows-{files:06d}.parquet")
        files += 1
        buf, buf_positions = [], 0

    for row in job_rows(spec, tokenizer, max_len, stats):
        if row.sample_id in done:
            done_tokens += row.num_tokens
            continue
        positions = expected_positions(row.num_tokens, row.prompt_len)
        buf.append(row)
        buf_positions += positions
        todo_seqs += 1
        todo_tokens += row.num_tokens
        todo_positions += positions
        if buf_positions >= spec.positions_per_shard or len(buf) >= _STAGING_FILE_ROWS:
            flush()
    flush()
    return stats, todo_seqs, todo_tokens, todo_positions, done_tokens


def _remove_staging(out: str, keep: Path | None = None) -> None:
    root = Path(out)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(STAGING_PREFIX) and p != keep:
            shutil.rmtree(p, ignore_errors=True)


def run_ray_precompute(
    spec: JobSpec,
    *,
    backend: str,
    model: str | os.PathLike[str],
    backend_options: dict[str, Any] | None = None,
    info: Any = None,
    on_progress: Callable[[JobProgress], None] | None = None,
    cancel: threading.Event | None = None,
    actor_num_cpus: float | None = None,
    actor_num_gpus: float | None = None,
) -> JobProgress:
    """Run a precompute job on the current Ray cluster (`ray.init()` if none is connected;
    `RAY_ADDRESS` selects a cluster) with `spec.num_actors` teacher actors.

    `info` (the TeacherInfo of the same backend/model, e.g. the service's engine) spares a
    probe task that starts the engine once to learn it; every actor checks that its own
    engine has the same signature. Each actor reserves `actor_num_gpus` GPUs (default: what
    its engine needs when the cluster has GPUs, `engine_gpus`, else 0) and `actor_num_cpus`
    CPUs (default 1). The output must be
    a filesystem path every node sees (object-store URIs are refused: the actors commit
    their own shards under a file lock). `cancel` is checked whenever a shard comes back.
    """
    import ray

    if is_uri(spec.out):
        raise JobError("out: --ray jobs write to a shared filesystem path, not a URI")
    spec = normalized_spec(spec)
    spec = spec.model_copy(update={"out": str(Path(spec.out).absolute())})
    model = str(model)
    options = dict(backend_options or {})
    if not ray.is_initialized():
        from todi.common.raycluster import join_cluster

        join_cluster()  # RAY_ADDRESS, or a local cluster
    if _through_ray_client():
        return _run_on_cluster(
            {
                "spec": spec, "backend": backend, "model": model, "backend_options": options,
                "info": info, "actor_num_cpus": actor_num_cpus, "actor_num_gpus": actor_num_gpus,
            },
            on_progress,
            cancel,
        )  # fmt: skip
    remote_args = actor_resources(
        backend,
        options,
        node_gpus=[n["Resources"].get("GPU", 0) for n in ray.nodes() if n.get("Alive")],
        num_actors=spec.num_actors,
        actor_num_cpus=actor_num_cpus,
        actor_num_gpus=actor_num_gpus,
    )
    options = actor_engine_options(backend, options, remote_args.get("num_gpus", 0))
    if info is None:
        info = _probe_info(backend, model, options, remote_args)
    metadata, max_len, progress, report = prepare(spec, info, on_progress)
    with output_lock(spec.out):
        return _run(spec, backend, model, options, remote_args, info, metadata, max_len,
                    progress, report, cancel)  # fmt: skip


def _through_ray_client() -> bool:
    from ray.util.client import ray as client_ray

    return client_ray.is_connected()


class _ClusterDriver:
    """A `--ray` precompute job run inside the cluster, for a caller that is a Ray client
    (`ray://...`, e.g. the compose stack's teacher service). Ray Data's streaming executor
    needs a driver on a cluster node: through the client it fails ("'Worker' object has no
    attribute 'core_worker'", Ray 2.60). The job runs in a thread; the caller polls it."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self._cancel = threading.Event()
        self._progress: dict[str, Any] | None = None
        self._outcome: tuple[str, Any] | None = None
        threading.Thread(target=self._main, args=(kwargs,), daemon=True).start()

    def _main(self, kwargs: dict[str, Any]) -> None:
        try:
            result = run_ray_precompute(**kwargs, on_progress=self._report, cancel=self._cancel)
            self._outcome = ("ok", result.model_dump(mode="json"))
        except Exception as exc:  # the caller re-raises it with its message
            message = str(exc) if isinstance(exc, JobError) else f"{type(exc).__name__}: {exc}"
            self._outcome = ("error", message)

    def _report(self, progress: JobProgress) -> None:
        self._progress = progress.model_dump(mode="json")

    def poll(self) -> tuple[dict[str, Any] | None, tuple[str, Any] | None]:
        return self._progress, self._outcome

    def cancel(self) -> None:
        self._cancel.set()


def _run_on_cluster(
    kwargs: dict[str, Any],
    on_progress: Callable[[JobProgress], None] | None,
    cancel: threading.Event | None,
    poll_seconds: float = 1.0,
) -> JobProgress:
    import ray

    driver = ray.remote(num_cpus=0)(_ClusterDriver).remote(kwargs)
    try:
        cancel_sent = False
        while True:
            progress, outcome = ray.get(driver.poll.remote())
            if progress is not None and on_progress is not None:
                on_progress(JobProgress.model_validate(progress))
            if outcome is not None:
                break
            if cancel is not None and cancel.is_set() and not cancel_sent:
                ray.get(driver.cancel.remote())
                cancel_sent = True
            time.sleep(poll_seconds)
    finally:
        ray.kill(driver)
    kind, value = outcome
    if kind == "error":
        raise JobError(value)
    return JobProgress.model_validate(value)


def _run(
    spec: JobSpec,
    backend: str,
    model: str,
    options: dict[str, Any],
    remote_args: dict[str, Any],
    info: Any,
    metadata: ShardSetMetadata,
    max_len: int,
    progress: JobProgress,
    report: Callable[[], None],
    cancel: threading.Event | None,
) -> JobProgress:
    from transformers import AutoTokenizer

    done = existing_sample_ids(spec, metadata)
    job_record = job_record_of(spec, info)
    manifest = commit_shards(spec.out, metadata, complete=False, job=job_record)
    progress.shards = len(manifest.shards)
    _remove_staging(spec.out)  # left by an earlier run that was cancelled or killed
    staging = Path(spec.out) / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    tokenizer = AutoTokenizer.from_pretrained(model)
    stats, todo_seqs, _todo_tokens, _todo_positions, done_tokens = _stage(
        spec, tokenizer, max_len, done, staging
    )
    progress.apply_stats(stats)
    progress.sequences_total, progress.tokens_total = stats.sequences, stats.tokens
    progress.sequences_done = progress.resumed_sequences = stats.sequences - todo_seqs
    progress.tokens_done = done_tokens
    report()

    complete = False
    coverage = Coverage()
    try:
        actor_kwargs = {
            "backend": backend,
            "model": model,
            "backend_options": options,
            "spec_json": spec.model_dump(mode="json"),
            "metadata_json": metadata.model_dump(mode="json"),
            "commit": True,
        }
        complete = todo_seqs == 0 or _stream_shards(
            staging, spec.num_actors, actor_kwargs, remote_args, stats.sequences, progress,
            report, cancel, coverage,
        )  # fmt: skip
    finally:
        if complete:
            shutil.rmtree(staging, ignore_errors=True)
        job_record["coverage"] = coverage.to_dict()
        commit_end(spec, metadata, job_record, stats, progress, complete)
    return finish(progress, report, complete)


def _stream_shards(
    staging: Path,
    num_actors: int,
    actor_kwargs: dict[str, Any],
    remote_args: dict[str, Any],
    sequences_total: int,
    progress: JobProgress,
    report: Callable[[], None],
    cancel: threading.Event | None,
    coverage: Coverage,
) -> bool:
    """Run `num_actors` TeacherActors (built from `actor_kwargs`) over the staging files,
    counting the shards as they come back.

    Returns True when every staged row came back, False when `cancel` stopped the stream.
    """
    import ray

    clock = Clock(progress)
    # One item per staging file (about one shard's positions, see _stage), one block
    # per item: every actor gets work and each call writes exactly one shard. (Reading
    # the rows through read_parquet would let Ray merge the small files into one
    # block, i.e. one actor.)
    files = sorted(str(f) for f in staging.glob("*.parquet"))
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    results = ds.map_batches(
        TeacherActor,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        fn_constructor_kwargs=actor_kwargs,
        **remote_args,
    )
    cancelled = False
    iterator = results.iter_batches(batch_size=None, batch_format="numpy")
    try:
        for out in iterator:
            progress.shards += len(out["shard"])  # committed by the actors
            clock.add(int(out["sequences"].sum()), int(out["tokens"].sum()))
            for c in out["coverage"]:
                coverage.merge(json.loads(str(c)))
            report()
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()
    if not cancelled and progress.sequences_done != sequences_total:
        raise JobError(
            f"ray: {progress.sequences_done} of {sequences_total} sequences came back "
            f"from the actors; re-run the job to compute the rest"
        )
    return not cancelled
