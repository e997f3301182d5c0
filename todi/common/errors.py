"""One base for every error the project raises on purpose.

`TodiError` marks an error that is the user's or the data's, not a bug: the CLI prints it as
one line (exit 2) and the REST API maps it by type to a status. `field` names what is at
fault (a setting, a request field, `out`, `dataset`) when one thing is; callers branch on the
type, never on the message text.
"""

from __future__ import annotations


class TodiError(Exception):
    """An expected failure: bad input, a bad or missing file, a failed job.

    `field`: the offending field or setting, or None. Subclasses keep their historical
    built-in base too (`ValueError`, `KeyError`, `RuntimeError`) so `except ValueError` in
    user code still catches them.
    """

    field: str | None = None

    def __init__(self, *args: object, field: str | None = None) -> None:
        super().__init__(*args)
        if field is not None:
            self.field = field


class UserError(TodiError):
    """Bad input from the user; the message names the problem."""


def first_line(exc: BaseException) -> str:
    """The first line of the message, or the type's name when there is none."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
