"""Teacher throughput: the bare forward vs top-k extraction vs the whole precompute job.

The same sequences (prompt/response pairs from the `chatterbot-corpus` package, through the
teacher's chat template) are scored by each backend, each in a fresh subprocess:

- forward: the engine's bare model forward on the same batches, no log-probs:
    hf    `model(input_ids, attention_mask)` over the backend's own token-budget batches
          (logits for every position included, no log_softmax / top-k);
    vllm  `LLM.generate(..., SamplingParams(max_tokens=1))` without prompt_logprobs (prefill
          of every token; logits of the last position only).
- topk: `backend.topk(sequences, k)` over the job's batches (forward + full-vocabulary
  log-softmax + top-k + conversion to numpy).
- job: `todi.services.jobs.run_precompute` end to end (read JSONL, tokenize, count pass, topk,
  slice, encode, write and commit Parquet shards, mark complete).

tokens/s counts the tokens of the sequences (every position). "outside forward" =
1 - t_forward / t_job: the share of the job's wall time spent anywhere but the model
forward (log-prob extraction, tokenization, shard writing, Python); goal < 10%.

Usage: .venv/bin/python bench/bench_teacher.py [--sequences 200] [--top-k 20]
       [--backends hf,vllm] [--batch-tokens 4096] [--max-seq-len 256] [--model DIR]
       [--hf-dtype float32] [--vllm-dtype float32] [--repeats 1]
Prints a table on stderr and ONE JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def chatterbot_pairs(n: int) -> list[dict[str, str]]:
    """The first n (prompt, response) pairs of chatterbot-corpus/english, in file order."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: pip install --no-deps chatterbot-corpus")
    data = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    pairs = []
    for f in sorted(data.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            if len(conv) >= 2 and all(isinstance(t, str) and t.strip() for t in conv[:2]):
                pairs.append({"prompt": conv[0], "response": conv[1]})
    if len(pairs) < n:
        raise SystemExit(f"error: only {len(pairs)} pairs in chatterbot-corpus, asked {n}")
    return pairs[:n]


def _best_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each function; rounds interleave them so that load drifting on a
    shared machine hits all of them alike."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def _child(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT))
    from todi.services.backends import create_backend
    from todi.services.config import JobSpec
    from todi.services.datasets import encode_rows, read_rows
    from todi.services.precompute import batched, effective_max_len, run_precompute

    kind = args.child
    options: dict = {}
    if kind == "hf":
        options = {"dtype": args.hf_dtype, "token_budget": args.batch_tokens}
    elif kind == "vllm":
        options = {"dtype": args.vllm_dtype, "max_num_batched_tokens": args.batch_tokens}
    t = time.perf_counter()
    backend = create_backend(kind, args.model, max_top_k=max(args.top_k, 20), **options)
    load_s = time.perf_counter() - t
    spec = JobSpec(dataset=args.dataset, out=str(Path(args.work) / f"set-{kind}-0"),
                   top_k=args.top_k, max_seq_len=args.max_seq_len,
                   batch_tokens=args.batch_tokens)  # fmt: skip
    max_len = effective_max_len(spec, backend.info)
    rows = list(encode_rows(read_rows(args.dataset), backend.tokenizer, max_seq_len=max_len))
    batches = [[r.input_ids for r in b] for b in batched(rows, args.batch_tokens)]
    tokens = sum(r.num_tokens for r in rows)

    # Warm-up (first-call allocations, lazy initialisation) on a small batch.
    backend.topk(batches[0][:2], args.top_k)

    if kind == "hf":
        import torch

        from todi.services.backends.hf import pack_by_budget

        budget = backend.token_budget

        def forward() -> None:
            with torch.inference_mode():
                for seqs in batches:
                    lengths = [len(s) for s in seqs]
                    for group in pack_by_budget(lengths, budget):
                        width = lengths[group[0]]
                        ids = torch.zeros((len(group), width), dtype=torch.long)
                        mask = torch.zeros((len(group), width), dtype=torch.long)
                        for row, i in enumerate(group):
                            ids[row, : lengths[i]] = torch.from_numpy(seqs[i].astype("int64"))
                            mask[row, : lengths[i]] = 1
                        backend.model(input_ids=ids, attention_mask=mask, use_cache=False)

    elif kind == "vllm":
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        llm = backend._llm
        params = SamplingParams(max_tokens=1, detokenize=False, temperature=0.0)

        def forward() -> None:
            for seqs in batches:
                prompts = [TokensPrompt(prompt_token_ids=s.tolist()) for s in seqs]
                llm.generate(prompts, params, use_tqdm=False)
    else:
        raise SystemExit(f"error: no bare forward for backend {kind!r}")

    def topk() -> None:
        for seqs in batches:
            backend.topk(seqs, args.top_k)

    runs = {"n": 0}

    def job() -> None:
        runs["n"] += 1
        out = str(Path(args.work) / f"set-{kind}-{runs['n']}")
        p = run_precompute(spec.model_copy(update={"out": out}), backend)
        assert p.state == "succeeded" and p.sequences_done == len(rows)

    best = _best_interleaved({"forward": forward, "topk": topk, "job": job}, args.repeats)
    result = {
        "backend": kind,
        "load_s": round(load_s, 2),
        "sequences": len(rows),
        "tokens": tokens,
        "forward_s": best["forward"],
        "topk_s": best["topk"],
        "job_s": best["job"],
    }
    backend.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=200)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--backends", default="hf,vllm")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--hf-dtype", default="float32")
    parser.add_argument("--vllm-dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(_child(args)), flush=True)
        return

    sys.path.insert(0, str(ROOT))
    from todi.services.models import resolve_model

    args.model = str(resolve_model(args.model))
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-teacher-") as work:
        dataset = Path(work) / "pairs.jsonl"
        with open(dataset, "w") as f:
            for pair in chatterbot_pairs(args.sequences):
                f.write(json.dumps(pair) + "\n")
        for kind in [b.strip() for b in args.backends.split(",") if b.strip()]:
            cmd = [sys.executable, __file__, "--child", kind, "--dataset", str(dataset),
                   "--work", work, "--model", args.model, "--top-k", str(args.top_k),
                   "--batch-tokens", str(args.batch_tokens),
                   "--max-seq-len", str(args.max_seq_len), "--hf-dtype", args.hf_dtype,
                   "--vllm-dtype", args.vllm_dtype, "--repeats", str(args.repeats)]  # fmt: skip
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                results[kind] = {"error": f"exit {out.returncode}"}
                continue
            results[kind] = json.loads(out.stdout.strip().splitlines()[-1])

    for r in results.values():
        if "error" in r:
            continue
        tok = r["tokens"]
        r["forward_tokens_per_s"] = round(tok / r["forward_s"], 1)
        r["topk_tokens_per_s"] = round(tok / r["topk_s"], 1)
        r["job_tokens_per_s"] = round(tok / r["job_s"], 1)
        r["outside_forward_share"] = round(1 - r["forward_s"] / r["job_s"], 4)
        for key in ("forward_s", "topk_s", "job_s"):
            r[key] = round(r[key], 3)

    print(
        f"teacher bench: {args.sequences} chatterbot pairs, k={args.top_k}, "
        f"batch_tokens={args.batch_tokens}, {os.cpu_count()} CPUs",
        file=sys.stderr,
    )
    header = f"{'backend':<8}{'tokens':>8}{'fwd tok/s':>11}{'topk tok/s':>12}{'job tok/s':>11}"
    print(header + f"{'outside fwd':>13}", file=sys.stderr)
    for kind, r in results.items():
        if "error" in r:
            print(f"{kind:<8}  {r['error']}", file=sys.stderr)
            continue
        print(
            f"{kind:<8}{r['tokens']:>8}{r['forward_tokens_per_s']:>11.1f}"
            f"{r['topk_tokens_per_s']:>12.1f}{r['job_tokens_per_s']:>11.1f}"
            f"{r['outside_forward_share'] * 100:>12.1f}%",
            file=sys.stderr,
        )
    summary = {
        "bench": "teacher",
        "sequences": args.sequences,
        "top_k": args.top_k,
        "batch_tokens": args.batch_tokens,
        "max_seq_len": args.max_seq_len,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "results": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
