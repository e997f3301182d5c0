"""The trainer's own error type (its own module: every part of the trainer raises it)."""

from __future__ import annotations

from todi.common.errors import TodiError


class TrainError(TodiError, RuntimeError):
    """A training run that could not start or finish; the message says why."""
