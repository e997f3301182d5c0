"""How the workers share the work: the distributed helpers and the wrapping of the student.

Every collective the trainer issues goes through this module (`all_reduce`,
`gather_objects`), and `worker_objective` decides how the student is held on a worker:

- `ddp` (DistributedDataParallel): every worker holds the whole student, its gradients and
  the whole AdamW state; gradients are all-reduced (averaged) after backward.
- `fsdp` (torch FSDP2, `fully_shard`): parameters, gradients and AdamW state are sharded over
  the workers (dim 0 of every tensor, 1/W each). Each decoder layer is its own unit: its
  parameters are all-gathered for its forward, freed after it, gathered again for its
  backward, and its gradients are reduce-scattered (averaged, as DDP's). The root unit holds
  the embeddings, the final norm and the output head (tied or not): **the whole head is
  gathered once per micro-batch** (V x H in the parameter dtype, e.g. 49,152 x 576 x 4 B =
  113 MB at toy width, 128,256 x 4,096 x 2 B = 1.05 GB for an 8B Llama in bf16) and kept
  until the root's backward has reduce-scattered its gradient; the chunked loss then runs
  `chunk_size` positions at a time against it, so no [positions, V] tensor exists beyond
  one chunk. `bench/bench_scale.py` measures what the gather costs.

Mixed precision: on GPU (bf16 where supported) FSDP keeps float32 sharded master weights and
optimizer state, casts the gathered parameters to bf16 for forward and backward
(`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32)`: gradients are reduced in
float32), and the chunked loss does its softmax / divergence math in float32. On CPU
everything is float32. DDP keeps its bf16 autocast (`--bf16`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from todi.trainer.config import TrainConfig
from todi.trainer.student import decoder_layers


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def comm_device() -> torch.device:
    if is_distributed() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Element-wise sum/max of a few numbers over all workers (identity without dist)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    red = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
    torch.distributed.all_reduce(t, op=red)
    return t.cpu().tolist()


def gather_objects(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 "where supported" is decided on the worker, where the device is (the driver may
    run on a CPU-only head node)."""
    if cfg.bf16 is not None:
        return cfg.bf16
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def unwrap(objective: nn.Module) -> nn.Module:
    """The StudentObjective inside a DDP wrapper (FSDP2 wraps in place: the module itself)."""
    return (
        objective.module
        if isinstance(objective, nn.parallel.DistributedDataParallel)
        else objective
    )


def fully_shard_student(
    objective: nn.Module, device: torch.device, *, bf16: bool, world: int | None = None
) -> nn.Module:
    """FSDP2 over the workers' process group: one unit per decoder layer, the rest (embeddings,
    final norm, head) in the root unit (module docstring). Changes `objective` in place: its
    parameters become DTensors sharded on dim 0; returns it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    world = world or torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.float32,
        # The root's inputs include the teacher's log-probs: they stay float32.
        cast_forward_inputs=False,
    )
    for layer in decoder_layers(objective.model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    # The root is used right after its forward by its own backward: not resharded in between.
    fully_shard(objective, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return objective


def wants_fsdp(cfg: TrainConfig) -> bool:
    """FSDP for `--strategy fsdp` whenever there is a process group (one worker included)."""
    return cfg.strategy == "fsdp" and is_distributed()


def wrap_objective(
    objective: nn.Module, cfg: TrainConfig, device: torch.device, world: int
) -> nn.Module:
    """`objective` (a StudentObjective) held for `cfg.strategy` (module docstring)."""
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(objective.model)
    if wants_fsdp(cfg):
        return fully_shard_student(objective, device, bf16=use_bf16(cfg, device), world=world)
    if world > 1:
        return nn.parallel.DistributedDataParallel(
            objective,
            device_ids=[device] if device.type == "cuda" else None,
            broadcast_buffers=False,
        )
    return objective


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of every decoder layer (transformers' own, non-reentrant):
    a layer's activations are dropped after forward and recomputed in backward; only the
    layer inputs are kept. Deterministic layers (no dropout in the students here) recompute
    the same values, so the loss curve is unchanged (tested)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def grad_sync(objective: nn.Module, last: bool):
    """The context of one accumulation micro-batch: only the last one synchronizes
    gradients (DDP `no_sync`; FSDP keeps unsharded gradients until the last)."""
    if isinstance(objective, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if last else objective.no_sync()
    if is_fsdp(objective):
        objective.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """The global gradient norm (before clipping) over all workers' shards; clips to
    `max_norm`. With FSDP the gradients are DTensor shards: the norm is reduced over them."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def local_state_bytes(objective: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this worker holds for parameters, gradients and optimizer state (its shards
    under FSDP, everything under DDP), counting a tied tensor once."""

    def nbytes(t: torch.Tensor) -> int:
        local = t.to_local() if hasattr(t, "to_local") else t
        return local.numel() * local.element_size()

    params = list({id(p): p for p in objective.parameters()}.values())
    out = {
        "params": sum(nbytes(p) for p in params),
        "grads": sum(nbytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(
            nbytes(v)
            for state in optimizer.state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        ),
    }
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out
