"""TissueNet (DrivenData cervical biopsies, 2020) as distributed: pyramidal TIF slides plus
`train_metadata_*.csv` (filename, width, height, resolution, ...) and
`train_annotations_*.csv` (annotation_id, filename, geometry, annotation_class, ...).

Each annotation is a 300 um axis-aligned square, a WKT polygon in level-0 pixels whose
y axis points UP from the bottom-left corner of the slide (the convention competitor code
uses: y_image = height - y); patches of `tile_px` pixels at `mpp` microns per pixel are cut
on a grid centred inside every square. Slide id = filename; TissueNet says nothing about
patients, so slide exclusion is the strictest available.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from pathlib import Path

from engine.errors import DatasetError
from engine.evaluation.datasets.base import Item, LabelledSet

LOG = logging.getLogger(__name__)
CLASS_NAMES = {"0": "0 benign", "1": "1 low-grade SIL", "2": "2 high-grade SIL", "3": "3 squamous carcinoma"}
SLIDE_FOLDERS = (".", "tif_images", "train/tif_images", "train")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def parse_square(wkt: str) -> tuple[float, float, float, float]:
    """WKT POLYGON -> (x_min, y_min, x_max, y_max) in the CSV's own (bottom-left) frame."""
    if not wkt.strip().upper().startswith("POLYGON"):
        raise DatasetError(f"tissuenet: geometry is not a WKT POLYGON: {wkt[:60]!r}")
    values = [float(v) for v in _NUMBER.findall(wkt)]
    if len(values) < 8 or len(values) % 2:
        raise DatasetError(f"tissuenet: cannot read the polygon {wkt[:60]!r}")
    xs, ys = values[0::2], values[1::2]
    return min(xs), min(ys), max(xs), max(ys)


def _one_csv(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if len(found) != 1:
        what = "none" if not found else ", ".join(p.name for p in found)
        raise DatasetError(f"tissuenet: expected one {pattern} in {root}, found {what}")
    return found[0]


def _find_slides(root: Path, names: set[str]) -> dict[str, Path]:
    where: dict[str, Path] = {}
    for folder in SLIDE_FOLDERS:
        for name in names - set(where):
            path = root / folder / name
            if path.is_file():
                where[name] = path
    return where


def patch_grid(square: tuple[float, float, float, float], height: int, size0: int) -> list[tuple[int, int]]:
    """Level-0 top-left corners (image frame, y down) of the size0 x size0 patches that fit
    in the square, on a grid centred inside it."""
    x0, y0, x1, y1 = square
    side_x, side_y = x1 - x0, y1 - y0
    nx, ny = int(side_x // size0), int(side_y // size0)
    top = height - y1  # the square's top edge in the image frame
    off_x = x0 + (side_x - nx * size0) / 2
    off_y = top + (side_y - ny * size0) / 2
    return [(int(round(off_x + i * size0)), int(round(off_y + j * size0))) for j in range(ny) for i in range(nx)]


def load_tissuenet(root: Path, *, mpp: float, tile_px: int) -> LabelledSet:
    """ROOT holds the metadata and annotation CSVs and the slides (in ROOT, ROOT/tif_images
    or ROOT/train/tif_images). Annotations of slides that are not there are left out with a
    warning (the full set is ~1 TB; a subset is normal); none there is an error."""
    if not root.is_dir():
        raise DatasetError(f"tissuenet: {root} is not a folder (expected the CSVs and tif_images/)")
    with open(_one_csv(root, "train_metadata*.csv"), newline="", encoding="utf-8") as fh:
        meta = {row["filename"]: row for row in csv.DictReader(fh)}
    with open(_one_csv(root, "train_annotations*.csv"), newline="", encoding="utf-8") as fh:
        annotations = list(csv.DictReader(fh))
    slides = _find_slides(root, {row["filename"] for row in annotations})
    if not slides:
        raise DatasetError(
            f"tissuenet: none of the {len({r['filename'] for r in annotations})} annotated slides is in {root} or its tif_images/ folder"
        )
    items: list[Item] = []
    absent = 0
    for row in annotations:
        name = row["filename"]
        if name not in slides:
            absent += 1
            continue
        if name not in meta:
            raise DatasetError(f"tissuenet: slide {name} is annotated but not in the metadata CSV")
        slide_mpp = float(meta[name]["resolution"])
        height = int(meta[name]["height"])
        size0 = max(1, int(round(tile_px * mpp / slide_mpp)))
        square = parse_square(row["geometry"])
        corners = patch_grid(square, height, size0)
        if not corners:
            side_um = (square[2] - square[0]) * slide_mpp
            raise DatasetError(
                f"tissuenet: a {tile_px} px patch at {mpp} um/px ({tile_px * mpp:.0f} um) does not fit in the "
                f"{side_um:.0f} um annotation {row['annotation_id']}; use --mpp <= {math.floor(side_um / tile_px * 100) / 100}"
            )
        label = CLASS_NAMES.get(row["annotation_class"].strip(), row["annotation_class"].strip())
        for i, (x, y) in enumerate(corners):
            items.append(
                Item(
                    key=f"{row['annotation_id']}#{i}",
                    label=label,
                    path=slides[name],
                    slide=name,
                    box=(x, y, size0),
                    mpp=slide_mpp,
                )
            )
    notes = [
        "annotation squares read with a bottom-left y origin (y_image = height - y)",
        f"patches of {tile_px} px at {mpp} um/px on a grid centred in each annotated square",
    ]
    if absent:
        notes.append(
            f"{absent} annotations of {len({r['filename'] for r in annotations}) - len(slides)} slides not present were left out"
        )
        LOG.warning("tissuenet: %d annotations are on slides that are not in %s; they are left out", absent, root)
    return LabelledSet("tissuenet", root, items, label_column="annotation_class", notes=notes, cut_mpp=mpp)
