"""Process-group setup: ``torchrun`` or SLURM (``srun``) processes join one group (NCCL on GPUs,
gloo on CPU); a process started alone trains alone.

Who a process is comes from its environment, read by the pure function :func:`launch_from_env`:

- ``torchrun`` (also ``torchrun`` inside a SLURM job): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``;
  it sets ``MASTER_ADDR`` / ``MASTER_PORT`` itself.
- ``srun`` without ``torchrun``: ``SLURM_PROCID`` (rank), ``SLURM_STEP_NUM_TASKS`` (world size:
  the tasks of this job step, which ``srun -n`` may set below the allocation's
  ``SLURM_NTASKS``), ``SLURM_LOCALID`` (local rank); ``MASTER_ADDR`` and ``MASTER_PORT`` must be
  exported by the job script (the first node of the allocation and a free port). A batch script
  of several tasks that runs ``python`` itself, not under ``srun``, has ``SLURM_NTASKS`` but no
  step variables: that is refused with the fix, since its one process would wait for the
  others forever.

On GPUs each process takes ``cuda:LOCAL_RANK``, set before the group is joined.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from xlip.errors import XlipError

SLURM_HINT = ('in the job script: export MASTER_ADDR=$(scontrol show hostnames '
              '"$SLURM_JOB_NODELIST" | head -n 1) MASTER_PORT=29500, then srun python -m xlip '
              'pretrain ...')


class LaunchError(XlipError, RuntimeError):
    """The launcher's environment variables contradict each other or miss one, or a process
    has no GPU of its own."""


@dataclass(frozen=True)
class Launch:
    """How this process was started (``launcher``: single | torchrun | slurm) and where rank 0
    listens (``master``: "ADDR:PORT"; empty for single and torchrun, whose env:// setup reads it
    from the environment)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"
    master: str = ""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    raw = env.get(key)
    if raw is None or raw.strip() == "":
        if default is None:
            raise LaunchError(f"{key} is not set; a torchrun or srun launch sets it: start the "
                              "processes with torchrun (or srun), or unset the other launch "
                              "variables to train in one process")
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{key}={raw!r} is not an integer; unset it or give the number the "
                          "launcher meant") from None


def _check(launch: Launch, names: tuple[str, str, str]) -> Launch:
    rank, world, local = names
    if launch.world_size < 1:
        raise LaunchError(f"{world}={launch.world_size}: the number of processes must be at "
                          "least 1")
    if not 0 <= launch.rank < launch.world_size:
        raise LaunchError(f"{rank}={launch.rank} is outside 0..{launch.world_size - 1} "
                          f"({world}={launch.world_size}); the launcher's variables disagree")
    if not 0 <= launch.local_rank <= launch.rank:
        raise LaunchError(f"{local}={launch.local_rank} must lie in 0..{rank} "
                          f"({launch.rank}); the launcher's variables disagree")
    return launch


def launch_from_env(env: Mapping[str, str]) -> Launch:
    """This process's place in the job, from the launcher's variables (see the module doc).

    torchrun's variables win over SLURM's (torchrun inside an allocation); with neither, or a
    SLURM job of one task, the process trains alone."""
    if "RANK" in env or "WORLD_SIZE" in env:
        return _check(Launch(_int(env, "RANK"), _int(env, "WORLD_SIZE"),
                             _int(env, "LOCAL_RANK", 0), "torchrun"),
                      ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if "SLURM_STEP_NUM_TASKS" not in env:  # not an srun task
        if _int(env, "SLURM_NTASKS", 1) > 1:
            raise LaunchError(f"SLURM_NTASKS={env['SLURM_NTASKS']} but this process was not "
                              "started by srun (SLURM_STEP_NUM_TASKS is not set), so it would "
                              "wait for the other tasks forever; in the batch script run "
                              "srun python -m xlip pretrain ... (or torchrun), or submit with "
                              "--ntasks 1 to train in one process")
        return Launch()
    world = _int(env, "SLURM_STEP_NUM_TASKS")
    if world == 1:
        return Launch()
    rank, local = _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k, "").strip()]
    if missing:
        raise LaunchError(f"SLURM_STEP_NUM_TASKS={world} but {' and '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not set, so the processes "
                          f"cannot find each other; {SLURM_HINT}")
    port = _int(env, "MASTER_PORT")
    return _check(Launch(rank, world, local, "slurm", f"{env['MASTER_ADDR'].strip()}:{port}"),
                  ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"))


def training_device(local_rank: int, cuda_count: int, launcher: str = "single") -> torch.device:
    """``cuda:LOCAL_RANK`` where there are GPUs, else the CPU. An srun task that sees one GPU
    takes it: ``--gpus-per-task`` / ``--gpu-bind`` leave each task only its own."""
    if cuda_count == 0:
        return torch.device("cpu")
    if launcher == "slurm" and cuda_count == 1:
        return torch.device("cuda", 0)
    if local_rank >= cuda_count:
        raise LaunchError(f"local rank {local_rank} has no GPU: this process sees {cuda_count}; "
                          f"start at most {cuda_count} processes per node (torchrun "
                          f"--nproc_per_node {cuda_count}, or srun --ntasks-per-node "
                          f"{cuda_count})")
    return torch.device("cuda", local_rank)


def backend_for(device: torch.device) -> str:
    """NCCL for GPU tensors, gloo for CPU ones."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(env: Mapping[str, str] | None = None) -> DistInfo:
    """Join the process group that torchrun or srun describes in ``env`` (default: this
    process's environment), if any; each GPU process first takes its own GPU."""
    launch = launch_from_env(os.environ if env is None else env)
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = training_device(launch.local_rank, cuda, launch.launcher)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launch.world_size > 1 and not dist.is_initialized():
        if launch.launcher == "slurm":
            dist.init_process_group(backend_for(device), init_method=f"tcp://{launch.master}",
                                    rank=launch.rank, world_size=launch.world_size)
        else:
            dist.init_process_group(backend_for(device))
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank, launch.world_size, launch.local_rank, device)


def sync_batchnorm(model: nn.Module, info: DistInfo) -> nn.Module:
    """BatchNorm (``vision.stem=hybrid``) over the global batch: ``SyncBatchNorm`` under DDP on
    GPUs. It has no CPU implementation, so CPU (gloo) processes keep per-process batch
    statistics. Call before the optimizer is built and before DDP wraps the model (the
    converted layers keep the same parameters, names and buffers)."""
    if info.world_size > 1 and info.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def wrap_for_training(model: nn.Module, info: DistInfo, compile_model: bool = False,
                      unused: bool = False) -> nn.Module:
    """The module a training step calls: ``model`` (already on ``info.device``) compiled in
    place when ``compile_model`` (``train.compile``), then, with several processes, wrapped in
    DDP: the order the PyTorch docs give (``model.compile()``, then
    ``DistributedDataParallel(model)``). ``model`` itself keeps its parameter names (no
    ``_orig_mod.`` prefix) for the optimizer, clipping and saving. ``unused``: some steps
    leave parameters without a gradient (``loss.aux_until`` < 1), which DDP must search for
    (``find_unused_parameters``; it costs a walk of the graph per step)."""
    if compile_model:
        model.compile()
    if info.world_size == 1:
        return model
    return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
               find_unused_parameters=unused)


def reduce_sums(sums: Mapping[str, float | torch.Tensor],
                counts: Mapping[str, float | torch.Tensor], keys: Sequence[str],
                device: torch.device) -> dict[str, tuple[float, float]]:
    """(sum, count) of each of ``keys`` summed over all ranks, in one all-reduce.

    ``keys`` is a fixed list that every rank passes alike (a rank may lack some of them, e.g.
    a batch without MLM rows: it adds zeros). The values are floats or 0-d tensors on
    ``device`` (sums kept there between log steps, so that the steps never wait to read
    them); the tensor reduced lives on ``device``, the training device, since NCCL refuses CPU
    tensors. Its values are read once, here.
    """
    host = torch.zeros(len(keys), 2, dtype=torch.float64)  # (K, 2)
    where, parts = [], []  # flat indices into the (K, 2) table, and their device values
    for i, k in enumerate(keys):
        for j, v in enumerate((sums.get(k, 0.0), counts.get(k, 0.0))):
            if torch.is_tensor(v):
                where.append(2 * i + j)
                parts.append(v.detach().to(device, torch.float64).reshape(()))
            else:
                host[i, j] = float(v)
    t = host.to(device)
    if parts:
        t.view(-1).index_put_((torch.tensor(where, device=device),), torch.stack(parts),
                              accumulate=True)
    if dist.is_initialized():
        dist.all_reduce(t)
    return {k: (s, c) for k, (s, c) in zip(keys, t.tolist())}


def any_rank(flags: torch.Tensor) -> torch.Tensor:
    """``flags`` (a tensor on the training device; nonzero: set) at its largest over all ranks,
    reduced on the device (every rank must call this alike): a rank that stops alone would
    leave the others waiting in the next collective. Nothing is read on the host here."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


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
