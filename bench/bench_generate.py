"""vLLM answer generation on CPU (`todi demo` step 2): dtype and thread binding.

The demo's sequence-level data are answers sampled from the teacher on vLLM
(`todi.services.answers`). On a CPU the engine's settings decide the speed; this measures the
generated tokens/s of each setting, each in a fresh subprocess (vLLM reads the binding when
its engine starts):

- `bfloat16/auto`: vLLM's own defaults (bf16; "auto" binding keeps one core per NUMA node for
  its scheduler, so a 2-core machine computes on one);
- `float32/auto`: float32 with vLLM's binding;
- `float32/all`: this project's defaults (`todi.services.backends.vllm.default_dtype` and
  `cpu_engine_env`: float32, threads bound to every core of the process).

Same prompts (the first --prompts chatterbot prompts through the chat template), same seeds,
same `generation_engine` settings. tokens/s = generated tokens / wall time of the
`generate` call (engine start-up excluded, reported as load_s).

    .venv/bin/python bench/bench_generate.py [--prompts 32] [--tokens 32]
        [--configs bfloat16/auto,float32/auto,float32/all]

Prints a table on stderr and ONE JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from todi.services.answers import (
        chat_prompt_ids,
        chatterbot_prompts,
        generation_engine,
        sample_answers,
    )
    from todi.services.models import resolve_model

    dtype = args.child.split("/")[0]
    model = resolve_model(args.model)
    prompt_ids = chat_prompt_ids(
        AutoTokenizer.from_pretrained(model), chatterbot_prompts()[: args.prompts]
    )
    t = time.perf_counter()
    with generation_engine(model, dtype=dtype, max_model_len=1024, seed=0) as llm:
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        out = sample_answers(llm, prompt_ids, args.tokens, temperature=0.7, top_p=0.9, seed=0)
        gen_s = time.perf_counter() - t
    tokens = sum(len(o) for o in out)
    return {
        "config": args.child,
        "binding": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "all (project default)"),
        "load_s": round(load_s, 1),
        "generate_s": round(gen_s, 2),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / gen_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--configs", default="bfloat16/auto,float32/auto,float32/all")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args)), flush=True)
        return

    rows = []
    for config in args.configs.split(","):
        binding = config.split("/")[1]
        env = dict(os.environ)
        env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        if binding != "all":
            env["VLLM_CPU_OMP_THREADS_BIND"] = binding
        cmd = [sys.executable, __file__, "--child", config, "--prompts", str(args.prompts),
               "--tokens", str(args.tokens), "--model", args.model]  # fmt: skip
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode != 0 or not lines:
            sys.exit(f"error: {config} failed (exit {done.returncode})")
        rows.append(json.loads(lines[-1]))

    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_first"] = round(r["tokens_per_s"] / base, 2)
    print(f"{'config':<16}{'load s':>9}{'tokens':>9}{'tok/s':>9}{'vs first':>10}", file=sys.stderr)
    for r in rows:
        print(f"{r['config']:<16}{r['load_s']:>9}{r['generated_tokens']:>9}"
              f"{r['tokens_per_s']:>9}{r['vs_first']:>10}", file=sys.stderr)  # fmt: skip
    print(json.dumps({"prompts": args.prompts, "max_new_tokens": args.tokens,
                      "cores": len(os.sched_getaffinity(0)), "results": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
