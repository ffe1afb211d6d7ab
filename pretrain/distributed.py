"""Distributed set-up for `torchrun`: process group (nccl on GPU, gloo on CPU), the device
of each rank, and the few collectives the trainer needs.

Only the env:// launch of `torchrun` (or a plain single process) is supported; a partial
launch environment fails at once with a message saying what is missing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os

import torch
import torch.distributed as dist

from engine.errors import ConfigError, HistoseekError

LOG = logging.getLogger(__name__)
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: one process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment, or run as one process.

    device: auto (cuda:LOCAL_RANK when CUDA is present, else cpu), cpu, or cuda."""
    present = [v for v in _LAUNCH_VARS if v in os.environ]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if present and world > 1 and len(present) < len(_LAUNCH_VARS):
        missing = [v for v in _LAUNCH_VARS if v not in os.environ]
        raise ConfigError(f"incomplete distributed launch: {', '.join(missing)} not set; launch several processes with torchrun --nproc-per-node N -m pretrain train ...")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
        if world > 1 and local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); lower --nproc-per-node")
        torch_device = torch.device("cuda", local_rank if world > 1 else (torch.device(device).index or 0))
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device(device)
    backend = None
    if world > 1:
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=dt.timedelta(minutes=30))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=torch_device, backend=backend)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Rows of x from every rank, in rank order (W*N x ...). No gradient flows back
    through all_gather: use it for keys and other targets only. Every rank must pass the
    same shape."""
    rank, world = dist_info()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable object on every rank."""
    if dist_info()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn, *args):
    """fn(*args) run on rank 0 only, its result (or its HistoseekError) handed to every rank,
    so a bad argument stops all ranks with the same message instead of leaving them waiting."""
    result = None
    if dist_info()[0] == 0:
        try:
            result = fn(*args)
        except HistoseekError as exc:
            result = exc
    result = broadcast_object(result)
    if isinstance(result, HistoseekError):
        raise result
    return result


def gather_objects(obj) -> list:
    """Every rank's picklable object, in rank order, on every rank."""
    world = dist_info()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist_info()[1] > 1:
        dist.barrier()
