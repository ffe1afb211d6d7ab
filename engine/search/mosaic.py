"""The mosaic of a slide: a few representative tissue tiles that stand for the whole slide
in a slide-to-slide search, in the line of Yottixel and SISH.

Tiles are clustered by appearance (colour histograms for a slide that is not indexed, where
embedding every tile would be the slow part; encoder features for an indexed one), then each
appearance cluster is sampled spatially: k-means on the tile positions of the cluster with
about `fraction` of its tiles as centres, and the tile nearest each centre is kept. So every
kind of tissue is represented, by tiles spread over where it occurs, not by neighbours.
"""

from __future__ import annotations

import math

import numpy as np

# Yottixel: 9 colour clusters, 5-20 % of each cluster's tiles
N_CLUSTERS = 9
FRACTION = 0.1
MAX_TILES = 48


def _kmeans_labels(x: np.ndarray, k: int, seed: int, iters: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding, in numpy: the inputs are small (one slide's
    tiles), and a library k-means with its thread pool costs more in start-up than it saves."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float32)
    n = len(x)
    sq = (x**2).sum(axis=1)
    first = int(rng.integers(n))
    picks = [first]
    d2 = np.maximum(sq - 2 * x @ x[first] + sq[first], 0)
    for _ in range(1, k):
        total = float(d2.sum())
        pick = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        picks.append(pick)
        d2 = np.minimum(d2, np.maximum(sq - 2 * x @ x[pick] + sq[pick], 0))
    c = x[picks].copy()
    labels = np.full(n, -1, np.int64)
    for _ in range(iters):
        new = (-2 * x @ c.T + (c**2).sum(axis=1)[None, :]).argmin(axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        onehot = np.zeros((k, n), np.float32)
        onehot[labels, np.arange(n)] = 1
        counts = onehot.sum(axis=1)
        filled = counts > 0
        c[filled] = (onehot @ x)[filled] / counts[filled, None]
    return labels, c


def select_mosaic(
    descriptors: np.ndarray,
    coords: np.ndarray,
    *,
    n_clusters: int = N_CLUSTERS,
    fraction: float = FRACTION,
    max_tiles: int = MAX_TILES,
    seed: int = 0,
) -> np.ndarray:
    """Indices (sorted) of the mosaic tiles among n tiles.

    descriptors: n x d appearance (colour histograms or features)
    coords:      n x 2 tile positions (any unit)
    n_clusters:  appearance clusters (default 9)
    fraction:    share of each cluster's tiles kept, at least one per cluster (default 0.1)
    max_tiles:   cap on the mosaic size; clusters keep their proportions (default 48)
    """
    descriptors = np.asarray(descriptors, dtype=np.float64)
    coords = np.asarray(coords, dtype=np.float64)
    n = len(descriptors)
    if n == 0:
        raise ValueError("a mosaic needs at least one tile")
    if len(coords) != n:
        raise ValueError(f"{n} descriptors but {len(coords)} coordinates")
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1]")
    k = min(n_clusters, n)
    labels = _kmeans_labels(descriptors, k, seed)[0] if k > 1 else np.zeros(n, int)
    clusters = [np.flatnonzero(labels == c) for c in range(k)]
    clusters = [m for m in clusters if len(m)]
    want = [max(1, math.ceil(fraction * len(m))) for m in clusters]
    total = sum(want)
    if total > max_tiles:
        want = [max(1, int(round(w * max_tiles / total))) for w in want]
    chosen: list[int] = []
    for members, n_pick in zip(clusters, want):
        n_pick = min(n_pick, len(members))
        if n_pick == len(members):
            chosen.extend(members.tolist())
            continue
        pos = coords[members]
        _, centres = _kmeans_labels(pos, n_pick, seed)
        taken: set[int] = set()
        for centre in centres:
            order = np.argsort(((pos - centre) ** 2).sum(axis=1))
            pick = next(int(members[i]) for i in order if int(members[i]) not in taken)
            taken.add(pick)
        chosen.extend(taken)
    return np.array(sorted(set(chosen)), dtype=np.int64)


def colour_histograms(rgb: np.ndarray, boxes: np.ndarray, downsample: float, bins: int = 8) -> np.ndarray:
    """Per level-0 box (rows of x, y, size), the normalised 3 x `bins` RGB histogram of the
    box's pixels in a low-resolution view `rgb` whose pixels cover `downsample` level-0
    pixels each."""
    h, w = rgb.shape[:2]
    out = np.zeros((len(boxes), 3 * bins), np.float32)
    for i, (x, y, size) in enumerate(np.asarray(boxes, dtype=np.float64)):
        x0, y0 = int(x / downsample), int(y / downsample)
        x1 = min(w, max(x0 + 1, int(math.ceil((x + size) / downsample))))
        y1 = min(h, max(y0 + 1, int(math.ceil((y + size) / downsample))))
        patch = rgb[min(y0, h - 1) : y1, min(x0, w - 1) : x1].reshape(-1, 3)
        for c in range(3):
            hist = np.bincount(patch[:, c].astype(np.int64) * bins // 256, minlength=bins)
            out[i, c * bins : (c + 1) * bins] = hist / max(1, len(patch))
    return out
