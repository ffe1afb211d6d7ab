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
import warnings

import numpy as np
from sklearn.cluster import KMeans

# Yottixel: 9 colour clusters, 5-20 % of each cluster's tiles
N_CLUSTERS = 9
FRACTION = 0.1
MAX_TILES = 48


def _kmeans_labels(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate points give fewer distinct clusters; fine here
        km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(x)
    return km.labels_, km.cluster_centers_


def select_mosaic(descriptors: np.ndarray, coords: np.ndarray, *, n_clusters: int = N_CLUSTERS, fraction: float = FRACTION, max_tiles: int = MAX_TILES, seed: int = 0) -> np.ndarray:
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
