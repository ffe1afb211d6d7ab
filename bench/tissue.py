"""Tissue-mask speed and tissue fractions (issue 13, point 4). Prints one JSON document.

    python bench/tissue.py                      # ../shared/data images, 2 Mpx region
    python bench/tissue.py --repeats 9

Timing: `tissue_mask_rgb` on a 2 Mpx crop (1414 x 1414) of the HistoPrep slide thumbnail,
the largest region query the webapp sends, without an mpp (as region queries call it now)
and with mpp=0.5 (fat filling on: its distance transforms run when a glass space is cut by
the edge), on the 1000 x 1000 TCGA H&E region with mpp=0.5, and on the CMU-1-Small-Region
slide thumbnail; the median of --repeats runs after one warm-up. Fractions: the tissue
fraction of every all-tissue field and every no-tissue tile that tests/test_tissue.py checks,
at the um/px that test gives it (labels.csv's, where known).
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


def _median_ms(rgb: np.ndarray, repeats: int, mpp: float | None = None) -> float:
    tissue_mask_rgb(rgb, mpp=mpp)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tissue_mask_rgb(rgb, mpp=mpp)
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)) * 1000, 1)


def _fraction(path: Path, mpp: float | None) -> float:
    return round(float(tissue_mask_rgb(np.asarray(Image.open(path).convert("RGB")), mpp=mpp).mean()), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    out: dict = {"timing_ms": {}, "fractions": {}}
    region = np.asarray(Image.open(SHARED / "images" / "histoprep" / "slide.jpeg").convert("RGB"))
    crop = np.ascontiguousarray(region[:1414, :1414])
    out["timing_ms"]["region_2mpx"] = _median_ms(crop, args.repeats)
    out["timing_ms"]["region_2mpx_mpp0.5"] = _median_ms(crop, args.repeats, mpp=0.5)
    tcga = np.asarray(Image.open(SHARED / "images" / "tiatoolbox" / "TCGA-HE-7130-01Z-00-DX1.png").convert("RGB"))
    out["timing_ms"]["tcga_1mpx_mpp0.5"] = _median_ms(tcga, args.repeats, mpp=0.5)
    import openslide

    slide = openslide.OpenSlide(str(SHARED / "slides" / "real" / "CMU-1-Small-Region.svs"))
    thumb, _ = slide_thumbnail(slide)
    slide.close()
    out["timing_ms"][f"cmu1_thumbnail_{thumb.shape[1]}x{thumb.shape[0]}"] = _median_ms(thumb, args.repeats)
    out["fractions"]["cmu1_thumbnail"] = round(float(tissue_mask_rgb(thumb).mean()), 3)

    from tests.test_tissue import ALL_TISSUE, MPP, NO_TISSUE

    for kind, paths in (("all_tissue", ALL_TISSUE), ("no_tissue", NO_TISSUE)):
        out["fractions"][kind] = {p: _fraction(SHARED / p, MPP.get(p)) for p in paths}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
