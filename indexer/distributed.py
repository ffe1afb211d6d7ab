"""What `indexer build` adds to engine.distributed (the one DistContext, its collectives,
joining and leaving the process group): the check that a multi-node job has a catalog every
node can write, and the balancing of slides over the ranks.

The build joins with gloo: it exchanges small Python objects (slide lists, fingerprints),
never tensors, so NCCL would add nothing and gloo runs on CPU-only machines too.
"""

from __future__ import annotations

from engine.catalog.db import is_sqlite
from engine.distributed import DistContext
from engine.errors import ConfigError


def check_catalog_for(ctx: DistContext, catalog_url: str) -> None:
    """Several machines cannot share one SQLite file (file locks do not work over network
    file systems): refuse a multi-node run on SQLite before any work is done."""
    if ctx.nnodes > 1 and is_sqlite(catalog_url):
        raise ConfigError(
            f"this torchrun job spans {ctx.nnodes} machines, but the catalog is a SQLite file; "
            "several machines writing at once need a server database, such as "
            "postgresql+psycopg://USER:PASS@HOST/DB (one node with several processes may use SQLite)"
        )


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
