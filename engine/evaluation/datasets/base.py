"""What every benchmark data set loader returns: labelled items (image files, or level-0
boxes of slides) with the slide and patient they come from, for leave-one-out exclusion."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.errors import DatasetError

EXCLUSIONS = ("image", "slide", "patient")


@dataclasses.dataclass(frozen=True)
class Item:
    """One labelled patch.

    key:     stable identity inside the data set (relative path, or annotation id + index)
    path:    the image file, or the slide file when `box` is set
    box:     level-0 (x, y, size0) square of the slide to read, None for image files
    mpp:     microns per pixel of the image file, or of the slide's level 0 (None: unknown)
    """

    key: str
    label: str
    path: Path
    slide: str | None = None
    patient: str | None = None
    box: tuple[int, int, int] | None = None
    mpp: float | None = None


@dataclasses.dataclass
class LabelledSet:
    """A benchmark data set: items plus what it is (kind, root, label column) and notes that
    the report repeats (e.g. coordinate conventions, rows skipped)."""

    kind: str
    root: Path
    items: list[Item]
    label_column: str
    notes: list[str] = dataclasses.field(default_factory=list)
    #: mpp the loader already cut slide patches at (TissueNet); None for image sets
    cut_mpp: float | None = None

    def __post_init__(self):
        if not self.items:
            raise DatasetError(f"{self.kind} data set at {self.root} has no labelled items")

    @property
    def labels(self) -> list[str]:
        return [item.label for item in self.items]

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    def has(self, exclusion: str) -> bool:
        """Whether the data set says, for every item, which slide/patient it is from."""
        if exclusion == "image":
            return True
        return all(getattr(item, exclusion) for item in self.items)

    def strictest_exclusion(self) -> str:
        """patient when known for every item, else slide, else image."""
        return next(e for e in ("patient", "slide", "image") if self.has(e))

    def groups(self, exclusion: str) -> np.ndarray:
        """Integer exclusion group per item: equal codes are never each other's results."""
        if exclusion not in EXCLUSIONS:
            raise ValueError(f"exclusion must be one of {EXCLUSIONS}, not {exclusion!r}")
        if exclusion == "image":
            return np.arange(len(self.items), dtype=np.int64)
        if not self.has(exclusion):
            missing = sum(1 for item in self.items if not getattr(item, exclusion))
            raise DatasetError(
                f"--exclude {exclusion}: {missing} of {len(self.items)} items of this {self.kind} data set have no "
                f"{exclusion} id; give a {exclusion} column, or use --exclude "
                f"{'slide' if exclusion == 'patient' and self.has('slide') else 'image'}"
            )
        codes: dict[str, int] = {}
        return np.array([codes.setdefault(getattr(item, exclusion), len(codes)) for item in self.items], np.int64)

    def counts(self) -> dict:
        per_class = collections.Counter(self.labels)  # one pass, not one per class
        return {
            "items": len(self.items),
            "classes": len(per_class),
            "slides": len({i.slide for i in self.items if i.slide}),
            "patients": len({i.patient for i in self.items if i.patient}),
            "per_class": {c: per_class[c] for c in sorted(per_class)},
        }

    def fingerprint(self) -> str:
        """sha256 of everything that decides the features: items, boxes and resolutions."""
        rows = [[i.key, str(i.path), i.box, i.mpp] for i in self.items]
        return hashlib.sha256(json.dumps([self.kind, rows]).encode()).hexdigest()


def parse_spec(spec: str, kinds: Sequence[str]) -> tuple[str, Path]:
    """'KIND:PATH' -> (kind, path); a clear error for anything else."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in kinds or not path:
        raise DatasetError(
            f"--dataset must be KIND:PATH with KIND one of {', '.join(kinds)} (e.g. csv:patches/labels.csv), not {spec!r}"
        )
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"{kind} data set: {p} does not exist")
    return kind, p


def optional_float(value: str | None) -> float | None:
    try:
        x = float(value) if value not in (None, "") else None
    except ValueError:
        return None
    return x if x is not None and x > 0 else None
