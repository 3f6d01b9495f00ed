"""Process-group setup for ``torchrun`` (gloo on CPU, NCCL on GPU); single process otherwise."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group that torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank, world, local, device)


def reduce_sums(sums: Mapping[str, float], counts: Mapping[str, float], keys: Sequence[str],
                device: torch.device) -> dict[str, tuple[float, float]]:
    """(sum, count) of each of ``keys`` summed over all ranks, in one all-reduce.

    ``keys`` is a fixed list that every rank passes alike (a rank may lack some of them, e.g.
    a batch without MLM rows: it adds zeros). The tensor lives on ``device``, the training
    device, since NCCL refuses CPU tensors.
    """
    t = torch.tensor([[float(sums.get(k, 0.0)), float(counts.get(k, 0.0))] for k in keys],
                     dtype=torch.float64, device=device)  # (K, 2)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return {k: (s, c) for k, (s, c) in zip(keys, t.tolist())}


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank (every rank must call this alike): a rank that
    stops alone would leave the others waiting in the next collective."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown_distributed(meet: bool = True) -> None:
    """Leave the process group: all ranks meet (unless ``meet`` is false: after an error, when
    the others may never arrive), then it is destroyed.

    Without this, a rank that exits while gloo's threads still talk to a slower rank can abort
    at interpreter exit ("terminate called without an active exception").
    """
    if dist.is_initialized():
        if meet:
            dist.barrier()
        dist.destroy_process_group()
