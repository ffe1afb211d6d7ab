"""A CSV listing images: a path column (relative to the CSV's folder, or absolute), a label
column, optional slide / patient / mpp columns. `../shared/data/patches/labels.csv` is one."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from engine.errors import DatasetError
from engine.evaluation.datasets.base import Item, LabelledSet, optional_float

LOG = logging.getLogger(__name__)
MPP_COLUMNS = ("mpp", "mpp_um")


def _pick(header: list[str], asked: str | None, default: str, role: str) -> str | None:
    if asked is not None:
        if asked not in header:
            raise DatasetError(f"CSV has no {role} column {asked!r}; its columns are: {', '.join(header)}")
        return asked
    return default if default in header else None


def load_csv(
    path: Path,
    *,
    label_column: str = "label",
    path_column: str = "path",
    slide_column: str | None = None,
    patient_column: str | None = None,
) -> LabelledSet:
    """Rows with an empty label are left out (and counted in the notes): a CSV often has
    several label columns, not all filled for every image. Missing image files are an error
    naming the first few, since a benchmark on a silently smaller set would mislead."""
    if not path.is_file():
        raise DatasetError(f"csv data set: {path} is not a file")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    label_col = _pick(header, label_column, label_column, "label")
    path_col = _pick(header, path_column, path_column, "path")
    slide_col = _pick(header, slide_column, "slide", "slide")
    patient_col = _pick(header, patient_column, "patient", "patient")
    mpp_col = next((c for c in MPP_COLUMNS if c in header), None)
    base = path.parent
    items, missing, unlabelled = [], [], 0
    for row in rows:
        label = (row.get(label_col) or "").strip()
        if not label:
            unlabelled += 1
            continue
        rel = row[path_col].strip()
        image = Path(rel) if Path(rel).is_absolute() else base / rel
        if not image.is_file():
            missing.append(rel)
            continue
        items.append(
            Item(
                key=rel,
                label=label,
                path=image,
                slide=(row.get(slide_col) or "").strip() or None if slide_col else None,
                patient=(row.get(patient_col) or "").strip() or None if patient_col else None,
                mpp=optional_float(row.get(mpp_col)) if mpp_col else None,
            )
        )
    if missing:
        raise DatasetError(
            f"csv data set: {len(missing)} image files listed in {path} do not exist, e.g. {missing[:3]} (paths are relative to the CSV's folder)"
        )
    notes = []
    if unlabelled:
        notes.append(f"{unlabelled} rows without a {label_col!r} value left out")
        LOG.info("%d rows of %s have no %r value and are left out", unlabelled, path.name, label_col)
    return LabelledSet("csv", path, items, label_column=label_col, notes=notes)
