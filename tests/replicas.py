"""Miniature replicas of UniToPatho and TissueNet in their published layouts (as the data sets' own documentation gives them),
built from the real split/CSV rows under ../shared/data/datasets and real patches under
../shared/data/patches. They exercise the loaders on the real names (spaces, commas and
parentheses in UniToPatho file names; WKT squares with a bottom-left y origin in TissueNet).

UniToPatho: `unitopath-public/7000_224/<CLASS>/<image_id>` (224 px PNGs) with train.csv and
test.csv in the distributed column order, rows taken from the real 7000 split file.

TissueNet: the real metadata / annotation / label rows of a few slides, with every
coordinate, width, height and the resolution scaled by 1/scale so that the pyramidal TIFFs
stay small while the squares still span 300 um; each annotated square is painted with a
real patch (one source class per TissueNet class) on white glass, at its y-flipped place.
"""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from tests.synthetic_slides import write_pyramidal_tiff

UNITO_COLUMNS = [
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
]
UNITO_TOP = {"HP": 0, "NORM": 1, "TA.HG": 2, "TA.LG": 3, "TVA.HG": 4, "TVA.LG": 5}
UNITO_TYPE = {"HP": 0, "NORM": 1, "TA": 2, "TVA": 3}
UNITO_GRADE = {"LG": 0, "HG": 1}
# real patches (CRC-VAL-HE-7K classes) standing in for each replica class
UNITO_SOURCE = {"HP": "MUC", "NORM": "NORM", "TA.HG": "TUM", "TA.LG": "STR", "TVA.HG": "LYM", "TVA.LG": "DEB"}
TISSUENET_SOURCE = {"0": "NORM", "1": "STR", "2": "LYM", "3": "TUM"}
# two small real slides per TissueNet class, so leave-one-slide-out has something to find
TISSUENET_SLIDES = (
    "C20_B002_S20_pyr.tif",
    "C12_B566_S12.tif",
    "C10_B006_S10.tif",
    "C20_B001_S20_pyr.tif",
    "C12_B401_S12.tif",
    "C02_B104_S21.tif",
    "C09_B045_S09.tif",
    "C12_B186_S12.tif",
)
_NAME = re.compile(
    r"^(?P<wsi>.+?)\.ndpi_ROI__mpp(?P<mpp>[\d.]+)_reg(?P<roi>\d+)_crop_sk\d+_\((?P<x>\d+),(?P<y>\d+),(?P<w>\d+),(?P<h>\d+)\)\.png$"
)


def source_patches(shared: Path, nct_class: str) -> list[Path]:
    """The real CRC-VAL-HE-7K patches of one NCT class listed in patches/labels.csv."""
    with open(shared / "patches" / "labels.csv", newline="") as fh:
        rows = [
            r for r in csv.DictReader(fh) if r["path"].startswith("crc-val-he-7k/") and r["label_nct9"] == nct_class
        ]
    return [shared / "patches" / r["path"] for r in rows]


def variant(path: Path, n: int, size: int) -> Image.Image:
    """The n-th distinct view (rotation, flip) of a real patch, resized to size x size."""
    img = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    img = img.rotate(90 * (n % 4))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if (n // 4) % 2 else img


def read_unitopatho_split(yml: Path) -> tuple[list[tuple[str, str]], set[int]]:
    """(label, location) of every image and the test indices, from a DeepHealth split file
    (a plain line scan: the file has one key per line, so no YAML library is needed)."""
    images: list[tuple[str, str]] = []
    test: set[int] = set()
    section = None
    label = None
    for line in yml.read_text().splitlines():
        if line.startswith("- label: "):
            label = line[len("- label: ") :].strip()
        elif line.startswith("  location: "):
            images.append((label, line[len("  location: ") :].strip()))
        elif line.startswith("  ") and line.strip().endswith(":") and not line.startswith("   "):
            section = line.strip()[:-1]
        elif line.startswith("  - ") and section == "test":
            test.add(int(line[4:]))
    return images, test


def unitopatho_row(label: str, location: str) -> dict:
    image_id = location.split("/", 1)[1]
    m = _NAME.match(image_id)
    if m is None:
        raise ValueError(f"unexpected UniToPatho name {image_id!r}")
    type_name, _, grade_name = label.partition(".")
    return {
        "image_id": image_id,
        "top_label_name": label,
        "top_label": UNITO_TOP[label],
        "type_name": type_name,
        "type": UNITO_TYPE[type_name],
        "grade_name": grade_name,
        "grade": UNITO_GRADE.get(grade_name, -1),
        "wsi": image_id.split(".ndpi")[0],
        "roi": int(m["roi"]),
        "mpp": m["mpp"],
        "x": m["x"],
        "y": m["y"],
        "w": m["w"],
        "h": m["h"],
    }


def make_unitopatho_replica(root: Path, shared: Path, *, slides_per_class: int = 2, images_per_slide: int = 2) -> Path:
    """Build root/unitopath-public/7000_224 from real 7000 rows; returns that folder."""
    images, test = read_unitopatho_split(shared / "datasets" / "unitopatho" / "unitopath-public-7000.yml")
    by_slide: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, (label, location) in enumerate(images):
        by_slide[(label, location.split("/", 1)[1].split(".ndpi")[0])].append(i)
    chosen: list[int] = []
    for label in UNITO_TOP:
        slides = sorted(
            (s for s in by_slide if s[0] == label and len(by_slide[s]) >= images_per_slide), key=lambda s: s[1]
        )
        for s in slides[:slides_per_class]:
            chosen.extend(by_slide[s][:images_per_slide])
    folder = root / "unitopath-public" / "7000_224"
    splits: dict[str, list[dict]] = {"train.csv": [], "test.csv": []}
    for n, i in enumerate(chosen):
        label, location = images[i]
        row = unitopatho_row(label, location)
        sources = source_patches(shared, UNITO_SOURCE[label])
        out = folder / label / row["image_id"]
        out.parent.mkdir(parents=True, exist_ok=True)
        variant(sources[n % len(sources)], n, 224).save(out)
        splits["test.csv" if i in test else "train.csv"].append(row)
    for name, rows in splits.items():
        with open(folder / name, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=UNITO_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    return folder


def _scaled_polygon(wkt: str, scale: float) -> str:
    values = [float(v) / scale for v in re.findall(r"-?\d+(?:\.\d+)?", wkt)]
    pairs = ", ".join(f"{x} {y}" for x, y in zip(values[0::2], values[1::2]))
    return f"POLYGON (({pairs}))"


def make_tissuenet_replica(
    root: Path, shared: Path, *, slides: tuple[str, ...] = TISSUENET_SLIDES, max_side_px: int = 2400
) -> Path:
    """Build root/tissuenet with the three CSVs (real rows of `slides`, scaled) and
    tif_images/<filename>; returns root/tissuenet."""
    src = shared / "datasets" / "tissuenet"
    out = root / "tissuenet"
    (out / "tif_images").mkdir(parents=True, exist_ok=True)
    files = {p.name.split("_")[1] if p.name.startswith("train_") else p.name: p for p in src.glob("*.csv")}
    tables = {}
    for key in ("metadata", "annotations", "labels.csv"):
        with open(files[key], newline="") as fh:
            reader = csv.DictReader(fh)
            tables[key] = (reader.fieldnames, [r for r in reader if r["filename"] in slides])
    scales = {}
    for row in tables["metadata"][1]:
        width, height = int(row["width"]), int(row["height"])
        scale = max(1, math.ceil(max(width, height) / max_side_px))
        scales[row["filename"]] = scale
        row["width"], row["height"] = str(math.ceil(width / scale)), str(math.ceil(height / scale))
        row["resolution"] = repr(float(row["resolution"]) * scale)
    meta = {r["filename"]: r for r in tables["metadata"][1]}
    for row in tables["annotations"][1]:
        row["geometry"] = _scaled_polygon(row["geometry"], scales[row["filename"]])
    for key, (fields, rows) in tables.items():
        with open(out / files[key].name, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    counter = 0
    for name in slides:
        width, height = int(meta[name]["width"]), int(meta[name]["height"])
        rgb = np.full((height, width, 3), 245, np.uint8)
        for row in (r for r in tables["annotations"][1] if r["filename"] == name):
            values = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", row["geometry"])]
            x0, x1 = int(round(min(values[0::2]))), int(round(max(values[0::2])))
            top = height - int(round(max(values[1::2])))  # the CSV's y axis points up from the bottom
            sources = source_patches(shared, TISSUENET_SOURCE[row["annotation_class"]])
            patch = variant(sources[counter % len(sources)], counter, x1 - x0)
            counter += 1
            rgb[top : top + patch.height, x0 : x0 + patch.width] = np.asarray(patch)[: height - top, : width - x0]
        write_pyramidal_tiff(out / "tif_images" / name, rgb, float(meta[name]["resolution"]), min_level_px=256)
    return out
