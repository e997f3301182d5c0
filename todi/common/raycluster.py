"""Joining a running Ray cluster, with retries for the Ray client's start-up.

Through the Ray client (`ray://head:10001`) every connection makes the head start a server
process of its own for that client; on a busy head that start sometimes fails ("Starting Ray
client server failed", a gRPC connection error) and the next attempt succeeds. A job should
not die of that, so `join_cluster` tries a few times before giving up with the last error.
"""

from __future__ import annotations

import sys
import time
from typing import Any

CLIENT_ATTEMPTS = 3
CLIENT_RETRY_SECONDS = 5.0


def join_cluster(address: str | None = None, **init_kwargs: Any) -> None:
    """`ray.init(address=address, **init_kwargs)`; a Ray client address (`ray://...`, also
    through RAY_ADDRESS) is retried up to CLIENT_ATTEMPTS times when the head answered but
    could not start the client's server (ConnectionAbortedError). An unreachable head fails
    at once, after Ray's own connection timeout."""
    import os

    import ray

    target = address if address is not None else os.environ.get("RAY_ADDRESS", "")
    attempts = CLIENT_ATTEMPTS if str(target).startswith("ray://") else 1
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, **init_kwargs)
            return
        except ConnectionAbortedError as exc:  # "Initialization failure from server"
            if attempt == attempts:
                raise
            print(
                f"warning: joining the Ray cluster at {target} failed ({exc.__class__.__name__}:"
                f" {str(exc).strip().splitlines()[-1]}); retrying ({attempt}/{attempts - 1})",
                file=sys.stderr,
            )
            ray.shutdown()
            time.sleep(CLIENT_RETRY_SECONDS * attempt)
