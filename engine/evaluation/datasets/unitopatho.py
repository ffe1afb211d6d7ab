"""UniToPatho as distributed (`unitopath-public/{800,7000,7000_224}/`): class folders of PNG
crops plus train.csv / test.csv with the columns

    image_id,top_label_name,top_label,type_name,type,grade_name,grade,wsi,roi,mpp,x,y,w,h

The image of a row is `<resolution folder>/<top_label_name>/<image_id>`, as the official
loader reads it. Slide id = `wsi`; every slide is a different patient (the data set's own
description), so slide and patient exclusion are the same here. Both CSVs are read: the
benchmark searches leave-one-out over the whole set, never across a fixed split.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from engine.errors import DatasetError
from engine.evaluation.datasets.base import Item, LabelledSet

LOG = logging.getLogger(__name__)
COLUMNS = (
    "image_id",
    "top_label_name",
    "top_label",
    "type_name",
    "type",
    "grade_name",
    "grade",
    "wsi",
    "roi",
    "mpp",
    "x",
    "y",
    "w",
    "h",
)
LABEL_COLUMNS = ("top_label_name", "type_name", "grade_name")
# Hamamatsu NanoZoomer S210 at 20x (the data set's description); the CSV's mpp column and the
# file names round it to 0.44
SCAN_MPP = 0.4415
SPLITS = ("train.csv", "test.csv")


def _resolution_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "train.csv").is_file())


def load_unitopatho(root: Path, *, label_column: str = "top_label_name") -> LabelledSet:
    """ROOT is one resolution folder (e.g. unitopath-public/800 or .../7000_224).

    label_column: top_label_name (6 classes, default), type_name (HP/NORM/TA/TVA) or
    grade_name (LG/HG; rows of HP and NORM, whose grade is -1, are left out as in the
    official train.py).
    """
    if label_column not in LABEL_COLUMNS:
        raise DatasetError(
            f"unitopatho: --label-column must be one of {', '.join(LABEL_COLUMNS)}, not {label_column!r}"
        )
    if not (root / "train.csv").is_file():
        found = _resolution_folders(root) if root.is_dir() else []
        hint = (
            f"; pick one of its resolution folders: {', '.join(str(root / f) for f in found)}"
            if found
            else " (expected unitopath-public/800, 7000 or 7000_224)"
        )
        raise DatasetError(f"unitopatho: no train.csv in {root}{hint}")
    # 7000_224 holds 224 px copies of the 7000 crops: their mpp is the crop's level-0 width
    # over 224 px, not the scan's.
    resized_px = 224 if root.name.endswith("_224") else None
    items: list[Item] = []
    missing: list[str] = []
    left_out = 0
    for split in SPLITS:
        path = root / split
        if not path.is_file():
            raise DatasetError(f"unitopatho: {path} is missing (a resolution folder has train.csv and test.csv)")
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            absent = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if absent:
                raise DatasetError(f"unitopatho: {path} lacks the columns {absent}; is this the distributed CSV?")
            for row in reader:
                label = row[label_column].strip()
                if not label:
                    left_out += 1
                    continue
                image = root / row["top_label_name"] / row["image_id"]
                if not image.is_file():
                    missing.append(image.relative_to(root).as_posix())
                    continue
                mpp = SCAN_MPP * float(row["w"]) / resized_px if resized_px else SCAN_MPP
                wsi = row["wsi"].strip()
                items.append(
                    Item(
                        key=f"{row['top_label_name']}/{row['image_id']}",
                        label=label,
                        path=image,
                        slide=wsi,
                        patient=wsi,
                        mpp=mpp,
                    )
                )
    if missing:
        raise DatasetError(
            f"unitopatho: {len(missing)} images listed in the CSVs are missing under {root}, e.g. {missing[:3]}"
        )
    notes = ["slide = the wsi column; each slide is a different patient (data set description)"]
    if left_out:
        notes.append(f"{left_out} rows without a {label_column} (HP/NORM for grade) left out")
    return LabelledSet("unitopatho", root, items, label_column=label_column, notes=notes)
