"""The ranks of a run through ``torch.distributed`` alone: who this rank is, the few small collectives
the training loop and evaluation need (each a no-op on one rank or with no process group), and the
rendezvous port. Joining the process group is :func:`mmssl.engine.init_distributed`'s (DeepSpeed's).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_mean(values: dict[str, Tensor]) -> dict[str, float]:
    """Average scalars over ranks and bring them to the host (one sync; call on logging steps only)."""
    names = list(values)
    stacked = torch.stack([values[n].detach().float() for n in names])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked.tolist(), strict=True))


def all_reduce_sum(counts: dict[str, int]) -> dict[str, int]:
    """Sum integer counters over ranks (every rank must pass the same keys)."""
    names = sorted(counts)
    if not names or not (dist.is_initialized() and dist.get_world_size() > 1):
        return dict(counts)
    total = torch.tensor([counts[n] for n in names], dtype=torch.float64)
    dist.all_reduce(total)
    return {n: int(v) for n, v in zip(names, total.tolist(), strict=True)}


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (small, picklable), in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (small, picklable) on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def remove_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU shared-memory all-reduce leaves a 66 MiB buffer per local rank in /dev/shm (named
    after the rendezvous port) that 0.19.7 never removes; remove this job's once its ranks are gone."""
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)
