"""Folder per class (Kather 2016 `01_TUMOR/*.tif`, NCT-CRC-HE-100K `ADI/*.tif`, ...): the
label is the name of the top-level folder an image sits in (recursively below it)."""

from __future__ import annotations

import re
from pathlib import Path

from engine.errors import DatasetError
from engine.evaluation.datasets.base import Item, LabelledSet
from engine.images import IMAGE_SUFFIXES

# Kather 2016 tile names carry their source image, e.g. 1A11_CRC-Prim-HE-07_022.tif_Row_601_Col_151.tif:
# tiles of one source image must not retrieve each other, like tiles of one slide.
KATHER2016_SOURCE = re.compile(r"_(CRC-Prim-HE-\d+)[_.]")


def load_folder(root: Path, *, mpp: float | None = None) -> LabelledSet:
    """Every image below ROOT/CLASS/ becomes an item of label CLASS. When every file name
    names its Kather 2016 source image, that is the item's slide; otherwise these layouts
    say nothing about slides or patients and only the image itself is excluded."""
    if not root.is_dir():
        raise DatasetError(f"folder data set: {root} is not a folder (expected ROOT/CLASS/image files)")
    found = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found.extend(
            (class_dir.name, p)
            for p in sorted(class_dir.rglob("*"))
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
    if not found:
        raise DatasetError(
            f"folder data set: no images in class sub-folders of {root} (expected ROOT/CLASS/*.tif|png|jpg)"
        )
    sources = [KATHER2016_SOURCE.search(p.name) for _, p in found]
    named = all(sources)
    items = [
        Item(key=p.relative_to(root).as_posix(), label=label, path=p, slide=m.group(1) if named else None, mpp=mpp)
        for (label, p), m in zip(found, sources)
    ]
    notes = ["slide = the CRC-Prim-HE-NN source image named in each Kather 2016 file name"] if named else []
    return LabelledSet("folder", root, items, label_column="folder", notes=notes)
