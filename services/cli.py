"""`todi models prepare|temper`, `todi serve`, `todi precompute` (client or in-process)."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import typer

from todi.common.cli import fail, first_line, user_errors
from todi.common.errors import TodiError

models_app = typer.Typer(help="Teacher model folders.", no_args_is_help=True)


# ----------------------------------------------------------------------------------------
# models
@models_app.command("prepare")
def models_prepare(
    name: str = typer.Argument(..., help="Embedded model name, e.g. smollm2-135m-instruct."),
    out: Path | None = typer.Option(None, "--out", help="Folder (default: the todi cache)."),
) -> None:
    """Convert an embedded teacher into a Hugging Face folder (idempotent); print the folder."""
    from todi.services.models import prepare_model

    with user_errors(OSError):
        print(prepare_model(name, out))


@models_app.command("temper")
def models_temper(
    model: str = typer.Argument(..., help="HF model folder or embedded model name."),
    temperature: float = typer.Option(..., "--temperature", "-t", help="Temperature T > 0."),
    out: Path | None = typer.Option(None, "--out", help="Folder (default: the todi cache)."),
) -> None:
    """Write a copy whose log-probs are log_softmax(logits / T) in any engine; print it."""
    from todi.services.tempering import temper_model_dir

    with user_errors(OSError):
        print(temper_model_dir(model, temperature, out))


# ----------------------------------------------------------------------------------------
# serve
def _parse_options(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; VALUE is JSON when it parses (numbers, true, {...}), else a string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise fail(f"--option {pair!r}: expected KEY=VALUE")
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = value
    return out


def serve(
    backend: str = typer.Option("hf", "--backend", help="Engine: hf | vllm | remote."),
    model: str = typer.Option(
        "smollm2-135m-instruct", "--model", help="Teacher HF folder or embedded model name."
    ),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    storage_root: Path | None = typer.Option(
        None, "--storage-root", help="Job outputs live under it (default: $TODI_HOME/storage)."
    ),
    dataset_root: Path | None = typer.Option(
        None, "--dataset-root", help="If set, job datasets must lie under it."
    ),
    temperature: float | None = typer.Option(
        None, "--temperature", help="vllm / remote: the one temperature the engine serves."
    ),
    dtype: str | None = typer.Option(None, "--dtype", help="hf / vllm: model dtype."),
    max_top_k: int | None = typer.Option(None, "--max-top-k"),
    max_model_len: int | None = typer.Option(None, "--max-model-len"),
    url: str | None = typer.Option(None, "--url", help="remote: the vllm serve base URL."),
    option: list[str] = typer.Option(
        [], "--option", "-o", help="Other backend option KEY=VALUE (repeatable)."
    ),
    max_sequences_per_request: int = typer.Option(256, "--max-sequences-per-request"),
    max_tokens_per_request: int = typer.Option(65_536, "--max-tokens-per-request"),
    max_chars_per_request: int | None = typer.Option(
        None, "--max-chars-per-request", help="Default: 8 x --max-tokens-per-request."
    ),
    max_body_bytes: int = typer.Option(16 * 1024 * 1024, "--max-body-bytes"),
    max_concurrent_jobs: int = typer.Option(1, "--max-concurrent-jobs"),
    batch_window_ms: float = typer.Option(5.0, "--batch-window-ms"),
    max_batch_tokens: int = typer.Option(16_384, "--max-batch-tokens"),
    log_level: str = typer.Option("info", "--log-level"),
    ssl_certfile: Path | None = typer.Option(
        None, "--ssl-certfile", help="PEM certificate (chain): serve HTTPS (with --ssl-keyfile)."
    ),
    ssl_keyfile: Path | None = typer.Option(
        None, "--ssl-keyfile", help="PEM private key of --ssl-certfile (unencrypted)."
    ),
) -> None:
    """Serve the teacher over HTTP or HTTPS (FastAPI + uvicorn). API key: env TODI_API_KEY."""
    import uvicorn
    from pydantic import ValidationError

    from todi.common.paths import todi_home
    from todi.common.validation import validation_message
    from todi.services.api import create_app
    from todi.services.backends import create_backend
    from todi.services.settings import ServiceSettings

    options = _parse_options(option)
    named = {
        "temperature": temperature,
        "dtype": dtype,
        "max_top_k": max_top_k,
        "max_model_len": max_model_len,
        "url": url,
    }
    options.update({k: v for k, v in named.items() if v is not None})
    try:
        settings = ServiceSettings(
            model=model,
            backend=backend,
            backend_options=options,
            host=host,
            port=port,
            storage_root=storage_root or todi_home() / "storage",
            dataset_root=dataset_root,
            max_sequences_per_request=max_sequences_per_request,
            max_tokens_per_request=max_tokens_per_request,
            max_chars_per_request=max_chars_per_request,
            max_body_bytes=max_body_bytes,
            max_concurrent_jobs=max_concurrent_jobs,
            batch_window_ms=batch_window_ms,
            max_batch_tokens=max_batch_tokens,
            ssl_certfile=ssl_certfile,
            ssl_keyfile=ssl_keyfile,
        )
    except ValidationError as exc:
        raise fail(validation_message(exc)) from None
    # The engine is created here, in the serving process (uvicorn runs the app in this same
    # process): vLLM spawns its engine core from it, which the console script's
    # `if __name__ == "__main__"` guard makes safe. Errors become one line, before binding.
    with user_errors(OSError):
        engine = create_backend(backend, model, **options)
    try:
        # The app closes the engine in its shutdown: uvicorn re-raises SIGTERM / SIGINT
        # after a graceful shutdown, so code after uvicorn.run may never run.
        app = create_app(settings, engine, own_backend=True)
        print(
            f"todi: serving {engine.info.model} ({engine.info.backend}) on "
            f"{settings.scheme}://{host}:{port} (docs at /docs; auth "
            f"{'on' if settings.api_key else 'off'}; storage root {settings.storage_root})",
            file=sys.stderr,
            flush=True,
        )
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=10,
            ssl_certfile=settings.ssl_certfile,
            ssl_keyfile=settings.ssl_keyfile,
        )
    finally:
        engine.close()


# ----------------------------------------------------------------------------------------
# precompute


def _temperatures(text: str | None, option: str) -> list[float]:
    """'2,4' -> [2.0, 4.0]; a one-line error naming the option otherwise."""
    if not text:
        return []
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise fail(f"{option}: expected comma-separated numbers, got {text!r}") from None


def precompute(
    dataset: str = typer.Option(..., "--dataset", help="JSONL / Parquet / HF datasets folder."),
    out: str = typer.Option(
        ..., "--out", help="Shard-set folder (with --server: relative to its storage root)."
    ),
    top_k: int = typer.Option(..., "--top-k", help="Exact top-k per position (0: draws only)."),
    targets: str = typer.Option(
        "topk", "--targets", help="topk (top-k + tail) | sampled (--draws teacher draws)."
    ),
    draws: int = typer.Option(0, "--draws", help="sampled: draws per position (<= 255)."),
    sample_seed: int = typer.Option(0, "--sample-seed", help="sampled: seed of the draws."),
    retemper: str | None = typer.Option(
        None, "--retemper", help="Training temperatures to re-temper to exactly, e.g. 2,4."
    ),
    temperature: float | None = typer.Option(
        None, "--temperature", help="T > 0 (default: --server: the service's own; --local: 1)."
    ),
    max_seq_len: int | None = typer.Option(None, "--max-seq-len"),
    server: str | None = typer.Option(None, "--server", help="URL of a running todi serve."),
    ca_file: Path | None = typer.Option(
        None,
        "--ca-file",
        help="--server https://...: PEM CA bundle to verify the service's certificate with "
        "(default: env TODI_CA_FILE, else the system's trusted CAs).",
    ),
    local: bool = typer.Option(False, "--local", help="Run the job in this process."),
    backend: str = typer.Option("hf", "--backend", help="--local: hf | vllm | remote."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="--local: teacher."),
    ray: bool = typer.Option(False, "--ray", help="Run on a Ray cluster of teacher actors."),
    num_actors: int | None = typer.Option(None, "--num-actors", help="--ray: actors."),
    job_id: str | None = typer.Option(None, "--job-id", help="Job id (resubmit to resume)."),
    option: list[str] = typer.Option([], "--option", "-o", help="--local: backend KEY=VALUE."),
    detach: bool = typer.Option(False, "--detach", help="--server: print the job id, exit."),
    poll: float = typer.Option(0.5, "--poll", help="--server: seconds between progress polls."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Precompute teacher top-k into a shard set: via a running service or in-process."""
    if (server is None) == (not local):
        raise fail("give exactly one of --server URL or --local")
    if ca_file is not None and (server is None or not server.lower().startswith("https://")):
        raise fail("--ca-file verifies an https:// --server; it has no use here")
    body: dict[str, Any] = {
        "dataset": dataset,
        "out": out,
        "top_k": top_k,
        "targets": targets,
        "draws": draws,
        "sample_seed": sample_seed,
        "retemper": _temperatures(retemper, "--retemper"),
        "temperature": temperature,
        "max_seq_len": max_seq_len,
        "ray": ray,
    }
    if num_actors is not None:
        body["num_actors"] = num_actors
    if job_id is not None:
        body["job_id"] = job_id
    if server is not None:
        # The service reads the dataset itself: send an absolute path when it exists here.
        if Path(dataset).exists():
            body["dataset"] = str(Path(dataset).absolute())
        body = {k: v for k, v in body.items() if v is not None}
        final = _precompute_remote(
            server, body, detach=detach, poll=poll, show=progress, ca_file=ca_file
        )
    else:
        final = _precompute_local(body, backend, model, _parse_options(option), show=progress)
    if final is None:
        return
    print(json.dumps(final))
    if final.get("state") != "succeeded":
        raise fail(
            f"job {final.get('job_id')} {final.get('state')}"
            + (f": {final['error']}" if final.get("error") else "")
        )


def _bar(show: bool):
    from tqdm import tqdm

    return tqdm(total=0, unit="seq", disable=not show, file=sys.stderr, dynamic_ncols=True)


def _update_bar(bar, p: dict[str, Any]) -> None:
    total = p.get("sequences_total")
    if total and bar.total != total:
        bar.total = total
    bar.n = int(p.get("sequences_done") or 0)
    tps = p.get("tokens_per_second")
    eta = p.get("eta_seconds")
    bar.set_postfix_str(
        f"{p.get('state')} {p.get('tokens_done') or 0}/{p.get('tokens_total') or '?'} tok"
        + (f" {tps:,.0f} tok/s" if tps else "")
        + (f" eta {eta:.0f}s" if eta is not None else ""),
        refresh=False,
    )
    bar.refresh()


def _precompute_remote(
    server: str,
    body: dict[str, Any],
    *,
    detach: bool,
    poll: float,
    show: bool,
    ca_file: Path | None = None,
) -> dict[str, Any] | None:
    from todi.services.job_client import JobClient

    with user_errors(), JobClient(server, ca_file=ca_file) as client:
        job = client.submit(body)
        job_id = job["job_id"]
        print(f"job {job_id} -> {job.get('out')}", file=sys.stderr, flush=True)
        if detach:
            print(json.dumps(job))
            return None
        bar = _bar(show)
        try:
            return client.wait(job_id, poll=poll, on_progress=lambda p: _update_bar(bar, p))
        except KeyboardInterrupt:
            bar.close()
            print(f"interrupted: cancelling job {job_id}", file=sys.stderr)
            client.cancel(job_id)
            raise typer.Exit(code=130) from None
        finally:
            bar.close()


def _precompute_local(
    body: dict[str, Any], backend: str, model: str, options: dict[str, Any], *, show: bool
) -> dict[str, Any]:
    from pydantic import ValidationError

    from todi.common.validation import validation_message
    from todi.services.api_metrics import progress_dict as _progress_dict
    from todi.services.backends import create_backend
    from todi.services.config import JobSpec
    from todi.services.jobs import run_job

    try:
        spec = JobSpec.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as exc:
        raise fail(validation_message(exc)) from None
    if backend != "hf" and "temperature" not in options and spec.temperature != 1.0:
        options["temperature"] = spec.temperature  # vllm / remote serve one temperature
    engine = None
    if not spec.ray:  # with --ray every actor starts its own engine
        with user_errors(OSError):
            engine = create_backend(backend, model, **options)
    bar = _bar(show)
    cancel = threading.Event()
    result: dict[str, Any] = {}

    def work() -> None:
        def on_progress(p) -> None:
            _update_bar(bar, _progress_dict(p))

        try:
            result["progress"] = run_job(
                spec,
                engine,
                ray_backend=(backend, model, options),
                on_progress=on_progress,
                cancel=cancel,
            )
        except BaseException as exc:
            result["error"] = exc

    try:
        thread = threading.Thread(target=work, name="todi-precompute", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.2)
        except KeyboardInterrupt:
            cancel.set()
            print("interrupted: cancelling (whole shards stay valid)", file=sys.stderr)
            thread.join()
    finally:
        bar.close()
        if engine is not None:
            engine.close()
    if "error" in result:
        exc = result["error"]
        if isinstance(exc, TodiError | ValueError | OSError):
            raise fail(first_line(exc))
        raise exc
    return _progress_dict(result["progress"])


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
    app.command("serve")(serve)
    app.command("precompute")(precompute)
