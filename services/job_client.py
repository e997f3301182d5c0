"""A client of the service's job API (`POST/GET/DELETE /v1/jobs`): submit a job, poll it to
the end. `todi precompute --server` and `todi demo` both drive jobs through it.

Over https:// the service's certificate is always verified: against `ca_file` (a PEM bundle;
default: the file named by TODI_CA_FILE) or else the system's trusted CAs. There is no
"insecure" switch: a certificate that does not verify ends the call with an error."""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from todi.common.errors import UserError

FINAL_STATES = ("succeeded", "failed", "cancelled")
CA_FILE_ENV = "TODI_CA_FILE"


def tls_context(ca_file: str | Path | None) -> ssl.SSLContext:
    """A client context that verifies the server's certificate and host name against
    `ca_file` (PEM), or the system's trusted CAs when None."""
    if ca_file is None:
        return ssl.create_default_context()
    path = Path(ca_file).expanduser()
    if not path.is_file():
        raise UserError(f"CA file {path}: no such file")
    try:
        return ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, OSError) as exc:
        raise UserError(f"CA file {path}: not a PEM CA bundle ({exc})") from None


class JobClient:
    """One HTTP connection to a running `todi serve` at `url`; errors are UserErrors that name
    the call (an unreachable server, or an HTTP error status with the service's detail).

    `api_key`: the bearer token; None reads TODI_API_KEY (no header when that is unset too).
    `ca_file`: PEM CA bundle that an https:// service's certificate must chain to; None reads
    TODI_CA_FILE, else the system's trusted CAs.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        ca_file: str | Path | None = None,
    ) -> None:
        import httpx

        from todi.services.settings import API_KEY_ENV

        if not url.lower().startswith(("http://", "https://")):
            raise UserError(f"server URL {url!r}: expected http://HOST:PORT or https://HOST:PORT")
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.base = url.rstrip("/")
        verify: ssl.SSLContext | bool = True
        if self.base.lower().startswith("https://"):
            verify = tls_context(ca_file or os.environ.get(CA_FILE_ENV) or None)
        self._client = httpx.Client(headers=headers, timeout=timeout, verify=verify)

    def __enter__(self) -> JobClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def call(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        """The JSON answer of one request (non-JSON answers: {"detail": the text's start})."""
        import httpx

        try:
            r = self._client.request(method, self.base + path, **kw)
        except httpx.HTTPError as exc:
            hint = ""
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                hint = (
                    " (the service's TLS certificate is not trusted here: give its CA with "
                    f"--ca-file or {CA_FILE_ENV})"
                )
            raise UserError(f"cannot reach {self.base}: {exc}{hint}") from None
        try:
            data = r.json()
        except ValueError:
            data = {"detail": r.text[:200]}
        if r.status_code >= 400:
            raise UserError(f"{method} {path}: HTTP {r.status_code}: {data.get('detail', data)}")
        return data

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """Submit a job (the JobSpec fields of `body`); its first progress record."""
        return self.call("POST", "/v1/jobs", json=body)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.call("DELETE", f"/v1/jobs/{job_id}")

    def wait(
        self,
        job_id: str,
        *,
        poll: float = 1.0,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll the job every `poll` seconds until it ends; its final progress record.
        `on_progress` sees every record polled (the final one included)."""
        while True:
            p = self.call("GET", f"/v1/jobs/{job_id}")
            if on_progress is not None:
                on_progress(p)
            if p.get("state") in FINAL_STATES:
                return p
            time.sleep(poll)
