"""Sizing on paper from the code's own numbers: shard bytes, the teacher's capture FLOPs, and
the student's memory per GPU under DDP and FSDP, with and without activation checkpointing.

    python bench/sizing.py --teacher llama-70b --student llama-8b --tokens 1e9 \\
        --seq-len 4096 --gpus 8 --top-k 64 [--online] [--micro-batch 1]
    python bench/sizing.py --table          # the table of docs/at-scale.md (markdown)

Where each number comes from:

- parameters: the student's HF config instantiated on the meta device (no memory), counted
  per decoder layer and for the rest (embeddings, final norm, head);
- what a worker holds per parameter: the trainer's own layout (trainer/strategy.py): float32
  master weights, float32 gradients, AdamW's two float32 moments; DDP also allocates its
  float32 gradient buckets and, with bf16 autocast, bf16 copies of the weights; FSDP holds
  1/W of all of that plus the gathered bf16 units (the root unit, i.e. embeddings + head,
  from forward to backward; two decoder layers at a time) and their unsharded gradients;
- activations per token and decoder layer: `activation_bytes` below, what autograd saves in
  the transformers Llama/Qwen2 layer (counted with saved-tensor hooks on the real layer,
  bench/bench_scale.py checks it on CPU); with checkpointing a layer keeps only its input
  (b * hidden) and one layer's activations exist at a time during its recompute;
- the chunked loss (trainer/chunked.py): the fused head gradient held from forward to
  backward (V x H float32), two [chunk, V] float32 buffers, the gathered hidden rows and
  their gradient;
- shard bytes: bytes per stored (id, log-prob) entry of the default codec as measured on
  the real teacher (bench/results/codec.json), plus the token ids (int32);
- capture FLOPs: one teacher forward per token, 2 * params + 2 * layers * seq * hidden
  (the attention scores of a causal sequence, averaged over positions).

Not modeled: the CUDA context and allocator slack (about 1-3 GB per GPU), NCCL buffers, the
teacher engine's KV cache (vLLM sizes that itself: --gpu-memory-utilization).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
GB = 1e9

# Public configs (the fields that size a model). Students and teacher must share a
# tokenizer in practice (same family); the sizes here only need the shapes.
MODELS: dict[str, dict] = {
    "qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151_936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151_936,
        tie_word_embeddings=True,
    ),
    "llama-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14_336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128_256,
        tie_word_embeddings=False,
    ),
    "llama-70b": dict(
        model_type="llama", hidden_size=8192, intermediate_size=28_672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=128_256,
        tie_word_embeddings=False,
    ),
    # The embedded teacher (tests, benchmarks): what can be checked on this machine.
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49_152,
        tie_word_embeddings=True,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    params: int  # all parameters (a tied head counted once)
    layer_params: int  # one decoder layer
    root_params: int  # the rest: embeddings, final norm, head

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def model_config(spec: dict | str):
    from transformers import AutoConfig

    data = dict(MODELS[spec] if isinstance(spec, str) else spec)
    return AutoConfig.for_model(data.pop("model_type"), **data)


@cache
def _shape(key: str) -> Shape:
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(json.loads(key))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied one once
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    text = config.get_text_config()
    return Shape(
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        layers=text.num_hidden_layers,
        heads=text.num_attention_heads,
        kv_heads=text.num_key_value_heads,
        vocab=text.vocab_size,
        params=total,
        layer_params=layer,
        root_params=total - text.num_hidden_layers * layer,
    )


def shape(spec: dict | str) -> Shape:
    """Parameter counts of a model (by name in MODELS or a config dict), from its HF class."""
    return _shape(json.dumps(MODELS[spec] if isinstance(spec, str) else spec, sort_keys=True))


def activation_bytes(s: Shape, b: int) -> int:
    """Bytes autograd keeps per token in one decoder layer (transformers' Llama / Qwen2 layer,
    SDPA attention) with activations of b bytes: the four [i] MLP tensors (gate, up, silu,
    product), six [h] tensors (normed inputs, q, attention output, o_proj input, ...), k, v
    and the rotary cos/sin in b bytes; the two RMSNorms' float32 inputs (2h), the attention's
    log-sum-exp per head and two per-token norm scalars in float32. Counted on CPU with
    saved-tensor hooks (bench/bench_scale.py: `activation_check`)."""
    kv = s.kv_heads * s.head_dim
    return b * (4 * s.intermediate + 6 * s.hidden + 2 * kv + 2 * s.head_dim) + 4 * (
        2 * s.hidden + s.heads + 2
    )


def student_memory(
    student: dict | str,
    *,
    strategy: str,
    gpus: int,
    seq_len: int,
    micro_batch: int = 1,
    checkpointing: bool,
    bf16: bool = True,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Bytes per GPU by part (module docstring), and their sum `total`."""
    s = shape(student)
    b = 2 if bf16 else 4
    n, tokens = s.params, seq_len * micro_batch
    w = gpus if strategy == "fsdp" else 1
    parts: dict[str, float] = {
        "params_fp32": 4 * n / w,
        "grads_fp32": 4 * n / w,
        "adamw_fp32": 8 * n / w,
    }
    if strategy == "ddp":
        parts["ddp_buckets"] = 4 * n
        if bf16:
            parts["autocast_weights"] = 2 * n
    else:
        # the root unit gathered from forward to backward, two layers (one prefetched), the
        # unsharded gradients of the root and one layer, one layer's float32 reduce input
        parts["gathered_params"] = b * (s.root_params + 2 * s.layer_params)
        parts["unsharded_grads"] = b * (s.root_params + s.layer_params) + 4 * s.layer_params
    if checkpointing:
        parts["activations"] = tokens * (s.layers * b * s.hidden + activation_bytes(s, b))
    else:
        parts["activations"] = tokens * s.layers * activation_bytes(s, b)
    # embeddings out, final norm (float32 input + output), the gathered hidden rows and grad
    parts["activations"] += tokens * (b * s.hidden + 4 * 2 * s.hidden + 2 * b * s.hidden)
    parts["loss_head_grad_fp32"] = 4 * s.vocab * s.hidden  # fused path, forward -> backward
    parts["loss_chunk_buffers"] = 2 * min(chunk_size, tokens) * s.vocab * 4
    parts["total"] = sum(parts.values())
    return parts


def codec_bytes_per_entry() -> tuple[float, str]:
    """The default codec's measured bytes per (id, log-prob) entry (bench/results/codec.json)."""
    from todi.storage import DEFAULT_CODEC

    path = HERE / "results" / "codec.json"
    data = json.loads(path.read_text())["result"]["codecs"][DEFAULT_CODEC]
    return float(data["bytes_per_entry"]), DEFAULT_CODEC


def shard_bytes(tokens: float, top_k: int) -> float:
    per_entry, _ = codec_bytes_per_entry()
    return tokens * (top_k * per_entry + 4)  # + the int32 token id of each position


def capture_flops(teacher: dict | str, tokens: float, seq_len: int) -> float:
    s = shape(teacher)
    return tokens * (2 * s.params + 2 * s.layers * seq_len * s.hidden)


def report(args) -> dict:
    rows = []
    for strategy in ("ddp", "fsdp"):
        for ckpt in (False, True):
            mem = student_memory(
                args.student, strategy=strategy, gpus=args.gpus, seq_len=args.seq_len,
                micro_batch=args.micro_batch, checkpointing=ckpt, bf16=not args.fp32,
            )  # fmt: skip
            rows.append({"strategy": strategy, "checkpointing": ckpt, **mem})
    out = {
        "teacher": args.teacher,
        "student": args.student,
        "student_params": shape(args.student).params,
        "teacher_params": shape(args.teacher).params,
        "tokens": args.tokens,
        "seq_len": args.seq_len,
        "gpus": args.gpus,
        "capture": "online" if args.online else f"top-{args.top_k}",
        "shard_bytes": 0.0 if args.online else shard_bytes(args.tokens, args.top_k),
        "capture_flops": capture_flops(args.teacher, args.tokens, args.seq_len),
        "memory": rows,
    }
    return out


def print_report(r: dict, gpu_gb: float) -> None:
    print(
        f"teacher {r['teacher']} ({r['teacher_params'] / 1e9:.2f} B params), student "
        f"{r['student']} ({r['student_params'] / 1e9:.2f} B), {r['tokens']:.3g} tokens of "
        f"{r['seq_len']}, {r['gpus']} GPUs, capture {r['capture']}"
    )
    print(f"shard bytes      {r['shard_bytes'] / GB:,.1f} GB")
    print(f"capture FLOPs    {r['capture_flops']:.3g}  (once; online: every epoch)")
    print(f"{'strategy':8} {'ckpt':5} {'GB/GPU':>8} {'fits ' + str(int(gpu_gb)) + ' GB':>10}")
    for m in r["memory"]:
        fits = "yes" if m["total"] / GB <= gpu_gb - 3 else "no"  # 3 GB: context, slack
        print(f"{m['strategy']:8} {m['checkpointing']!s:5} {m['total'] / GB:8.1f} {fits:>10}")


def table(gpus: int, seq_len: int, tokens: float, top_k: int, gpu_gb: float) -> str:
    """The markdown table of docs/at-scale.md."""
    lines = [
        f"Per GPU, {gpus} GPUs, one {seq_len:,}-token sequence per GPU per micro-batch, bf16 "
        f"compute, {gpu_gb:.0f} GB cards (3 GB kept for the CUDA context and slack).",
        "",
        "| student | params | DDP | DDP + ckpt | FSDP | FSDP + ckpt |",
        "|---|---|---|---|---|---|",
    ]
    for student in ("qwen2.5-0.5b", "qwen2.5-1.5b", "llama-8b"):
        cells = []
        for strategy, ckpt in (("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True)):
            gb = (
                student_memory(
                    student, strategy=strategy, gpus=gpus, seq_len=seq_len, checkpointing=ckpt
                )["total"]
                / GB
            )
            cells.append(f"{gb:.1f} GB" + ("" if gb <= gpu_gb - 3 else " ✗"))
        lines.append(
            f"| {student} | {shape(student).params / 1e9:.2f} B | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        f"Teachers, {tokens:.0e} tokens of {seq_len:,} (capture once, top-{top_k} shards):",
        "",
        "| teacher | params | capture FLOPs | shard bytes |",
        "|---|---|---|---|",
    ]
    for teacher in ("llama-8b", "llama-70b"):
        lines.append(
            f"| {teacher} | {shape(teacher).params / 1e9:.2f} B | "
            f"{capture_flops(teacher, tokens, seq_len):.2e} | "
            f"{shard_bytes(tokens, top_k) / GB:,.0f} GB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--teacher", default="llama-70b", help=f"one of {', '.join(MODELS)}")
    parser.add_argument("--student", default="llama-8b")
    parser.add_argument("--tokens", type=float, default=1e9, help="tokens captured / trained")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-gb", type=float, default=80.0)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--online", action="store_true", help="no shards: teacher every step")
    parser.add_argument("--fp32", action="store_true", help="float32 compute (CPU)")
    parser.add_argument("--table", action="store_true", help="docs/at-scale.md's table")
    args = parser.parse_args()
    if args.table:
        print(table(args.gpus, args.seq_len, args.tokens, args.top_k, args.gpu_gb))
        return
    r = report(args)
    print_report(r, args.gpu_gb)
    print(json.dumps(r, default=lambda x: x if math.isfinite(x) else None))


if __name__ == "__main__":
    main()
