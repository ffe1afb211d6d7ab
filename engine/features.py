"""`engine features`: raw encoder features of a set of images, like RetCCL's get_feature.py
but batched, with decoding in DataLoader workers overlapped with the encoder."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from engine.encoder import INPUT_PX, Encoder
from engine.errors import ImageError
from engine.files import atomic_output, atomic_write_text
from engine.images import encoder_input, open_rgb

LOG = logging.getLogger(__name__)


class ImageFiles(Dataset):
    """Image files -> (row, uint8 3x224x224 tensor or None, error message or None)."""

    def __init__(self, paths: Sequence[Path], size_px: int = INPUT_PX):
        self.paths = list(paths)
        self.size_px = size_px

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int):
        try:
            return row, encoder_input(open_rgb(self.paths[row]), self.size_px), None
        except ImageError as exc:
            return row, None, str(exc)


def collate_rows(items):
    """DataLoader collate of (row, tensor or None, error or None) items: the rows that decoded,
    their uint8 batch (empty when none did), and (row, message) of those that did not."""
    rows = [r for r, t, _ in items if t is not None]
    tensors = [t for _, t, _ in items if t is not None]
    errors = [(r, e) for r, t, e in items if t is None]
    batch = torch.stack(tensors) if tensors else torch.zeros((0, 3, INPUT_PX, INPUT_PX), dtype=torch.uint8)
    return rows, batch, errors


def default_workers() -> int:
    """Decoding workers: one fewer than the cores, so the encoder keeps one (0 on 1 core)."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def iter_batches(
    paths: Sequence[Path], batch_size: int, workers: int
) -> Iterator[tuple[list[int], torch.Tensor, list[tuple[int, str]]]]:
    loader = DataLoader(
        ImageFiles(paths),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_rows,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    yield from loader


@dataclass
class FeatureResult:
    features: np.ndarray  # N x D float32, raw (not L2-normalised)
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def compute_features(
    encoder: Encoder,
    paths: Sequence[Path],
    *,
    batch_size: int = 64,
    workers: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> FeatureResult:
    """Embed every image in `paths` (row order kept). An unreadable image raises ImageError
    naming it, unless `skip_bad`, which records it and goes on."""
    workers = default_workers() if workers is None else workers
    feats = np.zeros((len(paths), encoder.dim), np.float32)
    ok = np.zeros(len(paths), bool)
    skipped: list[tuple[Path, str]] = []
    with tqdm(total=len(paths), unit="img", disable=not progress, desc="features") as bar:
        for rows, batch, errors in iter_batches(paths, batch_size, workers):
            if errors and not skip_bad:
                row, message = errors[0]
                raise ImageError(f"{message} (skip unreadable images to record them and go on)")
            skipped.extend((paths[r], m) for r, m in errors)
            if rows:
                feats[rows] = encoder.embed(batch)
                ok[rows] = True
            bar.update(len(rows) + len(errors))
            if on_batch:
                on_batch(len(rows))
    kept = [p for p, good in zip(paths, ok) if good]
    return FeatureResult(features=feats[ok], paths=kept, skipped=skipped)


def write_features(result: FeatureResult, out: Path, encoder: Encoder) -> Path:
    """Write OUT (.npy, N x D float32) and a sidecar OUT.json listing the rows' image paths,
    the skipped images and the encoder. Both written to temp files, then renamed."""
    out = Path(out)
    if out.suffix != ".npy":
        out = out.with_suffix(out.suffix + ".npy") if out.suffix else out.with_suffix(".npy")
    sidecar = sidecar_path(out)
    info = encoder.info
    doc = {
        "rows": len(result.paths),
        "dim": int(result.features.shape[1]),
        "normalised": False,
        "encoder": {
            "name": info.name,
            "architecture": info.architecture,
            "checkpoint_sha256": info.checkpoint_sha256,
            "random": info.is_random,
        },
        "precision": encoder.precision,
        "paths": [str(p) for p in result.paths],
        "skipped": [{"path": str(p), "error": e} for p, e in result.skipped],
    }
    with atomic_output(out) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, result.features)
    atomic_write_text(sidecar, json.dumps(doc, indent=1))
    return out


def sidecar_path(npy: Path) -> Path:
    return Path(npy).with_suffix(".json")
