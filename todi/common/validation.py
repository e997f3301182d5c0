"""One reading of a pydantic ValidationError for every message the project prints.

Pydantic gives each error a `loc` (the path to the field: ("train", "lr"), or () for the whole
model), a `msg` and a `type`. Callers name the field as `train.lr`, with a fallback word of
their own when the error is about the whole model.
"""

from __future__ import annotations

from typing import Any


def validation_errors(exc: Exception) -> list[dict[str, Any]]:
    """The error dicts of a pydantic ValidationError; [] for any other exception."""
    errors = getattr(exc, "errors", None)
    return list(errors()) if callable(errors) else []


def field_name(loc: Any, default: str = "") -> str:
    """A `loc` tuple as a dotted field name (`default` when it is empty)."""
    return ".".join(str(p) for p in loc or ()) or default


def validation_message(exc: Exception, default: str = "spec") -> str:
    """One line naming every failing field: `field: msg; field: msg` (else str(exc))."""
    errors = validation_errors(exc)
    if not errors:
        return str(exc)
    return "; ".join(f"{field_name(e.get('loc'), default)}: {e.get('msg')}" for e in errors)
