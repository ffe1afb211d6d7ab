"""What loading a shard checked costs (issue 11: a damaged shard is refused, not searched).

Writes one shard of --tiles unit vectors (2048-d, as RetCCL) with the project's writer, then
loads it --repeats times each way, interleaved, and prints JSON with the median seconds:
  faiss_read_index   FAISS alone, no checks (what loading cost before)
  read_shard_norms   engine.shards.read_shard without a sha256: one read + the norm check
  read_shard_checked read_shard with the catalog's sha256, as search and verify load it

    python bench/shard_load.py --tiles 4000 --repeats 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent
]

from engine.encoder import cpu_flags  # noqa: E402
from engine.shards import ShardEncoder, read_shard, write_shard  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=4000, help="vectors in the shard (4000 x 2048 float32 = 32 MB)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((args.tiles, args.dim)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    encoder = ShardEncoder(name="bench", checkpoint_sha256="0" * 64, dim=args.dim, target_mpp=1.0, tile_px=224)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slide-000000001.faiss"
        sha = write_shard(path, np.arange(args.tiles, dtype=np.int64), xb, encoder)
        ways = {
            "faiss_read_index": lambda: faiss.read_index(str(path)),
            "read_shard_norms": lambda: read_shard(path),
            "read_shard_checked": lambda: read_shard(path, sha),
        }
        times = {name: [] for name in ways}
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits all alike
            for name, load in ways.items():
                start = time.perf_counter()
                load()
                times[name].append(time.perf_counter() - start)
        size = path.stat().st_size
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(
        json.dumps(
            {
                "bench": "shard_load",
                "tiles": args.tiles,
                "dim": args.dim,
                "file_mb": round(size / 2**20, 1),
                "repeats": args.repeats,
                "median_ms": {k: round(v * 1000, 2) for k, v in medians.items()},
                "checked_over_faiss": round(medians["read_shard_checked"] / medians["faiss_read_index"], 2),
                "cpu_flags": cpu_flags(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
