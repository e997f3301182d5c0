"""`todi shards export PATH --to hf-dataset OUT`: axolotl's KD columns, read back with `datasets`.

The shard set holds the real teacher's top-k (SmolLM2 through the `hf` backend, T = 2) for
prompt/response rows and a plain-text row. The exported folder is loaded with
`datasets.load_from_disk` and every value is checked against the shards; then the teacher
itself is scored against the exported targets the way axolotl's top-k KD loss reads them
(student logits at position j / kd_temperature, gathered at target_token_ids[j], top-k
renormalized, masked by target_mask): the teacher must score ~0, which only holds if the
rows are aligned as axolotl expects.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from todi.services.precompute import teacher_shard_metadata
from todi.storage import Sample, ShardSetWriter, open_shard_set
from todi.storage.export import PAD_LOGPROB, ExportError, export_hf_dataset

K = 8
T = 2.0
PAIRS = [
    ("Question: What is the capital of France?\nAnswer:", " The capital of France is Paris."),
    ("Question: Name a color.\nAnswer:", " Blue is a color."),
]
TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def teacher_set(teacher_dir, tmp_path_factory):
    from todi.services.backends import create_backend

    backend = create_backend("hf", teacher_dir, max_top_k=64)
    try:
        tok = backend.tokenizer
        seqs, plens = [], []
        for prompt, answer in PAIRS:
            p = tok(prompt)["input_ids"]
            seqs.append(p + tok(answer)["input_ids"])
            plens.append(len(p))
        seqs.append(tok(TEXT)["input_ids"])
        plens.append(0)
        results = backend.topk(seqs, K, T)
        meta = teacher_shard_metadata(backend.info, top_k=K, temperature=T)
        root = tmp_path_factory.mktemp("export") / "set"
        with ShardSetWriter(root, meta) as writer:
            for i, (ids, plen, res) in enumerate(zip(seqs, plens, results, strict=True)):
                first = max(plen - 1, 0)
                writer.write(
                    Sample(f"s{i}", np.asarray(ids, np.int32), plen,
                           res.ids[first:], res.logprobs[first:])
                )  # fmt: skip
    finally:
        backend.close()
    return root


def test_export_matches_shards_and_axolotl_alignment(teacher_set, teacher_dir, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM

    from todi.cli import app

    out = tmp_path / "hf"
    result = CliRunner().invoke(
        app, ["shards", "export", str(teacher_set), str(out), "--to", "hf-dataset"]
    )
    assert result.exit_code == 0, result.output
    assert "exported 3 rows" in result.output

    ds = datasets.load_from_disk(str(out))
    assert ds.column_names == [
        "input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs",
        "target_mask",
    ]  # fmt: skip
    assert ds.features["target_logprobs"].feature.feature.dtype == "float32"
    info = json.loads((out / "todi_export.json").read_text())
    assert json.loads(ds.info.description)["temperature"] == info["temperature"] == T
    assert info["rows"] == 3 and 0 < info["dropped_tail_mass_mean"] < 1

    samples = list(open_shard_set(teacher_set))
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, torch_dtype=torch.float32)
    for row, s in zip(ds.with_format("numpy"), samples, strict=True):
        ids, n = s.input_ids, len(s.input_ids)
        first, positions = s.first_position, s.num_positions
        np.testing.assert_array_equal(row["input_ids"], ids)
        assert (row["attention_mask"] == 1).all()
        labels = row["labels"]
        assert (labels[: s.prompt_len] == -100).all()
        np.testing.assert_array_equal(labels[s.prompt_len :], ids[s.prompt_len :])
        tid = np.stack(row["target_token_ids"])
        tlp = np.stack(row["target_logprobs"])
        mask = np.stack(row["target_mask"])
        assert tid.shape == tlp.shape == mask.shape == (n, K)
        stored = slice(first, first + positions)
        np.testing.assert_array_equal(tid[stored], s.topk_ids)
        expected = s.topk_logprobs - np.logaddexp.reduce(
            s.topk_logprobs.astype(np.float64), axis=1, keepdims=True
        )
        np.testing.assert_allclose(tlp[stored], expected, atol=1e-5)
        np.testing.assert_allclose(np.exp(tlp[stored].astype(np.float64)).sum(1), 1, atol=1e-5)
        # mask[j] == (labels[j + 1] != -100): axolotl's rule; the last row is padding
        np.testing.assert_array_equal(mask[:-1, 0], (labels[1:] != -100).astype(np.int8))
        assert (mask[-1] == 0).all() and (mask[stored] == 1).all()
        pad = mask[:, 0] == 0
        assert (tlp[pad] == np.float32(PAD_LOGPROB)).all()
        assert (tid[pad] == np.arange(K)).all()

        # axolotl's top-k KD loss with the teacher as the student: ~0 iff aligned
        with torch.no_grad():
            logits = model(torch.as_tensor(ids[None].astype(np.int64))).logits[0] / T
        q = torch.log_softmax(logits, -1).gather(-1, torch.as_tensor(tid, dtype=torch.long))
        q = q - torch.logsumexp(q, -1, keepdim=True)  # kd_normalize_topk
        p = torch.as_tensor(tlp)
        valid = torch.as_tensor(mask).bool()
        kl = (p.exp() * (p - q))[valid].sum() / valid[:, 0].sum()
        assert kl.item() < 2e-3, kl.item()
        shifted = (p.exp()[1:] * (p[1:] - q[:-1]))[valid[1:]].sum() / valid[1:, 0].sum()
        assert shifted.item() > 100 * max(kl.item(), 1e-4)  # off by one is far off


def test_export_retempers_like_axolotl_and_refuses_to_overwrite(teacher_set, tmp_path):
    import datasets

    out = tmp_path / "hf"
    info = export_hf_dataset(str(teacher_set), out, temperature=1.0, max_rows=1)
    assert info["rows"] == 1 and info["temperature"] == 1.0 and info["shard_temperature"] == T
    row = datasets.load_from_disk(str(out)).with_format("numpy")[0]
    s = next(iter(open_shard_set(teacher_set)))
    lp = np.stack(row["target_logprobs"])[s.first_position :][: s.num_positions]
    scaled = s.topk_logprobs.astype(np.float64) * (T / 1.0)  # p^(T1/T2), renormalized
    expected = scaled - np.logaddexp.reduce(scaled, axis=1, keepdims=True)
    np.testing.assert_allclose(lp, expected, atol=1e-5)
    with pytest.raises(ExportError, match="not empty"):
        export_hf_dataset(str(teacher_set), out)
    with pytest.raises(ExportError, match="unknown export format"):
        from todi.storage.export import export_shards

        export_shards(str(teacher_set), "parquet", tmp_path / "x")
