"""Training one model: Adam, one slide per step (bags differ in size; CLAM does the same),
class-weighted cross-entropy (+ the instance loss), early stopping on the validation loss
of a patient-grouped split taken from the training part only (the test fold is never seen)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging

import numpy as np
import torch
from torch.nn import functional as F

from engine.mil.model import GatedAttentionMIL

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainOptions:
    hidden: int = 256
    attention: int = 128
    dropout: float = 0.25
    lr: float = 5e-4
    weight_decay: float = 1e-5
    max_epochs: int = 40
    min_epochs: int = 3
    patience: int = 6
    val_fraction: float = 0.2
    instance_loss: bool = True
    instance_k: int = 8
    instance_weight: float = 0.3  # CLAM's bag weight 0.7
    max_tiles: int | None = None  # a random subset per slide and epoch (speed on huge slides)


def validation_split(
    y: np.ndarray, groups: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """(train rows, validation rows) with no group on both sides and every class on both;
    None when the training part is too small for that (then no early stopping)."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, round(1 / fraction)) if fraction > 0 else 0
    per_class_groups = min(len(set(groups[y == c])) for c in np.unique(y))
    if not n_splits or per_class_groups < 2:
        return None
    n_splits = min(n_splits, per_class_groups)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for tr, va in splitter.split(np.zeros(len(y)), y, groups):
        if len(np.unique(y[va])) == len(np.unique(y)) and len(np.unique(y[tr])) == len(np.unique(y)):
            return tr, va
    return None


def _loss(
    model: GatedAttentionMIL, x: torch.Tensor, label: int, class_weight: torch.Tensor, opts: TrainOptions
) -> torch.Tensor:
    logits, scores, h = model(x)
    loss = F.cross_entropy(logits[None], torch.tensor([label], device=x.device), weight=class_weight)
    if opts.instance_loss and opts.instance_weight > 0:
        loss = (1 - opts.instance_weight) * loss + opts.instance_weight * model.instance_loss(
            h, scores, label, opts.instance_k
        )
    return loss


@torch.no_grad()
def _mean_loss(model, xs, y, device, class_weight, opts) -> float:
    model.eval()
    return float(
        np.mean(
            [
                _loss(model, torch.from_numpy(x).to(device).float(), int(t), class_weight, opts).item()
                for x, t in zip(xs, y)
            ]
        )
    )


@contextlib.contextmanager
def _threads_for(xs: list[np.ndarray], device: torch.device):
    """One CPU thread for small bags: their matrix products are too small to split, and two
    threads on a busy machine made a step many times slower (docs/benchmarks.md)."""
    small = device.type == "cpu" and np.mean([x.size for x in xs]) < 200_000
    before = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_model(
    xs: list[np.ndarray],
    y: np.ndarray,
    groups: np.ndarray,
    n_classes: int,
    opts: TrainOptions,
    *,
    device: torch.device,
    seed: int,
    progress: bool = True,
    desc: str = "train",
) -> tuple[GatedAttentionMIL, dict]:
    """Train on bags `xs` (features n_i x dim) with labels `y`; returns the model at its best
    validation epoch and a summary (epochs, best epoch, losses)."""
    with _threads_for(xs, device):
        return _train_model(xs, y, groups, n_classes, opts, device=device, seed=seed, progress=progress, desc=desc)


def _train_model(xs, y, groups, n_classes, opts, *, device, seed, progress, desc):
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    split = validation_split(y, groups, opts.val_fraction, seed)
    tr, va = split if split is not None else (np.arange(len(y)), np.array([], np.int64))
    if split is None:
        LOG.warning(
            "%s: too few patients (groups) per class for a validation split; training %d epochs without early stopping",
            desc,
            opts.max_epochs,
        )
    model = GatedAttentionMIL(xs[0].shape[1], n_classes, opts.hidden, opts.attention, opts.dropout).to(device)
    optim = torch.optim.Adam(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    # balanced classes: a rare class weighs as much as a common one in the loss
    counts = np.bincount(y[tr], minlength=n_classes).astype(np.float32)
    class_weight = torch.tensor(counts.sum() / np.maximum(counts, 1) / n_classes, device=device)
    best, best_loss, best_epoch, stale, history = None, np.inf, 0, 0, []
    bar = tqdm(range(1, opts.max_epochs + 1), desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        total = 0.0
        for i in rng.permutation(tr):
            x = xs[i]
            if opts.max_tiles and len(x) > opts.max_tiles:
                x = x[rng.choice(len(x), opts.max_tiles, replace=False)]
            loss = _loss(model, torch.from_numpy(x).to(device).float(), int(y[i]), class_weight, opts)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            total += loss.item()
        train_loss = total / len(tr)
        val_loss = _mean_loss(model, [xs[i] for i in va], y[va], device, class_weight, opts) if len(va) else train_loss
        history.append({"epoch": epoch, "train_loss": round(train_loss, 5), "val_loss": round(val_loss, 5)})
        bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
        if val_loss < best_loss - 1e-4 or best is None:
            best, best_loss, best_epoch, stale = copy.deepcopy(model.state_dict()), val_loss, epoch, 0
        else:
            stale += 1
        if len(va) and epoch >= opts.min_epochs and stale >= opts.patience:
            break
    if len(va) == 0:
        best, best_epoch = model.state_dict(), len(history)
    model.load_state_dict(best)
    model.eval()
    info = {
        "epochs": len(history),
        "best_epoch": best_epoch,
        "best_val_loss": round(float(best_loss), 5) if len(va) else None,
        "train_slides": int(len(tr)),
        "val_slides": int(len(va)),
        "early_stopping": bool(len(va)),
        "history": history,
    }
    return model, info


@torch.no_grad()
def infer(model: GatedAttentionMIL, x: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities C, attention weights n summing to 1) of one slide."""
    logits, scores, _ = model(
        torch.from_numpy(np.ascontiguousarray(x)).to(device).float()
    )  # float16 bags allowed (half the memory)
    return torch.softmax(logits, 0).cpu().numpy(), torch.softmax(scores, 0).cpu().numpy()
