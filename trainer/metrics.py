"""The driver's side of the per-step metrics: rank 0 puts one record per step on a Ray
queue; `MetricsSink` drains it into `train_log.jsonl`, the trackers and a tqdm bar."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

LOG_NAME = "train_log.jsonl"


class MetricsSink:
    """Drains rank 0's per-step records: JSONL log (one line per step) + tqdm bar.

    A restart or resume replays steps after its checkpoint: a record whose step is not past
    the last one truncates the log back to before it, so every step appears once."""

    def __init__(
        self, queue, log_path: Path, total: int | None, progress: bool, trackers=None
    ) -> None:
        self.queue = queue
        self.trackers = trackers  # trainer.tracking.Trackers: --report-to
        self.log_path = log_path
        self.records: list[dict] = []
        if log_path.is_file():
            self.records = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
        self._stop = threading.Event()
        self.first_at: float | None = None  # perf_counter when this run's first record came
        self.first_record: dict | None = None
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)
            if self.records:
                self.bar.update(self.records[-1]["step"])
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                record = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # the queue actor is gone (cluster shutting down)
                return
            self._add(record)

    def _add(self, record: dict) -> None:
        if self.records and record["step"] <= self.records[-1]["step"]:
            self.records = [r for r in self.records if r["step"] < record["step"]]
            self.log_path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            if self.bar is not None:
                self.bar.reset(total=self.bar.total)
                self.bar.update(len(self.records))
        if self.first_at is None:
            self.first_at, self.first_record = time.perf_counter(), record
        self.records.append(record)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers:
            self.trackers.log_step(record)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False
            )

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        with contextlib.suppress(Exception):
            for record in self.queue.get_nowait_batch(self.queue.qsize()):
                self._add(record)
        if self.bar is not None:
            self.bar.close()
