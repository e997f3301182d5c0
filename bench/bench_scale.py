"""Scale: FSDP vs DDP on 2 CPU workers, activation checkpointing against sequence length, the
chunked loss at 49k and 152k vocabularies, and the sizing model (bench/sizing.py) checked
against what this machine measures.

Sections (`--only fsdp,activations,memory,loss`):

- fsdp: two processes (gloo), the same student and batches, 20 optimizer steps through the
  trainer's `train_step`, once wrapped in DDP and once sharded with FSDP2 (the trainer's
  `wrap_objective` pieces). Reported: the largest relative difference of the two loss curves;
  parameter + gradient + AdamW bytes per worker, measured on the tensors (`local_state_bytes`)
  and predicted by sizing.py; the cost of gathering the whole head once (what FSDP's root unit
  does per micro-batch); step times.
- activations: bytes autograd saves per token in one decoder layer (saved-tensor hooks on the
  real transformers layer, float32 and bf16) against `sizing.activation_bytes`.
- memory: one forward + backward of the student (StudentObjective, chunked loss) on one
  sequence of 512 ... 4,096 tokens, with and without `--gradient-checkpointing`, each in a
  fresh process: peak resident memory above the steady state (weights and gradients already
  allocated; the kernel's high-water mark, as bench/bench_loss.py measures it) and time.
- loss: the chunked head loss (forward + backward, the trainer's fused path) at 2,048
  positions for V = 49,152 (SmolLM2) and V = 151,936 (Qwen2.5), via bench/bench_loss.py's
  measured child.

Student: SmolLM2-135M's shape (width 576, vocab 49,152, tied head) with `--layers` decoder
layers, random weights (memory and numerics do not depend on the values). Prints tables and
ONE JSON line on stdout (`bench/run_all.py --only scale` stores it as bench/results/scale.json);
`--save NAME` writes it to bench/results/NAME.json itself.

    .venv/bin/python bench/bench_scale.py [--only ...] [--layers 8] [--save NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "bench"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

SEQS = (512, 1024, 2048, 4096)
K = 16


def _student_config(layers: int, vocab: int = 49_152) -> dict:
    from sizing import MODELS

    return {**MODELS["smollm2-135m"], "num_hidden_layers": layers, "vocab_size": vocab}


def _student(layers: int):
    import torch
    from sizing import model_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(_student_config(layers)))
    model.train()
    return model


def _batch(rows: int, seq: int, seed: int, vocab: int = 49_152):
    """`rows` sequences of `seq` tokens; a synthetic teacher's top-k (random log-probs over
    random ids, normalized over the full vocabulary); prompt of 16 tokens masked."""
    import torch

    from todi.storage.batches import IGNORE_INDEX, Batch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 16:-1] = ids[:, 17:]
    topk = torch.randint(0, vocab, (rows, seq, K), generator=g)
    # distinct ids per position are not needed for memory, but keep them distinct anyway
    topk = (topk + torch.arange(K) * (vocab // K)) % vocab
    lp = torch.log_softmax(torch.randn(rows, seq, K + 1, generator=g), -1)[..., :K]
    lp = lp.sort(-1, descending=True).values
    return Batch(ids, torch.ones_like(ids), labels, topk, lp, [str(i) for i in range(rows)])


def _objective(model, chunk: int):
    from todi.trainer.step import StudentObjective

    return StudentObjective(
        model, kind="todi", beta=1.0, temperature=1.0, chunk_size=chunk, kd_weight=0.5
    )


# ------------------------------------------------------------------------------------------
# fsdp vs ddp


def _dist_worker(rank: int, world: int, port: int, strategy: str, args, out: str) -> None:
    import torch
    import torch.distributed as dist

    from todi.trainer.config import TrainConfig
    from todi.trainer.step import batch_sums, make_optimizer, make_scheduler, train_step
    from todi.trainer.strategy import all_reduce, local_state_bytes, wrap_objective

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = TrainConfig(shards="-", student="-", out="-", lr=3e-4, strategy=strategy)
    model = _student(args.fsdp_layers)
    objective = wrap_objective(_objective(model, 256), cfg, torch.device("cpu"), world)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, warmup=0, total=args.steps)
    losses, times = [], []
    for step in range(args.steps):
        batch = _batch(2 * world, args.fsdp_seq, seed=step)
        mine = batch.to("cpu")
        rows = slice(2 * rank, 2 * rank + 2)
        mine = type(batch)(
            batch.input_ids[rows], batch.attention_mask[rows], batch.labels[rows],
            batch.topk_ids[rows], batch.topk_logprobs[rows], batch.sample_ids[rows],
        )  # fmt: skip
        t0 = time.perf_counter()
        stats = train_step(objective, [mine], optimizer, scheduler, kd_weight=0.5, grad_clip=1.0)
        times.append(time.perf_counter() - t0)
        ce, div, n = all_reduce([stats.ce_sum, stats.div_sum, stats.tokens])
        losses.append((0.5 * ce + 0.5 * div) / n)
    ce, div = batch_sums(objective, mine)
    (0.5 * ce + 0.5 * div).backward()
    held = local_state_bytes(objective, optimizer)
    gather_s = None
    head = model.get_output_embeddings().weight
    if hasattr(head, "full_tensor"):  # FSDP: what the root unit's all-gather moves
        head.full_tensor()
        t0 = time.perf_counter()
        for _ in range(5):
            head.full_tensor()
        gather_s = (time.perf_counter() - t0) / 5
    everyone = [None] * world
    dist.all_gather_object(everyone, held)
    if rank == 0:
        record = {"losses": losses, "step_s": times, "bytes": everyone, "head_gather_s": gather_s}
        Path(out).write_text(json.dumps(record))
    dist.destroy_process_group()


def bench_fsdp(args) -> dict:
    import torch.multiprocessing as mp
    from sizing import shape

    runs = {}
    for strategy in ("ddp", "fsdp"):
        out = Path(f"/tmp/todi-bench-scale-{strategy}-{os.getpid()}.json")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_dist_worker, args=(2, port, strategy, args, str(out)), nprocs=2, join=True)
        runs[strategy] = json.loads(out.read_text())
        out.unlink()
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    rel = max(abs(a - b) / abs(a) for a, b in zip(ddp["losses"], fsdp["losses"], strict=True))
    s = shape(_student_config(args.fsdp_layers))
    predicted_fsdp = 16 * s.params / 2  # float32 params + grads + 2 AdamW moments, over 2
    per_worker = [w["total"] for w in fsdp["bytes"]]
    head_bytes = s.vocab * s.hidden * 4
    result = {
        "layers": args.fsdp_layers,
        "params": s.params,
        "seq": args.fsdp_seq,
        "steps": args.steps,
        "loss_max_rel_diff": rel,
        "ddp_losses": ddp["losses"],
        "fsdp_losses": fsdp["losses"],
        "ddp_bytes_per_worker": ddp["bytes"][0]["total"],
        "fsdp_bytes_per_worker": per_worker,
        "fsdp_over_ddp_bytes": max(per_worker) / ddp["bytes"][0]["total"],
        "sizing_predicted_fsdp_bytes": predicted_fsdp,
        "measured_over_predicted": max(per_worker) / predicted_fsdp,
        "head_gather_bytes": head_bytes,
        "head_gather_s": fsdp["head_gather_s"],
        "ddp_step_s": sorted(ddp["step_s"])[len(ddp["step_s"]) // 2],
        "fsdp_step_s": sorted(fsdp["step_s"])[len(fsdp["step_s"]) // 2],
    }
    print(
        f"fsdp vs ddp, 2 workers, {s.params / 1e6:.0f} M params, {args.steps} steps: loss max rel "
        f"diff {rel:.2e}; state bytes/worker {max(per_worker) / 2**20:.0f} MiB vs "
        f"{ddp['bytes'][0]['total'] / 2**20:.0f} MiB = {result['fsdp_over_ddp_bytes']:.3f}x; "
        f"sizing predicted {predicted_fsdp / 2**20:.0f} MiB; head gather "
        f"{head_bytes / 2**20:.0f} MiB in {fsdp['head_gather_s'] * 1e3:.0f} ms; step "
        f"{result['ddp_step_s']:.2f} s (ddp) / {result['fsdp_step_s']:.2f} s (fsdp)",
        file=sys.stderr,
    )
    return result


# ------------------------------------------------------------------------------------------
# activation bytes per token per layer


def bench_activations(args) -> dict:
    import torch
    from sizing import activation_bytes, model_config, shape
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    spec = _student_config(1)
    config = model_config(spec)
    config._attn_implementation = "sdpa"
    s = shape(spec)
    out = {}
    for name, dtype, b in (("float32", torch.float32, 4), ("bfloat16", torch.bfloat16, 2)):
        seq = 256
        layer = LlamaDecoderLayer(config, 0).to(dtype)
        x = torch.randn(1, seq, s.hidden, dtype=dtype, requires_grad=True)
        pos = torch.arange(seq)[None]
        cos, sin = LlamaRotaryEmbedding(config)(x, pos)
        params = {id(p) for p in layer.parameters()}
        saved: dict[int, int] = {}

        def pack(t, params=params, saved=saved):
            base = t._base if t._base is not None else t
            if id(base) not in params:
                saved[base.untyped_storage().data_ptr()] = base.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x, position_embeddings=(cos.to(dtype), sin.to(dtype)), attention_mask=None)
        measured = sum(saved.values()) / seq
        out[name] = {"measured": measured, "predicted": activation_bytes(s, b)}
        print(
            f"activations/token/layer {name}: measured {measured:.0f} B, sizing "
            f"{activation_bytes(s, b)} B",
            file=sys.stderr,
        )
    return out


# ------------------------------------------------------------------------------------------
# peak memory against sequence length, checkpointing on / off


def _status_kib(field: str) -> int:
    import re

    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def _memory_child(args) -> dict:
    import torch

    from todi.trainer.step import batch_sums
    from todi.trainer.strategy import enable_gradient_checkpointing

    torch.set_num_threads(args.threads)
    model = _student(args.layers)
    if args.ckpt:
        enable_gradient_checkpointing(model)
    objective = _objective(model, args.chunk)
    # Warm-up on a short sequence: the gradients exist from now on (zeroed, not freed).
    ce, div = batch_sums(objective, _batch(1, 64, seed=1))
    (0.5 * ce + 0.5 * div).backward()
    model.zero_grad(set_to_none=False)
    batch = _batch(1, args.seq, seed=2)
    rss = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0, cpu0 = time.perf_counter(), time.process_time()
    ce, div = batch_sums(objective, batch)
    (0.5 * ce + 0.5 * div).backward()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    peak = _status_kib("VmHWM")
    # CPU seconds too: on a shared machine the wall clock includes waiting for a core
    return {
        "seq": args.seq,
        "ckpt": args.ckpt,
        "peak_mib": (peak - rss) / 1024,
        "s": seconds,
        "cpu_s": cpu,
    }


def _memory_run(seq: int, layers: int, ckpt: bool, args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}  # as bench_loss.py
    cmd = [sys.executable, __file__, "--child", "memory", "--seq", str(seq)]
    cmd += ["--layers", str(layers), "--chunk", str(args.chunk)]
    cmd += ["--threads", str(args.threads)] + (["--ckpt"] if ckpt else [])
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_memory(args) -> dict:
    """Per sequence length: the step's peak above the steady state with `--layers` decoder
    layers, checkpointing off and on, and with 0 layers (embeddings, final norm and the
    chunked loss alone: its buffers and the fused head gradient do not depend on the layers).
    The decoder layers' activation memory = peak - the 0-layer peak."""
    from sizing import activation_bytes, shape

    s = shape(_student_config(args.layers))
    print(
        f"{'tokens':>7} {'peak MiB':>9} {'+ckpt':>7} {'0 layers':>9} {'layers act':>10} "
        f"{'+ckpt':>7} {'act ratio':>9} {'s':>6} {'+ckpt s':>8} {'cpu ratio':>9}"
    )
    table = {}
    for seq in SEQS:
        base = _memory_run(seq, 0, False, args)
        off = _memory_run(seq, args.layers, False, args)
        on = _memory_run(seq, args.layers, True, args)
        act_off, act_on = off["peak_mib"] - base["peak_mib"], on["peak_mib"] - base["peak_mib"]
        row = {
            "peak_mib": off["peak_mib"],
            "peak_mib_ckpt": on["peak_mib"],
            "peak_mib_no_layers": base["peak_mib"],
            "layer_activations_mib": act_off,
            "layer_activations_mib_ckpt": act_on,
            "activation_ratio": act_on / act_off,
            "peak_ratio": on["peak_mib"] / off["peak_mib"],
            "s": off["s"],
            "s_ckpt": on["s"],
            "time_ratio": on["s"] / off["s"],
            "cpu_s": off["cpu_s"],
            "cpu_s_ckpt": on["cpu_s"],
            "cpu_time_ratio": on["cpu_s"] / off["cpu_s"],
            "sizing_layer_activations_mib": seq * s.layers * activation_bytes(s, 4) / 2**20,
            "sizing_layer_activations_mib_ckpt": seq
            * (s.layers * 4 * s.hidden + activation_bytes(s, 4))
            / 2**20,
        }
        table[seq] = row
        print(
            f"{seq:7d} {off['peak_mib']:9.0f} {on['peak_mib']:7.0f} {base['peak_mib']:9.0f} "
            f"{act_off:10.0f} {act_on:7.0f} {row['activation_ratio']:9.2f} {off['s']:6.1f} "
            f"{on['s']:8.1f} {row['cpu_time_ratio']:9.2f}"
        )
    return {"layers": args.layers, "chunk": args.chunk, "by_seq": table}


# ------------------------------------------------------------------------------------------
# the chunked loss at two vocabulary sizes


def bench_loss_vocab(args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = {}
    for vocab in (49_152, 151_936):
        cmd = [sys.executable, str(HERE / "bench_loss.py"), "--variant", "chunked"]
        cmd += ["--positions", "2048", "--vocab", str(vocab), "--hidden", "576", "--k", "64"]
        cmd += ["--kind", "todi", "--temperature", "2.0", "--chunk-size", "1024"]
        cmd += ["--repeats", "1", "--seed", "0"]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=ROOT)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        out[vocab] = {"peak_mib": r["peak_mib"], "s": r["seconds"], "cpu_s": r["cpu_seconds"]}
        print(
            f"chunked loss, 2048 positions, V = {vocab}: peak {r['peak_mib']:.0f} MiB, "
            f"{r['seconds']:.2f} s",
            file=sys.stderr,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="fsdp,activations,memory,loss")
    parser.add_argument("--layers", type=int, default=8, help="memory section's student")
    parser.add_argument("--chunk", type=int, default=256, help="memory section's chunk_size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fsdp-layers", type=int, default=4)
    parser.add_argument("--fsdp-seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--save", help="also write the record to bench/results/SAVE.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "memory":
        print(json.dumps(_memory_child(args)))
        return
    from machine import machine

    result: dict = {"bench": "scale", "machine": machine()}
    sections = {
        "fsdp": bench_fsdp,
        "activations": bench_activations,
        "memory": bench_memory,
        "loss": bench_loss_vocab,
    }
    for name in args.only.split(","):
        t0 = time.perf_counter()
        result[name] = sections[name](args)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    line = json.dumps(result)
    print(line)
    if args.save:
        (HERE / "results" / f"{args.save}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
