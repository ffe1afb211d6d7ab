"""Benchmark data sets: `load_dataset("KIND:PATH", ...)` for the kinds

- folder:     ROOT/CLASS/*.tif|png|jpg (Kather 2016, NCT-CRC-HE-100K, CRC-VAL-HE-7K)
- csv:        a CSV of image paths (relative to it) and labels, optional slide/patient
- unitopatho: one resolution folder of UniToPatho as distributed (800, 7000, 7000_224)
- tissuenet:  TissueNet slides + annotation CSVs; patches cut in the annotated squares
"""

from __future__ import annotations

from engine.errors import DatasetError
from engine.evaluation.datasets.base import EXCLUSIONS, Item, LabelledSet, parse_spec
from engine.evaluation.datasets.csv_table import load_csv
from engine.evaluation.datasets.folder import load_folder
from engine.evaluation.datasets.tissuenet import load_tissuenet
from engine.evaluation.datasets.unitopatho import load_unitopatho

KINDS = ("folder", "csv", "unitopatho", "tissuenet")

__all__ = ["EXCLUSIONS", "KINDS", "Item", "LabelledSet", "load_dataset"]


def load_dataset(
    spec: str,
    *,
    label_column: str | None = None,
    slide_column: str | None = None,
    patient_column: str | None = None,
    mpp: float | None = None,
    default_mpp: float = 1.0,
    tile_px: int = 224,
) -> LabelledSet:
    """Load a data set from 'KIND:PATH'.

    label_column: which label to benchmark (csv: default `label`; unitopatho: default
                  `top_label_name`); not accepted by folder and tissuenet
    mpp:          resolution to cut/rescale patches at. tissuenet always cuts at a resolution
                  (`mpp`, else `default_mpp`); image sets resize whole patches to tile_px
                  unless `mpp` is given and the patch's own mpp is known
    """
    kind, path = parse_spec(spec, KINDS)
    if label_column is not None and kind in ("folder", "tissuenet"):
        raise DatasetError(f"--label-column does not apply to {kind} data sets (their label is fixed by the layout)")
    if (slide_column or patient_column) and kind != "csv":
        raise DatasetError("--slide-column / --patient-column apply to csv data sets only")
    if kind == "folder":
        return load_folder(path)
    if kind == "csv":
        return load_csv(
            path, label_column=label_column or "label", slide_column=slide_column, patient_column=patient_column
        )
    if kind == "unitopatho":
        return load_unitopatho(path, label_column=label_column or "top_label_name")
    return load_tissuenet(path, mpp=mpp or default_mpp, tile_px=tile_px)
