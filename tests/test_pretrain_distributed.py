"""The must-show of CCL pretraining: a 2-process gloo run on CPU trains on the shared real
patches, is killed, resumes to exactly the state of an uninterrupted run, exports, and the
export works as --encoder for `engine features` and `indexer build`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from click.testing import CliRunner

from engine.catalog.db import Catalog
from engine.catalog.models import EncoderRecord, Slide, Tile
from engine.cli.main import main as engine_cli
from engine.encoder import Encoder, load_backbone
from engine.files import file_sha256
from engine.images import find_images, open_rgb, to_uint8_chw
from indexer.cli import main as indexer_cli
from pretrain.cli import main as pretrain_cli

pytestmark = pytest.mark.slow

STEPS = 4
# 2 ranks x 4 tiles x 2 accumulated micro-batches = 16 tiles per step (DDP no_sync exercised)
ARGS = [
    "--arch",
    "resnet18",
    "--batch-size",
    "4",
    "--accum-steps",
    "2",
    "--crop-px",
    "64",
    "--queue-size",
    "24",
    "--num-clusters",
    "3",
    "--kmeans-iters",
    "3",
    "--workers",
    "1",
    "--checkpoint-every",
    "1",
    "--log-every",
    "1",
    "--max-steps",
    str(STEPS),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "pretrain",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        *ARGS,
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _checkpoint_step(run: Path) -> int:
    path = run / "checkpoint.pt"
    if not path.exists():
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=False)["step"])


def _run_to_end(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _kill_after_first_checkpoint(cmd: list[str], run: Path) -> int:
    """Start the run in its own process group; SIGKILL the whole group (torchrun, both
    ranks, loader workers) once a checkpoint exists, as a crashed node would."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (run / "checkpoint.pt").exists():
                break
            time.sleep(0.05)
        assert proc.poll() is None, "run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return _checkpoint_step(run)


def test_two_rank_gloo_kill_resume_export(shared_data, tmp_path, test_output):
    data = shared_data / "patches"
    reference, killed = tmp_path / "reference", tmp_path / "killed"

    _run_to_end(_torchrun(data, reference))
    stopped_at = _kill_after_first_checkpoint(_torchrun(data, killed), killed)
    assert 1 <= stopped_at < STEPS, f"kill landed at step {stopped_at}; the test needs a run stopped midway"
    _run_to_end(_torchrun(data, killed, "--resume"))

    ref = torch.load(reference / "checkpoint.pt", map_location="cpu", weights_only=False)
    got = torch.load(killed / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert got["step"] == ref["step"] == STEPS and got["world_size"] == 2
    for key, value in ref["model"].items():
        assert torch.equal(value, got["model"][key]), f"model tensor {key} differs after resume"
    assert int(got["model"]["queue_ptr"]) == (STEPS * 16) % 24  # wrapped around twice
    for pid, slots in ref["optimizer"]["state"].items():
        assert torch.equal(slots["momentum_buffer"], got["optimizer"]["state"][pid]["momentum_buffer"])
    # the resumed metrics continue the killed run's lines without duplicates
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    ref_loss = [json.loads(line)["loss"] for line in (reference / "metrics.jsonl").read_text().splitlines()]
    got_loss = [json.loads(line)["loss"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert got_loss == pytest.approx(ref_loss, rel=1e-6)
    assert (killed / "loss.png").stat().st_size > 1000

    export = test_output / "ccl-resnet18.pth"
    runner = CliRunner()
    result = runner.invoke(pretrain_cli, ["export", str(killed), "--out", str(export)])
    assert result.exit_code == 0, result.output
    model, info = load_backbone(str(export))
    assert info.architecture == "resnet18" and info.layout == "histoseek" and info.dim == 512
    backbone = {
        k[len("encoder_q.backbone.") :]: v for k, v in got["model"].items() if k.startswith("encoder_q.backbone.")
    }
    for key, value in model.state_dict().items():
        assert torch.equal(value, backbone[key])

    # --encoder for `engine features`: same numbers as the backbone called directly
    feats = test_output / "feats.npy"
    images = find_images([data / "kather2016"])[:4]
    result = runner.invoke(
        engine_cli,
        [
            "features",
            *map(str, images),
            "--encoder",
            str(export),
            "--precision",
            "fp32",
            "--workers",
            "0",
            "--out",
            str(feats),
        ],
    )
    assert result.exit_code == 0, result.output
    x = np.load(feats)
    assert x.shape == (4, 512)
    with torch.no_grad():
        expected = Encoder(model, info, device="cpu", precision="fp32").embed(
            torch.stack([to_uint8_chw(open_rgb(p)) for p in images])
        )
    np.testing.assert_allclose(x, expected, rtol=1e-4, atol=1e-5)

    # --encoder for `indexer build`: a real slide indexed with the pretrained backbone
    archive = tmp_path / "archive"
    archive.mkdir()
    os.symlink(shared_data / "slides" / "real" / "CMU-1-Small-Region.svs", archive / "cmu.svs")
    catalog = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    result = runner.invoke(
        indexer_cli,
        [
            "build",
            str(archive),
            "--encoder",
            str(export),
            "--catalog",
            catalog,
            "--index-dir",
            str(tmp_path / "index"),
            "--data-dir",
            str(tmp_path / "data"),
            "--workers",
            "0",
            "--no-progress",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    cat = Catalog(catalog)
    with cat.session() as s:
        enc = s.scalars(sa.select(EncoderRecord)).one()
        slide = s.scalars(sa.select(Slide)).one()
        tiles = s.scalar(sa.select(sa.func.count()).select_from(Tile))
    cat.dispose()
    assert (enc.architecture, enc.dim, enc.checkpoint_sha256) == ("resnet18", 512, file_sha256(export))
    assert slide.status == "indexed" and slide.encoder_id == enc.id and tiles > 0
