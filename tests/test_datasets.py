"""Input rows -> token sequences: formats, chat-template prompt boundary, truncation, bad input.

Uses the real SmolLM2 teacher tokenizer (and its chat template); no engine.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from todi.services.config import JobSpec
from todi.services.datasets import (
    DatasetError,
    EncodeStats,
    dataset_files,
    encode_rows,
    read_rows,
)
from todi.storage import content_sample_id

CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
]
ROWS = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"prompt": "What is AI?", "response": "The study of thinking machines.", "id": "qa-1"},
    {"messages": CHAT},
    {"messages": MULTI, "id": 42},
]


def write_jsonl(path: Path, rows: list, raw_lines: list[str] = ()) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


def encode(path, tok, **kw) -> tuple[list, EncodeStats]:
    stats = EncodeStats()
    return list(encode_rows(read_rows(path), tok, stats=stats, **kw)), stats


def template_ids(tok, messages, **kw) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
    return list(out["input_ids"] if isinstance(out, dict) else out)


def check_reference(rows, tok) -> None:
    """The four ROWS encoded exactly as the rules in todi.services.datasets say."""
    text, pair, chat, multi = rows
    assert text.prompt_len == 0
    assert text.input_ids.tolist() == tok(ROWS[0]["text"])["input_ids"]
    assert text.sample_id == content_sample_id(text.input_ids)

    pair_msgs = [
        {"role": "user", "content": ROWS[1]["prompt"]},
        {"role": "assistant", "content": ROWS[1]["response"]},
    ]
    assert pair.sample_id == "qa-1"
    assert pair.input_ids.tolist() == template_ids(tok, pair_msgs)
    assert pair.prompt_len == len(template_ids(tok, pair_msgs[:1], add_generation_prompt=True))

    for row, msgs in ((chat, CHAT), (multi, MULTI)):
        prompt = template_ids(tok, msgs[:-1], add_generation_prompt=True)
        assert row.input_ids.tolist() == template_ids(tok, msgs)
        assert row.prompt_len == len(prompt)
        assert row.input_ids[: row.prompt_len].tolist() == prompt
        # The prompt ends with the assistant header; the response is the reply + end of turn.
        assert tok.decode(row.input_ids[: row.prompt_len]).endswith("<|im_start|>assistant\n")
        reply = tok.decode(row.input_ids[row.prompt_len :])
        assert reply.startswith(msgs[-1]["content"]) and "<|im_end|>" in reply
    # Earlier assistant turns belong to the prompt of a multi-turn chat.
    assert "Hello!" in tok.decode(multi.input_ids[: multi.prompt_len])
    assert multi.sample_id == "42"
    assert chat.sample_id == content_sample_id(chat.input_ids)


def test_jsonl_every_row_kind(tmp_path, teacher_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    rows, stats = encode(path, teacher_tokenizer)
    assert [r.row for r in rows] == [0, 1, 2, 3]
    check_reference(rows, teacher_tokenizer)
    assert stats.rows == stats.sequences == 4
    assert stats.tokens == sum(r.num_tokens for r in rows)
    assert (stats.truncated, stats.empty, stats.duplicates) == (0, 0, 0)


def test_parquet_hf_folder_and_folder_of_files(tmp_path, teacher_tokenizer):
    import datasets

    reference, _ = encode(write_jsonl(tmp_path / "ref.jsonl", ROWS), teacher_tokenizer)
    # Parquet wants one schema for all rows: absent columns are nulls.
    columns = ("text", "prompt", "response", "messages", "id")
    table = {c: [r.get(c) for r in ROWS] for c in columns}
    table["id"] = [None if v is None else str(v) for v in table["id"]]
    pq.write_table(pa.table(table), tmp_path / "d.parquet")
    hf = tmp_path / "hf"
    datasets.Dataset.from_dict(table).save_to_disk(str(hf))
    splits = tmp_path / "hf_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table)}).save_to_disk(str(splits))
    folder = tmp_path / "many"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", ROWS[:2])
    write_jsonl(folder / "b.jsonl", ROWS[2:])

    assert dataset_files(tmp_path / "d.parquet")[0] == "parquet"
    assert dataset_files(hf)[0] == "hf"
    assert dataset_files(folder)[0] == "jsonl"
    for path in (tmp_path / "d.parquet", hf, splits, folder):
        rows, _ = encode(path, teacher_tokenizer)
        assert [(r.sample_id, r.input_ids.tolist(), r.prompt_len) for r in rows] == [
            (r.sample_id, r.input_ids.tolist(), r.prompt_len) for r in reference
        ], path
        assert [r.row for r in rows] == [0, 1, 2, 3]

    two = tmp_path / "hf_two"
    d = datasets.Dataset.from_dict(table)
    datasets.DatasetDict({"train": d, "test": d}).save_to_disk(str(two))
    with pytest.raises(DatasetError, match=r"splits \['train', 'test'\]; point at one split"):
        encode(two, teacher_tokenizer)


def test_prompt_response_without_chat_template(tmp_path, teacher_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[1]])
    (row,), _ = encode(path, teacher_tokenizer, chat_template=False)
    head = teacher_tokenizer(ROWS[1]["prompt"])["input_ids"]
    tail = teacher_tokenizer(ROWS[1]["response"], add_special_tokens=False)["input_ids"]
    assert row.input_ids.tolist() == head + tail
    assert row.prompt_len == len(head)

    # A tokenizer without any chat template: prompt + response still works, messages cannot.
    plain = copy.deepcopy(teacher_tokenizer)
    plain.chat_template = None
    (row2,), _ = encode(path, plain)
    assert row2.input_ids.tolist() == head + tail
    with pytest.raises(DatasetError, match=r"d2.jsonl: line 1 \(row 0\): `messages` rows need"):
        encode(write_jsonl(tmp_path / "d2.jsonl", [ROWS[2]]), plain)


def test_template_that_breaks_the_prefix_property_is_refused(tmp_path, teacher_tokenizer):
    odd = copy.deepcopy(teacher_tokenizer)
    # Renders the final assistant turn differently from the generation prompt.
    odd.chat_template = (
        "{% for m in messages %}{{ m['role'] }}"
        "{% if loop.last and m['role'] == 'assistant' %}!{% endif %}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[2]])
    with pytest.raises(DatasetError, match=r"line 1 \(row 0\): the chat template is not prefix"):
        encode(path, odd)


def test_truncation_is_counted_and_keeps_the_prompt(tmp_path, teacher_tokenizer):
    long_reply = {"messages": [CHAT[0], {"role": "assistant", "content": "word " * 50}]}
    long_text = {"text": "one two three " * 30}
    rows = [long_reply, long_text, ROWS[2]]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    full, _ = encode(path, teacher_tokenizer)
    prompt_len = full[0].prompt_len
    max_len = prompt_len + 5
    cut, stats = encode(path, teacher_tokenizer, max_seq_len=max_len)
    assert [r.num_tokens for r in cut[:2]] == [max_len, max_len]
    assert cut[0].prompt_len == prompt_len and cut[0].truncated and cut[1].truncated
    assert cut[0].input_ids.tolist() == full[0].input_ids[:max_len].tolist()
    assert stats.truncated == 2 and stats.sequences == 3
    # Content ids follow the stored (cut) tokens.
    assert cut[1].sample_id == content_sample_id(cut[1].input_ids)

    # A prompt that leaves no room for a response token is dropped and reported.
    _, stats = encode(path, teacher_tokenizer, max_seq_len=prompt_len)
    # (the text row has no prompt: it is cut, not dropped)
    assert (stats.dropped_long_prompt, stats.dropped_rows, stats.sequences) == (2, [0, 2], 1)
    with pytest.raises(DatasetError, match="max_seq_len must be >= 2"):
        encode(path, teacher_tokenizer, max_seq_len=1)


def test_empty_rows_reported_duplicates_skipped(tmp_path, teacher_tokenizer):
    rows = [
        ROWS[0],
        {"text": ""},
        {"text": "   "},
        {"prompt": "Hi", "response": ""},
        {"messages": []},
        {"messages": [CHAT[0], {"role": "assistant", "content": ""}]},
        ROWS[0],  # same content, no id: skipped once
        ROWS[2],
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows, raw_lines=["", "   "])
    out, stats = encode(path, teacher_tokenizer)
    assert [r.row for r in out] == [0, 7]
    assert stats.empty == 5 and stats.empty_rows == [1, 2, 3, 4, 5]
    assert stats.duplicates == 1
    assert stats.rows == 8 and stats.sequences == 2


def test_duplicate_ids_are_an_error(tmp_path, teacher_tokenizer):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"text": "a b c", "id": "x"}, {"text": "d e f", "id": "y"}, {"text": "g h", "id": "x"}],
    )
    with pytest.raises(DatasetError, match=r"line 3 \(row 2\): duplicate id 'x' \(also row 0\)"):
        encode(path, teacher_tokenizer)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "ok"', r"line 2: bad JSON"),
        ("[1, 2]", r"line 2: expected a JSON object, got list"),
        ('{"txt": "typo"}', r"line 2 \(row 1\): no `text`, `prompt` \+ `response`, or `messages`"),
        ('{"text": 5}', r"line 2 \(row 1\): `text` must be a string, got int"),
        ('{"prompt": "only"}', r"has `prompt`/`response` but no `response`"),
        ('{"messages": "hi"}', r"`messages` must be a list"),
        ('{"messages": [{"role": "user"}]}', r"messages\[0\] has no `content`"),
        ('{"messages": [{"role": "user", "content": 1}]}', r"messages\[0\].content must be a str"),
        (
            '{"messages": [{"role": "user", "content": "hi"}]}',
            r"last message must be the assistant's reply",
        ),
        ('{"text": "x", "id": 1.5}', r"`id` must be a string or an integer, got float"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, teacher_tokenizer, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0]], raw_lines=[line])
    with pytest.raises(DatasetError, match=message) as info:
        encode(path, teacher_tokenizer)
    assert str(path) in str(info.value)


def test_bad_paths_and_streaming(tmp_path, teacher_tokenizer):
    with pytest.raises(DatasetError, match="dataset not found"):
        list(read_rows(tmp_path / "missing.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="unknown dataset format"):
        list(read_rows(tmp_path / "d.csv"))
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match="not a readable Parquet file"):
        list(read_rows(tmp_path / "x.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="neither a Hugging Face datasets folder"):
        list(read_rows(tmp_path / "empty"))
    # Streaming: the first rows come out before a bad line far down the file is read.
    path = write_jsonl(tmp_path / "big.jsonl", [ROWS[0]] * 5000, raw_lines=["{broken"])
    rows = encode_rows(read_rows(path), teacher_tokenizer)
    assert next(rows).row == 0
    with pytest.raises(DatasetError, match="line 5001: bad JSON"):
        list(read_rows(path))


def test_job_spec_validation():
    ok = JobSpec(dataset="d.jsonl", out="o", top_k=8)
    assert (ok.temperature, ok.max_seq_len, ok.ray, ok.num_actors, ok.chat_template) == (
        1.0,
        None,
        False,
        2,
        True,
    )
    assert ok.identity() == {
        "dataset": "d.jsonl",
        "top_k": 8,
        "temperature": 1.0,
        "max_seq_len": None,
        "chat_template": True,
        "targets": "topk",
        "draws": 0,
        "sample_seed": 0,
        "retemper": [],
    }
    bad = [
        ({"top_k": 0}, "top_k"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"max_seq_len": 1}, "max_seq_len"),
        ({"dataset": " "}, "dataset"),
        ({"job_id": "../x"}, "job_id"),
        ({"num_actors": 0}, "num_actors"),
        ({"topk": 3}, "topk"),
        ({"targets": "sampled"}, "draws"),
        ({"targets": "sampled", "draws": 300}, "draws"),
        ({"draws": 5}, "draws"),
        ({"retemper": [2.0, 2.0]}, "retemper"),
    ]
    for change, field in bad:
        with pytest.raises(ValueError, match=field):
            JobSpec.model_validate({"dataset": "d.jsonl", "out": "o", "top_k": 8, **change})
