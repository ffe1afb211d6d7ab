"""Retrieval benchmark ("classification through search", as in the RetCCL tables).

For each encoder: embed every item of a labelled data set once (cached per encoder + data
set under <data_dir>/cache), L2-normalise, run ONE batched leave-one-out k-NN search that
drops results of the query's own image / slide / patient, and score Acc@k, MV@k, mMV@k and
mAP@k (engine.evaluation.metrics), plus the figures of the chosen peer protocol (retccl, sish
or yottixel: engine.evaluation.protocols) under their own names. Optionally a linear SVM on the same features, cross-validated over
folds that keep each exclusion group on one side. Runs are stored in the catalog.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine.config import Settings, native_grid
from engine.encoder import Encoder, l2_normalise
from engine.errors import DatasetError
from engine.evaluation.datasets import LabelledSet
from engine.evaluation.datasets.reading import ItemImages
from engine.evaluation.knn import loo_neighbours
from engine.evaluation.metrics import encode_labels, hits_at_k, majority_at_k, retrieval_metrics
from engine.evaluation.protocols import DEFAULT_PROTOCOL, get_protocol, protocol_figures
from engine.features import collate_rows, default_workers
from engine.files import atomic_output

LOG = logging.getLogger(__name__)

TIE_RULE = (
    "MV ties go to the label of the best-ranked result among the tied labels; equal scores rank by data-set order"
)
MAP_DEFINITION = "AP@k = mean of precision@i over the relevant ranks i <= k (0 when none); mAP@k = mean over queries"


@dataclasses.dataclass(frozen=True)
class BenchmarkOptions:
    """ks: the k of Acc@k / MV@k (default 1, 3, 5); exclusion: image, slide or patient (None:
    the strictest the data set supports); mpp: resolution patches are cut/rescaled at (None:
    whole patches resized; TissueNet uses the settings' target_mpp); svm_folds: 0 = no SVM;
    protocol: retccl, sish or yottixel (whose figures are reported beside histoseek's)."""

    ks: tuple[int, ...] = (1, 3, 5)
    exclusion: str | None = None
    mpp: float | None = None
    svm_folds: int = 0
    batch_size: int = 64
    workers: int | None = None
    progress: bool = True
    protocol: str = DEFAULT_PROTOCOL


def embed_items(
    encoder: Encoder,
    dataset: LabelledSet,
    *,
    tile_px: int,
    mpp: float | None,
    batch_size: int,
    workers: int | None,
    progress: bool,
) -> np.ndarray:
    """Raw features (N x D float32) of every item, in item order. An unreadable item stops the
    run with its name: a benchmark on silently fewer items would mislead."""
    workers = default_workers() if workers is None else workers
    loader = DataLoader(
        ItemImages(dataset.items, tile_px, mpp), batch_size=batch_size, num_workers=workers, collate_fn=collate_rows
    )
    feats = np.zeros((len(dataset.items), encoder.dim), np.float32)
    with tqdm(total=len(dataset.items), unit="patch", desc=f"embed {encoder.info.name}", disable=not progress) as bar:
        for rows, batch, errors in loader:
            if errors:
                row, message = errors[0]
                raise DatasetError(f"item {dataset.items[row].key}: {message}")
            feats[rows] = encoder.embed(batch)
            bar.update(len(rows))
    return feats


def cache_path(settings: Settings, dataset: LabelledSet, encoder: Encoder, tile_px: int, mpp: float | None) -> Path:
    info = encoder.info
    key = json.dumps(
        [dataset.fingerprint(), info.checkpoint_sha256, info.architecture, encoder.precision, tile_px, mpp]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return settings.data_dir / "cache" / f"benchmark-{dataset.kind}-{info.architecture}-{digest}.npy"


def cached_features(
    settings: Settings, dataset: LabelledSet, encoder: Encoder, opts: BenchmarkOptions
) -> tuple[np.ndarray, bool]:
    """(raw features, whether they came from the cache). Written to a temp file, then renamed,
    so an interrupted run never leaves a half cache behind."""
    path = cache_path(settings, dataset, encoder, settings.tile_px, opts.mpp)
    if path.is_file():
        feats = np.load(path)
        if feats.shape == (len(dataset.items), encoder.dim):
            LOG.info("features from cache %s", path)
            return feats, True
        LOG.warning(
            "cache %s has shape %s, expected %s: recomputing", path, feats.shape, (len(dataset.items), encoder.dim)
        )
    feats = embed_items(
        encoder,
        dataset,
        tile_px=settings.tile_px,
        mpp=opts.mpp,
        batch_size=opts.batch_size,
        workers=opts.workers,
        progress=opts.progress,
    )
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, feats)
    return feats, False


def evaluate(
    features: np.ndarray,
    dataset: LabelledSet,
    ks: Sequence[int],
    exclusion: str,
    *,
    progress: bool = False,
    protocol: str = DEFAULT_PROTOCOL,
) -> dict:
    """Leave-one-out search + metrics from raw or normalised features of the data set; the
    protocol's own figures under result["protocol"]["figures"]."""
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"k values must be >= 1, got {ks}")
    codes, classes = encode_labels(dataset.labels)
    groups = dataset.groups(exclusion)
    kmax = ks[-1]
    t0 = time.perf_counter()
    D, I = loo_neighbours(l2_normalise(np.asarray(features, np.float32)), groups, kmax, progress=progress)
    search_s = time.perf_counter() - t0
    neighbour_codes = np.where(I >= 0, codes[np.maximum(I, 0)], -1)
    result = retrieval_metrics(codes, neighbour_codes, ks, classes)
    # the Acc@k and MV@k curves for every k up to the largest, for the plot
    result["curve"] = {
        "k": list(range(1, kmax + 1)),
        "acc": [float(hits_at_k(codes, neighbour_codes, k).mean()) for k in range(1, kmax + 1)],
        "mv": [float((majority_at_k(neighbour_codes, k) == codes).mean()) for k in range(1, kmax + 1)],
    }
    result["protocol"] = {
        "name": get_protocol(protocol).name,
        "figures": protocol_figures(protocol, codes, neighbour_codes, ks),
    }
    result["queries_short_of_k"] = int((I[:, -1] < 0).sum())
    result["search_s"] = search_s
    return result


def svm_accuracy(features: np.ndarray, dataset: LabelledSet, exclusion: str, folds: int, seed: int = 0) -> dict:
    """Linear SVM on L2-normalised features, cross-validated with folds that keep each
    exclusion group (slide/patient) whole, so no group is on both sides."""
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.svm import LinearSVC

    codes, classes = encode_labels(dataset.labels)
    groups = dataset.groups(exclusion)
    n_groups = len(np.unique(groups))
    smallest_class = int(np.bincount(codes).min())
    asked, folds = folds, min(folds, n_groups, smallest_class)
    if folds < 2:
        raise DatasetError(
            f"--svm needs at least 2 {exclusion} groups and 2 items per class to cross-validate; this data set has {n_groups} groups and a class of {smallest_class}"
        )
    if folds < asked:
        LOG.info(
            "SVM: %d folds instead of %d (%d %s groups, smallest class %d)",
            folds,
            asked,
            n_groups,
            exclusion,
            smallest_class,
        )
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    x = l2_normalise(np.asarray(features, np.float32))
    pred = cross_val_predict(LinearSVC(C=1.0, dual="auto", max_iter=5000), x, codes, groups=groups, cv=cv)
    correct = pred == codes
    per_class = {classes[c]: float(correct[codes == c].mean()) for c in np.unique(codes)}
    return {
        "folds": folds,
        "accuracy": float(correct.mean()),
        "balanced_accuracy": float(np.mean(list(per_class.values()))),
        "per_class": per_class,
        "model": "sklearn LinearSVC(C=1) on L2-normalised features, StratifiedGroupKFold",
    }


@dataclasses.dataclass
class EncoderResult:
    info: dict
    metrics: dict
    svm: dict | None
    cached: bool
    embed_s: float
    run_id: int | None = None


@dataclasses.dataclass
class BenchmarkReport:
    dataset: LabelledSet
    parameters: dict
    results: list[EncoderResult]
    created_at: str

    def to_json(self) -> dict:
        return {
            "dataset": {
                "kind": self.dataset.kind,
                "path": str(self.dataset.root),
                "label_column": self.dataset.label_column,
                "counts": self.dataset.counts(),
                "notes": self.dataset.notes,
                "fingerprint": self.dataset.fingerprint(),
            },
            "parameters": self.parameters,
            "protocol": get_protocol(self.parameters.get("protocol")).describe(),
            "encoders": [
                {
                    **r.info,
                    "metrics": r.metrics,
                    "svm": r.svm,
                    "features_cached": r.cached,
                    "embed_s": r.embed_s,
                    "catalog_run_id": r.run_id,
                }
                for r in self.results
            ],
            "created_at": self.created_at,
        }


def run_benchmark(
    settings: Settings, dataset: LabelledSet, encoder_specs: Sequence[str], opts: BenchmarkOptions
) -> BenchmarkReport:
    """Embed (or reuse cached features), search leave-one-out and score, per encoder."""
    exclusion = opts.exclusion or dataset.strictest_exclusion()
    dataset.groups(exclusion)  # a clear error now, before any embedding, if ids are missing
    if opts.mpp is not None and dataset.cut_mpp is None:
        unknown = sum(1 for item in dataset.items if item.mpp is None)
        if unknown:
            raise DatasetError(
                f"--mpp {opts.mpp}: {unknown} of {len(dataset.items)} patches have no known mpp to rescale from; drop --mpp (patches are then resized whole) or give an mpp column"
            )
    if not encoder_specs:
        raise ValueError("at least one encoder spec is needed")
    protocol = get_protocol(opts.protocol)
    parameters = {
        "protocol": protocol.name,
        "k": sorted(set(opts.ks)),
        "exclusion": exclusion,
        "exclusion_text": f"results from the query's own {exclusion} are excluded",
        "mpp": dataset.cut_mpp or opts.mpp,
        "tile_px": settings.tile_px,
        "precision": settings.precision,
        "tie_rule": TIE_RULE,
        "map_definition": MAP_DEFINITION,
        "svm_folds": opts.svm_folds,
    }
    results = []
    for spec in encoder_specs:
        encoder = Encoder.from_spec(spec, device=settings.device, precision=settings.precision)
        LOG.info("encoder %s on %s", encoder.info.describe(), encoder.device)
        t0 = time.perf_counter()
        feats, cached = cached_features(settings, dataset, encoder, opts)
        embed_s = time.perf_counter() - t0
        metrics = evaluate(feats, dataset, opts.ks, exclusion, progress=opts.progress, protocol=protocol.name)
        svm = svm_accuracy(feats, dataset, exclusion, opts.svm_folds) if opts.svm_folds else None
        info = encoder.info
        native = native_grid(info)
        results.append(
            EncoderResult(
                info={
                    "name": info.name,
                    "architecture": info.architecture,
                    "sha256": info.checkpoint_sha256,
                    "dim": info.dim,
                    "random": info.is_random,
                    "spec": spec,
                    # the grid the encoder was trained at (a card's mpp/input_px, RetCCL's 1.0/224)
                    "native_mpp": native[0],
                    "input_px": native[1],
                },
                metrics=metrics,
                svm=svm,
                cached=cached,
                embed_s=embed_s,
            )
        )
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if len(results) > 1:
        # side by side: every run of this invocation names the others (the web app groups them)
        shas = [r.info["sha256"] for r in results]
        parameters["comparison"] = {
            "id": hashlib.sha256(json.dumps([created, dataset.fingerprint(), shas]).encode()).hexdigest()[:16],
            "encoders": [r.info["name"] for r in results],
        }
    return BenchmarkReport(dataset, parameters, results, created)


def store_runs(catalog_url: str, report: BenchmarkReport, plot_path: Path | None = None) -> list[int]:
    """One BenchmarkRun row per encoder; sets each result's run_id and returns the ids."""
    from engine.catalog.db import Catalog
    from engine.catalog.models import BenchmarkRun

    catalog = Catalog(catalog_url)
    doc = report.to_json()
    try:
        with catalog.session() as s:
            rows = []
            for result, enc in zip(report.results, doc["encoders"]):
                row = BenchmarkRun(
                    dataset_kind=report.dataset.kind,
                    dataset_path=str(report.dataset.root),
                    encoder_name=result.info["name"],
                    encoder_sha256=result.info["sha256"],
                    parameters={
                        **report.parameters,
                        "label_column": report.dataset.label_column,
                        "counts": doc["dataset"]["counts"],
                        "notes": report.dataset.notes,
                    },
                    metrics={
                        "overall": enc["metrics"]["overall"],
                        "per_class": enc["metrics"]["per_class"],
                        "curve": enc["metrics"]["curve"],
                        "svm": enc["svm"],
                        **{
                            key: enc["metrics"][key]
                            for key in ("protocol", "protocols", "query_time")
                            if key in enc["metrics"]
                        },
                    },
                    plot_path=str(plot_path) if plot_path else None,
                )
                s.add(row)
                rows.append(row)
            s.flush()
            ids = [row.id for row in rows]
    finally:
        catalog.dispose()
    for result, run_id in zip(report.results, ids):
        result.run_id = run_id
    return ids
