"""Demo cases of different tissues and diagnoses, made from the real labelled images of the
shared test data (../shared/data, or HISTOSEEK_SHARED_DATA) when it is at hand.

Each case is a small pyramidal TIFF that OpenSlide reads: the patches of one tissue class
(Kather et al. 2016 and 2018, CC BY 4.0: tumour epithelium, stroma, lymphocytes, mucosa, ...)
or of one TCGA slide (Komura & Ishikawa 2021 uniform-tumour tiles: cholangiocarcinoma,
colorectal adenocarcinoma), laid out side by side on glass at 0.5 um/px, each turned by one of
the 8 rotations/mirrorings so a case does not repeat one picture. Every case carries its own
metadata (patient, site, diagnosis, label), so search results show real diagnoses and the
majority vote means something -- with random weights it is still not for diagnosis.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from engine.images import resize_bilinear
from engine.pyramid_tiff import write_pyramidal_tiff

LOG = logging.getLogger(__name__)

CASE_MPP = 0.5
CASE_PX = 1536  # a case is 0.77 x 0.77 mm at CASE_MPP: ~36 tiles of 224 px at 1 um/px

# NCT-9 class -> (diagnosis or tissue, site) as the data sets describe them
TISSUES = {
    "TUM": ("colorectal adenocarcinoma, tumour epithelium", "colorectum"),
    "NORM": ("normal colon mucosa", "colorectum"),
    "STR": ("cancer-associated stroma", "colorectum"),
    "LYM": ("lymphocytes", "colorectum"),
    "MUC": ("mucus", "colorectum"),
    "MUS": ("smooth muscle", "colorectum"),
    "DEB": ("debris and necrosis", "colorectum"),
    "ADI": ("adipose tissue", "colorectum"),
}
# TCGA slides of uniform tumour tiles: folder -> (patient, project, diagnosis, site)
TCGA_CASES = {
    "TCGA-3X-AAVA-01Z-00-DX1": ("TCGA-3X-AAVA", "TCGA-CHOL", "cholangiocarcinoma", "bile duct"),
    "TCGA-AD-6964-01Z-00-DX1": ("TCGA-AD-6964", "TCGA-COAD", "colorectal adenocarcinoma", "colorectum"),
}


def find_shared_data(env: dict | None = None) -> Path | None:
    """The shared test data folder: HISTOSEEK_SHARED_DATA, else ../shared/data beside the
    checkout; None when neither exists (a fresh machine: the demo then has CMU-1 only)."""
    env = os.environ if env is None else env
    candidates = [env.get("HISTOSEEK_SHARED_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "patches" / "labels.csv").is_file():
            return Path(candidate)
    return None


def _turn(rgb: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 rotations/mirrorings of a patch."""
    out = np.rot90(rgb, k % 4)
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


def _at_case_mpp(path: Path, mpp: float) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB"))
    size = round(rgb.shape[1] * mpp / CASE_MPP)
    return rgb if size == rgb.shape[1] else resize_bilinear(rgb, size)


def case_image(patches: list[np.ndarray]) -> np.ndarray:
    """The patches edge to edge in rows (largest first, so rows hold patches of one size and
    the index's tiles see tissue, not the glass between patches), cycling through them and
    their 8 turns until the case is full; what is left over is glass."""
    canvas = np.full((CASE_PX, CASE_PX, 3), 243, np.uint8)  # the tint of glass
    patches = sorted(patches, key=lambda p: -p.shape[0])
    x = y = row_h = 0
    for n in range(CASE_PX * CASE_PX // min(p.shape[0] * p.shape[1] for p in patches) + len(patches)):
        patch = _turn(patches[n % len(patches)], (n // len(patches)) % 8)
        h, w = patch.shape[:2]
        if x + w > CASE_PX:
            x, y, row_h = 0, y + row_h, 0
        if y + h > CASE_PX:
            if x == 0:
                break
            continue
        canvas[y : y + h, x : x + w] = patch
        x, row_h = x + w, max(row_h, h)
    return canvas


def _labelled_patches(shared: Path) -> dict[str, list[tuple[Path, float]]]:
    """NCT-9 class -> its patches (path, mpp) from patches/labels.csv."""
    out: dict[str, list[tuple[Path, float]]] = {}
    with open(shared / "patches" / "labels.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["label_nct9"] in TISSUES:
                out.setdefault(row["label_nct9"], []).append((shared / "patches" / row["path"], float(row["mpp_um"])))
    return out


def build_case_slides(shared: Path, archive: Path) -> list[dict]:
    """Write the case slides into `archive` (kept when already there) and return their
    metadata rows (slide, patient, site, diagnosis, label, collection)."""
    rows = []
    for code, items in sorted(_labelled_patches(shared).items()):
        diagnosis, site = TISSUES[code]
        name = f"kather-{code.lower()}.tiff"
        rows.append(
            {
                "slide": name,
                "patient": f"Kather-{code}",
                "site": site,
                "diagnosis": diagnosis,
                "label": code,
                "collection": "Kather CRC tissue classes",
            }
        )
        _write(archive / name, lambda items=items: case_image([_at_case_mpp(p, mpp) for p, mpp in items]))
    tiles = shared / "patches" / "tcga-uniform-tumor"
    for folder, (patient, project, diagnosis, site) in TCGA_CASES.items():
        paths = sorted((tiles / folder).glob("*.jpg"))
        if not paths:
            continue
        name = f"{folder}.tiff"
        # the tiles' resolution is not published with them: TCGA diagnostic slides are
        # scanned at 20x or 40x, and 0.5 um/px is assumed
        rows.append(
            {
                "slide": name,
                "patient": patient,
                "site": site,
                "diagnosis": diagnosis,
                "label": "TUM",  # uniform tumour tiles: the NCT-9 class of the other cases
                "collection": project,
            }
        )
        _write(archive / name, lambda paths=paths: case_image([_at_case_mpp(p, CASE_MPP) for p in paths]))
    return rows


def _write(path: Path, make) -> None:
    if path.exists():
        return
    LOG.info("writing demo case %s", path.name)
    write_pyramidal_tiff(path, make(), CASE_MPP)  # atomic: temp file + rename
