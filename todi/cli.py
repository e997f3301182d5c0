"""The `todi` console script: one root app; each package's CLI module adds its subcommands.

The registrations are explicit: a missing or broken module is an import error here, never a
silently absent command.
"""

from __future__ import annotations

from functools import partial

import typer

from todi import demo
from todi.services import cli as services_cli
from todi.services.backends import create_backend
from todi.services.models import embedded_model_path
from todi.storage import cli as storage_cli
from todi.trainer import cli as trainer_cli
from todi.trainer import eval_cli

app = typer.Typer(
    name="todi",
    help="Offline-teacher distillation: teacher service -> top-k shards -> Ray student training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

storage_cli.register(app)  # shards verify | inspect ...
services_cli.register(app)  # models, serve, precompute
# The trainer never imports the teacher service: the root wires the service's pieces in.
trainer_cli.register(app, teacher_engine=partial(create_backend, "hf"))  # train
eval_cli.register(app, resolve_model=embedded_model_path)  # eval
demo.register(app)  # demo

if __name__ == "__main__":
    app()
