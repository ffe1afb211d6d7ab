"""Cross-validated MIL training into a run folder that is atomic and resumable:

    RUN/contract.json      input contract (encoder name + sha256, width, grid, labels) + options
    RUN/folds.json         slides of each test fold (fixed once, so a resumed run is the same run)
    RUN/fold-K/model.pt    checkpoint: weights, model config, contract
    RUN/fold-K/result.json out-of-fold predictions + training summary; written last = fold done
    RUN/report.json, RUN/roc.png

Every file goes through engine.files.atomic_output, so a kill leaves whole files only; a
rerun skips folds whose result.json exists. Folds are grouped (patients never split) and
stratified by label (sklearn StratifiedGroupKFold)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from engine.errors import DatasetError
from engine.files import atomic_output, atomic_write_text
from engine.mil.data import BagSet
from engine.mil.report import summarise, write_roc_png
from engine.mil.train import TrainOptions, infer, train_model

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class MilOptions:
    folds: int = 5
    group: str = "patient"
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    train: TrainOptions = dataclasses.field(default_factory=TrainOptions)


def make_folds(y: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """Test rows of each fold; fewer folds than asked when a class has fewer groups."""
    from sklearn.model_selection import StratifiedGroupKFold

    notes = []
    per_class = min(len(set(groups[y == c])) for c in np.unique(y))
    if per_class < 2:
        raise DatasetError(
            f"a class has slides of only {per_class} patient(s)/group(s): cross-validation needs at least 2 per class (label more slides, or group by slide if slides of one patient are independent)"
        )
    if per_class < n_folds:
        notes.append(f"{n_folds} folds asked, {per_class} used: the smallest class has slides of {per_class} groups")
        n_folds = per_class
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [test for _, test in splitter.split(np.zeros(len(y)), y, groups)], notes


def _json_out(path: Path, doc) -> None:
    atomic_write_text(path, json.dumps(doc, indent=1))


def _settle_run_folder(out: Path, head: dict, bags: BagSet, options: MilOptions) -> tuple[list[np.ndarray], list[str]]:
    """Write contract.json + folds.json on the first call; on a rerun check they still fit."""
    y, groups = bags.y, bags.groups
    slide_ids = [b.slide_id for b in bags.bags]
    contract_file, folds_file = out / "contract.json", out / "folds.json"
    if contract_file.exists():
        old = json.loads(contract_file.read_text())
        if old != head:
            raise DatasetError(
                f"{out} holds another run (different encoder, labels or options); choose another run folder, or delete that folder to start again"
            )
    if folds_file.exists():
        saved = json.loads(folds_file.read_text())
        if sorted(sum(saved["folds"], [])) != sorted(slide_ids):
            raise DatasetError(
                f"the labelled slides changed since {out} was started ({len(slide_ids)} now, {sum(map(len, saved['folds']))} then); use a new run folder for the new set"
            )
        pos = {sid: i for i, sid in enumerate(slide_ids)}
        return [np.array([pos[s] for s in fold], np.int64) for fold in saved["folds"]], saved["notes"]
    folds, notes = make_folds(y, groups, options.folds, options.seed)
    for k, test in enumerate(folds):  # the promise of the folds, checked once more before use
        train_groups = set(groups[np.setdiff1d(np.arange(len(y)), test)])
        assert not train_groups & set(groups[test]), f"fold {k} shares a group"
    _json_out(contract_file, head)
    _json_out(folds_file, {"folds": [[slide_ids[i] for i in f] for f in folds], "notes": notes})
    return folds, notes


def train_run(bags: BagSet, out: str | Path, options: MilOptions | None = None) -> dict:
    """Train and evaluate with cross-validation; returns the report (also RUN/report.json)."""
    from engine.encoder import resolve_device

    options = options or MilOptions()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(options.device)
    contract = bags.contract.to_json()
    opts_doc = {
        "folds": options.folds,
        "group": options.group,
        "seed": options.seed,
        "train": dataclasses.asdict(options.train),
    }
    folds, fold_notes = _settle_run_folder(out, {"contract": contract, "options": opts_doc}, bags, options)
    y, groups = bags.y, bags.groups
    xs = [b.features for b in bags.bags]
    results, t_start = [], time.perf_counter()
    for k, test in enumerate(folds):
        fold_dir = out / f"fold-{k}"
        done = fold_dir / "result.json"
        if done.exists():
            LOG.info("fold %d/%d already done (%s); skipped", k + 1, len(folds), done)
            results.append(json.loads(done.read_text()))
            continue
        train_rows = np.setdiff1d(np.arange(len(y)), test)
        t0 = time.perf_counter()
        model, info = train_model(
            [xs[i] for i in train_rows],
            y[train_rows],
            groups[train_rows],
            len(bags.classes),
            options.train,
            device=device,
            seed=options.seed * 1000 + k,
            progress=options.progress,
            desc=f"fold {k + 1}/{len(folds)}",
        )
        info["seconds"] = round(time.perf_counter() - t0, 2)
        with atomic_output(fold_dir / "model.pt") as tmp:
            torch.save({"state_dict": model.state_dict(), "config": model.config, "contract": contract, "fold": k}, tmp)
        probs = np.stack([infer(model, xs[i], device)[0] for i in test])
        result = {
            "fold": k,
            "slide_ids": [bags.bags[i].slide_id for i in test],
            "y": y[test].tolist(),
            "probs": probs.round(6).tolist(),
            "train": info,
        }
        _json_out(done, result)
        LOG.info(
            "fold %d/%d: %d epochs (best %d), %.1f s",
            k + 1,
            len(folds),
            info["epochs"],
            info["best_epoch"],
            info["seconds"],
        )
        results.append(result)
    metrics = summarise(results, bags.classes)
    title = f"{contract['label_column']}: AUC {metrics['overall'].get('auc', float('nan')):.3f} ({len(folds)} folds)"
    plot = write_roc_png(metrics, out / "roc.png", title)
    counts = {c: int((y == i).sum()) for i, c in enumerate(bags.classes)}
    report = {
        "run_dir": str(out),
        "contract": contract,
        "options": opts_doc,
        "counts": {
            "slides": len(bags.bags),
            "groups": int(len(set(groups))),
            "tiles": int(sum(len(x) for x in xs)),
            "per_class": counts,
        },
        "notes": bags.notes + fold_notes,
        "device": str(device),
        "train_seconds": round(sum(r["train"].get("seconds", 0) for r in results), 2),
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "metrics": metrics,
        "plot": str(plot),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    _json_out(out / "report.json", report)
    return report
