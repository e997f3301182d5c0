"""Where todi keeps its on-disk cache (prepared teachers, demo runs)."""

from __future__ import annotations

import os
from pathlib import Path


def todi_home() -> Path:
    """`$TODI_HOME`, else `~/.cache/todi`; created on first use."""
    home = Path(os.environ.get("TODI_HOME") or Path.home() / ".cache" / "todi")
    home.mkdir(parents=True, exist_ok=True)
    return home
