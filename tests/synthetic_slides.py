"""Synthetic slides for tests: slide-like RGB arrays (`tissue_blobs`), written as pyramidal
TIFFs by `engine.pyramid_tiff.write_pyramidal_tiff` (re-exported here for the tests)."""

from __future__ import annotations

import numpy as np

from engine.pyramid_tiff import write_pyramidal_tiff

__all__ = ["tissue_blobs", "write_pyramidal_tiff"]


def tissue_blobs(
    height: int, width: int, seed: int = 0, n_blobs: int = 3, radius: tuple[float, float] = (0.12, 0.25)
) -> np.ndarray:
    """An H x W x 3 uint8 'slide': white glass with a few pink-purple elliptical tissue blobs
    carrying texture, so tissue masks and encoders see something slide-like. Blob radii are
    drawn from `radius` (fractions of the slide's height and width)."""
    rng = np.random.default_rng(seed)
    rgb = np.full((height, width, 3), 240, np.uint8)
    for _ in range(n_blobs):
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(*radius) * height, rng.uniform(*radius) * width
        y0, y1 = max(0, int(cy - ry)), min(height, int(cy + ry) + 1)
        x0, x1 = max(0, int(cx - rx)), min(width, int(cx + rx) + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        base = np.array([200, 110, 170], np.int16) + rng.integers(-30, 30, 3).astype(np.int16)
        noise = rng.integers(-40, 40, (int(inside.sum()), 3), dtype=np.int16)
        region = rgb[y0:y1, x0:x1]
        region[inside] = np.clip(base + noise, 0, 255).astype(np.uint8)
    return rgb
