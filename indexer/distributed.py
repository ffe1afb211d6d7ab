"""Running `indexer build` under torchrun: who am I, how many are we, and the few
collective steps the build needs (barrier, gather, broadcast of Python objects).

Only gloo is used: the build exchanges small Python objects (slide lists, fingerprints),
never tensors, so NCCL would add nothing and gloo runs on CPU-only machines too. Without
torchrun's variables the context is a single process and every collective is a no-op.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
from typing import Any, Mapping

import torch.distributed as dist

from engine.catalog.db import is_sqlite
from engine.errors import ConfigError

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

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

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's object, on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's object, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def device_for(self, device: str) -> str:
        """With `auto` or `cuda` under torchrun, each rank takes the GPU of its local rank."""
        import torch

        if self.active and device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return device


def context_from_env(env: Mapping[str, str] | None = None) -> DistContext:
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


def check_catalog_for(ctx: DistContext, catalog_url: str) -> None:
    """Several machines cannot share one SQLite file (file locks do not work over network
    file systems): refuse a multi-node run on SQLite before any work is done."""
    if ctx.nnodes > 1 and is_sqlite(catalog_url):
        raise ConfigError(
            f"this torchrun job spans {ctx.nnodes} machines, but the catalog is a SQLite file; "
            "several machines writing at once need a server database: pass "
            "--catalog postgresql+psycopg://USER:PASS@HOST/DB (one node with several processes "
            "may use SQLite)"
        )


def init(ctx: DistContext, timeout_s: float = 7200) -> None:
    """Join the process group (gloo). The timeout is long: rank 0 may fingerprint and
    register a large archive while the others wait at the first barrier."""
    if ctx.active and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=dt.timedelta(seconds=timeout_s))
        LOG.debug("rank %d of %d joined the process group", ctx.rank, ctx.world_size)


def shutdown(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()


def split_by_size(items: list[tuple[int, int]], world_size: int) -> list[list[int]]:
    """Balance (key, size) items over ranks, largest first onto the least-loaded rank
    (deterministic: ties go to the lower rank). Returns each rank's keys in input order."""
    loads = [0] * world_size
    owner: dict[int, int] = {}
    for key, size in sorted(items, key=lambda kv: (-kv[1], kv[0])):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owner[key] = rank
        loads[rank] += max(1, size)
    return [[k for k, _ in items if owner[k] == r] for r in range(world_size)]
