"""`python -m pretrain lincls`: the split keeps slides whole, the report matches sklearn's
metrics, a linear probe separates separable classes, fine-tuning runs end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from engine.evaluation.datasets import load_dataset
from pretrain.cli import main as pretrain_cli
from pretrain.lincls import classification_report, split_train_val

COLOURS = {"ADI": (235, 225, 230), "LYM": (60, 40, 120), "STR": (210, 120, 160)}


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _patch_set(root: Path, per_class: int = 8, size: int = 32) -> Path:
    """Folder data set (ROOT/CLASS/*.png) plus labels.csv with a slide per pair of patches."""
    rng = np.random.default_rng(0)
    rows = []
    for label, colour in COLOURS.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.clip(np.array(colour) + rng.integers(-25, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            name = f"{label}/{label.lower()}{i}.png"
            Image.fromarray(arr).save(root / name)
            rows.append({"path": name, "label": label, "slide": f"{label}-slide{i // 2}"})
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "slide"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_split_keeps_slides_whole_and_is_stratified(tmp_path):
    ds = load_dataset(f"csv:{_patch_set(tmp_path / 'p')}/labels.csv", slide_column="slide")
    train_idx, val_idx = split_train_val(ds, 0.3, "slide", seed=0)
    slides = np.array([item.slide for item in ds.items])
    assert not set(slides[train_idx]) & set(slides[val_idx])
    assert len(train_idx) + len(val_idx) == len(ds.items)
    labels = np.array(ds.labels)
    assert set(labels[val_idx]) == set(COLOURS)


def test_report_matches_sklearn():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix

    rng = np.random.default_rng(1)
    y_true, y_pred = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    report = classification_report(y_true, y_pred, ["a", "b", "c", "d"])
    assert report["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert report["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert report["confusion"] == confusion_matrix(y_true, y_pred).tolist()
    assert report["per_class"]["b"]["n"] == int((y_true == 1).sum())


@pytest.mark.parametrize("mode", ["linear", "finetune"])
def test_lincls_cli(tmp_path, mode):
    root = _patch_set(tmp_path / "p")
    out, plot = tmp_path / "report.json", tmp_path / "confusion.png"
    args = [
        "lincls",
        "--dataset",
        f"folder:{root}",
        "--encoder",
        "random:resnet18",
        "--device",
        "cpu",
        "--mode",
        mode,
        "--tile-px",
        "64",
        "--workers",
        "0",
        "--out",
        str(out),
        "--plot",
        str(plot),
    ]
    if mode == "finetune":
        args += ["--epochs", "2", "--batch-size", "8"]
    result = CliRunner().invoke(pretrain_cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["mode"] == mode and set(report["per_class"]) == set(COLOURS)
    assert sum(row["n"] for row in report["per_class"].values()) == report["split"]["val"] == report["n"]
    assert "balanced accuracy" in result.output and plot.stat().st_size > 1000
    if mode == "linear":
        # three flat colours: even random features separate them
        assert report["accuracy"] == 1.0


def test_lincls_refuses_bad_input(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        pretrain_cli, ["lincls", "--dataset", f"folder:{tmp_path / 'none'}", "--encoder", "random:resnet18"]
    )
    assert result.exit_code != 0 and "does not exist" in result.output
    root = _patch_set(tmp_path / "p", per_class=2)
    result = runner.invoke(
        pretrain_cli,
        [
            "lincls",
            "--dataset",
            f"csv:{root}/labels.csv",
            "--encoder",
            "random:resnet18",
            "--exclude",
            "slide",
            "--val-fraction",
            "0.1",
        ],
    )
    assert result.exit_code != 0 and "groups" in result.output
