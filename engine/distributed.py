"""Running under torchrun: who am I, how many are we, and the few collectives the indexer
and the trainer need (barrier, gather, broadcast, "rank 0 does it, everyone gets the
result"). Without torchrun's variables the context is a single process and every
collective is a no-op.

The indexer joins with gloo (it exchanges small Python objects, never tensors, and gloo
runs on CPU-only machines too): `context_from_env` + `join`. The trainer joins with nccl
on GPUs, gloo on CPU, and picks each rank's device: `init_training`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from engine.errors import ConfigError, HistoseekError

LOG = logging.getLogger(__name__)
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class DistContext:
    """This process's place in the job. `device` and `backend` are set by `init_training`
    (None for the indexer, which picks its device with `device_for`)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device | None = None
    backend: str | None = None

    @property
    def nnodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s picklable object, on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's picklable object, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) run on rank 0 only, its result handed to every rank. When it fails the
        other ranks raise too (the same HistoseekError, or one naming rank 0's error) instead
        of waiting for a result that never comes; rank 0 raises its own error."""
        if not self.is_main:
            ok, payload = self.broadcast(None)
            if not ok:
                raise payload
            return payload
        try:
            result = fn(*args)
        except HistoseekError as exc:
            self.broadcast((False, exc))
            raise
        except Exception as exc:
            self.broadcast((False, HistoseekError(f"rank 0 stopped: {type(exc).__name__}: {exc}")))
            raise
        self.broadcast((True, result))
        return result

    def device_for(self, device: str) -> str:
        """With `auto` or `cuda` under torchrun, each rank takes the GPU of its local rank."""
        if self.active and device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return device


def current() -> DistContext:
    """The context of the process group this process has joined (one process if none)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size())
    return DistContext()


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    ctx = current()
    return ctx.rank, ctx.world_size


def context_from_env(env: Mapping[str, str] | None = None) -> DistContext:
    """The context torchrun's variables describe (one process without them)."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return DistContext()
    try:
        world = int(env["WORLD_SIZE"])
        return DistContext(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
        )
    except ValueError as exc:
        raise ConfigError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_*): {exc}") from None


def join(ctx: DistContext, backend: str = "gloo", timeout_s: float = 7200) -> None:
    """Join the process group of `ctx` (no-op for one process or when already joined)."""
    if ctx.active and not dist.is_initialized():
        dist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s))
        LOG.debug("rank %d of %d joined the process group (%s)", ctx.rank, ctx.world_size, backend)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def init_training(device: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment (nccl on GPU, gloo on
    CPU), or run as one process; the context carries each rank's device.

    device: auto (cuda:LOCAL_RANK when CUDA is present, else cpu), cpu, or cuda. Only the
    env:// launch of torchrun is supported; a partial launch environment fails at once."""
    present = [v for v in _LAUNCH_VARS if v in os.environ]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if present and world > 1 and len(present) < len(_LAUNCH_VARS):
        missing = [v for v in _LAUNCH_VARS if v not in os.environ]
        raise ConfigError(
            f"incomplete distributed launch: {', '.join(missing)} not set; launch the processes with torchrun"
        )
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but CUDA is not available here; use the cpu device")
        if world > 1 and local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); start fewer processes per node"
            )
        torch_device = torch.device("cuda", local_rank if world > 1 else (torch.device(device).index or 0))
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device(device)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    backend = None
    if world > 1:
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=dt.timedelta(minutes=30))
    return DistContext(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        device=torch_device,
        backend=backend,
    )


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Rows of x from every rank, in rank order (W*N x ...). No gradient flows back
    through all_gather: use it for keys and other targets only. Every rank must pass the
    same shape."""
    world = dist_info()[1]
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """x reduced over the ranks in place (sum or max); x itself for one process."""
    if dist_info()[1] > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return x
