"""Cost of a region query at unknown magnification against the same query at known mpp, in the
same run (issue 13.2: at most 3x, p50).

A small archive is indexed (random ResNet-18 weights, CPU): the real slides CMU-1-Small-Region
and the TCGA frozen section of ../shared/data/slides/real, plus two synthetic blob slides. The
query is a crop of CMU-1 (default 700 x 700 level-0 px at 0.499 um/px), turned and mirrored
and saved as JPEG q80, searched `--repeats` times at its true mpp and as many times without
one (engine.search.scale), alternating. Prints one JSON document:
{known_p50_ms, unknown_p50_ms, ratio, estimated_mpp, true_mpp, source_rank_known,
source_rank_unknown, candidates}.

    python bench/region_scale.py [--repeats 9] [--crop 700] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.search import SearchEngine  # noqa: E402
from engine.slides import open_slide  # noqa: E402
from tests.indexed_archive import make_indexed_archive  # noqa: E402
from tests.synthetic_slides import tissue_blobs, write_pyramidal_tiff  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "slides" / "real"
SOURCE = "CMU-1-Small-Region.svs"


def query_image(path: Path, edge: int) -> tuple[Image.Image, float]:
    slide = open_slide(path)
    try:
        mpp = float(slide.properties["openslide.mpp-x"])
        w, h = slide.dimensions
        crop = slide.read_region(((w - edge) // 2, (h - edge) // 2), 0, (edge, edge)).convert("RGB")
    finally:
        slide.close()
    crop = crop.transpose(Image.Transpose.ROTATE_90).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    crop.save(buf, "JPEG", quality=80)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), mpp


def rank_of(result, name: str) -> int | None:
    return next((h.rank for h in result.results if Path(h.slide["path"]).name == name), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--crop", type=int, default=700)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="region-scale-"))
    slides = [REAL / SOURCE, REAL / "tcga-cr-7395-01a-01-ts1.svs"]
    slides += [
        write_pyramidal_tiff(work / "src" / f"blobs-{s}.tiff", tissue_blobs(1800, 1800, seed=s, n_blobs=4), mpp=0.5)
        for s in (31, 32)
    ]
    settings = make_indexed_archive(work / "archive", slides, default_mpp=0.5)
    engine = SearchEngine(settings)
    image, mpp = query_image(REAL / SOURCE, args.crop)
    engine.search_region(image, mpp=mpp, top_k=5)  # warm-up: caches, encoder fast path
    engine.search_region(image, top_k=5)
    known, unknown = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        rk = engine.search_region(image, mpp=mpp, top_k=5)
        known.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        ru = engine.search_region(image, top_k=5)
        unknown.append((time.perf_counter() - t) * 1000)
    k50, u50 = statistics.median(known), statistics.median(unknown)
    scale = ru.query["scale"]
    print(
        json.dumps(
            {
                "known_p50_ms": round(k50, 1),
                "unknown_p50_ms": round(u50, 1),
                "ratio": round(u50 / k50, 2),
                "true_mpp": mpp,
                "estimated_mpp": scale["estimated_mpp"],
                "evidence": scale["evidence"],
                "source_rank_known": rank_of(rk, SOURCE),
                "source_rank_unknown": rank_of(ru, SOURCE),
                "candidates": scale["candidates"],
                "timing_unknown_ms": {k: round(v, 1) for k, v in ru.timing_ms.items()},
                "timing_known_ms": {k: round(v, 1) for k, v in rk.timing_ms.items()},
                "repeats": args.repeats,
                "crop_px": args.crop,
            },
            indent=1,
        )
    )
    engine.catalog.dispose()


if __name__ == "__main__":
    main()
