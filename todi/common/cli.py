"""One way for every subcommand to fail: a one-line message on stderr and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from todi.common.errors import TodiError, UserError, first_line

__all__ = ["UserError", "fail", "first_line", "user_errors"]


def fail(message: str) -> typer.Exit:
    """Print `error: message` on stderr and return the Exit to raise."""
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code=2)


@contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Turn every TodiError (and the given other types, e.g. OSError) into a one-line CLI
    error."""
    try:
        yield
    except (TodiError, *kinds) as exc:
        raise fail(first_line(exc)) from None
