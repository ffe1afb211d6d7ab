"""Tissue-mask speed and tissue fractions (issue 13, point 4). Prints one JSON document.

    python bench/tissue.py                      # ../shared/data images, 2 Mpx region
    python bench/tissue.py --repeats 9

Timing: `tissue_mask_rgb` on a 2 Mpx crop (1414 x 1414) of the HistoPrep slide thumbnail,
the largest region query the webapp sends, and on the CMU-1-Small-Region slide thumbnail;
the median of --repeats runs after one warm-up. Fractions: the tissue fraction of every
all-tissue field and every no-tissue tile that tests/test_tissue.py checks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.tissue import slide_thumbnail, tissue_mask_rgb  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def _median_ms(rgb: np.ndarray, repeats: int) -> float:
    tissue_mask_rgb(rgb)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tissue_mask_rgb(rgb)
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)) * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    out: dict = {"timing_ms": {}, "fractions": {}}
    region = np.asarray(Image.open(SHARED / "images" / "histoprep" / "slide.jpeg").convert("RGB"))
    out["timing_ms"]["region_2mpx"] = _median_ms(np.ascontiguousarray(region[:1414, :1414]), args.repeats)
    import openslide

    slide = openslide.OpenSlide(str(SHARED / "slides" / "real" / "CMU-1-Small-Region.svs"))
    thumb, _ = slide_thumbnail(slide)
    slide.close()
    out["timing_ms"][f"cmu1_thumbnail_{thumb.shape[1]}x{thumb.shape[0]}"] = _median_ms(thumb, args.repeats)
    out["fractions"]["cmu1_thumbnail"] = round(float(tissue_mask_rgb(thumb).mean()), 3)

    from tests.test_tissue import ALL_TISSUE, NO_TISSUE

    for kind, paths in (("all_tissue", ALL_TISSUE), ("no_tissue", NO_TISSUE)):
        fr = {
            p: round(float(tissue_mask_rgb(np.asarray(Image.open(SHARED / p).convert("RGB"))).mean()), 3) for p in paths
        }
        out["fractions"][kind] = fr
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
