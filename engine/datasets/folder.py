"""Folder per class (Kather 2016 `01_TUMOR/*.tif`, NCT-CRC-HE-100K `ADI/*.tif`, ...): the
label is the name of the top-level folder an image sits in (recursively below it)."""

from __future__ import annotations

from pathlib import Path

from engine.datasets.base import Item, LabelledSet
from engine.errors import DatasetError
from engine.images import IMAGE_SUFFIXES


def load_folder(root: Path, *, mpp: float | None = None) -> LabelledSet:
    """Every image below ROOT/CLASS/ becomes an item of label CLASS. These layouts say
    nothing about slides or patients, so only the image itself is excluded."""
    if not root.is_dir():
        raise DatasetError(f"folder data set: {root} is not a folder (expected ROOT/CLASS/image files)")
    items = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                items.append(Item(key=path.relative_to(root).as_posix(), label=class_dir.name, path=path, mpp=mpp))
    if not items:
        raise DatasetError(f"folder data set: no images in class sub-folders of {root} (expected ROOT/CLASS/*.tif|png|jpg)")
    return LabelledSet("folder", root, items, label_column="folder")
