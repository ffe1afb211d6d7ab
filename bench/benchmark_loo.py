"""Leave-one-out search speed at archive scale, from synthetic features (no encoder).

Times `engine.evaluation.knn.loo_neighbours` (one batched FAISS flat search + exact fallback)
on N L2-normalised D-d vectors grouped in slides, against the baseline a per-query
implementation would take (one search per query, asking for k + slide size neighbours and
filtering), timed on a sample of queries in the same run and extrapolated to N. The sample's
results must agree, so the speed-up is for the same answer. Prints one JSON object.

    python bench/benchmark_loo.py --n 100000 --dim 2048 --k 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import faiss
import numpy as np

from engine.encoder import l2_normalise
from engine.evaluation.knn import loo_neighbours


def synthetic_features(
    n: int, dim: int, classes: int, slide_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class centres + a per-slide offset + per-patch noise: neighbours cluster by slide and
    class as real tile features do, so the exclusion actually removes close results."""
    rng = np.random.default_rng(seed)
    slides = np.arange(n) // slide_size
    n_slides = int(slides[-1]) + 1
    slide_class = rng.integers(0, classes, n_slides)
    x = rng.standard_normal((classes, dim), dtype=np.float32)[slide_class[slides]]
    x += 0.7 * rng.standard_normal((n_slides, dim), dtype=np.float32)[slides]
    x += rng.standard_normal((n, dim), dtype=np.float32)
    return l2_normalise(x), slides, slide_class[slides]


def per_query(xb: np.ndarray, groups: np.ndarray, rows: np.ndarray, k: int, slide_size: int) -> np.ndarray:
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    out = np.full((len(rows), k), -1, np.int64)
    for r, q in enumerate(rows):
        D, I = index.search(xb[q : q + 1], k + slide_size)
        keep = [(-d, i) for d, i in zip(D[0], I[0]) if i >= 0 and groups[i] != groups[q]]
        out[r, : min(k, len(keep))] = [i for _, i in sorted(keep)[:k]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="patches (default 100000)")
    parser.add_argument("--dim", type=int, default=2048, help="feature width (default 2048, RetCCL)")
    parser.add_argument("--k", type=int, default=5, help="neighbours per query (default 5)")
    parser.add_argument("--classes", type=int, default=9, help="labels (default 9, as NCT-CRC-HE)")
    parser.add_argument("--slide-size", type=int, default=100, help="patches per slide = exclusion group (default 100)")
    parser.add_argument(
        "--baseline-queries", type=int, default=200, help="queries timed one by one for the baseline (default 200)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t0 = time.perf_counter()
    xb, groups, _ = synthetic_features(args.n, args.dim, args.classes, args.slide_size, args.seed)
    make_s = time.perf_counter() - t0

    load_before = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    D, I = loo_neighbours(xb, groups, args.k, progress=False)
    batched_s, batched_cpu_s = time.perf_counter() - t0, time.process_time() - c0

    rows = np.random.default_rng(args.seed + 1).choice(args.n, min(args.baseline_queries, args.n), replace=False)
    t0 = time.perf_counter()
    I_ref = per_query(xb, groups, rows, args.k, args.slide_size)
    sample_s = time.perf_counter() - t0
    baseline_s = sample_s / len(rows) * args.n

    print(
        json.dumps(
            {
                "bench": "benchmark_loo",
                "n": args.n,
                "dim": args.dim,
                "k": args.k,
                "slide_size": args.slide_size,
                "batched_loo_s": round(batched_s, 2),
                "batched_queries_per_s": round(args.n / batched_s, 1),
                # CPU seconds of this process: what the run costs on an idle machine (the wall time
                # above grows when other work shares the cores)
                "batched_loo_cpu_s": round(batched_cpu_s, 1),
                "baseline_per_query_s_extrapolated": round(baseline_s, 1),
                "baseline_sample_queries": len(rows),
                "speedup": round(baseline_s / batched_s, 2),
                "sample_agrees_with_baseline": bool((I[rows] == I_ref).all()),
                "feature_memory_gb": round(xb.nbytes / 1e9, 2),
                "make_features_s": round(make_s, 1),
                "faiss_threads": faiss.omp_get_max_threads(),
                "cpus": os.cpu_count(),
                "load_average_at_start": round(load_before, 2),
                "machine": platform.processor() or platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
