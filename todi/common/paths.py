"""Where todi keeps its on-disk cache (prepared teachers, demo runs)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def todi_home() -> Path:
    """`$TODI_HOME`, else `~/.cache/todi`; created on first use."""
    home = Path(os.environ.get("TODI_HOME") or Path.home() / ".cache" / "todi")
    home.mkdir(parents=True, exist_ok=True)
    return home


def publish_dir(tmp: Path, out: Path, is_done: Callable[[Path], bool]) -> Path:
    """Move the fully built folder `tmp` to `out` in one rename, and return `out`.

    Several processes may build the same folder at once (parallel test sessions, engines
    tempering one teacher): a folder another process has completed is never deleted (its
    users may be reading it); the loser drops its own copy.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    if not is_done(out):
        shutil.rmtree(out, ignore_errors=True)  # an older or partial build
        try:
            os.replace(tmp, out)
        except OSError:  # another process's folder landed in between
            if not is_done(out):
                raise
    shutil.rmtree(tmp, ignore_errors=True)
    return out
