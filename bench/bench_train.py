"""Training throughput: offline (shards) vs online (live teacher), and the loader's share.

Same batches for both modes: the 135M SmolLM2 teacher writes a small shard set (hf backend,
top-k at T = 1); a student of `--layers` of its 30 layers (default 10, about a third) trains
on it for `--steps` steps in one process (no Ray: this measures the step, not the cluster).

- offline: raw shard rows in memory -> `epoch_batches` plan -> `decode_rows` (the loader) ->
  `train_step`. The loader's share = loader time / (loader + step) time (goal < 5%).
- online: the same decoded batches, targets replaced by the teacher's live top-k
  (`OnlineTeacher.fill`) -> `train_step`.
- jemalloc (`--jemalloc-compare`): the offline run again in a subprocess with ray's bundled
  libjemalloc preloaded; reports both step times.

Prints ONE JSON line, then a table.

    .venv/bin/python bench/bench_train.py [--seqs 16 --seq-len 128 --batch-size 4 --steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

_VOCAB_TEXT = (
    "the a river mountain light music quiet city old new story garden winter summer morning "
    "bright small large happy careful people would could often always never write read "
    "travel learn build share answer question simple clear reason because while after"
)
_WORDS = _VOCAB_TEXT.split()


def _texts(n: int, words: int, seed: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        q = " ".join(rng.choice(_WORDS, size=max(4, words // 6)))
        a = " ".join(rng.choice(_WORDS, size=int(rng.integers(words // 4, words + 1))))
        out.append((f"Question: {q}?\nAnswer:", f" {a}."))
    return out


def build_shards(teacher_dir: Path, out: Path, *, seqs: int, seq_len: int, top_k: int) -> float:
    from todi.services.backends import create_backend
    from todi.services.precompute import teacher_shard_metadata
    from todi.storage import ShardSetWriter
    from todi.storage.schema import Sample

    backend = create_backend("hf", teacher_dir, max_top_k=top_k)
    tok = backend.tokenizer
    rows = []
    for q, a in _texts(seqs, seq_len, 0):
        p = tok(q)["input_ids"]
        r = tok(a)["input_ids"]
        ids = (p + r)[:seq_len]
        rows.append((ids, len(p)))
    t0 = time.perf_counter()
    results = backend.topk([r[0] for r in rows], top_k, 1.0)
    seconds = time.perf_counter() - t0
    meta = teacher_shard_metadata(backend.info, top_k=top_k, temperature=1.0)
    with ShardSetWriter(out, meta) as w:
        for i, ((ids, plen), res) in enumerate(zip(rows, results, strict=True)):
            first = max(plen - 1, 0)
            w.write(
                Sample(
                    f"b{i}", np.asarray(ids, np.int32), plen, res.ids[first:], res.logprobs[first:]
                )
            )
    backend.close()
    return seconds


def _raw(shards: Path):
    import pyarrow.parquet as pq

    from todi.storage import open_shard_set
    from todi.trainer.data import raw_rows

    ss = open_shard_set(shards)
    schema, rows = None, []
    for f in ss.files():
        schema, r = raw_rows(pq.read_table(f).replace_schema_metadata(None))
        rows += r
    return ss.signature, schema, rows


def padding_waste(args) -> dict:
    """Padding share of one epoch's micro-batches, with and without length bucketing."""
    from todi.trainer.data import LoaderSettings, epoch_batches

    _, _, rows = _raw(Path(args.shards))
    out = {}
    for name, bucket in (("bucketed", len(rows)), ("unbucketed", 0)):
        settings = LoaderSettings(args.batch_size, None, len(rows), bucket, seed=0)
        real = padded = 0
        for plan in epoch_batches(rows, settings, epoch=0, rank=0):
            real += sum(r.length for r in plan)
            padded += max(r.length for r in plan) * len(plan)
        out[name] = 1 - real / padded
    return out


def run_mode(args, mode: str) -> dict:
    """Train `args.steps` (+1 warm-up) steps in `mode` (offline|online) and time them."""
    from todi.services.backends import create_backend
    from todi.trainer.config import TrainConfig
    from todi.trainer.data import LoaderSettings, decode_rows, epoch_batches
    from todi.trainer.online import OnlineTeacher
    from todi.trainer.student import build_student
    from todi.trainer.train import StudentObjective, make_optimizer, make_scheduler, train_step

    torch.set_num_threads(args.threads)
    meta, schema, rows = _raw(Path(args.shards))
    settings = LoaderSettings(
        batch_size=args.batch_size,
        max_tokens=None,
        shuffle_buffer=len(rows),
        bucket_buffer=len(rows),
        seed=0,
    )
    plans = []
    epoch = 0
    while len(plans) < args.steps + 1:
        plans += list(epoch_batches(rows, settings, epoch=epoch, rank=0))
        epoch += 1
    plans = plans[: args.steps + 1]
    model, _ = build_student(f"init:teacher={args.teacher},layers={args.layers}")
    objective = StudentObjective(
        model, kind="todi", beta=1.0, temperature=meta.temperature, chunk_size=1024
    )
    cfg = TrainConfig(shards="-", student="-", out="-", lr=1e-5)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, warmup=0, total=args.steps + 1)
    teacher = (
        OnlineTeacher(args.teacher, meta, device="cpu", engine=partial(create_backend, "hf"))
        if mode == "online"
        else None
    )
    load_s = step_s = teacher_s = step_cpu = 0.0
    tokens = 0
    for i, plan in enumerate(plans):
        t0 = time.perf_counter()
        batch = decode_rows(plan, meta, schema, pad_id=2)
        t1 = time.perf_counter()
        if teacher is not None:
            batch = teacher.fill(batch)
        t2, c2 = time.perf_counter(), time.process_time()
        train_step(objective, [batch], opt, sched, kd_weight=0.5, grad_clip=1.0)
        t3, c3 = time.perf_counter(), time.process_time()
        if i == 0:
            continue  # warm-up
        load_s += t1 - t0
        teacher_s += t2 - t1
        step_s += t3 - t2
        step_cpu += c3 - c2
        tokens += batch.num_tokens
    if teacher is not None:
        teacher.close()
    total = load_s + teacher_s + step_s
    return {
        "mode": mode,
        "steps": args.steps,
        "tokens": tokens,
        "tokens_per_s": tokens / total,
        "step_s": step_s / args.steps,
        # CPU seconds of the step (user + sys, all threads): robust to other load on the host
        "step_cpu_s": step_cpu / args.steps,
        "loader_s": load_s / args.steps,
        "teacher_s": teacher_s / args.steps,
        "loader_share": load_s / total,
    }


def _subprocess_offline(args, preload: str | None) -> dict:
    env = dict(os.environ)
    if preload:
        env["LD_PRELOAD"] = preload
    else:
        env.pop("LD_PRELOAD", None)
    cmd = [sys.executable, __file__, "--_child", "offline", "--shards", args.shards]
    cmd += ["--teacher", str(args.teacher), "--layers", str(args.layers)]
    cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--jemalloc-compare", action="store_true")
    ap.add_argument("--shards", default=None)
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(run_mode(args, args._child)))
        return

    from todi.services.models import prepare_model

    args.teacher = str(prepare_model("smollm2-135m-instruct"))
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards is None:
            args.shards = str(Path(tmp) / "shards")
            precompute_s = build_shards(
                Path(args.teacher),
                Path(args.shards),
                seqs=args.seqs,
                seq_len=args.seq_len,
                top_k=args.top_k,
            )
        else:
            precompute_s = None
        if args.jemalloc_compare:
            from todi.trainer.train import jemalloc_path

            offline = _subprocess_offline(args, None)
            jem = _subprocess_offline(args, jemalloc_path())
        else:
            offline, jem = run_mode(args, "offline"), None
        online = run_mode(args, "online")
        waste = padding_waste(args)
    result = {
        "bench": "train",
        "teacher": "smollm2-135m-instruct",
        "student_layers": args.layers,
        "seqs": args.seqs,
        "seq_len": args.seq_len,
        "top_k": args.top_k,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "precompute_s": precompute_s,
        "offline": offline,
        "online": online,
        "online_over_offline_time": offline["tokens_per_s"] / online["tokens_per_s"],
        "padding_waste": waste,
    }
    if jem is not None:
        result["offline_jemalloc"] = jem
        result["jemalloc_speedup"] = offline["step_s"] / jem["step_s"]
        result["jemalloc_cpu_speedup"] = offline["step_cpu_s"] / jem["step_cpu_s"]
    print(json.dumps(result))
    print(
        f"{'mode':<18}{'tokens/s':>10}{'step s':>9}{'step cpu':>9}{'loader s':>10}"
        f"{'teacher s':>10}{'loader %':>9}"
    )
    rows = [("offline", offline), ("online", online)]
    if jem is not None:
        rows.insert(1, ("offline+jemalloc", jem))
    for name, r in rows:
        print(
            f"{name:<18}{r['tokens_per_s']:>10.1f}{r['step_s']:>9.3f}{r['step_cpu_s']:>9.3f}"
            f"{r['loader_s']:>10.4f}"
            f"{r['teacher_s']:>10.3f}{100 * r['loader_share']:>8.2f}%"
        )
    print(
        f"padding waste: bucketed {100 * waste['bucketed']:.1f}%, "
        f"unbucketed {100 * waste['unbucketed']:.1f}%"
    )


if __name__ == "__main__":
    main()
