"""`todi eval` and trainer/evaluate.py against the real SmolLM2 teacher and its own shards."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from todi.storage import (
    DEFAULT_CODEC,
    Sample,
    ShardSetMetadata,
    ShardSetWriter,
    first_position,
    iter_batches,
    open_shard_set,
)
from todi.storage.fingerprints import tokenizer_fingerprint, weights_fingerprint
from todi.trainer.divergences import dense_divergence
from todi.trainer.eval_cli import register
from todi.trainer.evaluate import (
    ECE_BINS,
    EvalError,
    FullVocabTeacher,
    encode_prompt,
    evaluate_batches,
    evaluate_shards,
    expected_calibration_error,
    load_model,
    read_reference_rows,
    rouge_l_eval,
)

TOP_K = 16
ROWS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name a primary color.", "Red is a primary color."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Say hello in Spanish.", "Hola! That is hello in Spanish."),
    ("What do bees make?", "Bees make honey and wax."),
]

pytestmark = pytest.mark.timeout(600)  # generous: the suite may share 2 cores


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for this module: its forwards are tiny (tens of tokens, batch <= 5)
    and, when other work shares the 2 cores, a 2-thread OpenMP pool spends most of its time
    waiting at barriers (measured: generation 5-10x slower). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher(teacher_dir: Path):
    return load_model(teacher_dir, device="cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory, teacher_dir: Path, teacher) -> dict:
    """A held-out shard set written from a float32 transformers forward of the teacher (T=1),
    its prompt file, and a copy of the set that claims another tokenizer."""
    model, tok = teacher
    root = tmp_path_factory.mktemp("eval")
    prompts = root / "heldout.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in ROWS[:3])
        + json.dumps(
            {
                "messages": [
                    {"role": "user", "content": ROWS[3][0]},
                    {"role": "assistant", "content": ROWS[3][1]},
                ]
            }
        )
        + "\n"
    )
    samples = []
    with torch.inference_mode():
        for i, (prompt, response) in enumerate(ROWS):
            p_ids = encode_prompt(tok, [{"role": "user", "content": prompt}])
            r_ids = tok(response + "<|im_end|>", add_special_tokens=False)["input_ids"]
            ids = torch.tensor(p_ids + r_ids)
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), dim=-1)
            start = first_position(len(p_ids))
            vals, top = torch.topk(logp[start : len(ids) - 1], TOP_K, dim=-1)
            samples.append(
                Sample(
                    f"row-{i}",
                    ids.numpy().astype(np.int32),
                    len(p_ids),
                    top.numpy().astype(np.int32),
                    vals.numpy().astype(np.float32),
                )
            )
    meta = ShardSetMetadata(
        teacher_model="smollm2-135m-instruct",
        teacher_fingerprint=weights_fingerprint(teacher_dir),
        tokenizer_sha256=tokenizer_fingerprint(tok),
        vocab_size=model.config.vocab_size,
        top_k=TOP_K,
        temperature=1.0,
        logprobs_mode="log_softmax_fp32",
        backend="hf",
        codec=DEFAULT_CODEC,
    )
    sets = {}
    for name, m in (
        ("heldout", meta),
        ("other-tok", meta.model_copy(update={"tokenizer_sha256": "0" * 64})),
    ):
        with ShardSetWriter(root / name, m, positions_per_shard=40) as w:  # several shards
            w.write_many(samples)
        sets[name] = root / name
    return {"root": root, "prompts": prompts, "samples": samples, "meta": meta, **sets}


@pytest.fixture(scope="module")
def student(teacher_dir: Path):
    return load_model(f"init:teacher={teacher_dir},layers=2", device="cpu")


@pytest.fixture(scope="module")
def teacher_metrics(teacher, data) -> dict:
    return evaluate_shards(teacher[0], open_shard_set(data["heldout"]), tokenizer=teacher[1])


@pytest.fixture(scope="module")
def student_metrics(student, data) -> dict:
    return evaluate_shards(student[0], data["heldout"], tokenizer=student[1], batch_size=2)


def test_teacher_against_its_own_shards_is_near_zero(teacher, teacher_metrics, data):
    m = teacher_metrics
    # What is left is the codec: log-probs stored to 1/32 nat (error <= 1/64), which mostly
    # shows in the tail bucket 1 - sum_k p_k when that tail is small.
    for kind in ("fkl", "rkl", "todi"):
        assert 0 <= m[kind] < 5e-3, (kind, m[kind])
    assert m["top1_agreement"] == 1.0
    assert m["tokens"] == sum(s.num_positions for s in data["samples"])
    assert m["samples"] == len(ROWS)
    assert m["perplexity"] == pytest.approx(math.exp(m["ce"]), rel=1e-12)
    assert 0 < m["ce"] < 3  # the teacher's own forward on fluent text
    assert 0.5 < m["teacher_topk_mass"] <= 1.0
    assert m["temperature"] == 1.0 and m["beta"] == 1.0 and m["top_k"] == TOP_K
    # The same samples before the codec (float32 top-k): the divergences vanish, so the
    # evaluation itself adds nothing; CE and agreement do not depend on the codec.
    raw = evaluate_batches(teacher[0], iter_batches(data["samples"], batch_size=2), data["meta"])
    for kind in ("fkl", "rkl", "todi"):
        assert abs(raw[kind]) < 1e-5, (kind, raw[kind])
    assert raw["top1_agreement"] == 1.0 and raw["tokens"] == m["tokens"]
    assert raw["ce"] == pytest.approx(m["ce"], rel=1e-5)


def test_two_layer_student_is_clearly_worse(student_metrics, teacher_metrics):
    s, t = student_metrics, teacher_metrics
    for kind in ("fkl", "rkl", "todi"):
        assert s[kind] > 0.5 and s[kind] > 100 * max(t[kind], 1e-4), (kind, s[kind], t[kind])
    assert s["top1_agreement"] < 0.8
    assert s["ce"] > t["ce"] + 0.5
    assert s["perplexity"] == pytest.approx(math.exp(s["ce"]), rel=1e-12)
    # beta = 1: the ToDi value equals FKL + RKL (docs/method.md), so the three agree token by token.
    assert s["todi"] == pytest.approx(s["fkl"] + s["rkl"], rel=1e-4)


def test_means_are_over_tokens_not_batches(student, student_metrics, data):
    """Batches of 1 and of 2 hold different token counts; a mean of batch means would differ."""
    model, tok = student
    one = evaluate_shards(model, data["heldout"], batch_size=1, tokenizer=tok)
    for key in ("fkl", "rkl", "todi", "ce", "top1_agreement", "tokens"):
        assert one[key] == pytest.approx(student_metrics[key], rel=1e-4, abs=1e-6), key
    sharper = evaluate_shards(model, data["heldout"], beta=2.0, batch_size=5, chunk_size=7)
    assert sharper["fkl"] == pytest.approx(student_metrics["fkl"], rel=1e-4)
    assert sharper["todi"] != pytest.approx(student_metrics["todi"], rel=1e-3)
    # The fallback path (the model's own [B, T, V] logits) gives the same values.
    full = evaluate_shards(model, data["heldout"], batch_size=5, full_logits=True)
    for key in ("fkl", "rkl", "todi", "ce", "top1_agreement", "tokens"):
        assert full[key] == pytest.approx(student_metrics[key], rel=1e-4, abs=1e-6), key
    part = evaluate_shards(model, data["heldout"], max_samples=2, batch_size=3)
    assert part["samples"] == 2
    assert part["tokens"] == sum(s.num_positions for s in data["samples"][:2])


def test_full_vocab_metrics_against_the_teacher_run_here(teacher, student, data):
    """`reference=FullVocabTeacher(teacher)`: FKL/RKL over the whole vocabulary at T = 1,
    checked against the models' own [T, V] logits and `dense_divergence` position by
    position; the teacher against itself is 0 with full agreement; the cache reuses batches."""
    t_model, tok = teacher
    s_model, _ = student
    ref = FullVocabTeacher(t_model, cache=True)
    got = evaluate_shards(s_model, data["heldout"], tokenizer=tok, reference=ref, batch_size=2)
    fkl = rkl = agree = n = 0.0
    with torch.inference_mode():
        for sample in data["samples"]:
            ids = torch.from_numpy(sample.input_ids.astype(np.int64))[None]
            pos = slice(first_position(sample.prompt_len), len(sample.input_ids) - 1)
            zt = t_model(input_ids=ids).logits[0, pos].float()
            zs = s_model(input_ids=ids).logits[0, pos].float()
            fkl += float(dense_divergence("fkl", zs, zt).sum())
            rkl += float(dense_divergence("rkl", zs, zt).sum())
            agree += int((zs.argmax(-1) == zt.argmax(-1)).sum())
            n += zs.shape[0]
    assert got["tokens"] == n
    assert got["full_fkl"] == pytest.approx(fkl / n, rel=1e-4)
    assert got["full_rkl"] == pytest.approx(rkl / n, rel=1e-4)
    assert got["full_top1_agreement"] == pytest.approx(agree / n)
    assert got["full_fkl"] > 0.5 and got["full_rkl"] > 0.5
    cached = len(ref._cache)
    again = evaluate_shards(s_model, data["heldout"], tokenizer=tok, reference=ref, batch_size=2)
    assert len(ref._cache) == cached and again["full_fkl"] == got["full_fkl"]
    itself = evaluate_shards(t_model, data["heldout"], tokenizer=tok, reference=ref, batch_size=2)
    assert itself["full_fkl"] < 1e-5 and itself["full_rkl"] < 1e-5
    assert itself["full_top1_agreement"] == 1.0
    assert "full_fkl" not in evaluate_shards(s_model, data["heldout"], max_samples=1)


def _logits_with_confidence(conf: float, n: int) -> torch.Tensor:
    """n rows over 4 tokens whose top-1 (token 0) has softmax probability `conf`."""
    row = torch.tensor([conf] + [(1 - conf) / 3] * 3, dtype=torch.float64).log()
    return row.expand(n, 4).clone()


def test_ece_known_answer():
    """15 equal-width bins (b/15, (b+1)/15]. 10 positions at confidence 0.9 (bin 13) with 6
    right, 10 at 0.5 (bin 7) with 5 right, 5 at 0.3 (bin 4) with none right:
    ECE = (10 * |0.6 - 0.9| + 10 * 0 + 5 * |0 - 0.3|) / 25 = 0.18."""
    parts = [_logits_with_confidence(c, n) for c, n in ((0.9, 10), (0.5, 10), (0.3, 5))]
    logits = torch.cat(parts)
    labels = torch.tensor([0] * 6 + [1] * 4 + [0] * 5 + [2] * 5 + [3] * 5)
    got = expected_calibration_error(logits, labels)
    assert got["ece"] == pytest.approx(0.18, abs=1e-12)
    assert got["bins"] == ECE_BINS == 15 and sum(got["count"]) == 25
    assert [i for i, c in enumerate(got["count"]) if c] == [4, 7, 13]
    assert got["count"][13] == 10 and got["accuracy"][13] == pytest.approx(0.6)
    assert got["confidence"][13] == pytest.approx(0.9) and got["accuracy"][4] == 0.0
    assert got["accuracy"][0] is None and got["confidence"][0] is None
    # Calibrated (accuracy = confidence in every bin) is 0; a sure, always-wrong model is 1.
    right = expected_calibration_error(_logits_with_confidence(0.5, 4), torch.tensor([0, 0, 1, 1]))
    assert right["ece"] == pytest.approx(0.0, abs=1e-12)
    sure = torch.tensor([[60.0, 0.0, 0.0]]).expand(3, 3)
    wrong = expected_calibration_error(sure, torch.tensor([1, 2, 1]))
    assert wrong["ece"] == pytest.approx(1.0) and wrong["count"][14] == 3
    # Bins are right-closed: confidence exactly 1 is in the last bin (60 nats: q = 1 in float32).
    assert wrong["confidence"][14] == 1.0


def test_ece_of_a_real_student_and_sampled_targets(student, student_metrics, data):
    """ECE of the 2-layer student over the held-out labels, recomputed here from the model's
    own logits; and the same samples as sampled targets (w = p on the stored ids: the exact
    head of a hybrid without draws), whose fkl/rkl estimate is sum_i p_i d_i / p_i over the
    listed ids, recomputed here too."""
    model, tok = student
    confs, hits, fkl, rkl = [], [], 0.0, 0.0
    with torch.inference_mode():
        for sample in data["samples"]:
            ids = torch.from_numpy(sample.input_ids.astype(np.int64))[None]
            start = first_position(sample.prompt_len)
            pos = slice(start, len(sample.input_ids) - 1)
            z = model(input_ids=ids).logits[0, pos].double()
            lq = torch.log_softmax(z, -1)
            confs += lq.exp().amax(-1).tolist()
            hits += (z.argmax(-1) == ids[0, start + 1 :]).tolist()
            top = torch.from_numpy(sample.topk_ids.astype(np.int64))
            lp = torch.from_numpy(sample.topk_logprobs).double()
            lq_top = lq.gather(1, top)
            fkl += float((lp.exp() * (lp - lq_top)).sum())
            rkl += float((lq_top.exp() * (lq_top - lp)).sum())
    n = len(confs)
    ece = 0.0
    for b in range(15):
        idx = [i for i, c in enumerate(confs) if b / 15 < c <= (b + 1) / 15]
        if idx:
            acc = sum(hits[i] for i in idx) / len(idx)
            conf = sum(confs[i] for i in idx) / len(idx)
            ece += len(idx) / n * abs(acc - conf)
    m = student_metrics
    assert m["tokens"] == n and sum(m["calibration"]["count"]) == n
    assert m["ece"] == pytest.approx(ece, abs=1e-5) and 0 < m["ece"] < 1
    assert not m["sampled_targets"]

    def weighted(batches):
        for b in batches:
            yield dataclasses.replace(b, target_weights=b.topk_logprobs.exp())

    got = evaluate_batches(
        model, weighted(iter_batches(data["samples"], batch_size=2)), data["meta"], tokenizer=tok
    )
    assert got["sampled_targets"] and got["tokens"] == n
    assert got["fkl"] == pytest.approx(fkl / n, rel=1e-4)
    assert got["rkl"] == pytest.approx(rkl / n, rel=1e-4)
    plain = evaluate_batches(model, iter_batches(data["samples"], batch_size=2), data["meta"])
    assert got["teacher_topk_mass"] == pytest.approx(plain["teacher_topk_mass"], rel=1e-6)
    assert got["top1_agreement"] == plain["top1_agreement"]
    assert got["ece"] == pytest.approx(ece, abs=1e-5)


def test_rouge_l_of_the_teacher_is_reproducible(teacher, data):
    model, tok = teacher
    rows = read_reference_rows(data["prompts"])
    assert len(rows) == 4 and rows[3].reference == ROWS[3][1]
    kw = {"max_new_tokens": 8, "temperature": 1.0, "batch_size": 2}
    a = rouge_l_eval(model, tok, rows[2:], seeds=[1, 0], **kw)  # a plain row and a messages row
    b = rouge_l_eval(model, tok, rows[2:], seeds=[1], **kw)  # each seed starts from its seed
    assert a["per_seed"]["1"] == b["per_seed"]["1"]
    assert [s["answer"] for s in a["samples"]] == [s["answer"] for s in b["samples"]]
    assert all(s["answer"] for s in a["samples"])
    assert 0 <= a["rouge_l_mean"] <= 100 and a["rouge_l_std"] >= 0
    assert a["rouge_l_mean"] == pytest.approx(np.mean(list(a["per_seed"].values())))
    greedy = rouge_l_eval(model, tok, rows[:1], seeds=[0], max_new_tokens=8, temperature=0)
    assert greedy["rouge_l_std"] == 0.0
    # The greedy answer to "capital of France" names Paris: a real, scored answer.
    assert "Paris" in greedy["samples"][0]["answer"] and greedy["rouge_l_mean"] > 20


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """todi (test root)"""

    register(app)
    return app


def test_cli_writes_json_and_table(teacher_dir, data, student_metrics, teacher_metrics):
    """`todi eval` on the 2-layer student, with the teacher as the reference column."""
    out = data["root"] / "report.json"
    student = f"init:teacher={teacher_dir},layers=2"
    args = ["eval", "--shards", str(data["heldout"]), "--student", student]
    args += ["--teacher", str(teacher_dir), "--out", str(out), "--no-progress"]
    args += ["--generate", "--prompts", str(data["prompts"]), "--seeds", "3,4"]
    args += ["--max-new-tokens", "4", "--max-prompts", "1"]
    args += ["--full-vocab-teacher", str(teacher_dir)]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    assert "top-1 agreement" in result.stdout and "ROUGE-L" in result.stdout
    assert "full-vocab FKL" in result.stdout and "ECE" in result.stdout
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"student", "teacher"}
    assert report["metrics"] == report["models"]["student"]["shards"]
    assert report["generation"] == report["models"]["student"]["generation"]
    assert report["metadata"] == json.loads(json.dumps(open_shard_set(data["heldout"]).metadata))
    for name, ref in (("student", student_metrics), ("teacher", teacher_metrics)):
        got = report["models"][name]["shards"]
        for key in ("fkl", "todi", "ce", "top1_agreement", "tokens", "ece"):
            assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (name, key)
        assert (got["full_fkl"] < 1e-5) == (name == "teacher"), (name, got["full_fkl"])
        gen = report["models"][name]["generation"]
        assert gen["seeds"] == [3, 4] and gen["prompts"] == 1 and set(gen["per_seed"]) == {"3", "4"}


def _fails(args: list[str], *needles: str) -> None:
    result = CliRunner().invoke(_app(), ["eval", "--no-progress", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_fails_cleanly(teacher_dir, teacher, data):
    root = data["root"]
    _fails(
        ["--shards", str(root / "missing"), "--student", str(teacher_dir)],
        "no manifest",
    )
    _fails(
        ["--shards", str(data["other-tok"]), "--student", str(teacher_dir)],
        "tokenizer mismatch",
    )
    # A student with the teacher's tokenizer but a 1,000-entry head.
    from transformers import LlamaConfig, LlamaForCausalLM

    small = root / "small-vocab"
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(small)
    teacher[1].save_pretrained(small)
    _fails(
        ["--shards", str(data["heldout"]), "--student", str(small)],
        "vocabulary mismatch",
        "1000",
        "49152",
    )
    _fails(
        ["--shards", str(data["heldout"]), "--student", str(teacher_dir), "--generate"],
        "--prompts",
    )
    bad = root / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n')
    args = ["--shards", str(data["heldout"]), "--student", str(teacher_dir)]
    _fails([*args, "--generate", "--prompts", str(bad)], "bad.jsonl:1", "response")


def test_api_refuses_mismatch(teacher, data):
    model, tok = teacher
    with pytest.raises(EvalError, match="tokenizer mismatch"):
        evaluate_shards(model, data["other-tok"], tokenizer=tok)
