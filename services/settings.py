"""Configuration of the teacher service (`todi serve`): one pydantic model, CLI flags map 1:1.

The API key is never a CLI flag (it would show in `ps`): it comes from the environment
variable `TODI_API_KEY`; unset or empty means no authentication (loopback use).
TLS: `ssl_certfile` + `ssl_keyfile` (PEM) make uvicorn serve HTTPS, so the key never crosses
the network in clear text.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

API_KEY_ENV = "TODI_API_KEY"


def _check_tls_pair(certfile: Path, keyfile: Path | None) -> None:
    """Load the pair the way the server will, so a wrong file fails before the engine loads."""
    import ssl

    def no_password() -> bytes:
        raise ValueError("the key is encrypted: give an unencrypted PEM key")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(certfile, keyfile, password=no_password)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ValueError(
            f"cannot use TLS certificate {certfile} with key {keyfile}: {exc}"
        ) from None


def _api_key_from_env() -> SecretStr | None:
    value = os.environ.get(API_KEY_ENV, "")
    return SecretStr(value) if value else None


class ServiceSettings(BaseModel):
    """Everything `create_app` needs; limits protect the engine from a single client."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Teacher: an HF model folder or an embedded model name.")
    backend: str = Field("hf", description="Engine: hf | vllm | remote.")
    backend_options: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for create_backend."
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    storage_root: Path = Field(
        description="Job outputs are confined under this folder; job records live here too."
    )
    dataset_root: Path | None = Field(
        None,
        description="If set, job datasets must lie under it (else any path the server can read).",
    )
    api_key: SecretStr | None = Field(default_factory=_api_key_from_env)
    ssl_certfile: Path | None = Field(
        None, description="PEM certificate (chain) to serve HTTPS with; needs ssl_keyfile."
    )
    ssl_keyfile: Path | None = Field(
        None, description="PEM private key of ssl_certfile; needs ssl_certfile."
    )

    # -- request limits ---------------------------------------------------------------
    max_sequences_per_request: int = Field(256, ge=1)
    max_tokens_per_request: int = Field(65_536, ge=2)
    max_chars_per_request: int | None = Field(
        None,
        ge=2,
        description="Characters in all `texts` of a request, checked before tokenizing "
        "(default 8 x max_tokens_per_request).",
    )
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_concurrent_jobs: int = Field(1, ge=1)

    # -- dynamic batching ---------------------------------------------------------------
    batch_window_ms: float = Field(
        5.0, ge=0.0, description="How long the engine thread waits to gather more requests."
    )
    max_batch_tokens: int = Field(
        16_384, ge=2, description="Token budget of one gathered engine call."
    )

    @property
    def effective_max_chars(self) -> int:
        return self.max_chars_per_request or 8 * self.max_tokens_per_request

    @field_validator("storage_root", "dataset_root")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        # Resolved once: every confinement check compares against the real path.
        return None if v is None else Path(os.path.realpath(os.path.expanduser(v)))

    @field_validator("ssl_certfile", "ssl_keyfile")
    @classmethod
    def _readable_file(cls, v: Path | None) -> Path | None:
        if v is None:
            return None
        v = Path(os.path.expanduser(v))
        if not v.is_file():
            raise ValueError(f"{v}: no such file")
        if not os.access(v, os.R_OK):
            raise ValueError(f"{v}: not readable")
        return v

    @model_validator(mode="after")
    def _tls_pair(self) -> ServiceSettings:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("TLS needs both a certificate and its key (ssl_certfile, ssl_keyfile)")
        if self.ssl_certfile is not None:
            _check_tls_pair(self.ssl_certfile, self.ssl_keyfile)
        return self

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_certfile is not None else "http"

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_none(cls, v: SecretStr | None) -> SecretStr | None:
        return v if v is not None and v.get_secret_value() else None
