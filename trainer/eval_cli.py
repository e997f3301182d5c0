"""`todi eval`: a student (and optionally the teacher) against a held-out shard set."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from todi.common.cli import fail, user_errors


def _parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise fail(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise fail("--seeds: no seeds given")
    return seeds


def eval_command(
    shards: Annotated[str, typer.Option("--shards", help="Held-out shard set (path or URI).")],
    student: Annotated[
        str,
        typer.Option(
            "--student", help="Student SPEC: HF folder, init:teacher=DIR,layers=N, init:config=F."
        ),
    ],
    teacher: Annotated[
        str | None,
        typer.Option("--teacher", help="Also evaluate this teacher folder, as a reference."),
    ] = None,
    full_vocab_teacher: Annotated[
        str | None,
        typer.Option(
            "--full-vocab-teacher",
            help="Run this teacher here and add full-vocabulary FKL/RKL/top-1 (T=1).",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the JSON report here.")] = None,
    beta: Annotated[float, typer.Option("--beta", help="ToDi's beta.")] = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Cap on padded tokens per batch.")
    ] = 2048,
    max_samples: Annotated[
        int | None, typer.Option("--max-samples", min=1, help="Evaluate only the first N.")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1...")] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="Model dtype: float32, bfloat16 or float16.")
    ] = "float32",
    generate: Annotated[
        bool, typer.Option("--generate", help="Also sample answers and score ROUGE-L.")
    ] = False,
    prompts: Annotated[
        Path | None,
        typer.Option("--prompts", help="JSONL of prompt/response (or messages) rows."),
    ] = None,
    seeds: Annotated[str, typer.Option("--seeds", help="Sampling seeds, e.g. 0,1,2.")] = "0,1,2",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 128,
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.0, help="Sampling temperature (0: greedy).")
    ] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 1.0,
    max_prompts: Annotated[int | None, typer.Option("--max-prompts", min=1)] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Per-token FKL/RKL/ToDi, top-1 agreement, CE/perplexity and calibration (ECE, 15 bins)
    on held-out shards; with --generate, ROUGE-L of sampled answers over several seeds. Prints
    a table; writes JSON."""
    from transformers.utils import logging as hf_logging

    from todi.trainer.evaluate import GenerateOptions, evaluate

    gen = None
    if generate:
        if prompts is None:
            raise fail("--generate needs --prompts FILE.jsonl")
        gen = GenerateOptions(
            prompts=prompts,
            seeds=_parse_seeds(seeds),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            batch_size=batch_size,
            max_prompts=max_prompts,
        )
    models = {"student": student}
    if teacher is not None:
        models["teacher"] = teacher
    # Our own bars only (not transformers' weight loading): stderr stays one line on errors.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with user_errors(ValueError, OSError):
            report = evaluate(
                shards,
                models,
                beta=beta,
                batch_size=batch_size,
                max_tokens=max_tokens,
                max_samples=max_samples,
                generate=gen,
                device=device,
                resolve_model=_resolve_model,
                dtype=dtype,
                progress=progress,
                full_vocab_teacher=full_vocab_teacher,
            )
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    _print_table(report)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        typer.echo(f"wrote {out}")


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from todi.trainer.evaluate import report_table

    lines = report_table(report)
    table = Table(title=f"todi eval: {report['shards']}")
    for i, head in enumerate(lines[0]):
        table.add_column(head, justify="left" if i == 0 else "right")
    for row in lines[1:]:
        table.add_row(*row)
    Console().print(table)


# Maps a model name the trainer does not know (the teacher service's embedded models) to a
# folder; set by whoever registers the command (the root CLI), so this package stays below
# the teacher service.
_resolve_model: Callable[[str], str] | None = None


def register(app: typer.Typer, *, resolve_model: Callable[[str], str] | None = None) -> None:
    """Add `eval` to the root app; `resolve_model` maps embedded model names to folders."""
    global _resolve_model
    _resolve_model = resolve_model
    app.command("eval")(eval_command)
