"""The `todi` console script: one root app, subcommands registered by each package."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="todi",
    help="Offline-teacher distillation: teacher service -> top-k shards -> Ray student training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _register_all() -> None:
    # Each package owns its subcommands; importing them here keeps this file conflict-free.
    import importlib

    for module in ("storage.cli", "services.cli", "trainer.cli", "trainer.eval_cli", "todi.demo"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(app)


_register_all()

if __name__ == "__main__":
    app()
