"""How the workers share the work: the distributed helpers and the wrapping of the student.

Every collective the trainer issues goes through this module (`all_reduce`,
`gather_objects`), and `worker_objective` decides how the student is wrapped on a worker
(DistributedDataParallel when there are several workers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from todi.trainer.config import TrainConfig
from todi.trainer.step import StudentObjective


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


def worker_objective(
    model: nn.Module, cfg: TrainConfig, lc: dict[str, Any], device: torch.device, world: int
) -> nn.Module:
    """The StudentObjective of this worker, wrapped in DDP when there are several."""
    # bf16 autocast "where supported" is decided here, where the device is (the driver may
    # run on a CPU-only head node).
    bf16 = cfg.bf16
    if bf16 is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    objective: nn.Module = StudentObjective(
        model,
        kind=cfg.loss,
        beta=cfg.beta,
        temperature=lc["temperature"],
        chunk_size=cfg.chunk_size,
        vocab_limit=lc["vocab_limit"],
        bf16=bf16,
        kd_weight=cfg.kd_weight,
        tail=cfg.topk_target == "tail",
    )
    if world > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective,
            device_ids=[device] if device.type == "cuda" else None,
            broadcast_buffers=False,
        )
    return objective
