"""`engine features` as a user runs it: files and folders in, .npy + sidecar out."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from engine.cli.main import main
from tests import checkpoints
from tests.test_encoder import rel_err, torchvision_reference


def write_tiles(folder, n, size=224, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((size, size), Image.Resampling.BILINEAR)
        path = folder / f"tile_{i:02d}.png"
        img.save(path)
        paths.append(path)
    return paths


def run(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result


@pytest.mark.slow
def test_fp32_features_equal_torchvision_resnet50(tmp_path):
    paths = write_tiles(tmp_path / "tiles", 3)
    model = checkpoints.torchvision_resnet("resnet50", seed=11)
    ckpt = checkpoints.save_released_layout(model, tmp_path / "best_ckpt.pth")
    out = tmp_path / "feats.npy"
    result = run(
        [
            "features",
            str(tmp_path / "tiles"),
            "--encoder",
            str(ckpt),
            "--precision",
            "fp32",
            "--out",
            str(out),
            "--workers",
            "0",
            "--data-dir",
            str(tmp_path),
        ]
    )
    assert result.exit_code == 0, result.output
    feats = np.load(out)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["paths"] == [str(p) for p in paths] and side["dim"] == 2048 and not side["normalised"]
    batch = torch.stack(
        [torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1) for p in paths]
    )
    assert rel_err(feats, torchvision_reference(checkpoints.torchvision_resnet("resnet50", seed=11), batch)) < 1e-4


def test_shared_patches_of_every_size_are_embedded(tmp_path, shared_data):
    out = tmp_path / "patches.npy"
    result = run(
        [
            "features",
            str(shared_data / "patches" / "kather2016"),
            str(shared_data / "patches" / "nct-crc-he-100k"),
            "--encoder",
            "random:resnet18",
            "--out",
            str(out),
            "--data-dir",
            str(tmp_path),
        ]
    )
    assert result.exit_code == 0, result.output
    feats = np.load(out)
    assert feats.shape == (24 + 9, 512) and np.isfinite(feats).all()
    assert len(set(map(tuple, feats.round(3)))) == 33  # every row is its own image


def test_unreadable_image_stops_with_its_name_unless_skip_bad(tmp_path):
    write_tiles(tmp_path / "tiles", 2, size=150)
    bad = tmp_path / "tiles" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "f.npy"
    base = [
        "features",
        str(tmp_path / "tiles"),
        "--encoder",
        "random:resnet18",
        "--out",
        str(out),
        "--workers",
        "0",
        "--data-dir",
        str(tmp_path),
    ]
    result = run(base)
    assert result.exit_code != 0 and "broken.png" in result.output and "skip unreadable images" in result.output
    assert not out.exists()

    result = run(base + ["--skip-bad"])
    assert result.exit_code == 0, result.output
    side = json.loads(out.with_suffix(".json").read_text())
    assert np.load(out).shape == (2, 512)
    assert [s["path"] for s in side["skipped"]] == [str(bad)]


def test_no_encoder_is_a_helpful_error(tmp_path):
    write_tiles(tmp_path / "tiles", 1)
    result = CliRunner(env={"HISTOSEEK_ENCODER": ""}).invoke(
        main, ["features", str(tmp_path / "tiles"), "--out", str(tmp_path / "f.npy"), "--data-dir", str(tmp_path)]
    )
    assert result.exit_code != 0 and "best_ckpt.pth" in result.output


def test_int8_is_a_flag_of_engine_features_only(tmp_path, monkeypatch):
    """Issue 14: `engine features --precision int8` quantises (close to fp32, not equal);
    HISTOSEEK_PRECISION=int8 and `indexer build --precision int8` are refused, so quantised
    features never reach an index by accident."""
    write_tiles(tmp_path / "tiles", 8, seed=3)
    common = ["--encoder", "random:resnet18", "--workers", "0", "--data-dir", str(tmp_path), "--device", "cpu"]
    outs = {}
    for precision in ("fp32", "int8"):
        out = tmp_path / f"{precision}.npy"
        result = run(["features", str(tmp_path / "tiles"), "--precision", precision, "--out", str(out), *common])
        assert result.exit_code == 0, result.output
        assert json.loads(out.with_suffix(".json").read_text())["precision"] == precision
        outs[precision] = np.load(out)
    a, b = outs["fp32"], outs["int8"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.9 and not np.allclose(a, b, rtol=1e-4, atol=1e-5)

    monkeypatch.setenv("HISTOSEEK_PRECISION", "int8")
    result = CliRunner().invoke(
        main, ["features", str(tmp_path / "tiles"), "--out", str(tmp_path / "env.npy"), *common]
    )
    assert result.exit_code != 0 and "precision must be 'auto' or 'fp32'" in result.output
    monkeypatch.delenv("HISTOSEEK_PRECISION")

    from indexer.cli import main as indexer_main

    result = CliRunner().invoke(indexer_main, ["build", str(tmp_path / "tiles"), "--precision", "int8", *common])
    assert result.exit_code == 2 and "int8" in result.output
