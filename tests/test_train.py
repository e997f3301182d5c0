"""`todi train`: real Ray (the session cluster), the real SmolLM2 teacher, real shard sets.

The shard set is written by the real teacher through the `hf` backend (`train_shards`); the
students are `init:teacher=<teacher>,layers=2`. One uninterrupted 2-worker run is the
reference: a run stopped and resumed, whose resumed part also loses a worker (SIGKILL) and
is restarted from its last checkpoint by Ray Train, must end with the same parameters.
Each of those runs once per strategy: DDP and FSDP (`--strategy fsdp`: sharded parameters,
gradients, optimizer state and checkpoints); the FSDP curve equals the DDP curve.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tolerance import TIE_NAT, assert_same_ranking
from todi.services.precompute import teacher_shard_metadata
from todi.storage import (
    DEFAULT_CODEC,
    Sample,
    ShardSetMetadata,
    ShardSetWriter,
    collate,
    open_shard_set,
)
from todi.storage.codec import get_codec
from todi.trainer.config import ConfigError, TrainConfig, load_config
from todi.trainer.data import DataError
from todi.trainer.train import FAULT_ENV, TrainError, train

TOP_K = 16
CODEC = DEFAULT_CODEC

_SUBJECTS = ["cats", "rivers", "the moon", "bread", "music", "winter", "trains", "gardens"]
_QUESTIONS = [
    ("What is {a} plus {b}?", "{a} plus {b} is {c}."),
    ("Say something short about {s}.", "I think {s} are worth a closer look every day."),
    ("Write one sentence about {s}.", "Here is one sentence: {s} can surprise you."),
    ("Is {a} larger than {b}?", "{ans}, {a} is {cmp} than {b}."),
    ("Give me a word that rhymes with {w}.", "A word that rhymes with {w} is {r}."),
]
_RHYMES = [("cat", "hat"), ("light", "night"), ("tree", "free"), ("cake", "lake")]


def _pairs(n: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        q, a = _QUESTIONS[i % len(_QUESTIONS)]
        x, y = int(rng.integers(1, 60)), int(rng.integers(1, 60))
        w, r = _RHYMES[i % len(_RHYMES)]
        fields = {
            "a": x,
            "b": y,
            "c": x + y,
            "s": _SUBJECTS[i % len(_SUBJECTS)],
            "ans": "Yes" if x > y else "No",
            "cmp": "larger" if x > y else "not larger",
            "w": w,
            "r": r,
        }
        out.append((q.format(**fields), a.format(**fields)))
    return out


def write_teacher_shards(
    backend, out: Path, *, n: int = 40, top_k: int = TOP_K, codec: str = CODEC
) -> Path:
    """A shard set of `n` prompt/response sequences with the real teacher's top-k (T = 1)."""
    tok = backend.tokenizer
    seqs, prompt_lens = [], []
    for question, answer in _pairs(n):
        prompt = tok(f"Question: {question}\nAnswer:")["input_ids"]
        response = tok(f" {answer}")["input_ids"] + [tok.eos_token_id]
        seqs.append(prompt + response)
        prompt_lens.append(len(prompt))
    results = backend.topk(seqs, top_k, 1.0)
    meta = teacher_shard_metadata(backend.info, top_k=top_k, temperature=1.0, codec=codec)
    with ShardSetWriter(out, meta, positions_per_shard=150) as writer:
        for i, (ids, plen, res) in enumerate(zip(seqs, prompt_lens, results, strict=True)):
            first = max(plen - 1, 0)
            writer.write(
                Sample(
                    f"qa-{i:03d}",
                    np.asarray(ids, dtype=np.int32),
                    plen,
                    res.ids[first:],
                    res.logprobs[first:],
                )
            )
    return out


@pytest.fixture(scope="session")
def hf_teacher(teacher_dir):
    """The real teacher behind the `hf` backend (float32 on CPU), shared by the fixtures."""
    from todi.services.backends import create_backend

    backend = create_backend("hf", teacher_dir, max_top_k=64)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def train_shards(hf_teacher, tmp_path_factory) -> Path:
    """40 sequences, k = 16, written by the real teacher (hf backend)."""
    return write_teacher_shards(hf_teacher, tmp_path_factory.mktemp("train") / "shards")


@pytest.fixture(scope="session")
def tiny_student(teacher_dir) -> str:
    return f"init:teacher={teacher_dir},layers=2"


def _config(shards: Path, student: str, out: Path, **kw) -> TrainConfig:
    base = dict(
        shards=str(shards),
        student=student,
        out=str(out),
        workers=2,
        cpus_per_worker=0.5,  # the session cluster has 2 CPUs; leave room for Ray Data
        max_steps=6,
        batch_size=4,
        lr=5e-4,
        checkpoint_every=3,
        shuffle_buffer=16,
        bucket_buffer=8,
        chunk_size=256,
        seed=3,
        progress=False,
        max_failures=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def _params(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _assert_same_params(a: Path, b: Path) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), f"{name} differs"


# ------------------------------------------------------------------------------------------
# Pre-flight errors (no Ray)


def _copy_set(src: Path, dst: Path, **meta_changes) -> Path:
    """The same samples in a new set, with some metadata fields changed."""
    source = open_shard_set(src)
    meta = ShardSetMetadata(**{**source.signature.model_dump(), **meta_changes})
    with ShardSetWriter(dst, meta) as writer:
        writer.write_many(iter(source))
    return dst


def test_tokenizer_mismatch_names_both(train_shards, tiny_student, tmp_path):
    bad = _copy_set(train_shards, tmp_path / "other-tok", tokenizer_sha256="ab" * 32)
    with pytest.raises(DataError) as exc:
        train(_config(bad, tiny_student, tmp_path / "out"))
    msg = str(exc.value)
    assert "tokenizer mismatch" in msg and "abababab" in msg
    real = open_shard_set(train_shards).signature.tokenizer_sha256
    assert real[:16] in msg


def test_vocab_mismatch_names_both(train_shards, teacher_dir, tmp_path):
    config = json.loads((teacher_dir / "config.json").read_text())
    config.update(vocab_size=1000, num_hidden_layers=1, tie_word_embeddings=True)
    (tmp_path / "small.json").write_text(json.dumps(config))
    spec = f"init:config={tmp_path / 'small.json'},tokenizer={teacher_dir}"
    with pytest.raises(DataError) as exc:
        train(_config(train_shards, spec, tmp_path / "out"))
    msg = str(exc.value)
    assert "vocab_size 49152" in msg and "1000" in msg


def test_temperature_mismatch_names_both(train_shards, tiny_student, tmp_path):
    with pytest.raises(DataError) as exc:
        train(_config(train_shards, tiny_student, tmp_path / "out", temperature=2.0))
    msg = str(exc.value)
    assert "--temperature 2" in msg and "temperature 1" in msg


def test_unverifiable_and_incomplete_sets(train_shards, tiny_student, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(train_shards, broken)
    victim = sorted(broken.glob("*.parquet"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(DataError) as exc:
        train(_config(broken, tiny_student, tmp_path / "o1"))
    assert "failed verification" in str(exc.value) and victim.name in str(exc.value)

    (broken / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest"):
        train(_config(broken, tiny_student, tmp_path / "o2"))

    partial = tmp_path / "partial"
    source = open_shard_set(train_shards)
    writer = ShardSetWriter(partial, source.signature)
    writer.write_many(iter(source))
    writer.close(complete=False)
    with pytest.raises(DataError, match=r"incomplete.*--allow-incomplete"):
        train(_config(partial, tiny_student, tmp_path / "o3"))


def test_config_file_and_flag_precedence(tmp_path):
    (tmp_path / "c.yaml").write_text("shards: a\nstudent: b\nout: c\nlr: 0.001\nkd-weight: 0.3\n")
    cfg = load_config(tmp_path / "c.yaml", {"lr": 0.002, "beta": None})
    assert (cfg.lr, cfg.kd_weight, cfg.beta) == (0.002, 0.3, 1.0)
    (tmp_path / "c.toml").write_text('[train]\nshards = "a"\nstudent = "b"\nout = "c"\nlosss = 1\n')
    with pytest.raises(ConfigError, match="losss: unknown setting"):
        load_config(tmp_path / "c.toml")


def test_cli_error_is_one_line(train_shards, tiny_student, tmp_path):
    from typer.testing import CliRunner

    from todi.cli import app

    args = ["train", "--shards", str(train_shards), "--student", tiny_student]
    args += ["--out", str(tmp_path / "o"), "--temperature", "0.5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: temperature mismatch")
    assert result.stderr.count("\n") == 1


def test_epoch_order_is_a_pure_function_of_seed_epoch_rank():
    from todi.trainer.data import LoaderSettings, RawRow, epoch_batches

    rng = np.random.default_rng(0)
    rows = [RawRow(f"r{i}", int(rng.integers(5, 200)), {}) for i in range(203)]
    settings = LoaderSettings(
        batch_size=8, max_tokens=None, shuffle_buffer=50, bucket_buffer=32, seed=1
    )

    def ids(epoch, rank=0):
        return [
            [r.sample_id for r in b] for b in epoch_batches(rows, settings, epoch=epoch, rank=rank)
        ]

    e0 = ids(0)
    assert e0 == ids(0)  # deterministic: resume can skip to a position
    assert sorted(x for b in e0 for x in b) == sorted(r.sample_id for r in rows)  # once each
    assert e0 != ids(1) and e0 != ids(0, rank=1)  # a new order per epoch (and per worker)
    assert len(e0) == -(-203 // 8)  # whole-batch buckets: ceil(rows / batch_size) batches

    def waste(bucket):
        s = LoaderSettings(8, None, 50, bucket, seed=1)
        real = padded = 0
        for b in epoch_batches(rows, s, epoch=0, rank=0):
            real += sum(r.length for r in b)
            padded += max(r.length for r in b) * len(b)
        return 1 - real / padded

    assert waste(64) < 0.5 * waste(0)


# ------------------------------------------------------------------------------------------
# Student construction and the objective (no Ray)


def test_student_from_teacher_layers(teacher_dir, tmp_path):
    from safetensors import safe_open

    from todi.trainer.student import build_student, layer_indices, save_student

    assert layer_indices(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    model, tok = build_student(f"init:teacher={teacher_dir},layers=3")
    assert model.config.num_hidden_layers == 3
    with safe_open(str(teacher_dir / "model.safetensors"), "pt") as f:
        for dst, src in enumerate(layer_indices(30, 3)):
            want = f.get_tensor(f"model.layers.{src}.mlp.down_proj.weight").float()
            got = model.model.layers[dst].mlp.down_proj.weight
            assert torch.equal(got, want)
        assert torch.equal(model.lm_head.weight, f.get_tensor("model.embed_tokens.weight").float())
    save_student(model, tok, tmp_path / "s")
    assert (tmp_path / "s" / "tokenizer.json").is_file()


# Two float computations of the same teacher log-prob in batches of different shapes (or on
# CPUs with different kernels: AMX, AVX-512, AVX2) agree to a few ULP, not bit for bit
# (tests/tolerance.py). 2e-5 nat is 1/1600 of a 1/32 step.
ROUNDING_TIE_NAT = TIE_NAT


def assert_same_quantized(
    online: torch.Tensor, online_float: torch.Tensor, stored: torch.Tensor, mask: torch.Tensor
) -> int:
    """Quantized log-probs [B, T, k] of the live teacher equal the stored ones exactly, except
    where the live float value lies within `ROUNDING_TIE_NAT` of a rounding boundary (half a
    step between two codes): there the capture's float, computed in a batch of another shape,
    may have rounded to the neighbouring code, so one step either way is allowed. Such ties
    must be rare (< 1 % of entries; about 0.13 % expected at step 1/32). Returns their number.
    """
    step = 1.0 / get_codec(CODEC).scale
    online, online_float, stored = (t[mask].double() for t in (online, online_float, stored))
    codes = -online_float / step
    tie = ((codes - codes.floor()) - 0.5).abs() * step <= ROUNDING_TIE_NAT
    diff = (online - stored).abs()
    assert (diff[~tie] == 0).all(), (
        f"{int((diff[~tie] > 0).sum())} stored log-probs differ from the live teacher's away "
        "from a rounding tie"
    )
    assert (diff[tie] <= step + 1e-9).all(), "a tie moved by more than one step"
    assert tie.double().mean() < 0.01, f"{int(tie.sum())} of {tie.numel()} entries on a tie"
    return int((diff[tie] > 0).sum())


def test_offline_loss_equals_online_loss(train_shards, hf_teacher, tiny_student):
    """The same batch: stored top-k vs the teacher's live top-k, through the same objective."""
    from todi.trainer.objective import distillation_loss
    from todi.trainer.online import OnlineTeacher
    from todi.trainer.student import build_student
    from todi.trainer.train import StudentObjective, batch_sums

    source = open_shard_set(train_shards)
    meta = source.signature
    samples = [s for _, s in zip(range(6), iter(source), strict=False)]
    offline = collate(samples, pad_id=2)
    model, _ = build_student(tiny_student)
    objective = StudentObjective(
        model, kind="todi", beta=1.0, temperature=meta.temperature, chunk_size=64
    )

    def loss(batch):
        with torch.no_grad():
            ce, div = batch_sums(objective, batch)
        return float(distillation_loss(ce, div, batch.num_tokens, 0.5)), float(div)

    teacher = OnlineTeacher(hf_teacher, meta)
    try:
        same = teacher.fill(offline, quantize=True)
        floats = teacher.fill(offline, quantize=False)
        swaps = assert_same_ranking(
            same.topk_ids, floats.topk_logprobs, offline.topk_ids, offline.topk_logprobs
        )
        ties = swaps + assert_same_quantized(
            same.topk_logprobs, floats.topk_logprobs, offline.topk_logprobs, offline.loss_mask
        )
        off_loss, off_div = loss(offline)
        on_loss, _ = loss(same)
        # A value on a rounding tie moves by one step of a log-prob far below the top-1, so
        # the loss moves by far less than 1e-4 of itself; with no tie it is the same number.
        assert on_loss == pytest.approx(off_loss, rel=1e-4 if ties else 1e-6, abs=1e-7)
        # Float targets differ from the shards only by the codec's rounding (<= 1/64 nat).
        float_loss, float_div = loss(floats)
        assert float_div == pytest.approx(off_div, rel=0.02)
        assert float_loss == pytest.approx(off_loss, rel=0.01)
    finally:
        teacher.close()


def test_online_full_vocab_is_the_dense_loss(train_shards, teacher_dir, tiny_student):
    """`online_full_vocab`: the live teacher's whole distribution (k = V, no tail) through the
    same objective gives the dense divergence of the two models' own logits at T;
    `tail=False` (`--topk-target renormalized`) gives the divergence over the k ids only."""
    from todi.services.backends import create_backend
    from todi.trainer.chunked import reference_head_loss
    from todi.trainer.divergences import dense_divergence
    from todi.trainer.online import OnlineTeacher
    from todi.trainer.student import body_and_head, build_student
    from todi.trainer.train import StudentObjective, batch_sums

    source = open_shard_set(train_shards)
    meta = source.signature.model_copy(update={"temperature": 2.0})
    batch = collate([s for _, s in zip(range(3), iter(source), strict=False)], pad_id=2)
    model, _ = build_student(tiny_student)
    engine = create_backend("hf", teacher_dir, max_top_k=meta.vocab_size)
    try:
        full = OnlineTeacher(engine, meta, full_vocab=True).fill(batch)
        teacher_logits = engine.model(input_ids=batch.input_ids).logits.float()
    finally:
        engine.close()
    assert full.topk_ids.shape[-1] == meta.vocab_size
    objective = StudentObjective(model, kind="todi", beta=1.0, temperature=2.0, chunk_size=64)
    with torch.no_grad():
        _, div = batch_sums(objective, full)
        mask = batch.labels != -100
        student_logits = model(input_ids=batch.input_ids).logits.float()
        dense = dense_divergence(
            "todi", student_logits[mask], teacher_logits[mask], temperature=2.0
        ).sum()
    assert float(div) == pytest.approx(float(dense), rel=1e-4)

    renorm = StudentObjective(
        model, kind="todi", beta=1.0, temperature=1.0, chunk_size=64, tail=False
    )
    with torch.no_grad():
        _, div = batch_sums(renorm, batch)
        hidden = body_and_head(model)[0](input_ids=batch.input_ids).last_hidden_state[mask]
        want = reference_head_loss(
            hidden,
            model.lm_head.weight,
            None,
            batch.labels[mask],
            batch.topk_ids[mask],
            batch.topk_logprobs[mask],
            temperature=1.0,
            tail=False,
        )
    assert float(div) == pytest.approx(float(want.div_sum), rel=1e-5)


def test_dummy_batch_is_a_zero_gradient_pass(tiny_student):
    """A worker whose data ran out joins the step's synchronized backward with a dummy batch:
    its loss and every gradient must be exactly zero."""
    from todi.trainer.data import dummy_batch
    from todi.trainer.objective import distillation_loss
    from todi.trainer.student import build_student
    from todi.trainer.train import StudentObjective, batch_sums

    model, _ = build_student(tiny_student)
    objective = StudentObjective(model, kind="todi", beta=1.0, temperature=1.0, chunk_size=64)
    batch = dummy_batch(TOP_K, pad_id=2)
    assert batch.num_tokens == 0
    ce, div = batch_sums(objective, batch)
    loss = distillation_loss(ce, div, 7.0, 0.5)
    loss.backward()
    assert float(loss) == 0.0
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and not g.any() for g in grads)


# ------------------------------------------------------------------------------------------
# Ray runs


@pytest.fixture(scope="module")
def reference_run(ray_cluster, train_shards, tiny_student, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    # Trackers and the final evaluation ride along: they do not change the trajectory.
    cfg = _config(train_shards, tiny_student, out, report_to="all")
    cfg = cfg.model_copy(
        update={"eval_shards": str(train_shards), "eval_max_samples": 8, "eval_every": 3}
    )
    summary = train(cfg)
    return out, summary


@pytest.fixture(scope="module")
def fsdp_reference_run(ray_cluster, train_shards, tiny_student, tmp_path_factory):
    """The reference run under FSDP (no --eval-every: rank 0 cannot run a sharded model
    alone; the final evaluation of the exported model rides along)."""
    out = tmp_path_factory.mktemp("ref-fsdp") / "run"
    cfg = _config(train_shards, tiny_student, out, strategy="fsdp")
    cfg = cfg.model_copy(update={"eval_shards": str(train_shards), "eval_max_samples": 8})
    return out, train(cfg)


STRATEGIES = pytest.mark.parametrize("strategy", ["ddp", "fsdp"])


def _reference(request, strategy: str):
    return request.getfixturevalue("reference_run" if strategy == "ddp" else "fsdp_reference_run")


@pytest.mark.timeout(300)
@STRATEGIES
def test_two_worker_run_learns_and_exports(request, strategy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary = _reference(request, strategy)
    records = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "ce", "divergence", "tokens", "tokens_per_s", "lr", "grad_norm"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert all(0 <= r["padding_waste"] < 0.5 for r in records)
    # 40 rows over 2 workers, 4 per micro-batch: epoch 0 is steps 1-5 and sees every row once
    assert [r["epoch"] for r in records] == [0, 0, 0, 0, 0, 1]
    assert sum(r["sequences"] for r in records if r["epoch"] == 0) == 40
    assert records[-1]["loss"] < records[0]["loss"]
    assert np.mean([r["loss"] for r in records[3:]]) < np.mean([r["loss"] for r in records[:3]])
    assert records[0]["lr"] == pytest.approx(5e-4) and records[-1]["lr"] < records[0]["lr"]
    assert (out / "curves.png").stat().st_size > 1000
    assert summary.steps == 6 and not summary.stopped_early

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    ids = tok("Question: What is 2 plus 3?\nAnswer:", return_tensors="pt")["input_ids"]
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 4


@pytest.mark.timeout(300)
def test_fsdp_run_equals_ddp_run(reference_run, fsdp_reference_run):
    """Same seed, same data, sharded: the FSDP curve and the exported weights equal DDP's to
    float32 tolerance (the reductions differ: all-reduce vs reduce-scatter of shards). The
    export has the DDP export's tensors and files (the DDP one is served by vLLM in
    tests/test_student_vllm.py) and the sharded checkpoints hold one file per worker."""
    ddp_out, fsdp_out = reference_run[0], fsdp_reference_run[0]
    ddp = [json.loads(x) for x in (ddp_out / "train_log.jsonl").read_text().splitlines()]
    fsdp = [json.loads(x) for x in (fsdp_out / "train_log.jsonl").read_text().splitlines()]
    for key in ("loss", "ce", "divergence", "grad_norm"):
        assert [r[key] for r in fsdp] == pytest.approx([r[key] for r in ddp], rel=1e-4), key
    pa, pb = _params(ddp_out / "model"), _params(fsdp_out / "model")
    assert pa.keys() == pb.keys()
    for name in pa:
        torch.testing.assert_close(pb[name], pa[name], rtol=1e-3, atol=1e-5, msg=name)
    names = {p.name for p in (ddp_out / "model").iterdir()}
    assert names == {p.name for p in (fsdp_out / "model").iterdir()}
    checkpoints = sorted((fsdp_out / "ray" / "train").glob("step-*"))
    assert checkpoints, "no checkpoint folders"
    shards = sorted(p.name for p in (checkpoints[0] / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert fsdp_reference_run[1].eval["todi"] == pytest.approx(
        reference_run[1].eval["todi"], rel=1e-3
    )


def test_reference_run_reports_rank0_steps_config_and_eval_to_trackers(reference_run):
    from tests.test_tracking import mlflow_run, tensorboard_scalars, wandb_history

    out, summary = reference_run
    records = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    evaluation = json.loads((out / "eval.json").read_text())["metrics"]
    assert summary.eval == evaluation and evaluation["samples"] == 8
    assert json.loads((out / "summary.json").read_text())["eval"]["todi"] == evaluation["todi"]

    # --eval-every 3: held-out metrics at steps 3 and 6; at 6 the model is the exported one.
    assert [r["step"] for r in records if "eval_fkl" in r] == [3, 6]
    assert records[-1]["eval_fkl"] == pytest.approx(evaluation["fkl"], rel=1e-5)
    assert records[2]["eval_fkl"] > records[-1]["eval_fkl"]

    scalars = tensorboard_scalars(out / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == steps  # one value per step: rank 0 only
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in records])
    assert scalars["eval/todi"] == [(6, pytest.approx(evaluation["todi"]))]

    client, run = mlflow_run(out / "mlruns")
    history = client.get_metric_history(run.info.run_id, "train/divergence")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["divergence"]) for r in records]
    assert run.data.params["loss"] == "todi" and run.data.params["workers"] == "2"
    assert run.data.params["shard_temperature"] == str(summary.temperature)
    assert run.data.metrics["eval/top1_agreement"] == evaluation["top1_agreement"]
    assert run.data.metrics["summary/steps"] == 6

    rows, config, wb_summary = wandb_history(out)
    assert [r["_step"] for r in rows if "train/loss" in r] == steps
    assert config["batch_size"] == 4
    assert json.loads(config["report_to"]) == ["tensorboard", "mlflow", "wandb"]
    assert wb_summary["eval/ce"] == pytest.approx(evaluation["ce"])


@pytest.mark.timeout(600)
@STRATEGIES
def test_resume_and_killed_worker_match_uninterrupted(
    request, strategy, train_shards, tiny_student, tmp_path, monkeypatch
):
    """Stop after step 4 (checkpoint), resume; in the resumed run worker 1 is SIGKILLed after
    step 5 and Ray Train restarts the group from the step-4 checkpoint. Both the resume and
    the restart replay the data order exactly: the parameters equal the reference run's."""
    reference_run = _reference(request, strategy)
    out = tmp_path / "run"
    first = train(_config(train_shards, tiny_student, out, stop_at_step=4, strategy=strategy))
    assert first.stopped_early and first.steps == 4
    with pytest.raises(TrainError, match=r"pass --resume"):
        train(_config(train_shards, tiny_student, out, strategy=strategy))
    with pytest.raises(TrainError, match=r"lr: 0\.0005"):
        train(_config(train_shards, tiny_student, out, resume=True, lr=1e-3, strategy=strategy))

    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"kill:5:1:{marker}")
    second = train(_config(train_shards, tiny_student, out, resume=True, strategy=strategy))
    assert marker.is_file(), "the worker was not killed"
    assert second.resumed and second.steps == 6 and not second.stopped_early
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    _assert_same_params(out / "model", reference_run[0] / "model")
    # The same seed gives the same loss curve, through a stop, a resume and a killed worker.
    ref = [json.loads(x) for x in (reference_run[0] / "train_log.jsonl").read_text().splitlines()]
    for key in ("loss", "ce", "divergence", "grad_norm"):
        assert [r[key] for r in log] == [r[key] for r in ref[: len(log)]], key


@STRATEGIES
def test_worker_killed_at_a_random_step_ends_like_the_reference(
    request, strategy, train_shards, tiny_student, tmp_path, monkeypatch
):
    """SIGKILL worker 1 after a step drawn at random (1-5 of 6; the draw is in every message):
    Ray Train restarts the group from the last checkpoint (every 3 steps), or from the start
    before the first one, and the run ends with the reference run's parameters and curve.
    TODI_TEST_KILL_STEP=N replays a draw."""
    step = int(os.environ.get("TODI_TEST_KILL_STEP") or random.Random().randint(1, 5))
    where = f"{strategy}: worker 1 killed after step {step}"
    reference_run = _reference(request, strategy)
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"kill:{step}:1:{marker}")
    out = tmp_path / "run"
    summary = train(_config(train_shards, tiny_student, out, strategy=strategy))
    assert marker.is_file(), f"{where}: the worker was not killed"
    assert summary.steps == 6 and not summary.stopped_early, where
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (reference_run[0] / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6], where
    assert [r["loss"] for r in log] == [r["loss"] for r in ref], where
    _assert_same_params(out / "model", reference_run[0] / "model")


def test_rounding_tie_rule():
    """The tie rule of `assert_same_quantized` on the case seen on an Intel Xeon (AMX): the live
    float -10.859375 is exactly halfway between the codes -10.84375 and -10.875, so either
    code may be stored; one step away from a tie is still a failure."""
    step = 1.0 / get_codec(CODEC).scale
    mask = torch.ones(1, 1, dtype=torch.bool)
    base = -torch.arange(1, 401, dtype=torch.float32).reshape(1, 1, 400) * 0.0271
    codes = torch.round(base / step) * step
    live = base.clone()
    live[0, 0, 5] = -10.859375
    online = torch.round(live / step) * step  # -10.875 (round half to even: code 348)
    stored = online.clone()
    stored[0, 0, 5] = -10.84375
    assert assert_same_quantized(online, live, stored, mask) == 1
    far = stored.clone()
    far[0, 0, 7] = codes[0, 0, 7] + step  # no tie there: a real difference
    with pytest.raises(AssertionError, match="away from a rounding tie"):
        assert_same_quantized(online, live, far, mask)
    ties = online.clone()
    ties[0, 0, :] = -10.859375
    with pytest.raises(AssertionError, match="on a tie"):
        assert_same_quantized(ties, ties, ties, mask)


def test_sampled_hybrid_set_trains_retempered(hf_teacher, tiny_student, ray_cluster, tmp_path):
    """A hybrid set (exact top-4 + 16 draws from the rest) captured at T = 1 with --retemper 2
    trains at T = 2 through Ray (re-tempered head, importance-weighted draws): finite losses
    that go down, an exported student. AKL and a temperature the set did not record are
    refused before Ray starts."""
    from todi.services.config import JobSpec
    from todi.services.precompute import run_precompute

    rows = tmp_path / "qa.jsonl"
    rows.write_text("".join(
        json.dumps({"id": f"s{i}", "prompt": q, "response": a}) + "\n"
        for i, (q, a) in enumerate(_pairs(24))
    ))  # fmt: skip
    spec = JobSpec(dataset=str(rows), out=str(tmp_path / "set"), top_k=4, targets="sampled",
                   draws=16, sample_seed=1, retemper=[2.0], temperature=1.0)  # fmt: skip
    assert run_precompute(spec, hf_teacher).state == "succeeded"
    with pytest.raises(TrainError, match="--loss: divergence 'akl' cannot be trained"):
        train(_config(tmp_path / "set", tiny_student, tmp_path / "akl", loss="akl"))
    with pytest.raises(DataError, match="--temperature 3: the shard set was captured at"):
        train(_config(tmp_path / "set", tiny_student, tmp_path / "t3", temperature=3.0))
    with pytest.raises(TrainError, match="--topk-target spread: a sampled shard set"):
        train(_config(tmp_path / "set", tiny_student, tmp_path / "sp", topk_target="spread"))
    first = {}
    for estimator in ("bucketed", "unbiased"):  # the default, then the other
        out = tmp_path / estimator
        summary = train(_config(tmp_path / "set", tiny_student, out, temperature=2.0, workers=1,
                                cpus_per_worker=1.0, max_steps=5, checkpoint_every=5,
                                sampled_estimator=estimator))  # fmt: skip
        records = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
        assert summary.steps == 5 and len(records) == 5
        assert all(np.isfinite(r["loss"]) and np.isfinite(r["divergence"]) for r in records)
        assert records[-1]["loss"] < records[0]["loss"]
        assert (out / "model" / "config.json").is_file()
        first[estimator] = records[0]
    # Same batch, same initial student: the CE is the same, the divergence estimate is not.
    assert first["bucketed"]["ce"] == pytest.approx(first["unbiased"]["ce"], rel=1e-5)
    assert first["bucketed"]["divergence"] != pytest.approx(first["unbiased"]["divergence"])
    assert TrainConfig(shards="s", student="m", out="o").sampled_estimator == "bucketed"


def test_spread_tail_trains_through_ray(train_shards, tiny_student, ray_cluster, tmp_path):
    """`--topk-target spread` end to end: finite losses, a divergence other than the bucket's
    on the same first batch (same CE), an exported student."""
    first = {}
    for target in ("spread", "tail"):
        out = tmp_path / target
        train(_config(train_shards, tiny_student, out, workers=1, cpus_per_worker=1.0,
                      max_steps=4, checkpoint_every=4, topk_target=target))  # fmt: skip
        records = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
        assert len(records) == 4 and all(np.isfinite(r["loss"]) for r in records)
        first[target] = records[0]
    assert (tmp_path / "spread" / "model" / "config.json").is_file()
    assert first["spread"]["ce"] == pytest.approx(first["tail"]["ce"], rel=1e-5)
    assert first["spread"]["divergence"] != pytest.approx(first["tail"]["divergence"])
