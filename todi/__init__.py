"""todi-distill: offline-teacher distillation with the ToDi loss."""

__version__ = "0.1.0"
