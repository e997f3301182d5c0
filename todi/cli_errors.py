"""One way for every subcommand to fail: a one-line message on stderr and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer


class UserError(Exception):
    """Bad input from the user; the message names the problem."""


def fail(message: str) -> typer.Exit:
    """Print `error: message` on stderr and return the Exit to raise."""
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code=2)


@contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Turn the given exception types (and UserError) into a one-line CLI error."""
    try:
        yield
    except (UserError, *kinds) as exc:
        raise fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
