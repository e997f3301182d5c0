"""Precompute jobs behind the service: a queue, JSON records, recovery, mode dispatch.

`JobManager` runs jobs on a background thread over one shared backend and keeps a JSON
record per job under `<storage_root>/.todi-jobs/`, so that after a restart (even kill -9)
`recover()` re-queues the jobs that were queued or running and they resume (see
`todi.services.precompute`, which runs one job). `run_job` sends a job to the mode it asks
for: in this process or on a Ray cluster (`todi.services.ray_precompute`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from todi.services.config import JobSpec
from todi.services.datasets import DatasetError
from todi.services.precompute import (
    ACTIVE_STATES,
    JobConflictError,
    JobError,
    JobLimitError,
    JobNotFoundError,
    JobPathError,
    JobProgress,
    JobState,
    check_spec,
    run_precompute,
)
from todi.storage import ShardFormatError
from todi.storage.fs import is_uri

log = logging.getLogger(__name__)

JOBS_DIR = ".todi-jobs"


def run_job(
    spec: JobSpec,
    engine: Any = None,
    *,
    ray_backend: tuple[str, str, dict[str, Any]] | None = None,
    on_progress: Callable[[JobProgress], None] | None = None,
    cancel: threading.Event | None = None,
) -> JobProgress:
    """Run one job in the mode `spec.ray` asks for.

    In this process: with `engine` (a backend). On a Ray cluster: every actor starts its own
    `ray_backend` = (backend kind, model, options); `engine`, when given, is the same teacher
    and spares the probe of its TeacherInfo.
    """
    if not spec.ray:
        return run_precompute(spec, engine, on_progress=on_progress, cancel=cancel)
    from todi.services.ray_precompute import run_ray_precompute

    if ray_backend is None:
        raise JobError("ray: no backend for the actors")
    kind, model, options = ray_backend
    return run_ray_precompute(
        spec,
        backend=kind,
        model=model,
        backend_options=options,
        info=None if engine is None else engine.info,
        on_progress=on_progress,
        cancel=cancel,
    )


# ----------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------


def confine(root: str | os.PathLike[str], path: str, what: str = "out") -> Path:
    """`path` (relative to `root`, or absolute inside it) as an absolute path inside `root`.

    Refuses `..` components, URIs, absolute paths outside `root`, the root itself, the jobs
    folder, and paths whose existing part resolves (through symlinks) outside `root`.
    """
    real_root = Path(os.path.realpath(root))
    text = str(path)
    where = "the dataset root" if what == "dataset" else "the storage root"
    if is_uri(text):
        raise JobPathError(f"{what}: {text!r} must be a path under {where}, not a URI", field=what)
    if "\x00" in text:
        raise JobPathError(f"{what}: path contains a NUL byte", field=what)
    p = Path(text)
    if ".." in p.parts:
        raise JobPathError(f"{what}: {text!r} must not contain '..'", field=what)
    candidate = p if p.is_absolute() else Path(root) / p
    # realpath resolves every existing component (symlinks included); the rest stays as is.
    try:
        resolved = Path(os.path.realpath(candidate))
    except OSError as exc:  # ENAMETOOLONG, ELOOP: the path is the client's fault
        raise JobPathError(
            f"{what}: {text!r} is not a usable path ({exc.strerror})", field=what
        ) from None
    try:
        rel = resolved.relative_to(real_root)
    except ValueError:
        # The resolved path is not shown: it would tell a client where the server's files are.
        raise JobPathError(f"{what}: {text!r} resolves outside {where}", field=what) from None
    if not rel.parts:
        raise JobPathError(f"{what}: {text!r} is {where} itself; name a folder in it", field=what)
    if rel.parts[0] == JOBS_DIR:
        raise JobPathError(
            f"{what}: {text!r} is inside the job records folder {JOBS_DIR}",
            field=what,
        )
    return resolved


# ----------------------------------------------------------------------------------------
# The job manager
# ----------------------------------------------------------------------------------------


class _Job:
    def __init__(self, spec: JobSpec, progress: JobProgress) -> None:
        self.spec = spec
        self.progress = progress
        self.cancel = threading.Event()
        self.interrupted = False  # cancelled by shutdown: resume on recover, not "cancelled"
        self.last_saved = 0.0


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class JobManager:
    """Runs precompute jobs in background threads on one shared backend; survives restarts.

    `backend` is a TeacherBackend or a zero-argument factory (called once, lazily, in the
    worker). At most `max_concurrent` jobs run at once (they share the backend, whose calls
    are serialized anyway) and at most `max_jobs` are queued or running (JobLimitError).
    Each job's spec and progress are saved to `<storage_root>/.todi-jobs/<job_id>.json` on
    every state change and at most every `save_interval_s` during a run.

    `dataset_root`, if given, confines dataset paths like output paths (relative datasets
    are then relative to it); otherwise relative datasets are relative to `storage_root`.
    `ray_backend` ({"backend": kind, "model": dir, **options}) is what `--ray` jobs start in
    each actor; by default the shared backend's kind and model folder.
    """

    def __init__(
        self,
        storage_root: str | os.PathLike[str],
        backend: Any,
        max_concurrent: int = 1,
        *,
        max_jobs: int = 16,
        dataset_root: str | os.PathLike[str] | None = None,
        ray_backend: dict[str, Any] | None = None,
        save_interval_s: float = 1.0,
    ) -> None:
        if max_concurrent < 1 or max_jobs < 1:
            raise ValueError("max_concurrent and max_jobs must be >= 1")
        self.root = Path(os.path.realpath(storage_root))
        self.root.mkdir(parents=True, exist_ok=True)
        self.records = self.root / JOBS_DIR
        self.records.mkdir(exist_ok=True)
        self.dataset_root = Path(dataset_root) if dataset_root is not None else None
        self.max_concurrent = max_concurrent
        self.max_jobs = max_jobs
        self.ray_backend = ray_backend
        self.save_interval_s = save_interval_s
        self._backend_arg = backend
        self._backend: Any = None if callable(backend) and not hasattr(backend, "topk") else backend
        self._backend_lock = threading.Lock()
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._jobs: dict[str, _Job] = {}
        self._queue: deque[str] = deque()
        self._workers: list[threading.Thread] = []
        self._stopping = False
        self._load_records()

    # -- records --------------------------------------------------------------------------
    def _record_path(self, job_id: str) -> Path:
        return self.records / f"{job_id}.json"

    def _save(self, job: _Job) -> None:
        job.last_saved = time.monotonic()
        data = {
            "version": 1,
            "spec": job.spec.model_dump(mode="json"),
            "progress": job.progress.model_dump(mode="json"),
        }
        try:
            _write_json_atomic(self._record_path(job.progress.job_id), data)
        except OSError as exc:  # a full disk must not kill the service; the job goes on
            log.warning("cannot save job record %s: %s", job.progress.job_id, exc)

    def _load_records(self) -> None:
        for path in sorted(self.records.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                spec = JobSpec.model_validate(data["spec"])
                progress = JobProgress.model_validate(data["progress"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable job record %s: %s", path, exc)
                continue
            if progress.state in ACTIVE_STATES:
                # It was queued or running when the last process died; recover() resumes it.
                progress.state = "queued"
            self._jobs[progress.job_id] = _Job(spec, progress)

    def recover(self) -> list[str]:
        """Queue every job that was queued or running when the last process stopped (or
        was killed); they resume where their committed shards end. Returns their ids."""
        with self._lock:
            ids = [
                job_id
                for job_id, job in sorted(
                    self._jobs.items(), key=lambda kv: kv[1].progress.created_at
                )
                if job.progress.state in ACTIVE_STATES
                and job_id not in self._queue
                and not self._running(job_id)
            ]
            for job_id in ids:
                self._jobs[job_id].cancel = threading.Event()
                self._enqueue(job_id)
            return ids

    # -- public API -----------------------------------------------------------------------
    def submit(self, spec: JobSpec | dict[str, Any]) -> str:
        """Queue a job; return its id. Re-submitting the same job (same output and
        parameters) returns the existing id and, if it is not active, runs it again: it
        resumes and computes only what is missing."""
        if not isinstance(spec, JobSpec):
            spec = JobSpec.model_validate(spec)
        out = confine(self.root, spec.out, "out")
        dataset = self._dataset_path(spec.dataset)
        read_dataset_format(dataset)
        spec = spec.model_copy(update={"out": str(out), "dataset": str(dataset)})
        backend = self._backend
        if backend is not None:
            check_spec(backend, spec)
        with self._lock:
            if self._stopping:
                raise JobError("the job manager is shutting down")
            same_out = [j for j in self._jobs.values() if j.spec.out == spec.out]
            for job in same_out:
                diffs = spec.identity_differences(job.spec.identity())
                if diffs and job.progress.active:
                    raise JobConflictError(
                        f"out: job {job.progress.job_id} is writing {spec.out} with other "
                        f"parameters ({'; '.join(diffs)})",
                        field="out",
                    )
                if not diffs and (spec.job_id in (None, job.progress.job_id)):
                    if not job.progress.active:
                        self._check_limit()
                        self._restart(job, spec)
                    return job.progress.job_id
            if spec.job_id is not None and spec.job_id in self._jobs:
                raise JobConflictError(
                    f"job_id: {spec.job_id!r} already names a job writing "
                    f"{self._jobs[spec.job_id].spec.out}",
                    field="job_id",
                )
            self._check_manifest(spec)
            self._check_limit()
            job_id = spec.job_id or f"job-{uuid.uuid4().hex[:12]}"
            spec = spec.model_copy(update={"job_id": job_id})
            job = _Job(
                spec, JobProgress(job_id=job_id, name=spec.name, dataset=spec.dataset, out=spec.out)
            )
            self._jobs[job_id] = job
            self._save(job)
            self._enqueue(job_id)
            return job_id

    def get(self, job_id: str) -> JobProgress:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobNotFoundError(job_id)
            return job.progress.model_copy(deep=True)

    def spec(self, job_id: str) -> JobSpec:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobNotFoundError(job_id)
            return job.spec

    def list(self) -> list[JobProgress]:
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: j.progress.created_at)
            return [j.progress.model_copy(deep=True) for j in jobs]

    def cancel(self, job_id: str) -> JobProgress:
        """Cancel a queued or running job; the set keeps its whole shards (complete=false).
        A finished job is left as it is."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobNotFoundError(job_id)
            if job.progress.state == "queued":
                with contextlib.suppress(ValueError):
                    self._queue.remove(job_id)
                job.progress.state = "cancelled"
                job.progress.finished_at = time.time()
                self._save(job)
            elif job.progress.state == "running":
                job.cancel.set()
            return job.progress.model_copy(deep=True)

    def wait(self, job_id: str, timeout: float | None = None) -> JobProgress:
        """Block until the job is no longer queued or running (or timeout); its progress."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if job_id not in self._jobs:
                raise JobNotFoundError(job_id)
            while self._jobs[job_id].progress.active:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._wake.wait(timeout=left if left is not None else 1.0)
            return self.get(job_id)

    def shutdown(self, wait: bool = True, timeout: float | None = 60.0) -> None:
        """Stop the workers. Running jobs stop at their next batch, commit their whole
        samples, and stay queued in their records, so `recover()` resumes them."""
        with self._lock:
            self._stopping = True
            for job in self._jobs.values():
                if job.progress.state == "running":
                    job.interrupted = True
                    job.cancel.set()
            self._wake.notify_all()
            workers = list(self._workers)
        if wait:
            for t in workers:
                t.join(timeout)

    close = shutdown

    # -- internals ------------------------------------------------------------------------
    def _dataset_path(self, dataset: str) -> Path:
        if self.dataset_root is not None:
            return confine(self.dataset_root, dataset, "dataset")
        if is_uri(dataset):
            raise JobPathError(f"dataset: {dataset!r} must be a local path", field="dataset")
        p = Path(dataset)
        return p if p.is_absolute() else self.root / p

    def _check_limit(self) -> None:
        active = sum(j.progress.active for j in self._jobs.values())
        if active >= self.max_jobs:
            raise JobLimitError(
                f"{active} jobs are queued or running (max_jobs={self.max_jobs}); retry when "
                f"one finishes or cancel one"
            )

    def _check_manifest(self, spec: JobSpec) -> None:
        manifest = Path(spec.out) / "manifest.json"
        if not manifest.is_file():
            return
        try:
            recorded = json.loads(manifest.read_text()).get("job") or {}
        except (OSError, ValueError):
            return  # run_precompute reports a broken set with the storage error
        diffs = spec.identity_differences(recorded)
        if diffs:
            raise JobConflictError(
                f"out: {spec.out} holds a shard set written by a different job (existing != "
                f"new): {'; '.join(diffs)}",
                field="out",
            )

    def _restart(self, job: _Job, spec: JobSpec) -> None:
        job.spec = spec.model_copy(update={"job_id": job.progress.job_id})
        job.progress.state = "queued"
        job.progress.error = None
        job.progress.finished_at = None
        job.cancel = threading.Event()
        job.interrupted = False
        self._save(job)
        self._enqueue(job.progress.job_id)

    def _running(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        return job is not None and job.progress.state == "running"

    def _enqueue(self, job_id: str) -> None:
        self._queue.append(job_id)
        self._stopping = False
        alive = [t for t in self._workers if t.is_alive()]
        self._workers = alive
        if len(alive) < self.max_concurrent:
            t = threading.Thread(target=self._worker, name="todi-job-worker", daemon=True)
            self._workers.append(t)
            t.start()
        self._wake.notify_all()

    def _worker(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    if not self._wake.wait(timeout=30.0) and not self._queue:
                        self._workers.remove(threading.current_thread())
                        return  # idle: a new worker starts with the next submit
                if self._stopping:
                    self._workers.remove(threading.current_thread())
                    return
                job = self._jobs[self._queue.popleft()]
                job.progress.state = "running"
                job.progress.started_at = time.time()
                job.progress.error = None
                self._save(job)
                self._wake.notify_all()
            self._run(job)

    def _get_backend(self) -> Any:
        with self._backend_lock:
            if self._backend is None:
                self._backend = self._backend_arg()
            return self._backend

    def _on_progress(self, job: _Job, p: JobProgress) -> None:
        with self._lock:
            keep = job.progress
            p.job_id, p.created_at, p.started_at = keep.job_id, keep.created_at, keep.started_at
            if p.state != "running":
                p.state = "running"  # the final state is set by _run
            job.progress = p
            if time.monotonic() - job.last_saved >= self.save_interval_s:
                self._save(job)

    def _run(self, job: _Job) -> None:
        state: JobState
        error = None
        try:
            # The output folder may have been swapped for a symlink since submit.
            confine(self.root, job.spec.out, "out")
            backend = self._get_backend()
            result = run_job(
                job.spec,
                backend,
                ray_backend=self._ray_backend(backend) if job.spec.ray else None,
                on_progress=lambda p: self._on_progress(job, p),
                cancel=job.cancel,
            )
            state = result.state
        except Exception as exc:
            log.warning("job %s failed: %s", job.progress.job_id, exc, exc_info=True)
            state, error = "failed", str(exc) or type(exc).__name__
        with self._lock:
            p = job.progress
            if state == "cancelled" and job.interrupted:
                state = "queued"  # stopped by shutdown: recover() resumes it
            p.state = state
            p.error = error
            if state != "queued":
                p.finished_at = time.time()
            if state == "succeeded":
                p.eta_seconds = 0.0
            self._save(job)
            self._wake.notify_all()

    def _ray_backend(self, backend: Any) -> tuple[str, str, dict[str, Any]]:
        if self.ray_backend is not None:
            options = dict(self.ray_backend)
            return options.pop("backend"), str(options.pop("model")), options
        model_dir = getattr(backend, "model_dir", None)
        if model_dir is None:
            inner = getattr(backend, "backend", None) or getattr(backend, "engine", None)
            model_dir = getattr(inner, "model_dir", None)
        if model_dir is None:
            raise JobError(
                "ray: this service's backend has no local model folder to start actors from; "
                "configure JobManager(ray_backend={'backend': ..., 'model': ...})"
            )
        return backend.info.backend, str(model_dir), {}


def read_dataset_format(path: str | os.PathLike[str]) -> str:
    """The dataset's format, or DatasetError if it is missing or not a dataset."""
    from todi.services.datasets import dataset_files

    return dataset_files(path)[0]


# ----------------------------------------------------------------------------------------
# `python -m todi.services.jobs`: one job, in-process or through a JobManager (used by tests)
# ----------------------------------------------------------------------------------------


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m todi.services.jobs", description=__doc__)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--top-k", type=int, required=True)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-seq-len", type=int)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--positions-per-shard", type=int, default=65_536)
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--backend", default="hf")
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--storage-root", help="run through a JobManager rooted here (records, recovery)"
    )
    args = parser.parse_args(argv)

    from todi.services.backends import create_backend

    spec = JobSpec(
        dataset=args.dataset,
        out=args.out,
        top_k=args.top_k,
        temperature=args.temperature,
        max_seq_len=args.max_seq_len,
        batch_tokens=args.batch_tokens,
        positions_per_shard=args.positions_per_shard,
        chat_template=not args.no_chat_template,
    )
    backend = create_backend(args.backend, args.model)
    try:
        if args.storage_root:
            manager = JobManager(args.storage_root, backend)
            job_id = manager.submit(spec)
            print(f"job {job_id}", flush=True)
            p = manager.wait(job_id)
        else:
            p = run_precompute(spec, backend)
    except (DatasetError, JobError, ShardFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        backend.close()
    print(p.model_dump_json(), flush=True)
    return 0 if p.state == "succeeded" else 1


if __name__ == "__main__":
    raise SystemExit(_main())
