"""Shard format v1 end to end: round trip, metadata, CLI, crash safety, bad input, batches, S3.

Everything is real: real Parquet files on disk, a real writer process killed with SIGKILL,
the real `todi` console script, a real S3 API (moto's server on loopback).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from todi.cli import app
from todi.storage import (
    DEFAULT_CODEC,
    IGNORE_INDEX,
    Sample,
    ShardFormatError,
    ShardSetMetadata,
    ShardSetWriter,
    collate,
    commit_shards,
    expected_positions,
    first_position,
    get_codec,
    iter_batches,
    known_codecs,
    open_shard_set,
    padding_waste,
    shard_schema,
    verify_shard_set,
    write_shard,
)
from todi.storage.codec import RowBlock
from todi.storage.manifest import ShardInfo
from todi.storage.schema import FOOTER_KEY, MANIFEST_NAME

REPO = Path(__file__).resolve().parents[1]
VOCAB = 1000
K = 8


def make_meta(**changes) -> ShardSetMetadata:
    base = ShardSetMetadata(
        teacher_model="test-teacher",
        teacher_fingerprint="sha256:teacher",
        tokenizer_sha256="sha256:tok",
        vocab_size=VOCAB,
        top_k=K,
        temperature=1.0,
        logprobs_mode="processed_logprobs",
        backend="hf",
    )
    return base.model_copy(update=changes)


def make_samples(
    n: int, *, seed: int = 0, k: int = K, vocab: int = VOCAB, lengths=(3, 40), prefix: str = "s"
) -> list[Sample]:
    """Samples shaped like teacher output: the top-k of a log-softmax over a Zipf-like vocab,
    in descending order, normalized over the whole vocabulary (so sum(p_k) < 1)."""
    rng = np.random.default_rng(seed)
    prior = -1.1 * np.log1p(np.arange(vocab))
    out = []
    for i in range(n):
        length = int(rng.integers(*lengths))
        tokens = rng.integers(0, vocab, length).astype(np.int32)
        prompt_len = int(rng.integers(0, length)) if i % 3 else 0
        positions = expected_positions(length, prompt_len)
        logits = prior + 2.5 * rng.standard_normal((positions, vocab))
        # the actual next token is often the teacher's favourite
        nxt = tokens[first_position(prompt_len) + 1 :]
        logits[np.arange(positions), nxt] += 4.0 * (rng.random(positions) < 0.6)
        lse = np.logaddexp.reduce(logits, axis=1, keepdims=True)
        lp = logits - lse
        top = np.argsort(-lp, axis=1, kind="stable")[:, :k]
        out.append(
            Sample(
                f"{prefix}{i}",
                tokens,
                prompt_len,
                top.astype(np.int32),
                np.take_along_axis(lp, top, 1).astype(np.float32),
            )
        )
    return out


def assert_same(a: list[Sample], b: list[Sample], bound: float) -> None:
    assert [s.sample_id for s in a] == [s.sample_id for s in b]
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.input_ids, y.input_ids)
        assert x.prompt_len == y.prompt_len
        assert y.topk_ids.dtype == np.int32 and y.topk_logprobs.dtype == np.float32
        assert np.array_equal(x.topk_ids, y.topk_ids)  # bit-exact, rank order kept
        assert np.abs(x.topk_logprobs - y.topk_logprobs).max(initial=0) <= bound


def write_set(path, samples, meta=None, **kw) -> None:
    with ShardSetWriter(path, meta or make_meta(), **kw) as w:
        for s in samples:
            w.write(s)


def manifest_of(path: Path) -> dict:
    return json.loads((path / MANIFEST_NAME).read_text())


def rewrite_manifest(path: Path, data: dict) -> None:
    (path / MANIFEST_NAME).write_text(json.dumps(data))


# --------------------------------------------------------------------------------------------
# Round trip and metadata


@pytest.mark.parametrize("codec", known_codecs())
def test_round_trip_every_codec(tmp_path: Path, codec: str) -> None:
    samples = make_samples(40, seed=1)
    meta = make_meta(codec=codec)
    write_set(tmp_path / "set", samples, meta, positions_per_shard=150)
    shard_set = open_shard_set(tmp_path / "set")
    assert shard_set.complete and len(shard_set.shards) > 2
    assert shard_set.num_rows == 40
    assert shard_set.num_positions == sum(s.num_positions for s in samples)
    assert_same(samples, list(shard_set), get_codec(codec).max_logprob_error)
    assert verify_shard_set(tmp_path / "set").ok


def test_default_codec_is_the_compact_one() -> None:
    assert DEFAULT_CODEC == "rans-q32-v2"
    # old sets stay readable
    assert {"qdelta32-planes-v1", "rans-q32-v1", "ans-q32-c1"} <= set(known_codecs())
    assert make_meta().codec == DEFAULT_CODEC


def test_metadata_in_every_footer_and_in_the_manifest(tmp_path: Path) -> None:
    meta = make_meta(temperature=0.7)
    write_set(tmp_path, make_samples(12), meta, positions_per_shard=100, job={"top_k": K})
    manifest = manifest_of(tmp_path)
    want = {
        "format_version": 2,
        "teacher_model": "test-teacher",
        "teacher_fingerprint": "sha256:teacher",
        "tokenizer_sha256": "sha256:tok",
        "vocab_size": VOCAB,
        "top_k": K,
        "temperature": 0.7,
        "logprobs_mode": "processed_logprobs",
        "backend": "hf",
        "codec": DEFAULT_CODEC,
        "targets": "topk",
        "draws": 0,
        "sample_seed": None,
        "candidates": None,
        "retemper_temperatures": [],
    }
    assert manifest["metadata"] == want
    assert manifest["complete"] is True and manifest["job"] == {"top_k": K}
    assert len(manifest["shards"]) > 1
    for info in manifest["shards"]:
        data = (tmp_path / info["file"]).read_bytes()
        assert info["bytes"] == len(data)
        assert info["sha256"] == hashlib.sha256(data).hexdigest()
        pf = pq.ParquetFile(tmp_path / info["file"])
        assert json.loads(pf.schema_arrow.metadata[FOOTER_KEY]) == want
        assert pf.metadata.num_rows == info["rows"]
        assert pf.schema_arrow.names == shard_schema(DEFAULT_CODEC).names
    assert open_shard_set(tmp_path).metadata == want


@pytest.mark.parametrize("dictionary", [False, True])
def test_decode_table_mixes_rows_of_different_shards(tmp_path: Path, dictionary: bool) -> None:
    """What a Ray Data block may hold: rows of several files, each with its own codec table,
    as plain or dictionary chunks, or rebuilt from Python rows (the trainer's shuffle buffer)."""
    from todi.storage import decode_table

    samples = make_samples(20, seed=2)
    write_set(tmp_path, samples, positions_per_shard=150)
    shard_set = open_shard_set(tmp_path)
    read_dictionary = ["topk_table"] if dictionary else None
    tables = [
        pq.read_table(tmp_path / info.file, read_dictionary=read_dictionary)
        for info in shard_set.shards
    ]
    mixed = pa.concat_tables(tables).replace_schema_metadata(None)
    order = np.random.default_rng(0).permutation(mixed.num_rows)
    by_id = {s.sample_id: s for s in samples}
    for block in (
        mixed,
        mixed.take(pa.array(order)),
        pa.Table.from_pylist(mixed.take(pa.array(order)).to_pylist(), schema=mixed.schema),
    ):
        decoded = decode_table(block, shard_set.signature, "mixed block")
        assert_same([by_id[s.sample_id] for s in decoded], decoded, 1 / 64 + 1e-6)


def test_sample_ids_and_seeded_shard_order(tmp_path: Path) -> None:
    samples = make_samples(30, seed=3)
    write_set(tmp_path, samples, positions_per_shard=120)
    shard_set = open_shard_set(tmp_path)
    assert shard_set.sample_ids() == {s.sample_id for s in samples}
    a = [s.sample_id for s in shard_set.iter_samples(seed=5)]
    assert a == [s.sample_id for s in shard_set.iter_samples(seed=5)]
    assert sorted(a) == sorted(s.sample_id for s in samples)
    assert a != [s.sample_id for s in shard_set]


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_inspect_and_verify(tmp_path: Path) -> None:
    samples = make_samples(15, seed=4)
    write_set(tmp_path, samples, positions_per_shard=200)
    runner = CliRunner()
    result = runner.invoke(app, ["shards", "inspect", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for word in ("rows", "positions", "top_k", "teacher_model", "bytes_per_position", "complete"):
        assert word in result.output
    result = runner.invoke(app, ["shards", "inspect", str(tmp_path), "--json"])
    info = json.loads(result.output)
    positions = sum(s.num_positions for s in samples)
    assert (info["rows"], info["positions"], info["top_k"]) == (15, positions, K)
    assert info["complete"] is True and info["teacher_model"] == "test-teacher"
    assert info["bytes_per_position"] == pytest.approx(info["bytes"] / positions, abs=0.01)

    result = runner.invoke(app, ["shards", "verify", str(tmp_path)])
    assert result.exit_code == 0 and result.output.startswith("ok: ")

    victim = open_shard_set(tmp_path).files()[1]
    Path(victim).write_bytes(Path(victim).read_bytes()[:-10])
    result = runner.invoke(app, ["shards", "verify", str(tmp_path)])
    assert result.exit_code == 2
    assert f"error: {victim}:" in result.output and "manifest says" in result.output
    result = runner.invoke(app, ["shards", "inspect", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no manifest" in result.output


def test_cli_verify_subprocess(tmp_path: Path) -> None:
    """The installed console script: a broken set exits 2 with one `error:` line naming it."""
    write_set(tmp_path, make_samples(6, seed=5))
    victim = open_shard_set(tmp_path).files()[0]
    os.remove(victim)
    todi = Path(sys.executable).parent / "todi"
    done = subprocess.run(
        [str(todi), "shards", "verify", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == f"error: {victim}: listed in the manifest but missing\n"


# --------------------------------------------------------------------------------------------
# Crash safety and appending

_WRITER = textwrap.dedent(
    """
    import numpy as np
    from todi.storage import Sample, ShardSetMetadata, ShardSetWriter

    meta = ShardSetMetadata.model_validate_json({meta!r})
    rng = np.random.default_rng(0)
    w = ShardSetWriter({path!r}, meta, positions_per_shard=60)
    i = 0
    while True:  # until killed
        n = int(rng.integers(3, 40))
        lps = np.sort(-rng.exponential(3.0, (n - 1, meta.top_k)), axis=1)[:, ::-1]
        ids = rng.integers(0, meta.vocab_size, (n - 1, meta.top_k))
        tokens = rng.integers(0, meta.vocab_size, n)
        w.write(Sample(f"w{{i}}", tokens.astype(np.int32), 0, ids.astype(np.int32),
                       lps.astype(np.float32)))
        i += 1
    """
)


@pytest.mark.timeout(120)
def test_writer_killed_mid_way_leaves_a_readable_set(tmp_path: Path) -> None:
    root = tmp_path / "set"
    script = _WRITER.format(meta=make_meta().model_dump_json(), path=str(root))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if (root / MANIFEST_NAME).exists() and len(manifest_of(root)["shards"]) >= 4:
                break
            assert proc.poll() is None, "writer died on its own"
            time.sleep(0.05)
        else:
            pytest.fail("the writer committed no shards")
        time.sleep(0.137)  # land somewhere inside a shard write
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    shard_set = open_shard_set(root)
    assert shard_set.complete is False
    listed = {info.file for info in shard_set.shards}
    rows = list(shard_set)  # every listed shard is whole and readable
    assert len(rows) == shard_set.num_rows > 0
    report = verify_shard_set(root)
    assert report.ok, report.problems
    on_disk = {p.name for p in root.iterdir() if p.name.endswith(".parquet")}
    assert listed <= on_disk  # anything else is an unlisted leftover: a warning only
    temps = {p.name for p in root.iterdir() if p.name.startswith(".tmp-")}
    # Unlisted shards and the killed writer's temp file (if the kill landed in one): warnings.
    assert len(report.warnings) == len(on_disk - listed) + len(temps), report.warnings

    # Appending later (a resumed job) works, completes the set and removes the temp file.
    more = make_samples(10, seed=99, prefix="resumed-")
    write_set(root, more, positions_per_shard=10**6)
    again = open_shard_set(root)
    assert again.complete and again.num_rows == len(rows) + 10
    assert {s.sample_id for s in more} <= again.sample_ids()
    assert verify_shard_set(root).ok
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"top_k": 4}, "top_k: 8 != 4"),
        ({"temperature": 0.5}, "temperature: 1.0 != 0.5"),
        ({"teacher_fingerprint": "sha256:other"}, "teacher_fingerprint"),
        ({"tokenizer_sha256": "sha256:othertok"}, "tokenizer_sha256"),
        ({"codec": "qdelta32-planes-v1"}, "codec"),
    ],
)
def test_append_with_another_signature_is_refused(tmp_path: Path, change, named) -> None:
    write_set(tmp_path, make_samples(3))
    with pytest.raises(ShardFormatError) as err:
        ShardSetWriter(tmp_path, make_meta(**change))
    assert str(tmp_path) in str(err.value) and named in str(err.value)
    assert open_shard_set(tmp_path).complete  # the refused writer changed nothing


def test_append_with_another_backend_is_allowed(tmp_path: Path) -> None:
    """backend / model name are not in the signature: a resumed job may switch engines."""
    write_set(tmp_path, make_samples(4))
    write_set(tmp_path, make_samples(4, seed=8, prefix="v"), make_meta(backend="vllm"))
    shard_set = open_shard_set(tmp_path)
    assert len(list(shard_set)) == 8
    report = verify_shard_set(tmp_path)
    assert report.ok and any("backend" in w for w in report.warnings)


def test_multi_process_style_write_then_commit(tmp_path: Path) -> None:
    """Actors write whole shards; one process commits them; uncommitted files stay invisible."""
    meta = make_meta()
    a = write_shard(tmp_path, make_samples(5, seed=1, prefix="a"), meta)
    b = write_shard(tmp_path, make_samples(5, seed=2, prefix="b"), meta)
    write_shard(tmp_path, make_samples(5, seed=3, prefix="c"), meta)  # never committed
    commit_shards(tmp_path, meta, [a, b], complete=True)
    shard_set = open_shard_set(tmp_path)
    assert {s.sample_id[0] for s in shard_set} == {"a", "b"}
    report = verify_shard_set(tmp_path)
    assert report.ok and len(report.warnings) == 1


# --------------------------------------------------------------------------------------------
# Bad input: each error names the file and the problem


def _problem(root: Path) -> str:
    report = verify_shard_set(root)
    assert not report.ok
    with pytest.raises(ShardFormatError) as err:
        list(open_shard_set(root))
    assert str(err.value) in report.problems or report.problems[0].split(":")[0] in str(err.value)
    return report.problems[0]


@pytest.fixture
def good_set(tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "set"
    write_set(root, make_samples(12, seed=6), positions_per_shard=150)
    return root, open_shard_set(root).files()[0]


def test_truncated_shard(good_set) -> None:
    root, victim = good_set
    data = Path(victim).read_bytes()
    Path(victim).write_bytes(data[: len(data) // 2])
    problem = _problem(root)
    assert problem.startswith(f"{victim}: ") and "manifest says" in problem
    # Even when the manifest was (wrongly) written for the truncated bytes, the file fails.
    m = manifest_of(root)
    short = Path(victim).read_bytes()
    m["shards"][0].update(bytes=len(short), sha256=hashlib.sha256(short).hexdigest())
    rewrite_manifest(root, m)
    problem = _problem(root)
    assert problem.startswith(f"{victim}: ") and "not a readable Parquet file" in problem


def test_corrupted_bytes(good_set) -> None:
    root, victim = good_set
    data = bytearray(Path(victim).read_bytes())
    data[len(data) // 3] ^= 0x5A
    Path(victim).write_bytes(bytes(data))
    problem = _problem(root)
    assert problem == f"{victim}: sha256 differs from the manifest (corrupted)"
    # With a manifest that matches the corrupted bytes, the Parquet page checksums or the
    # codec's own consistency checks still refuse it.
    m = manifest_of(root)
    m["shards"][0]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    rewrite_manifest(root, m)
    assert _problem(root).startswith(f"{victim}: ")


def test_missing_file(good_set) -> None:
    root, victim = good_set
    os.remove(victim)
    assert _problem(root) == f"{victim}: listed in the manifest but missing"


@pytest.mark.parametrize(
    ("field", "delta", "words"),
    [
        ("rows", 1, "rows, the manifest says"),
        ("positions", 3, "positions, the manifest says"),
        ("bytes", 7, "bytes, the manifest says"),
        ("sha256", None, "sha256 differs from the manifest"),
    ],
)
def test_manifest_disagrees_with_files(good_set, field, delta, words) -> None:
    root, victim = good_set
    m = manifest_of(root)
    entry = m["shards"][0]
    entry[field] = "0" * 64 if delta is None else entry[field] + delta
    rewrite_manifest(root, m)
    problem = _problem(root)
    assert problem.startswith(f"{victim}: ") and words in problem


def _raw_shard(root: Path, meta: ShardSetMetadata, samples: list[Sample]) -> str:
    """A shard written by a broken writer: encoded WITHOUT the writer's checks."""
    codec = get_codec(meta.codec)
    block = RowBlock(
        [s.sample_id for s in samples],
        [s.input_ids for s in samples],
        np.array([s.prompt_len for s in samples]),
        np.array([s.num_positions for s in samples]),
    )
    cols = codec.encode_rows(
        [s.topk_ids for s in samples],
        [s.topk_logprobs for s in samples],
        block,
        vocab_size=meta.vocab_size,
        top_k=meta.top_k,
    )
    table = pa.table(
        {
            "sample_id": block.sample_ids,
            "input_ids": pa.array(block.input_ids, pa.list_(pa.int32())),
            "prompt_len": pa.array(block.prompt_lens, pa.int32()),
            **cols,
        },
        schema=shard_schema(meta.codec).with_metadata(meta.footer()),
    )
    name = "part-broken.parquet"
    pq.write_table(table, root / name)
    data = (root / name).read_bytes()
    info = ShardInfo(
        file=name,
        rows=len(samples),
        positions=sum(s.num_positions for s in samples),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    m = manifest_of(root)
    m["shards"].append(info.model_dump())
    rewrite_manifest(root, m)
    return str(root / name)


def test_ids_outside_the_vocabulary(tmp_path: Path) -> None:
    bad = make_samples(3, seed=7)
    bad[1].topk_ids[2, 3] = VOCAB + 5
    # The writer refuses them, naming the set and the sample ...
    with pytest.raises(ShardFormatError, match=r"sample 's1': top-k id 1005 outside"):
        write_set(tmp_path / "w", bad)
    # ... and a file that holds them anyway (broken writer, legacy codec) fails verification.
    meta = make_meta(codec="qdelta32-planes-v1")
    root = tmp_path / "set"
    write_set(root, make_samples(3), meta)
    path = _raw_shard(root, meta, bad)
    problem = _problem(root)
    assert problem.startswith(f"{path}: sample 's1'") and "1005 outside the vocabulary" in problem


@pytest.mark.parametrize("value", [float("nan"), 0.5])
def test_nan_or_positive_logprobs_refused(tmp_path: Path, value: float) -> None:
    bad = make_samples(2, seed=9)
    bad[1].topk_logprobs[0, 0] = value
    with pytest.raises(ShardFormatError) as err:
        write_set(tmp_path, bad)
    text = str(err.value)
    assert text.startswith(f"{tmp_path}: sample 's1'")
    assert ("NaN" in text) if value != value else ("positive log-prob" in text)


def test_k_mismatch_across_files(good_set) -> None:
    root, _ = good_set
    meta4 = make_meta(top_k=4)
    info = write_shard(root, make_samples(3, k=4, prefix="k4-"), meta4)
    m = manifest_of(root)
    m["shards"].append(info.model_dump())
    rewrite_manifest(root, m)
    problem = _problem(root)
    assert problem.startswith(str(root / info.file)) and "top_k: 4 != 8" in problem


def test_unknown_codec_and_newer_format(good_set) -> None:
    root, _ = good_set
    m = manifest_of(root)
    m["metadata"]["codec"] = "zstd-magic-v9"
    rewrite_manifest(root, m)
    with pytest.raises(ShardFormatError, match=r"unknown shard codec 'zstd-magic-v9'.*newer"):
        open_shard_set(root)
    assert "unknown shard codec" in _first_problem(root)

    m["metadata"]["codec"] = DEFAULT_CODEC
    m["format_version"] = 3
    rewrite_manifest(root, m)
    with pytest.raises(ShardFormatError, match="format_version 3 is newer than this reader"):
        open_shard_set(root)

    # A file from a newer writer inside an otherwise fine set.
    m["format_version"] = 2
    rewrite_manifest(root, m)
    newer = make_meta(format_version=3)
    info = write_shard(root, make_samples(2, prefix="n"), newer)
    m["shards"].append(info.model_dump())
    rewrite_manifest(root, m)
    assert "format_version 3 is newer" in _first_problem(root)


def _first_problem(root: Path) -> str:
    report = verify_shard_set(root)
    assert not report.ok
    return report.problems[0]


def test_duplicate_sample_ids_and_unlisted_files(good_set) -> None:
    root, _ = good_set
    dup = make_samples(2, seed=6)  # same ids as the set's first samples
    info = write_shard(root, dup, make_meta())
    stray = write_shard(root, make_samples(2, prefix="stray"), make_meta())
    m = manifest_of(root)
    m["shards"].append(info.model_dump())
    rewrite_manifest(root, m)
    report = verify_shard_set(root)
    assert any("sample 's0' also in" in p for p in report.problems)
    assert any(stray.file in w and "not listed" in w for w in report.warnings)


# --------------------------------------------------------------------------------------------
# Batches


def test_collate_aligns_labels_and_teacher_rows() -> None:
    samples = make_samples(6, seed=10)
    samples[0] = make_samples(1, seed=11)[0]
    batch = collate(samples)
    b, t = batch.input_ids.shape
    assert t == max(len(s.input_ids) for s in samples)
    assert batch.topk_ids.shape == (b, t, K) and batch.topk_ids.dtype == torch.long
    assert batch.topk_logprobs.dtype == torch.float32
    for i, s in enumerate(samples):
        n, first = len(s.input_ids), s.first_position
        labels = batch.labels[i].numpy()
        for pos in range(t):
            if first <= pos <= n - 2:  # positions with a teacher row: the response targets
                assert labels[pos] == s.input_ids[pos + 1]
                assert np.array_equal(batch.topk_ids[i, pos].numpy(), s.topk_ids[pos - first])
                assert np.allclose(
                    batch.topk_logprobs[i, pos].numpy(), s.topk_logprobs[pos - first]
                )
            else:  # prompt (except its last token), the last token, padding
                assert labels[pos] == IGNORE_INDEX
                assert not batch.topk_logprobs[i, pos].any()
        assert batch.attention_mask[i, :n].all() and not batch.attention_mask[i, n:].any()
        if s.prompt_len > 0:  # the prompt's last token predicts the first response token
            assert labels[s.prompt_len - 1] == s.input_ids[s.prompt_len]
            assert (labels[: s.prompt_len - 1] == IGNORE_INDEX).all()
    assert batch.num_tokens == sum(s.num_positions for s in samples)


def _counting(samples: list[Sample], counter: list[int]) -> Iterator[Sample]:
    for s in samples:
        counter[0] += 1
        yield s


@pytest.mark.parametrize(("shuffle", "bucket"), [(0, 0), (16, 0), (0, 24), (16, 24)])
def test_iter_batches_streams(shuffle: int, bucket: int) -> None:
    samples = make_samples(200, seed=12, lengths=(3, 12))
    counter = [0]
    stream = iter_batches(
        _counting(samples, counter), batch_size=4, shuffle_buffer=shuffle, bucket_buffer=bucket
    )
    next(stream)
    assert counter[0] <= shuffle + bucket + 4 + 1  # bounded by the buffers, not the data
    rest = [sid for batch in stream for sid in batch.sample_ids]
    assert counter[0] == 200 and len(rest) + 4 >= 196


def test_shard_set_batches_stream_and_cover_everything(tmp_path: Path) -> None:
    samples = make_samples(60, seed=13)
    write_set(tmp_path, samples, positions_per_shard=200)
    seen = [
        sid
        for batch in open_shard_set(tmp_path).iter_batches(
            batch_size=8, shuffle_buffer=10, bucket_buffer=20, seed=1, max_tokens=200
        )
        for sid in batch.sample_ids
    ]
    assert sorted(seen) == sorted(s.sample_id for s in samples)


def test_bucketing_reduces_padding() -> None:
    samples = make_samples(120, seed=14, lengths=(2, 100), vocab=200)

    def waste(**kw) -> float:
        batches = list(iter_batches(iter(samples), batch_size=8, seed=3, **kw))
        pad = sum(padding_waste(b) * b.input_ids.numel() for b in batches)
        return pad / sum(b.input_ids.numel() for b in batches)

    plain, bucketed = waste(), waste(bucket_buffer=80)
    assert bucketed < 0.5 * plain


def test_max_tokens_caps_padded_batch_size() -> None:
    samples = make_samples(50, seed=15, lengths=(2, 60))
    for batch in iter_batches(iter(samples), batch_size=16, max_tokens=120, bucket_buffer=50):
        assert batch.input_ids.numel() <= 120 or batch.input_ids.shape[0] == 1


def test_shuffling_is_seeded() -> None:
    samples = make_samples(100, seed=16, lengths=(3, 30))

    def order(seed: int) -> list[str]:
        stream = iter_batches(
            iter(samples), batch_size=5, shuffle_buffer=30, bucket_buffer=20, seed=seed
        )
        return [sid for b in stream for sid in b.sample_ids]

    a = order(1)
    assert a == order(1)
    assert a != order(2)
    assert sorted(a) == sorted(s.sample_id for s in samples)
    assert a != [s.sample_id for s in samples]


# --------------------------------------------------------------------------------------------
# S3 through a real S3 API server on loopback


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, "moto_server exited"
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.timeout(180)
def test_s3_round_trip_verify_and_cli(s3_endpoint: str, monkeypatch) -> None:
    fs = pafs.S3FileSystem(
        endpoint_override=s3_endpoint,
        scheme="http",
        access_key="x",
        secret_key="x",
        region="us-east-1",
        allow_bucket_creation=True,
    )
    fs.create_dir("bucket")
    samples = make_samples(20, seed=17)
    write_set("bucket/set", samples, positions_per_shard=200, filesystem=fs)
    shard_set = open_shard_set("bucket/set", filesystem=fs)
    assert shard_set.complete and len(shard_set.shards) > 1
    assert_same(samples, list(shard_set), 1 / 64 + 1e-6)
    assert verify_shard_set("bucket/set", filesystem=fs).ok

    # The same set through an s3:// URI, in-process and through the CLI.
    for key, value in {
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)
    uri = f"s3://bucket/set?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    assert [s.sample_id for s in open_shard_set(uri)] == [s.sample_id for s in samples]
    assert verify_shard_set(uri).ok
    result = CliRunner().invoke(app, ["shards", "verify", uri])
    assert result.exit_code == 0, result.output

    fs.delete_file(f"bucket/set/{shard_set.shards[0].file}")
    report = verify_shard_set(uri)
    assert report.problems == [
        f"bucket/set/{shard_set.shards[0].file}: listed in the manifest but missing"
    ]
