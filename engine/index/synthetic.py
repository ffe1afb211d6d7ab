"""Synthetic archive-like embeddings for index tests and benchmarks (never for search).

Real tile embeddings are far from uniform noise: tiles of one slide resemble each other, tissue
classes form clusters, and the variation inside a class spans few directions. The generator
mimics that, so recall measured on it means something: a vector is

    normalise(class_centre[c] + pattern_offset[c, p] + slide_offset[s] + B z + noise)

with tiles grouped into slides of `tiles_per_slide` consecutive ids, each slide of one of
`n_classes` classes, each tile showing one of the class's `n_patterns` morphological patterns
(gland, stroma, necrosis, ...), `z` a `rank`-dimensional Gaussian (the variation within a
pattern), and a small isotropic noise. Pattern offsets and slide offsets (stain, scanner) lie
in subspaces of `pattern_rank` and `slide_rank` dimensions: CNN embeddings of tissue have a
low intrinsic dimension (a few hundred principal components hold most of their variance),
which is what makes PCA + product quantisation work on them. `explained_variance(k)` reports
how much of the generated variance k principal directions hold, to compare with real features. Chunks
are reproducible from (seed, start), so a 1 M x 2048 archive (8 GB as float32) can be streamed
and regenerated for exact ground truth without ever being held in memory.
"""

from __future__ import annotations

import dataclasses

import numpy as np

BLOCK = 4096


@dataclasses.dataclass
class ClusteredVectors:
    dim: int = 2048
    n_classes: int = 30
    n_patterns: int = 40
    tiles_per_slide: int = 1000
    rank: int = 16
    pattern_rank: int = 96
    slide_rank: int = 16
    seed: int = 0
    pattern_scale: float = 0.8
    slide_scale: float = 0.3
    within_scale: float = 0.4
    noise_scale: float = 0.2

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        self.centres = _unit(rng.standard_normal((self.n_classes, self.dim)).astype(np.float32))
        pattern_basis = _unit(rng.standard_normal((self.pattern_rank, self.dim)).astype(np.float32))
        self.patterns = (
            _unit(
                rng.standard_normal((self.n_classes * self.n_patterns, self.pattern_rank)).astype(np.float32)
                @ pattern_basis
            )
            * self.pattern_scale
        )
        self.slide_basis = _unit(rng.standard_normal((self.slide_rank, self.dim)).astype(np.float32))
        self.basis = (rng.standard_normal((self.dim, self.rank)) / np.sqrt(self.dim)).astype(np.float32)

    def slide_of(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(ids, dtype=np.int64) // self.tiles_per_slide

    def class_of_slide(self, slides: np.ndarray) -> np.ndarray:
        return (np.asarray(slides, dtype=np.int64) * 7919 + self.seed) % self.n_classes

    def _slide_offsets(self, slides: np.ndarray) -> np.ndarray:
        out = np.empty((len(slides), self.dim), np.float32)
        for i, s in enumerate(slides):
            out[i] = (
                np.random.default_rng((self.seed, 1, int(s))).standard_normal(self.slide_rank, dtype=np.float32)
                @ self.slide_basis
            )
        return _unit(out) * self.slide_scale

    def _block(self, b: int) -> np.ndarray:
        """Vectors of ids b*BLOCK .. (b+1)*BLOCK-1, seeded by the block alone."""
        ids = np.arange(b * BLOCK, (b + 1) * BLOCK, dtype=np.int64)
        rng = np.random.default_rng((self.seed, 2, b))
        slides = self.slide_of(ids)
        uniq, inv = np.unique(slides, return_inverse=True)
        classes = self.class_of_slide(uniq)[inv]
        pattern = rng.integers(0, self.n_patterns, BLOCK)
        x = self.centres[classes] + self.patterns[classes * self.n_patterns + pattern] + self._slide_offsets(uniq)[inv]
        z = rng.standard_normal((BLOCK, self.rank), dtype=np.float32) * (
            self.within_scale / np.sqrt(self.rank) * np.sqrt(self.dim)
        )
        x += z @ self.basis.T
        x += rng.standard_normal((BLOCK, self.dim), dtype=np.float32) * (self.noise_scale / np.sqrt(self.dim))
        return _unit(x)

    def chunk(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, L2-normalised float32 vectors) of tiles start..stop-1; the same vector for
        an id whatever chunk it is generated in."""
        first, last = start // BLOCK, (stop - 1) // BLOCK
        x = np.concatenate([self._block(b) for b in range(first, last + 1)])
        offset = first * BLOCK
        return np.arange(start, stop, dtype=np.int64), x[start - offset : stop - offset]

    def iter_chunks(self, n: int, chunk: int = 50_000):
        for start in range(0, n, chunk):
            yield self.chunk(start, min(n, start + chunk))

    def queries(self, n: int, n_tiles: int, seed: int = 1, noise: float = 0.3) -> np.ndarray:
        """n query vectors near random archive tiles (a perturbed copy of each), like a
        re-scanned or re-stained view of an archived region."""
        rng = np.random.default_rng((self.seed, 3, seed))
        picks = np.sort(rng.choice(n_tiles, size=n, replace=False))
        blocks = {int(b): self._block(int(b)) for b in np.unique(picks // BLOCK)}
        base = np.stack([blocks[int(p) // BLOCK][int(p) % BLOCK] for p in picks])
        jitter = rng.standard_normal(base.shape, dtype=np.float32) * (noise / np.sqrt(self.dim))
        return _unit(base + jitter)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)
