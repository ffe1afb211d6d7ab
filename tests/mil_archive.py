"""Synthetic indexed archives for the MIL tests: tile features written into real FAISS shards
and real catalog rows through the indexer's own writer (`indexer.writer.commit_slide`), with
the class carried by a small subset of each positive slide's tiles."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from engine.catalog.db import Catalog
from engine.catalog.models import EncoderRecord, Slide
from engine.config import Settings
from engine.encoder import l2_normalise
from engine.shards import ShardEncoder
from engine.slides import SlideInfo
from engine.tiling import TileBox
from indexer.writer import commit_slide, tile_ids


def synthetic_bag(
    rng: np.random.Generator,
    n_tiles: int,
    dim: int,
    signal: np.ndarray | None,
    n_signal: int,
    tissue: np.ndarray,
    strength: float = 4.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Background tiles: a few shared 'tissue types' plus noise; with `signal`, `n_signal`
    tiles get the signal direction added (the evidence; at strength 4 a signal tile's
    cosine to the signal is ~0.5 against ~0.15 for others after L2 normalisation, while the
    slide's mean moves by only a tenth of that). Returns (features, signal mask)."""
    kinds = rng.integers(0, len(tissue), n_tiles)
    x = tissue[kinds] + 0.6 * rng.standard_normal((n_tiles, dim))
    mask = np.zeros(n_tiles, bool)
    if signal is not None:
        where = rng.choice(n_tiles, n_signal, replace=False)
        x[where] += strength * signal
        mask[where] = True
    return x.astype(np.float32), mask


def synthetic_encoder(catalog: Catalog, name: str, dim: int, target_mpp: float = 1.0) -> tuple[int, ShardEncoder]:
    """A catalog row for a made-up encoder (sha256 of its name) and its shard identity."""
    sha = hashlib.sha256(name.encode()).hexdigest()
    with catalog.session() as s:
        enc = EncoderRecord(
            name=name,
            architecture="synthetic",
            checkpoint_sha256=sha,
            dim=dim,
            target_mpp=target_mpp,
            tile_px=224,
            normalisation={},
            is_random=True,
        )
        s.add(enc)
        s.flush()
        return enc.id, ShardEncoder(name, sha, dim, target_mpp, 224)


def make_feature_archive(
    tmp_path: Path,
    patients: list[tuple[str, str]],
    *,
    slides_per_patient: int = 2,
    n_tiles: int = 40,
    n_signal: int = 4,
    dim: int = 32,
    positive: str = "tumour",
    seed: int = 0,
    encoder_name: str = "synthetic-encoder",
    label_column: str = "diagnosis",
) -> tuple[Settings, dict[int, np.ndarray]]:
    """An indexed archive under tmp_path: per (patient, label) `slides_per_patient` slides;
    slides of the `positive` label carry `n_signal` signal tiles each. Returns the settings
    and, per slide id, the tile ids of its signal tiles."""
    rng = np.random.default_rng(seed)
    tissue = rng.standard_normal((6, dim))
    signal = rng.standard_normal(dim)
    signal /= np.linalg.norm(signal)
    settings = Settings.load(
        env={},
        data_dir=str(tmp_path / "data"),
        catalog_url=f"sqlite:///{tmp_path / 'catalog.sqlite'}",
        index_dir=str(tmp_path / "index"),
        device="cpu",
    )
    catalog = Catalog(settings.catalog_url)
    encoder_id, shard_encoder = synthetic_encoder(catalog, encoder_name, dim)
    side = int(np.ceil(np.sqrt(n_tiles)))
    boxes = [TileBox(224 * (i % side), 224 * (i // side), 224, 1.0) for i in range(n_tiles)]
    signal_tiles: dict[int, np.ndarray] = {}
    for patient, label in patients:
        for k in range(slides_per_patient):
            name = f"{patient}-{k}.svs"
            with catalog.session() as s:
                row = Slide(
                    path=str(tmp_path / "archive" / name),
                    fingerprint=hashlib.sha256(name.encode()).hexdigest(),
                    patient=patient,
                    status="pending",
                    **{label_column: label} if label_column != "extra" else {"extra": {"grade": label}},
                )
                s.add(row)
                s.flush()
                slide_id = row.id
            x, mask = synthetic_bag(rng, n_tiles, dim, signal if label == positive else None, n_signal, tissue)
            info = SlideInfo(
                path=Path(name),
                vendor="synthetic",
                width=224 * side,
                height=224 * side,
                mpp=0.5,
                mpp_source="metadata",
                level_downsamples=(1.0,),
            )
            commit_slide(catalog, settings.index_dir, shard_encoder, encoder_id, slide_id, info, boxes, l2_normalise(x))
            signal_tiles[slide_id] = tile_ids(slide_id, n_tiles)[mask]
    catalog.dispose()
    return settings, signal_tiles


def patients(n: int, labels=("normal", "tumour"), prefix: str = "P") -> list[tuple[str, str]]:
    """n patients, labels alternating."""
    return [(f"{prefix}{i:03d}", labels[i % len(labels)]) for i in range(n)]
