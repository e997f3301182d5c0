"""The teacher service's wire format: request and response models (validation and the OpenAPI
document) and the two encodings of a `/v1/logprobs` answer (JSON, Arrow IPC stream)."""

from __future__ import annotations

import io
import json
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from todi.services.backends import TopK
from todi.services.backends.base import MAX_TEMPERATURE, MIN_TEMPERATURE
from todi.storage.schema import ARROW_SCHEMA, content_sample_id

ARROW_STREAM = "application/vnd.apache.arrow.stream"

# The Arrow response: the shard schema's logical columns, with the top-k decoded (nested
# lists instead of codec bytes), so a program gets exactly what a shard row decodes to.
ARROW_RESPONSE_SCHEMA = pa.schema(
    [
        ARROW_SCHEMA.field("sample_id"),
        ARROW_SCHEMA.field("input_ids"),
        ARROW_SCHEMA.field("prompt_len"),
        pa.field(ARROW_SCHEMA.field("topk_ids").name, pa.list_(pa.list_(pa.int32())), False),
        pa.field(ARROW_SCHEMA.field("topk_logprobs").name, pa.list_(pa.list_(pa.float32())), False),
    ]
)
ARROW_METADATA_KEY = b"todi"


class LogprobsRequest(BaseModel):
    """Either `input_ids` (token-id lists) or `texts` (tokenized by the teacher's tokenizer).

    The limits that depend on the server (max sequences, tokens, characters, max_top_k,
    max_model_len, vocab_size) are enforced by the routes and published in the OpenAPI
    document (`_publish_limits`)."""

    model_config = ConfigDict(
        extra="forbid",
        # Exactly one of the two (checked in `_sequences`), declared for generated clients.
        json_schema_extra={"oneOf": [{"required": ["input_ids"]}, {"required": ["texts"]}]},
    )

    input_ids: list[list[Annotated[StrictInt, Field(ge=0)]]] | None = Field(
        None, description="Token sequences (each >= 2 tokens).", examples=[[[504, 3575, 282]]]
    )
    texts: list[StrictStr] | None = Field(None, description="Texts, tokenized by the teacher.")
    top_k: StrictInt = Field(ge=1, description="How many next tokens per position (<= max_top_k).")
    temperature: float | None = Field(
        None,
        strict=True,  # a JSON number: "0.5" is refused
        ge=MIN_TEMPERATURE,
        le=MAX_TEMPERATURE,
        description="Softmax temperature T (a JSON number). Default: the engine's one "
        "temperature (a vllm/remote engine serves exactly one), else 1.0.",
    )


class SequenceResult(BaseModel):
    input_ids: list[int]
    topk_ids: list[list[int]] = Field(description="[L-1][k]; row t predicts token t+1.")
    topk_logprobs: list[list[float]] = Field(description="[L-1][k] full-vocabulary log-probs.")


class LogprobsResponse(BaseModel):
    model: str
    top_k: int
    temperature: float
    results: list[SequenceResult]


class TeacherResponse(BaseModel):
    model: str
    backend: str
    vocab_size: int
    tokenizer_sha256: str
    max_top_k: int
    max_model_len: int
    weights_sha256: str | None = None
    logprobs_mode: str | None = None
    temperatures: list[float] | None = None


class JobAccepted(BaseModel):
    """`POST /v1/jobs` answer; follow the job at `GET /v1/jobs/{job_id}`."""

    job_id: str
    state: str
    out: str


class ErrorResponse(BaseModel):
    detail: str
    field: str | None = None


ERRORS = {
    401: {"model": ErrorResponse, "description": "missing or wrong API key"},
    413: {"model": ErrorResponse, "description": "body, sequences or tokens over the limit"},
    422: {"model": ErrorResponse, "description": "bad input; `field` names it"},
}


def arrow_body(seqs: list[list[int]], results: list[TopK], meta: dict[str, Any]) -> bytes:
    """Results as one Arrow IPC stream record batch (see ARROW_RESPONSE_SCHEMA)."""
    k = int(meta["top_k"])
    rows = np.array([r.ids.shape[0] for r in results], dtype=np.int64)
    outer = np.zeros(len(results) + 1, dtype=np.int32)
    np.cumsum(rows, out=outer[1:])
    inner = np.arange(0, int(rows.sum()) * k + 1, k, dtype=np.int32)
    empty_i = np.zeros((0,), np.int32)
    empty_f = np.zeros((0,), np.float32)
    ids = np.concatenate([r.ids.reshape(-1) for r in results] or [empty_i]).astype(np.int32)
    lps = np.concatenate([r.logprobs.reshape(-1) for r in results] or [empty_f]).astype(np.float32)

    def nested(values: np.ndarray, typ: pa.DataType) -> pa.Array:
        inner_arr = pa.ListArray.from_arrays(pa.array(inner), pa.array(values, typ))
        return pa.ListArray.from_arrays(pa.array(outer), inner_arr)

    schema = ARROW_RESPONSE_SCHEMA.with_metadata({ARROW_METADATA_KEY: json.dumps(meta)})
    batch = pa.RecordBatch.from_arrays(
        [
            pa.array([content_sample_id(s) for s in seqs], pa.string()),
            pa.array([np.asarray(s, dtype=np.int32) for s in seqs], pa.list_(pa.int32())),
            pa.array(np.zeros(len(seqs), dtype=np.int32)),
            nested(ids, pa.int32()),
            nested(lps, pa.float32()),
        ],
        schema=schema,
    )
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def json_body(seqs: list[list[int]], results: list[TopK], meta: dict[str, Any]) -> bytes:
    out = {
        **meta,
        "results": [
            {
                "input_ids": s,
                "topk_ids": r.ids.tolist(),
                "topk_logprobs": r.logprobs.tolist(),
            }
            for s, r in zip(seqs, results, strict=True)
        ],
    }
    return json.dumps(out, separators=(",", ":")).encode()


def wants_arrow(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return any(part.split(";")[0].strip() == ARROW_STREAM for part in accept.split(","))
