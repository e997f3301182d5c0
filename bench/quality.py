"""Does it distill? The ToDi paper's comparison at small scale, and what offline top-k costs.

Every run goes through the product: answers and shards from `todi serve` + `todi precompute`
(vLLM), training with `todi train` (Ray), evaluation with the functions `todi eval` runs
(`todi.trainer.evaluate`), with the teacher run once over the held-out set at full vocabulary.

Phases (each kept on disk and skipped when already done, so a grid can span several sittings):

1. data    prompts (chatterbot-corpus turns, or `--prompts FILE`) answered by the teacher on
           vLLM; a held-out split never trained on;
2. shards  one `todi serve` per temperature, `todi precompute --server` per (split, k);
3. runs    one `todi train` per (setting, seed), identical budget; each run ends with the
           held-out evaluation (full-vocabulary FKL/RKL/top-1/CE against the teacher, the
           stored-top-k metrics, ROUGE-L of sampled answers over several sampling seeds);
           `runs/<setting>-s<seed>/result.json` marks a finished run;
4. report  `quality.json` (every run, mean +- std per setting, paired ToDi - best other
           method with a 95% interval), `quality.png` (held-out divergence against steps).

Settings: SFT (CE only), FKL, RKL, JS, TVD, AKL, ToDi at top-64 + tail and T = 2 (the main
comparison), and ToDi ablations: top-8 + tail, top-64 renormalized without the tail, the
full-vocabulary teacher in the loop (online), and T = 1.

    .venv/bin/python bench/quality.py                 # the committed grid (2 CPU cores)
    .venv/bin/python bench/quality.py --settings todi,fkl --seeds 0  # part of it
    .venv/bin/python bench/quality.py --prompts my.jsonl --out /tmp/q  # other prompts

On a GPU machine the same command uses it (`todi train` and evaluation pick CUDA); raise
`--steps`, `--batch-size`, `--student-layers` and `--heldout` there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine

RESULTS = Path(__file__).resolve().parent / "results"
UNIFORM = ("fkl", "rkl", "js", "tvd", "akl")
MAIN = ("sft", *UNIFORM, "todi")
ABLATIONS = ("todi-k8", "todi-renorm", "todi-online-full", "todi-t1")
# Offline targets against the live teacher (#18), all ToDi: the teacher in the loop over the
# full vocabulary at T = 1 and 2 (todi-online-t1, todi-online-full), top-64 + tail at T = 1
# and 2 (todi-t1, todi), draws at T = 1 and 2 with each sampled-target estimator (unbiased:
# both sides by importance weights; bucketed: the student side over the drawn ids + a bucket),
# a T = 1 capture re-tempered to T = 2, and the hybrid (exact top-8 + draws from the rest,
# bucketed) at T = 2.
TARGETS = (
    "todi-online-t1",
    "todi-spread-t1",
    "todi-spread-t2",
    "todi-draws-t1",
    "todi-draws-t2",
    "todi-draws-bucketed-t1",
    "todi-draws-bucketed-t2",
    "todi-retemper-t2",
    "todi-hybrid-t2",
)
ALL_SETTINGS = MAIN + ABLATIONS + TARGETS
# Which settings are compared against which live teacher (same temperature).
LIVE_OF = {
    "todi-online-t1": ("todi-t1", "todi-spread-t1", "todi-draws-t1", "todi-draws-bucketed-t1"),
    "todi-online-full": (
        "todi",
        "todi-spread-t2",
        "todi-draws-t2",
        "todi-draws-bucketed-t2",
        "todi-retemper-t2",
        "todi-hybrid-t2",
    ),
}


class StudyConfig(BaseModel):
    """Sizes of the study; the defaults are the committed 2-core grid."""

    out: str = Field(description="working folder (data, shards, runs)")
    prompts: str | None = Field(None, description="JSONL prompt/response rows; None: chatterbot")
    heldout: int = 320
    max_prompts: int | None = None  # use the first N prompts only (None: all)
    # teacher: the teacher answers each prompt (sequence-level KD, as the demo); corpus: the
    # corpus's own next turn (no generation: the grid compares targets on the same text).
    answers: str = "teacher"
    answer_tokens: int = 24
    max_seq_len: int = 128
    student_layers: int = 10
    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 10
    kd_weight: float = 0.5
    beta: float = 1.0
    top_k: int = 64
    small_k: int = 8
    temperature: float = 2.0
    draws: int = 50
    # hf: transformers (a full-vocabulary engine, needed by draws and re-tempering anyway);
    # vllm: faster on an idle machine (bench/results/teacher.json) but its CPU threads spin
    # and crawl when the 2 cores are shared.
    engine: str = "hf"
    hybrid_k: int = 8
    hybrid_draws: int = 42
    sample_seed: int = 0
    workers: int = 1
    cpus_per_worker: float = 2.0
    curve_every: int = 25
    curve_samples: int = 64
    rouge_seeds: tuple[int, ...] = (0, 1, 2)
    rouge_prompts: int = 160
    seeds: tuple[int, ...] = (0, 1, 2)
    settings: tuple[str, ...] = MAIN + ABLATIONS + TARGETS
    data_seed: int = 0


def _todi(*args: str) -> list[str]:
    return [sys.executable, "-m", "todi.cli", *args]


def _run(cmd: list[str], log: Path | None = None) -> None:
    print("$ todi " + " ".join(cmd[3:]), flush=True)
    if log is None:
        done = subprocess.run(cmd)
    else:
        with open(log, "ab") as f:
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        where = f" (log: {log})" if log else ""
        raise SystemExit(f"failed (exit {done.returncode}): todi {' '.join(cmd[3:])}{where}")


# --------------------------------------------------------------------------------------------
# 1. data


def _conversations() -> Iterator[list[str]]:
    """The turns of every English chatterbot-corpus conversation, file by file."""
    import glob
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package 'chatterbot_corpus' is missing: pip install chatterbot-corpus")
    root = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    for path in sorted(glob.glob(str(root / "*.yml"))):
        with open(path, encoding="utf-8") as f:
            for conversation in yaml.safe_load(f).get("conversations", []) or []:
                yield [str(t).strip() for t in conversation or []]


def chatterbot_turns() -> list[str]:
    """Every distinct turn of the English chatterbot-corpus conversations (1,880 texts)."""
    seen: set[str] = set()
    out: list[str] = []
    for turns in _conversations():
        for text in turns:
            if text and len(text) < 400 and text.lower() not in seen:
                seen.add(text.lower())
                out.append(text)
    return out


def chatterbot_pairs() -> list[tuple[str, str]]:
    """(turn, next turn) of every English chatterbot-corpus conversation, deduplicated."""
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for turns in _conversations():
        for a, b in itertools.pairwise(turns):
            if a and b and len(a) < 400 and len(b) < 400 and a.lower() not in seen:
                seen.add(a.lower())
                out.append((a, b))
    return out


def _read_prompts(path: str) -> list[str]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise SystemExit(f"{path}:{n}: expected a JSON object with a string 'prompt'")
            prompts.append(row["prompt"])
    return prompts


def build_data(cfg: StudyConfig, teacher: Path) -> tuple[Path, Path]:
    """(train.jsonl, heldout.jsonl): the prompts answered by the teacher (vLLM, sampled at
    T = 0.7, top-p 0.9, as the demo builds them); `heldout` rows never trained on."""
    from todi.services.answers import generate_answers

    data = Path(cfg.out) / "data"
    train, held = data / "train.jsonl", data / "heldout.jsonl"
    if train.is_file() and held.is_file():
        return train, held
    t0 = time.monotonic()
    if cfg.answers == "corpus" and not cfg.prompts:
        pairs = chatterbot_pairs()[: cfg.max_prompts]
        prompts, answers = [a for a, _ in pairs], [b for _, b in pairs]
    else:
        prompts = _read_prompts(cfg.prompts) if cfg.prompts else chatterbot_turns()
        prompts = prompts[: cfg.max_prompts]
        answers = generate_answers(
            teacher, prompts, backend=cfg.engine, max_new_tokens=cfg.answer_tokens,
            seed=cfg.data_seed,
        )  # fmt: skip
    rows = [
        {"id": f"q{i}", "prompt": p, "response": a}
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
        if a
    ]
    random.Random(cfg.data_seed).shuffle(rows)
    if len(rows) <= cfg.heldout:
        raise SystemExit(f"{len(rows)} answered prompts: not enough for {cfg.heldout} held out")
    data.mkdir(parents=True, exist_ok=True)
    for path, part in ((held, rows[: cfg.heldout]), (train, rows[cfg.heldout :])):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
        os.replace(tmp, path)
    (data / "timing.json").write_text(json.dumps({"answers_s": time.monotonic() - t0}))
    return train, held


# --------------------------------------------------------------------------------------------
# 2. shards


class SetSpec(BaseModel):
    """One shard set of the study: which split, what it keeps, which engine captures it."""

    split: str
    temperature: float
    top_k: int
    engine: str = "hf"  # draws and re-tempering need the full distribution (hf)
    targets: str = "topk"
    draws: int = 0
    retemper: tuple[float, ...] = ()

    def args(self, cfg: StudyConfig) -> list[str]:
        out = ["--top-k", str(self.top_k), "--temperature", str(self.temperature)]
        if self.targets == "sampled":
            out += ["--targets", "sampled", "--draws", str(self.draws)]
            out += ["--sample-seed", str(cfg.sample_seed)]
        if self.retemper:
            out += ["--retemper", ",".join(f"{t:g}" for t in self.retemper)]
        return out


def _topk_name(split: str, k: int, t: float) -> str:
    return f"{split}-k{k}-T{t:g}"


def shard_sets(cfg: StudyConfig) -> dict[str, SetSpec]:
    """name -> SetSpec of every shard set the chosen settings need."""
    t = cfg.temperature
    sets = {
        _topk_name(sp, cfg.top_k, t): SetSpec(
            split=sp, temperature=t, top_k=cfg.top_k, engine=cfg.engine
        )
        for sp in ("train", "heldout")
    }
    want = set(cfg.settings)
    if "todi-k8" in want:
        sets[_topk_name("train", cfg.small_k, t)] = SetSpec(
            split="train", temperature=t, top_k=cfg.small_k, engine=cfg.engine
        )
    if want & {"todi-t1", "todi-online-t1", "todi-spread-t1"}:
        for sp in ("train", "heldout"):
            sets[_topk_name(sp, cfg.top_k, 1)] = SetSpec(
                split=sp, temperature=1.0, top_k=cfg.top_k, engine=cfg.engine
            )
    for temp in (1.0, t):
        if want & {f"todi-draws-t{temp:g}", f"todi-draws-bucketed-t{temp:g}"}:
            sets[f"train-d{cfg.draws}-T{temp:g}"] = SetSpec(
                split="train", temperature=temp, top_k=0, engine="hf", targets="sampled",
                draws=cfg.draws,
            )  # fmt: skip
    if f"todi-retemper-t{t:g}" in want:
        sets[f"train-k{cfg.top_k}-T1-rt{t:g}"] = SetSpec(
            split="train", temperature=1.0, top_k=cfg.top_k, engine="hf", retemper=(t,)
        )
    if f"todi-hybrid-t{t:g}" in want:
        sets[f"train-k{cfg.hybrid_k}-d{cfg.hybrid_draws}-T{t:g}"] = SetSpec(
            split="train", temperature=t, top_k=cfg.hybrid_k, engine="hf", targets="sampled",
            draws=cfg.hybrid_draws,
        )  # fmt: skip
    return sets


def build_shards(cfg: StudyConfig, teacher: Path, data: dict[str, Path]) -> Path:
    """Every needed shard set under out/shards, written by `todi precompute --server`; each
    `<name>.done` records the capture's wall time, tokens/s and bytes per position."""
    from todi.demo import LocalService
    from todi.storage import open_shard_set

    root = Path(cfg.out) / "shards"
    todo = {n: s for n, s in shard_sets(cfg).items() if not (root / f"{n}.done").exists()}
    for engine, temp in sorted({(s.engine, s.temperature) for s in todo.values()}):
        service = LocalService(teacher, engine, temp, root, Path(cfg.out) / "service.log")
        try:
            service.wait_healthy()
            for name, spec in todo.items():
                if (spec.engine, spec.temperature) != (engine, temp):
                    continue
                t0 = time.monotonic()
                # fmt: off
                _run(_todi(
                    "precompute", "--server", service.url, "--dataset", str(data[spec.split]),
                    "--out", name, *spec.args(cfg),
                    "--max-seq-len", str(cfg.max_seq_len), "--no-progress",
                ))
                # fmt: on
                seconds = time.monotonic() - t0
                _run(_todi("shards", "verify", str(root / name)))
                s = open_shard_set(root / name)
                tokens = sum(len(x.input_ids) for x in s.iter_samples())
                record = {
                    **spec.model_dump(),
                    "engine": engine,
                    "capture_seconds": seconds,
                    "tokens": tokens,
                    "tokens_per_second": tokens / seconds,
                    "positions": s.num_positions,
                    "bytes": s.manifest.bytes,
                    "bytes_per_position": s.manifest.bytes / max(s.num_positions, 1),
                    "coverage": (s.manifest.job or {}).get("coverage"),
                }
                _write_json(root / f"{name}.done", record)
        finally:
            service.stop()
    return root


# --------------------------------------------------------------------------------------------
# 3. runs


def setting_args(cfg: StudyConfig, setting: str, teacher: Path) -> tuple[str, list[str]]:
    """(training shard set, the `todi train` flags that make `setting`)."""
    t = cfg.temperature
    main = _topk_name("train", cfg.top_k, t)
    online = ["--online-teacher", str(teacher), "--online-full-vocab"]
    if setting == "sft":
        return main, ["--loss", "fkl", "--kd-weight", "0"]
    if setting in UNIFORM or setting == "todi":
        return main, ["--loss", setting]
    if setting == "todi-k8":
        return _topk_name("train", cfg.small_k, t), ["--loss", "todi"]
    if setting == "todi-renorm":
        return main, ["--loss", "todi", "--topk-target", "renormalized"]
    if setting == "todi-online-full":
        return main, ["--loss", "todi", *online]
    if setting == "todi-t1":
        return _topk_name("train", cfg.top_k, 1), ["--loss", "todi"]
    if setting == "todi-spread-t1":
        return _topk_name("train", cfg.top_k, 1), ["--loss", "todi", "--topk-target", "spread"]
    if setting == f"todi-spread-t{t:g}":
        return main, ["--loss", "todi", "--topk-target", "spread"]
    if setting == "todi-online-t1":
        return _topk_name("train", cfg.top_k, 1), ["--loss", "todi", *online]
    for temp in (1.0, t):
        for est in ("unbiased", "bucketed"):
            name = f"todi-draws-t{temp:g}" if est == "unbiased" else f"todi-draws-{est}-t{temp:g}"
            if setting == name:
                return f"train-d{cfg.draws}-T{temp:g}", [
                    "--loss", "todi", "--sampled-estimator", est
                ]  # fmt: skip
    if setting == f"todi-retemper-t{t:g}":
        return f"train-k{cfg.top_k}-T1-rt{t:g}", ["--loss", "todi", "--temperature", f"{t:g}"]
    if setting == f"todi-hybrid-t{t:g}":
        return f"train-k{cfg.hybrid_k}-d{cfg.hybrid_draws}-T{t:g}", [
            "--loss", "todi", "--sampled-estimator", "bucketed"
        ]  # fmt: skip
    raise SystemExit(f"unknown setting {setting!r}; expected one of {', '.join(ALL_SETTINGS)}")


class Evaluator:
    """The held-out evaluation of `todi eval`, kept in this process across runs: the teacher's
    full-vocabulary log-probs are computed once (`FullVocabTeacher(cache=True)`)."""

    def __init__(self, cfg: StudyConfig, teacher: Path, shards: Path, heldout_jsonl: Path):
        from todi.trainer.evaluate import FullVocabTeacher, load_model, read_reference_rows

        self.cfg = cfg
        self.shards = shards / f"heldout-k{cfg.top_k}-T{cfg.temperature:g}"
        model, _ = load_model(teacher)
        self.reference = FullVocabTeacher(model, cache=True)
        self.rows = read_reference_rows(heldout_jsonl, max(cfg.rouge_prompts, 1))

    def __call__(self, spec: str | Path, *, rouge: bool = True) -> dict[str, Any]:
        from todi.trainer.evaluate import evaluate_shards, load_model, rouge_l_eval

        model, tokenizer = load_model(spec)
        t0 = time.monotonic()
        out = evaluate_shards(
            model, self.shards, beta=self.cfg.beta, tokenizer=tokenizer, reference=self.reference
        )
        if rouge and self.cfg.rouge_prompts > 0:
            out["rouge_l"] = rouge_l_eval(
                model,
                tokenizer,
                self.rows,
                self.cfg.rouge_seeds,
                max_new_tokens=self.cfg.answer_tokens,
                temperature=1.0,
                top_p=1.0,
                batch_size=32,
            )
        out["eval_seconds"] = time.monotonic() - t0
        print(f"evaluated {spec} in {out['eval_seconds']:.0f} s", flush=True)
        return out


def train_run(cfg: StudyConfig, setting: str, seed: int, teacher: Path, shards: Path) -> Path:
    """`todi train` of one (setting, seed) into runs/<setting>-s<seed>/train; its folder."""
    run = Path(cfg.out) / "runs" / f"{setting}-s{seed}"
    if run.exists():
        shutil.rmtree(run)  # an unfinished run starts over (result.json marks finished ones)
    run.mkdir(parents=True)
    train_set, extra = setting_args(cfg, setting, teacher)
    heldout = shards / f"heldout-k{cfg.top_k}-T{cfg.temperature:g}"
    # fmt: off
    _run(_todi(
        "train", "--shards", str(shards / train_set),
        "--student", f"init:teacher={teacher},layers={cfg.student_layers}",
        "--out", str(run / "train"), "--beta", str(cfg.beta), "--kd-weight", str(cfg.kd_weight),
        "--max-steps", str(cfg.steps), "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr),
        "--warmup-steps", str(cfg.warmup_steps), "--seed", str(seed),
        "--workers", str(cfg.workers), "--cpus-per-worker", str(cfg.cpus_per_worker),
        "--eval-shards", str(heldout), "--eval-every", str(cfg.curve_every),
        "--eval-max-samples", str(cfg.curve_samples), "--no-progress",
        *extra,  # a later --kd-weight (SFT's 0) wins
    ), log=run / "train.log")
    # fmt: on
    return run


def run_grid(cfg: StudyConfig, teacher: Path, shards: Path, heldout_jsonl: Path) -> None:
    """Every (setting, seed) without a result.json: train, evaluate, record."""
    runs = Path(cfg.out) / "runs"
    # Every setting at the first seed, then the methods at the other seeds, then the
    # ablations: a grid cut short still has every setting and the main comparison.
    main = [s for s in cfg.settings if s in MAIN]
    ablations = [s for s in cfg.settings if s not in MAIN]
    first, rest = cfg.seeds[:1], cfg.seeds[1:]
    order = [(s, seed) for seed in first for s in main + ablations]
    # ToDi and FKL (the method it is most often compared with) lead each later seed.
    lead = [s for s in ("todi", "fkl") if s in main]
    order += [(s, seed) for seed in rest for s in lead + [m for m in main if m not in lead]]
    order += [(s, seed) for seed in rest for s in ablations]
    todo = [(s, seed) for s, seed in order if not (runs / f"{s}-s{seed}" / "result.json").is_file()]
    runs.mkdir(parents=True, exist_ok=True)
    init = runs / "init.json"
    if not todo and init.is_file():
        return
    evaluator = Evaluator(cfg, teacher, shards, heldout_jsonl)
    if not init.is_file():
        spec = f"init:teacher={teacher},layers={cfg.student_layers}"
        teacher_result = evaluator(teacher)
        _write_json(init, {"student": evaluator(spec), "teacher": teacher_result})
    for n, (setting, seed) in enumerate(todo, 1):
        print(f"== run {n}/{len(todo)}: {setting} seed {seed}", flush=True)
        t0 = time.monotonic()
        try:
            run = train_run(cfg, setting, seed, teacher, shards)
        except SystemExit as exc:  # one failed run does not end the grid; a rerun retries it
            print(f"run {setting} seed {seed} failed: {exc}", flush=True)
            continue
        trained = time.monotonic() - t0
        log = [json.loads(x) for x in (run / "train" / "train_log.jsonl").read_text().splitlines()]
        heldout = evaluator(run / "train" / "model")
        result = {
            "setting": setting,
            "seed": seed,
            "heldout": heldout,
            "curve": [
                {k: r[k] for k in r if k == "step" or k.startswith("eval_")}
                for r in log
                if "eval_fkl" in r
            ],
            "train": {
                "steps": len(log),
                "first_loss": log[0]["loss"],
                "last_loss": log[-1]["loss"],
                "mean_step_s": statistics.fmean(r["step_s"] for r in log),
                "mean_teacher_s": statistics.fmean(r["teacher_s"] for r in log),
                "seconds": trained,
            },
            "eval_seconds": time.monotonic() - t0 - trained,
        }
        _write_json(run / "result.json", result)
        shutil.rmtree(run / "train" / "ray", ignore_errors=True)  # checkpoints: not needed


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# 4. report

METRICS = (
    ("full_fkl", "FKL (full vocab)", -1),
    ("full_rkl", "RKL (full vocab)", -1),
    ("full_top1_agreement", "top-1", +1),
    ("ce", "CE", -1),
    ("ece", "ECE", -1),
    ("rouge_l", "ROUGE-L", +1),
)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


def _value(result: dict, metric: str) -> float:
    """A held-out metric of a run (NaN where the run predates it, e.g. ECE)."""
    held = result["heldout"]
    if metric == "rouge_l":
        return float(held["rouge_l"]["rouge_l_mean"]) if "rouge_l" in held else math.nan
    return float(held.get(metric, math.nan))


def _mean_std(values: list[float]) -> dict[str, float | int]:
    values = [v for v in values if not math.isnan(v)] or [math.nan]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any] | None:
    """a - b over the seeds both have: mean and its 95% t-interval."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = [a[s] - b[s] for s in seeds]
    m, sd = statistics.fmean(d), statistics.stdev(d)
    half = T_975.get(len(d) - 1, 1.96) * sd / math.sqrt(len(d))
    return {"mean": m, "low": m - half, "high": m + half, "seeds": seeds}


def topk_mass(shards: Path) -> dict[str, float]:
    """Mean teacher probability mass in the stored top-k (and in its first 8) per held-out
    set: how much the tail bucket carries at each (k, T)."""
    from todi.storage import open_shard_set

    out = {}
    for path in sorted(shards.glob("heldout-*")):
        if not path.is_dir():
            continue
        s = open_shard_set(path)
        mass_k = mass_8 = n = 0.0
        for sample in s.iter_samples():
            p = np.exp(sample.topk_logprobs.astype(np.float64))
            mass_k += float(p.sum())
            mass_8 += float(p[:, :8].sum())
            n += p.shape[0]
        k, temp = s.signature.top_k, s.signature.temperature
        out[f"k{k}-T{temp:g}"] = mass_k / n
        out[f"k8-T{temp:g}"] = mass_8 / n
    return out


def report(cfg: StudyConfig, shards: Path) -> dict[str, Any]:
    runs = Path(cfg.out) / "runs"
    results = [json.loads(p.read_text()) for p in sorted(runs.glob("*-s*/result.json"))]
    by: dict[str, dict[int, dict]] = {}
    for r in results:
        by.setdefault(r["setting"], {})[r["seed"]] = r
    order = [s for s in ALL_SETTINGS if s in by]
    summary = {
        s: {m: _mean_std([_value(r, m) for r in by[s].values()]) for m, _, _ in METRICS}
        for s in order
    }
    paired = {}
    others = [s for s in ("sft", *UNIFORM) if s in by]
    if "todi" in by and others:
        for m, _, sign in METRICS:
            best = min(others, key=lambda s: -sign * summary[s][m]["mean"])
            vals = {s: {seed: _value(r, m) for seed, r in by[s].items()} for s in by}
            paired[m] = {"best_other": best, **(_paired(vals["todi"], vals[best]) or {})}
    against_live = {}
    for live, offline in LIVE_OF.items():
        if live not in by:
            continue
        for setting in (x for x in offline if x in by):
            row = {}
            for m in ("full_fkl", "full_rkl", "ece"):
                vals = {x: {seed: _value(r, m) for seed, r in by[x].items()} for x in by}
                pair = _paired(vals[setting], vals[live])
                if pair is not None and not math.isnan(pair["mean"]):
                    pair["relative"] = pair["mean"] / summary[live][m]["mean"]
                    row[m] = pair
            against_live[setting] = {"live": live, **row}
    init = json.loads((runs / "init.json").read_text())
    if "curve_start" not in init:
        init["curve_start"] = _curve_start(cfg, shards)
        _write_json(runs / "init.json", init)
    out = {
        "benchmark": "quality",
        "machine": machine(),
        "config": cfg.model_dump(mode="json"),
        "teacher_topk_mass": topk_mass(shards),
        "init": init,
        "summary": summary,
        "paired_todi_minus_best": paired,
        "offline_minus_live": against_live,
        "shard_sets": _set_records(shards),
        "runs": results,
    }
    return out


def _set_records(shards: Path) -> dict[str, Any]:
    """Capture time, tokens/s, bytes per position (and coverage) of every set made."""
    out = {}
    for done in sorted(shards.glob("*.done")):
        text = done.read_text().strip()
        out[done.stem] = json.loads(text) if text else {}
    return out


def _curve_start(cfg: StudyConfig, shards: Path) -> dict[str, float]:
    """The curve's step 0: the initial student on the curve's held-out subset."""
    from todi.trainer.evaluate import evaluate_shards, load_model

    model, tokenizer = load_model(f"init:teacher={_prepare_teacher()},layers={cfg.student_layers}")
    heldout = shards / f"heldout-k{cfg.top_k}-T{cfg.temperature:g}"
    m = evaluate_shards(
        model, heldout, beta=cfg.beta, max_samples=cfg.curve_samples, tokenizer=tokenizer
    )
    return {f"eval_{k}": float(m[k]) for k in ("fkl", "rkl", "todi", "top1_agreement", "ce")}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [3, 3, 2]})
    start = result["init"]["curve_start"]["eval_fkl"]
    present = {r["setting"] for r in result["runs"]}
    targets_group = ("todi-online-full", "todi", *TARGETS, "todi-t1")
    first = (
        (MAIN, "methods (top-64 + tail, T = 2)")
        if present & set(MAIN) - {"todi"}
        else (("todi", *ABLATIONS), "ToDi ablations")
    )
    for ax, group, title in (
        (axes[0], *first),
        (axes[1], targets_group, "ToDi: offline targets vs the live teacher"),
    ):
        for setting in group:
            runs = [r for r in result["runs"] if r["setting"] == setting]
            if not runs:
                continue
            steps = [0] + [c["step"] for c in runs[0]["curve"]]
            curves = [[start] + [c["eval_fkl"] for c in r["curve"]] for r in runs]
            mean = [statistics.fmean(v) for v in zip(*curves, strict=True)]
            ax.plot(steps, mean, marker="o", label=f"{setting} (n={len(runs)})")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    axes[0].set_ylabel(
        f"FKL to the teacher, top-64 + tail, T = 2\n(first {result['config']['curve_samples']} "
        "held-out sequences)"
    )
    names = list(result["summary"])
    means = [result["summary"][s]["full_fkl"]["mean"] for s in names]
    stds = [result["summary"][s]["full_fkl"]["std"] for s in names]
    axes[2].barh(names, means, xerr=stds, color="#2a7ab9")
    axes[2].invert_yaxis()
    axes[2].set_xlim(min(means) * 0.9, max(means) * 1.05)
    axes[2].set_title(
        f"after {result['config']['steps']} steps: full-vocabulary FKL, T = 1\n"
        "(all held-out tokens; ± std)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result: dict[str, Any]) -> None:
    print("| setting | " + " | ".join(label for _, label, _ in METRICS) + " |")
    print("|---" * (len(METRICS) + 1) + "|")
    for name in ("teacher", "student"):
        ref = {"heldout": result["init"][name]}
        label = "teacher itself" if name == "teacher" else "initial student"
        print(f"| {label} | " + " | ".join(f"{_value(ref, m):.3f}" for m, _, _ in METRICS) + " |")
    for setting, row in result["summary"].items():
        cells = [f"{row[m]['mean']:.3f} ± {row[m]['std']:.3f}" for m, _, _ in METRICS]
        print(f"| {setting} (n={row[METRICS[0][0]]['n']}) | " + " | ".join(cells) + " |")
    for setting, row in result.get("offline_minus_live", {}).items():
        for m in ("full_fkl", "full_rkl", "ece"):
            if m in row:
                p = row[m]
                print(
                    f"{setting} - {row['live']} on {m}: {p['mean']:+.4f} "
                    f"[{p['low']:+.4f}, {p['high']:+.4f}] ({100 * p['relative']:+.1f} %)"
                )
    print("| shard set | engine | bytes/position | capture tokens/s | coverage |")
    print("|---|---|---|---|---|")
    for name, rec in result.get("shard_sets", {}).items():
        if rec:
            cov = (rec.get("coverage") or {}).get("mean", 1.0)
            print(
                f"| {name} | {rec.get('engine', 'vllm')} | {rec['bytes_per_position']:.1f} | "
                f"{rec['tokens_per_second']:.0f} | {cov:.4f} |"
            )
    for m, p in result["paired_todi_minus_best"].items():
        if "mean" in p:
            print(
                f"ToDi - {p['best_other']} on {m}: {p['mean']:+.4f} "
                f"[{p['low']:+.4f}, {p['high']:+.4f}] (seeds {p['seeds']})"
            )


# --------------------------------------------------------------------------------------------


def _prepare_teacher() -> Path:
    from todi.services.models import prepare_model

    return Path(prepare_model("smollm2-135m-instruct"))


def main(argv: list[str] | None = None) -> None:
    from todi.common.paths import todi_home

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(todi_home() / "quality"))
    ap.add_argument("--prompts", help="JSONL with a 'prompt' per row (default: chatterbot)")
    ap.add_argument("--settings", help=f"comma-separated, of {','.join(ALL_SETTINGS)}")
    ap.add_argument("--seeds", help="comma-separated training seeds [0,1,2]")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--student-layers", type=int)
    ap.add_argument("--heldout", type=int)
    ap.add_argument("--max-prompts", type=int, help="use the first N prompts only")
    ap.add_argument("--answers", choices=("teacher", "corpus"), help="who answers the prompts")
    ap.add_argument("--curve-every", type=int)
    ap.add_argument("--curve-samples", type=int)
    ap.add_argument("--engine", choices=("hf", "vllm"), help="answers and top-k captures")
    ap.add_argument("--rouge-prompts", type=int)
    ap.add_argument("--results", default=str(RESULTS / "quality.json"))
    ap.add_argument("--report-only", action="store_true", help="no new runs: report what is")
    args = ap.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "settings" in given:
        given["settings"] = tuple(x for x in given["settings"].split(",") if x)
    if "seeds" in given:
        given["seeds"] = tuple(int(x) for x in given["seeds"].split(","))
    for key in ("results", "report_only"):
        given.pop(key, None)
    cfg = StudyConfig(**given)
    for s in cfg.settings:
        if s not in ALL_SETTINGS:
            raise SystemExit(f"unknown setting {s!r}; expected one of {', '.join(ALL_SETTINGS)}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    teacher = _prepare_teacher()
    train_jsonl, held_jsonl = build_data(cfg, teacher)
    shards = build_shards(cfg, teacher, {"train": train_jsonl, "heldout": held_jsonl})
    if not args.report_only:
        run_grid(cfg, teacher, shards, held_jsonl)
    result = report(cfg, shards)
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("benchmark", "summary", "paired_todi_minus_best")}))
    print_table(result)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
