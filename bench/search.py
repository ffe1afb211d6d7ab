"""Search speed and quality at archive scale, on synthetic clustered 2048-d embeddings
(engine.index.synthetic) streamed in chunks, so 1 M tiles (8 GB as float32) never sit in RAM.

For each archive size: the compressed index (PCA-rotation + IVF-PQ + re-ranking from the row
store on disk, `--store`: by default float16 of the PCA-256 rotation, 512 B per tile) is
trained on a sample and filled chunk by chunk; the exact reference is computed
on the same stream (brute force). Measured: p50/p99 latency of a region query (4 query tiles,
a 2 x 2-tile region) and of a slide query (a 32-tile mosaic), each = index search + grouping of
the hits into slides; recall@10 of single tiles against exact search; RAM bytes per tile of
the index; build time. Baseline in the same run: the exact flat index of shards (one shard per
slide, as `indexer build` writes them) where it fits in RAM (default up to 100 k tiles).

    python bench/search.py --sizes 10000 100000 1000000 --plot docs/search_latency.png

`--compare-8bit` also times, in the same run, the same index with 8-bit PQ codes (the
layout before fast-scan PQ) as a second baseline. `--compare-stores f16 pca-sq8` fills, in
the same run, other row stores (engine.index.codec) and re-ranks the same IVF-PQ candidates
with each: recall@10, latency and bytes per tile of each under "stores".

The synthetic stream is generated one chunk ahead in a second process (`--gen-workers`,
default 1; 0: in line), so a build costs about max(generation, indexing) per chunk; queries are
timed after the build, with nothing else of the bench running.

Per size, the summary keys: tiles, recall_at_10, region_p50_ms, slide_p50_ms,
ram_bytes_per_tile, disk_bytes_per_tile (the row store), build_s (train + add + save).

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import faiss
import numpy as np

from engine.index import CompressedIndex, FlatShardIndex, default_nlist, merge_topk, recall_at_k
from engine.index.codec import DEFAULT_KIND, KINDS, Codec, index_pca
from engine.index.common import topk_rows
from engine.index.compressed import train_sample_size
from engine.index.rowstore import RowStore
from engine.index.synthetic import BLOCK, ClusteredVectors
from engine.index.vectorstore import VectorStore
from engine.search import slide_scores

LOG = logging.getLogger("bench.search")
K_TILES = 64  # neighbours per query tile, as SearchEngine asks for with top_k = 8


def percentiles(ms: list[float]) -> dict:
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "n": len(ms),
    }


def region_queries(gen: ClusteredVectors, n_tiles: int, count: int, tiles: int, seed: int) -> list[np.ndarray]:
    """`count` queries of `tiles` vectors each, near `tiles` consecutive tiles of one slide."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        start = int(rng.integers(0, n_tiles - tiles))
        _, xb = gen.chunk(start, start + tiles)
        noise = rng.standard_normal(xb.shape).astype(np.float32) * (0.3 / np.sqrt(gen.dim))
        q = xb + noise
        out.append((q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32))
    return out


def timed_query(index, xq: np.ndarray, slide_of_id, rule: str) -> float:
    t = time.perf_counter()
    D, I = index.search(xq, K_TILES)
    ok = I >= 0
    slides = np.where(ok, slide_of_id(np.maximum(I, 0)), -1)
    floor = np.where(ok, D, np.inf).min(axis=1)
    slide_scores(np.where(ok, D, -np.inf), slides, floor, rule)
    return (time.perf_counter() - t) * 1000


def run_size(n: int, args, folder: Path) -> dict:
    gen = ClusteredVectors(dim=args.dim, tiles_per_slide=1000, seed=args.seed)
    slide_of_id = gen.slide_of
    out: dict = {"tiles": n, "dim": args.dim}
    region_qs = region_queries(gen, n, args.region_queries, 4, seed=1)
    slide_qs = region_queries(gen, n, args.slide_queries, 32, seed=2)
    xq_recall = np.concatenate(region_qs)[: args.recall_queries]

    # -- train on a sample of whole blocks drawn over the archive ------------------------------
    t = time.perf_counter()
    nlist = default_nlist(n)
    want = min(n, train_sample_size(nlist))
    rng = np.random.default_rng(args.seed)
    blocks = rng.choice(max(1, n // BLOCK), size=max(1, min(n // BLOCK, -(-want // BLOCK))), replace=False)
    sample = np.concatenate([gen.chunk(int(b) * BLOCK, min(n, (int(b) + 1) * BLOCK))[1] for b in blocks])[:want]
    index = CompressedIndex.train(folder, sample, nlist=nlist, store=args.store)
    # other row stores, filled from the same stream, re-ranking the same candidates
    stores = {}
    for kind in dict.fromkeys(args.compare_stores):
        if kind != args.store:
            codec = Codec.train(kind, sample, pca=index_pca(index.index.chain.at(0)))
            path = folder.with_name(f"{folder.name}-{kind}") / codec.file
            path.parent.mkdir(parents=True, exist_ok=True)
            stores[kind] = RowStore(VectorStore(path, codec.width, dtype=codec.dtype), np.zeros(0, np.int64), codec)
    # baseline in the same run: the same index with 8-bit PQ codes (same bytes per tile)
    eight = (
        CompressedIndex.train(folder.with_name(folder.name + "-pq8"), sample, nlist=nlist, pq_bits=8)
        if args.compare_8bit
        else None
    )
    del sample
    out["train_s"] = round(time.perf_counter() - t, 1)

    # -- stream: add to the compressed index, exact reference, flat baseline ------------------
    flat = FlatShardIndex(args.dim) if n <= args.flat_max else None
    D_ex = I_ex = None
    add_s = 0.0
    for start, (ids, xb) in zip(range(0, n, args.chunk), stream(gen, n, args.chunk, args.gen_workers)):
        t = time.perf_counter()
        index.add(ids, xb)
        add_s += time.perf_counter() - t
        if eight is not None:
            eight.add(ids, xb)
        for store in stores.values():
            store.append(ids, xb)
        Dc, Ic = topk_rows(xq_recall @ xb.T, ids, 10)
        D_ex, I_ex = (Dc, Ic) if D_ex is None else merge_topk([D_ex, Dc], [I_ex, Ic], 10)
        if flat is not None:
            for s in np.unique(gen.slide_of(ids)):
                sel = gen.slide_of(ids) == s
                flat.add_arrays(f"slide-{s}", ids[sel], xb[sel])
        LOG.info("%d / %d tiles", min(n, start + args.chunk), n)
    t = time.perf_counter()
    index.save()
    out["add_s"] = round(add_s + time.perf_counter() - t, 1)
    out["index"] = {
        "factory": index.manifest["factory"],
        "nlist": index.manifest["nlist"],
        "nprobe": index.nprobe,
        "shortlist": index.shortlist,
    }

    # -- quality and size --------------------------------------------------------------------
    _, I_c = index.search(xq_recall, 10)
    out["recall_at_10"] = round(recall_at_k(I_c, I_ex, 10), 4)
    out["ram_bytes_per_tile"] = round(index.ram_bytes() / n, 1)
    out["disk_bytes_per_tile"] = round(index.disk_bytes() / n, 1)
    out["store"] = index.manifest["rerank"]

    # -- latency: warm up, then time each query ----------------------------------------------
    for q in region_qs[:5]:
        index.search(q, K_TILES)
    out["compressed"] = {
        "region_query": percentiles([timed_query(index, q, slide_of_id, "mean") for q in region_qs]),
        "slide_query": percentiles([timed_query(index, q, slide_of_id, "median") for q in slide_qs]),
    }
    out["region_p50_ms"] = out["compressed"]["region_query"]["p50_ms"]
    out["slide_p50_ms"] = out["compressed"]["slide_query"]["p50_ms"]
    out["build_s"] = round(out["train_s"] + out["add_s"], 1)
    if stores:
        out["stores"] = {args.store: store_summary(index, xq_recall, I_ex, region_qs, slide_qs, slide_of_id, n)}
        for kind, store in stores.items():
            view = copy.copy(index)
            view.rowstore = store
            out["stores"][kind] = store_summary(view, xq_recall, I_ex, region_qs, slide_qs, slide_of_id, n)
    if eight is not None:
        _, I_8 = eight.search(xq_recall, 10)
        for q in region_qs[:5]:
            eight.search(q, K_TILES)
        out["compressed_pq8"] = {
            "factory": eight.manifest["factory"],
            "recall_at_10": round(recall_at_k(I_8, I_ex, 10), 4),
            "ram_bytes_per_tile": round(eight.ram_bytes() / n, 1),
            "region_query": percentiles([timed_query(eight, q, slide_of_id, "mean") for q in region_qs]),
            "slide_query": percentiles([timed_query(eight, q, slide_of_id, "median") for q in slide_qs]),
        }
    if flat is not None:
        _, I_f = flat.search(xq_recall, 10)
        out["flat_recall_at_10"] = round(recall_at_k(I_f, I_ex, 10), 4)
        out["flat_ram_bytes_per_tile"] = round(flat.ram_bytes() / n, 1)
        flat.search(region_qs[0], K_TILES)
        out["flat"] = {
            "region_query": percentiles([timed_query(flat, q, slide_of_id, "mean") for q in region_qs]),
            "slide_query": percentiles([timed_query(flat, q, slide_of_id, "median") for q in slide_qs]),
        }
    if args.sweep:
        # recall and region latency of other probe depths / short lists, for choosing defaults
        out["sweep"] = []
        for nprobe in sorted({min(p, index.manifest["nlist"]) for p in (16, 32, 64)}):
            for shortlist in (100, 200):
                _, I_s = index.search(xq_recall, 10, nprobe=nprobe, shortlist=shortlist)
                ms = []
                for q in region_qs[:50]:
                    t = time.perf_counter()
                    index.search(q, K_TILES, nprobe=nprobe, shortlist=shortlist)
                    ms.append((time.perf_counter() - t) * 1000)
                out["sweep"].append(
                    {
                        "nprobe": nprobe,
                        "shortlist": shortlist,
                        "recall_at_10": round(recall_at_k(I_s, I_ex, 10), 4),
                        "region_p50_ms": round(float(np.median(ms)), 2),
                    }
                )
    out["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["load_average_1min"] = round(os.getloadavg()[0], 2)  # other work on the machine
    return out


def stream(gen: ClusteredVectors, n: int, chunk: int, workers: int):
    """(ids, vectors) chunks of tiles 0..n-1 in order; with `workers` > 0 generated ahead in
    that many processes while the caller indexes the previous chunk (generation is the
    costliest step of the build loop and no part of what is measured)."""
    starts = range(0, n, chunk)
    if workers <= 0:
        yield from (gen.chunk(s, min(n, s + chunk)) for s in starts)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = deque()
        for s in starts:
            pending.append(pool.submit(gen.chunk, s, min(n, s + chunk)))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def store_summary(index, xq_recall, I_ex, region_qs, slide_qs, slide_of_id, n: int) -> dict:
    """Recall@10, latency and bytes per tile of the index re-ranking from its row store."""
    _, I = index.search(xq_recall, 10)
    for q in region_qs[:5]:
        index.search(q, K_TILES)
    region = [timed_query(index, q, slide_of_id, "mean") for q in region_qs]
    slide = [timed_query(index, q, slide_of_id, "median") for q in slide_qs]
    return {
        "recall_at_10": round(recall_at_k(I, I_ex, 10), 4),
        "region_p50_ms": round(float(np.median(region)), 2),
        "slide_p50_ms": round(float(np.median(slide)), 2),
        "ram_bytes_per_tile": round(index.ram_bytes() / n, 1),
        "disk_bytes_per_tile": round(index.disk_bytes() / n, 1),
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    sizes = [r["tiles"] for r in results]
    for kind, style in (("compressed", "-o"), ("compressed_pq8", ":^"), ("flat", "--s")):
        for query, colour in (("region_query", "tab:blue"), ("slide_query", "tab:orange")):
            pts = [(r["tiles"], r[kind][query]["p50_ms"]) for r in results if kind in r]
            if pts:
                ax.plot(*zip(*pts), style, color=colour, label=f"{kind}, {query.replace('_', ' ')} (p50)")
    ax.axhline(50, color="tab:blue", lw=0.8, ls=":")
    ax.axhline(100, color="tab:orange", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sizes, [f"{s:,}" for s in sizes])
    ax.set_xlabel("archive size (tiles, 2048-d)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Search latency vs archive size (targets dotted)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="archive sizes in tiles"
    )
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--region-queries", type=int, default=200)
    parser.add_argument("--slide-queries", type=int, default=50)
    parser.add_argument("--recall-queries", type=int, default=400, help="single tiles whose recall@10 is measured")
    parser.add_argument(
        "--flat-max", type=int, default=100_000, help="largest size with the exact flat baseline (RAM: 8 kB per tile)"
    )
    parser.add_argument("--chunk", type=int, default=50_000)
    parser.add_argument("--threads", type=int, default=None, help="FAISS threads (default: all cores)")
    parser.add_argument(
        "--gen-workers",
        type=int,
        default=1,
        help="processes generating the synthetic stream ahead of the build (0: in line); queries are timed after",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compare-8bit",
        action="store_true",
        help="also build and time the same index with 8-bit PQ codes (the earlier layout)",
    )
    parser.add_argument(
        "--store", choices=KINDS, default=DEFAULT_KIND, help="row store the index re-ranks from (engine.index.codec)"
    )
    parser.add_argument(
        "--compare-stores",
        nargs="*",
        choices=KINDS,
        default=[],
        help="also fill these row stores and re-rank the same candidates with each (f16 costs 4 kB/tile of disk)",
    )
    parser.add_argument(
        "--sweep", action="store_true", help="at each size, also measure other nprobe / shortlist settings"
    )
    parser.add_argument("--plot", type=Path, default=None, help="write the latency-vs-size plot here (PNG)")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the row stores (default: a temp folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in args.sizes:
            LOG.info("archive of %d tiles (load average %.1f)", n, os.getloadavg()[0])
            results.append(run_size(n, args, Path(tmp) / f"n{n}"))
            print(json.dumps(results[-1]), file=sys.stderr)
    doc = {
        "bench": "search",
        "command": "python bench/search.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "cpus": os.cpu_count(),
            "faiss_threads": faiss.omp_get_max_threads(),
            "platform": platform.platform(),
            "faiss": faiss.__version__,
        },
        "results": results,
    }
    if args.plot:
        plot(results, args.plot)
        doc["plot"] = str(args.plot)
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
