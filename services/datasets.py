"""Input rows -> token sequences for the teacher: JSONL, Parquet, or a Hugging Face folder.

Accepted rows (one of, checked per row):

    {"text": str}                                   plain text, prompt_len = 0
    {"prompt": str, "response": str}                one exchange
    {"messages": [{"role": str, "content": str}]}   a chat; the LAST message is the response
                                                    and must have role "assistant"

plus an optional `id` (str or int) that becomes the sample id; without it the id is
`storage.content_sample_id(input_ids)`, so the same tokens always get the same id.

Chat rows go through the teacher's chat template. With x = template(messages) and
p = template(messages[:-1], add_generation_prompt=True), the prompt is everything up to and
including the header of the last assistant turn and

    prompt_len = len(p),   input_ids = x,   requiring x[:len(p)] == p   (the prefix property).

A template that breaks the prefix property (e.g. one that rewrites earlier turns once a
reply follows) would silently mislabel prompt tokens as response; it is refused with a
DatasetError that says so. `prompt` + `response` rows are the chat [user: prompt,
assistant: response] when the tokenizer has a template and `chat_template=True`; otherwise
prompt and response are tokenized separately and concatenated (the prompt with the
tokenizer's special tokens, the response without), so the boundary is exact.

Truncation (max_seq_len, explicit and counted): the prompt is kept and the response is cut
from the end. A row whose prompt alone leaves no response token (prompt_len >= max_seq_len)
is DROPPED and counted (`dropped_long_prompt`): cutting into the prompt would train on a
context the data never had. Plain text is cut to max_seq_len.

Empty rows (empty/blank text or response, no messages, fewer than 2 tokens) are skipped and
reported (count + first row numbers), never fatal. Rows repeating the exact same content
without an explicit id are skipped once and counted (`duplicates`): each sample exactly once.
Two rows with the same explicit `id` are an error naming both rows.

Everything streams: a JSONL file is read line by line, Parquet by record batch, a datasets
folder by memory-mapped batches. Rows are numbered from 0 in file order (for JSONL: the
non-blank lines; messages also give the line number).
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from todi.common.errors import TodiError
from todi.storage import content_sample_id

# How many row numbers of each kind (empty, dropped) a report keeps.
REPORT_ROWS = 10
_READ_BATCH = 1024
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
_PARQUET_SUFFIXES = (".parquet", ".pq")


class DatasetError(TodiError, ValueError):
    """Input that cannot be read as rows; the message names the file and the row."""


@dataclass(frozen=True)
class RawRow:
    """One input record as read from the file, before tokenization."""

    index: int  # 0-based row number within the dataset (all files, in order)
    where: str  # "FILE: row N" / "FILE: line N (row M)", for messages
    data: dict[str, Any]


@dataclass
class EncodedRow:
    """One row as token ids, ready for the teacher."""

    sample_id: str
    input_ids: np.ndarray  # int32 [L], L >= 2
    prompt_len: int  # 0 <= prompt_len < L
    row: int  # RawRow.index
    truncated: bool = False

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class EncodeStats:
    """Counts from one pass of `encode_rows` (filled in as rows stream by)."""

    rows: int = 0  # rows read
    sequences: int = 0  # rows encoded and yielded
    tokens: int = 0  # tokens of the yielded sequences
    truncated: int = 0  # yielded, but cut to max_seq_len
    empty: int = 0  # skipped: nothing to score
    empty_rows: list[int] = field(default_factory=list)  # first REPORT_ROWS row numbers
    dropped_long_prompt: int = 0  # skipped: prompt_len >= max_seq_len
    dropped_rows: list[int] = field(default_factory=list)
    duplicates: int = 0  # skipped: same content (no explicit id) as an earlier row

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------


def dataset_files(path: str | os.PathLike[str]) -> tuple[str, list[Path]]:
    """(format, files) for a dataset path: "jsonl" | "parquet" | "hf" (files = [folder]).

    A folder is a Hugging Face `datasets` folder (`save_to_disk`) when it holds
    `dataset_info.json`, `state.json` or `dataset_dict.json`; otherwise a folder of JSONL
    or Parquet files (one format), read in sorted name order.
    """
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{p}: dataset not found")
    if p.is_dir():
        if any((p / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "hf", [p]
        jsonl = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(_JSONL_SUFFIXES))
        parquet = sorted(
            f for f in p.iterdir() if f.is_file() and f.name.endswith(_PARQUET_SUFFIXES)
        )
        if jsonl and parquet:
            raise DatasetError(f"{p}: folder mixes JSONL and Parquet files; keep one format")
        if jsonl:
            return "jsonl", jsonl
        if parquet:
            return "parquet", parquet
        raise DatasetError(
            f"{p}: folder is neither a Hugging Face datasets folder (save_to_disk) nor holds "
            f"*.jsonl / *.parquet files"
        )
    name = p.name.lower()
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl", [p]
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet", [p]
    raise DatasetError(
        f"{p}: unknown dataset format (expected .jsonl/.json lines, .parquet, or a Hugging Face "
        f"datasets folder)"
    )


def _read_jsonl(path: Path, start: int) -> Iterator[RawRow]:
    opener = gzip.open if path.name.endswith(".gz") else open
    index = start
    with opener(path, "rb") as raw:
        reader = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline=None)
        lineno = 0
        while True:
            lineno += 1
            try:
                line = reader.readline()
            except UnicodeDecodeError as exc:
                raise DatasetError(f"{path}: line {lineno}: not UTF-8 ({exc.reason})") from None
            if not line:
                return
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    f"{path}: line {lineno}: bad JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(data, dict):
                raise DatasetError(
                    f"{path}: line {lineno}: expected a JSON object, got {type(data).__name__}"
                )
            yield RawRow(index, f"{path}: line {lineno} (row {index})", data)
            index += 1


def _read_parquet(path: Path, start: int) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from None
    index = start
    try:
        for batch in pf.iter_batches(batch_size=_READ_BATCH):
            for data in batch.to_pylist():
                yield RawRow(index, f"{path}: row {index}", data)
                index += 1
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"{path}: unreadable after row {index} ({exc})") from None


def _read_hf(path: Path, start: int) -> Iterator[RawRow]:
    try:
        import datasets
    except ModuleNotFoundError:
        raise DatasetError(
            f"{path}: reading a Hugging Face datasets folder needs the `datasets` package"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DatasetError(f"{path}: cannot load the datasets folder ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if len(splits) != 1:
            raise DatasetError(
                f"{path}: a DatasetDict with splits {splits}; point at one split's folder "
                f"(e.g. {path / splits[0]})"
            )
        ds = ds[splits[0]]
    index = start
    for batch in ds.with_format(None).iter(batch_size=_READ_BATCH):
        columns = list(batch)
        n = len(batch[columns[0]]) if columns else 0
        for i in range(n):
            yield RawRow(index, f"{path}: row {index}", {c: batch[c][i] for c in columns})
            index += 1


def read_rows(path: str | os.PathLike[str]) -> Iterator[RawRow]:
    """Stream the records of a dataset (JSONL, Parquet, HF folder, or a folder of files)."""
    fmt, files = dataset_files(path)
    reader = {"jsonl": _read_jsonl, "parquet": _read_parquet, "hf": _read_hf}[fmt]
    index = 0
    for f in files:
        for row in reader(f, index):
            yield row
            index = row.index + 1


# ----------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------


def _ids(encoded: Any) -> list[int]:
    """Token ids from whatever a tokenizer call returned (list, BatchEncoding, dict)."""
    if isinstance(encoded, dict) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):  # a batch of one
        encoded = encoded[0]
    return [int(t) for t in encoded]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _check_str(row: RawRow, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise DatasetError(f"{row.where}: `{name}` must be a string, got {type(value).__name__}")
    return value


def _check_messages(row: RawRow, value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list | tuple):
        raise DatasetError(
            f"{row.where}: `messages` must be a list of {{role, content}}, got "
            f"{type(value).__name__}"
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DatasetError(
                f"{row.where}: messages[{i}] must be an object with `role` and `content`, got "
                f"{type(m).__name__}"
            )
        for key in ("role", "content"):
            if key not in m:
                raise DatasetError(f"{row.where}: messages[{i}] has no `{key}`")
            if not isinstance(m[key], str):
                raise DatasetError(
                    f"{row.where}: messages[{i}].{key} must be a string, got "
                    f"{type(m[key]).__name__}"
                )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _row_id(row: RawRow) -> str | None:
    value = row.data.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | np.integer):
        raise DatasetError(
            f"{row.where}: `id` must be a string or an integer, got {type(value).__name__}"
        )
    text = str(value)
    if not text:
        raise DatasetError(f"{row.where}: `id` is empty")
    return text


def _encode_chat(
    row: RawRow, tokenizer: Any, messages: list[dict[str, str]]
) -> tuple[list[int], int]:
    """(input_ids, prompt_len) for a chat whose last message is the assistant's reply."""
    if not has_chat_template(tokenizer):
        raise DatasetError(
            f"{row.where}: `messages` rows need a tokenizer with a chat template; this "
            f"teacher's tokenizer has none"
        )
    try:
        full = _ids(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
        prompt = _ids(
            tokenizer.apply_chat_template(
                messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=False
            )
        )
    except Exception as exc:  # jinja raises its own error types (e.g. raise_exception)
        raise DatasetError(f"{row.where}: the chat template refused the messages: {exc}") from None
    if full[: len(prompt)] != prompt:
        at = next(
            (i for i, (a, b) in enumerate(zip(full, prompt, strict=False)) if a != b),
            min(len(full), len(prompt)),
        )
        raise DatasetError(
            f"{row.where}: the chat template is not prefix-stable: "
            f"template(messages[:-1], add_generation_prompt=True) ({len(prompt)} tokens) is not "
            f"a prefix of template(messages) ({len(full)} tokens; first difference at token "
            f"{at}), so the prompt/response boundary is undefined. Use `text` or "
            f"`prompt` + `response` rows with chat_template=False, or a template that keeps "
            f"earlier turns unchanged"
        )
    return full, len(prompt)


def encode_row(
    row: RawRow, tokenizer: Any, *, chat_template: bool = True
) -> tuple[str | None, list[int], int] | None:
    """(explicit id or None, input_ids, prompt_len), or None for an empty row.

    Not truncated; see `encode_rows`.
    """
    data = row.data
    row_id = _row_id(row)
    if data.get("messages") is not None:
        messages = _check_messages(row, data["messages"])
        if not messages or not messages[-1]["content"].strip():
            return None
        if messages[-1]["role"] != "assistant":
            raise DatasetError(
                f"{row.where}: the last message must be the assistant's reply (the response "
                f"to score), got role {messages[-1]['role']!r}"
            )
        ids, prompt_len = _encode_chat(row, tokenizer, messages)
    elif data.get("prompt") is not None or data.get("response") is not None:
        if data.get("prompt") is None or data.get("response") is None:
            missing = "response" if data.get("response") is None else "prompt"
            raise DatasetError(f"{row.where}: has `prompt`/`response` but no `{missing}`")
        prompt = _check_str(row, "prompt", data["prompt"])
        response = _check_str(row, "response", data["response"])
        if not response.strip():
            return None
        if chat_template and has_chat_template(tokenizer):
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
            ]
            ids, prompt_len = _encode_chat(row, tokenizer, messages)
        else:
            head = _ids(tokenizer(prompt)) if prompt else []
            tail = _ids(tokenizer(response, add_special_tokens=False))
            ids, prompt_len = head + tail, len(head)
    elif data.get("text") is not None:
        text = _check_str(row, "text", data["text"])
        if not text.strip():
            return None
        ids, prompt_len = _ids(tokenizer(text)), 0
    else:
        present = sorted(k for k, v in data.items() if v is not None)
        raise DatasetError(
            f"{row.where}: no `text`, `prompt` + `response`, or `messages` "
            f"(columns with values: {present or 'none'})"
        )
    if len(ids) < 2 or len(ids) <= prompt_len:
        return None
    return row_id, ids, prompt_len


def encode_rows(
    rows: Iterable[RawRow],
    tokenizer: Any,
    *,
    max_seq_len: int | None = None,
    chat_template: bool = True,
    stats: EncodeStats | None = None,
) -> Iterator[EncodedRow]:
    """Tokenize, truncate, dedupe and id rows (see the module docstring for the rules).

    `stats` (if given) is updated as rows stream by. Raises DatasetError on bad input and on
    a repeated explicit id.
    """
    if max_seq_len is not None and max_seq_len < 2:
        raise DatasetError(f"max_seq_len must be >= 2, got {max_seq_len}")
    stats = stats if stats is not None else EncodeStats()
    seen: dict[str, int] = {}  # sample id -> row
    for row in rows:
        stats.rows += 1
        encoded = encode_row(row, tokenizer, chat_template=chat_template)
        if encoded is None:
            stats.empty += 1
            if len(stats.empty_rows) < REPORT_ROWS:
                stats.empty_rows.append(row.index)
            continue
        row_id, ids, prompt_len = encoded
        truncated = False
        if max_seq_len is not None and len(ids) > max_seq_len:
            if prompt_len >= max_seq_len:
                stats.dropped_long_prompt += 1
                if len(stats.dropped_rows) < REPORT_ROWS:
                    stats.dropped_rows.append(row.index)
                continue
            ids, truncated = ids[:max_seq_len], True
        input_ids = np.asarray(ids, dtype=np.int32)
        sample_id = row_id if row_id is not None else content_sample_id(input_ids)
        if sample_id in seen:
            if row_id is not None:
                raise DatasetError(
                    f"{row.where}: duplicate id {sample_id!r} (also row {seen[sample_id]}); "
                    f"ids must be unique"
                )
            stats.duplicates += 1
            continue
        seen[sample_id] = row.index
        stats.sequences += 1
        stats.tokens += len(ids)
        stats.truncated += truncated
        yield EncodedRow(sample_id, input_ids, prompt_len, row.index, truncated)
