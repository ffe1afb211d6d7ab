"""Predicting with a finished run: the mean of its fold models (each trained without one
test fold; averaging them is the usual way to use a cross-validated MIL run without a
further training pass). Class probabilities are the mean of the models' softmax outputs;
a tile's attention the mean of its attention weights (they sum to 1 over the slide)."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import numpy as np
import torch

from engine.catalog.db import Catalog
from engine.catalog.models import INDEXED
from engine.errors import EncoderError, NotFound, QueryError
from engine.mil.data import Contract, VectorReader, slide_row
from engine.mil.model import build_model
from engine.mil.train import infer


@dataclasses.dataclass
class LoadedRun:
    path: Path
    contract: Contract
    models: list
    device: torch.device

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if x.ndim != 2 or x.shape[1] != self.contract.dim:
            raise QueryError(
                f"features of width {x.shape[-1]} given to a run trained on {self.contract.dim}-d features of {self.contract.encoder_name}"
            )
        outs = [infer(m, x, self.device) for m in self.models]
        return np.mean([p for p, _ in outs], 0), np.mean([a for _, a in outs], 0)


def load_run(run_dir: str | Path, device: str = "cpu") -> LoadedRun:
    from engine.encoder import resolve_device

    run_dir = Path(run_dir)
    contract_file = run_dir / "contract.json"
    if not contract_file.is_file():
        raise NotFound(f"{run_dir} is not a MIL run folder (no contract.json); train a run into it first")
    contract = Contract.from_json(json.loads(contract_file.read_text())["contract"])
    dev = resolve_device(device)
    models = []
    for path in sorted(run_dir.glob("fold-*/model.pt")):
        if not (path.parent / "result.json").exists():
            continue  # a fold still training when the run was stopped
        ckpt = torch.load(path, map_location=dev, weights_only=True)
        if Contract.from_json(ckpt["contract"]) != contract:
            raise EncoderError(
                f"{path} was trained for another contract than {contract_file}; the run folder is mixed up: train it again"
            )
        model = build_model(ckpt["config"]).to(dev)
        model.load_state_dict(ckpt["state_dict"])
        models.append(model.eval())
    if not models:
        raise NotFound(f"{run_dir} has no finished fold yet; train again into the same run folder to finish it")
    return LoadedRun(run_dir, contract, models, dev)


_RUNS: dict[tuple[str, float], LoadedRun] = {}
_RUNS_LOCK = threading.Lock()


def cached_run(run_dir: str | Path) -> LoadedRun:
    """A loaded run kept per process (the web app), reloaded when its report changes."""
    run_dir = Path(run_dir)
    stamp = (run_dir / "report.json").stat().st_mtime if (run_dir / "report.json").exists() else 0.0
    key = (str(run_dir.resolve()), stamp)
    with _RUNS_LOCK:
        if key not in _RUNS:
            if len(_RUNS) > 8:
                _RUNS.clear()
            _RUNS[key] = load_run(run_dir)
        return _RUNS[key]


def _answer(run: LoadedRun, probs: np.ndarray, att: np.ndarray, boxes: np.ndarray, slide: dict) -> dict:
    order = np.argsort(-att, kind="stable")
    # percentile of each tile's attention within the slide (0 lowest .. 1 highest), what the
    # heat map shows: raw weights of a 10,000-tile slide are all tiny
    pct = np.empty(len(att))
    pct[order] = 1.0 - np.arange(len(att)) / max(1, len(att) - 1)
    return {
        "run": str(run.path),
        "slide": slide,
        "classes": list(run.contract.classes),
        "probabilities": {c: round(float(p), 6) for c, p in zip(run.contract.classes, probs)},
        "prediction": run.contract.classes[int(np.argmax(probs))],
        "tiles": [
            {"x": int(b[0]), "y": int(b[1]), "size": int(b[2]), "attention": float(a), "rank": float(round(r, 5))}
            for b, a, r in zip(boxes, att, pct)
        ],
        "models": len(run.models),
    }


def predict_indexed(catalog: Catalog, index_dir: str | Path, run: LoadedRun, slide_id: int) -> dict:
    """Probabilities and per-tile attention of an indexed slide, from its stored features."""
    slide, enc = slide_row(catalog, slide_id, run.contract)
    if slide.status != INDEXED or enc is None:
        raise QueryError(
            f"slide {slide_id} ({Path(slide.path).name}) is not indexed (status {slide.status}); run `indexer build` first"
        )
    run.contract.check_encoder(enc, f"slide {slide_id} ({Path(slide.path).name})")
    _, x, boxes = VectorReader(catalog, index_dir).slide(slide_id, enc.id)
    probs, att = run.predict(x)
    info = {
        "id": slide.id,
        "name": Path(slide.path).name,
        run.contract.label_column: _label(slide, run.contract.label_column),
    }
    return _answer(run, probs, att, boxes, info)


def _label(slide, column: str):
    from engine.mil.data import slide_value

    return slide_value(slide, column)


def predict_file(
    path: Path,
    run: LoadedRun,
    encoder_spec: str,
    *,
    device: str = "auto",
    default_mpp: float | None = None,
    min_tissue: float = 0.5,
) -> dict:
    """A slide file that is not in the index: tiled on the run's grid and embedded on the
    fly with `encoder_spec`, which must be the run's encoder (same weights sha256)."""
    import torch as _torch

    from engine.encoder import Encoder, l2_normalise
    from engine.images import to_uint8_chw
    from engine.slides import describe_slide, open_slide, read_box
    from engine.tiling import tile_grid
    from engine.tissue import slide_thumbnail, tissue_mask_rgb

    c = run.contract
    encoder = Encoder.from_spec(encoder_spec, device=device)
    if encoder.info.checkpoint_sha256 != c.encoder_sha256 or encoder.dim != c.dim:
        raise EncoderError(
            f"encoder {encoder_spec} is {encoder.info.name} (sha256 {encoder.info.checkpoint_sha256[:12]}) but the run was trained on {c.encoder_name} (sha256 {c.encoder_sha256[:12]}): give that encoder"
        )
    slide = open_slide(path)
    try:
        info = describe_slide(path, slide, default_mpp)
        thumb, ds = slide_thumbnail(slide)
        boxes = tile_grid(info, tissue_mask_rgb(thumb), ds, c.target_mpp, c.tile_px, min_tissue=min_tissue)
        if not boxes:
            raise QueryError(f"{Path(path).name}: no tissue tiles found at {c.target_mpp:g} um/px")
        feats = []
        for start in range(0, len(boxes), 64):
            batch = _torch.stack(
                [
                    to_uint8_chw(read_box(slide, b.x, b.y, b.size, c.tile_px), c.tile_px)
                    for b in boxes[start : start + 64]
                ]
            )
            feats.append(l2_normalise(encoder.embed(batch)))
    finally:
        slide.close()
    probs, att = run.predict(np.concatenate(feats))
    arr = np.array([(b.x, b.y, b.size) for b in boxes], np.int64)
    return _answer(run, probs, att, arr, {"id": None, "name": Path(path).name})
