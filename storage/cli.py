"""`todi shards inspect|verify PATH`."""

from __future__ import annotations

import json

import typer

from todi.common.cli import fail, user_errors
from todi.storage.reader import open_shard_set, verify_shard_set

app = typer.Typer(help="Inspect and verify shard sets.", no_args_is_help=True)


@app.command()
def inspect(
    path: str = typer.Argument(..., help="Shard set directory or URI (s3://...)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Rows, positions, k, teacher, bytes per position, and whether the set is complete."""
    with user_errors(OSError):
        s = open_shard_set(path)
    m = s.manifest
    info = {
        "path": path,
        "complete": m.complete,
        "shards": len(m.shards),
        "rows": m.rows,
        "positions": m.positions,
        "bytes": m.bytes,
        "bytes_per_position": round(m.bytes / m.positions, 2) if m.positions else None,
        "bytes_per_entry": round(m.bytes / (m.positions * s.signature.top_k), 3)
        if m.positions
        else None,
        **s.metadata,
        "job": m.job,
    }
    if as_json:
        print(json.dumps(info))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


@app.command()
def verify(
    path: str = typer.Argument(..., help="Shard set directory or URI."),
    clean: bool = typer.Option(
        False, "--clean", help="Remove temp files left by writers that are gone."
    ),
) -> None:
    """Check every checksum, the schema and metadata consistency; exit 2 on any problem."""
    report = verify_shard_set(path, clean=clean)
    for r in report.removed:
        print(f"removed: {r}")
    for w in report.warnings:
        print(f"warning: {w}")
    if not report.ok:
        for p in report.problems[1:]:
            print(f"problem: {p}")
        raise fail(report.problems[0])
    print(f"ok: {report.shards} shards, {report.rows} rows, {report.positions} positions verified")


@app.command()
def export(
    path: str = typer.Argument(..., help="Shard set directory or URI."),
    out: str = typer.Argument(..., help="Output folder."),
    to: str = typer.Option(
        ..., "--to", help="Format: hf-dataset (axolotl's KD columns, datasets.load_from_disk)."
    ),
    temperature: float = typer.Option(
        None, "--temperature", help="Re-temper the top-k to this T (default: the set's)."
    ),
    max_rows: int = typer.Option(None, "--max-rows", min=1, help="Export only the first N."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT."),
) -> None:
    """Write the set for other tools (see storage/export.py for what is kept and lost)."""
    from todi.storage.export import export_shards

    with user_errors(FileNotFoundError, OSError):  # + every TodiError (shards, export)
        info = export_shards(
            path, to, out, temperature=temperature, max_rows=max_rows, overwrite=overwrite
        )
    print(
        f"exported {info['rows']} rows, {info['positions']} positions (k = {info['top_k']}, "
        f"T = {info['temperature']:g}) to {out}; top-k renormalized: mean dropped tail mass "
        f"{info['dropped_tail_mass_mean']:.4f}"
    )


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="shards")
