"""Real processes: `indexer build` killed with SIGKILL at several points and rerun, and a
2-process torchrun build (gloo, CPU); both must end equal to a clean 1-process build
(same slides, tile ids, coordinates and vectors; no duplicates)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.catalog.db import Catalog
from indexer.verify import verify_index
from tests.synthetic_slides import tissue_blobs, write_pyramidal_tiff
from tests.test_indexer_build import _build, _settings, _snapshot

pytestmark = pytest.mark.slow

# Sizes differ so that slides finish at different times and the ranks get unequal shares.
SLIDES = {
    "s1.tiff": (1400, 1400),
    "s2.tiff": (900, 1400),
    "s3.tiff": (900, 900),
    "s4.tiff": (1350, 900),
    "s5.tiff": (700, 1000),
}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slow") / "archive"
    for i, (name, (h, w)) in enumerate(SLIDES.items()):
        write_pyramidal_tiff(
            root / name, tissue_blobs(h, w, seed=20 + i, n_blobs=3, radius=(0.3, 0.45)), mpp=0.5, min_level_px=256
        )
    return root


@pytest.fixture(scope="module")
def reference(archive, tmp_path_factory):
    """A clean single-process build: the result every other run must equal."""
    settings = _settings(tmp_path_factory.mktemp("reference"))
    summary = _build(settings, archive)
    assert summary.failed == 0 and summary.indexed == len(SLIDES)
    return _snapshot(settings)


def _cli_args(tmp_path: Path, archive: Path) -> list[str]:
    return [
        "build",
        str(archive),
        "--catalog",
        f"sqlite:///{tmp_path / 'catalog.sqlite'}",
        "--index-dir",
        str(tmp_path / "index"),
        "--encoder",
        "random:resnet18",
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--no-progress",
    ]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _assert_equal(got: dict, want: dict) -> None:
    assert got["slides"] == want["slides"]
    assert got["tiles"] == want["tiles"]  # same ids, slides, coordinates; no duplicates
    assert len({t[0] for t in got["tiles"]}) == len(got["tiles"])
    assert sorted(got["vectors"]) == sorted(want["vectors"])
    for tile_id, vec in want["vectors"].items():
        assert np.allclose(got["vectors"][tile_id], vec, atol=1e-4), tile_id


def _run_until(args: list[str], condition, timeout_s: float = 240) -> bool:
    """Start the CLI; SIGKILL it (and its decoding workers) once `condition()` holds.
    True when it was killed, False when it finished first."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "indexer", *args],
        env=_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + timeout_s
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if condition():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.02)
        assert proc.poll() is not None, "indexer build did not finish in time"
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _shard_files(tmp_path: Path) -> int:
    return len(list((tmp_path / "index").rglob("*.faiss")))


def test_sigkill_at_several_points_then_rerun_equals_clean_build(tmp_path, archive, reference):
    args = _cli_args(tmp_path, archive)
    # 1: as soon as the archive is registered (fingerprint cache written), before any commit
    assert _run_until(args, lambda: (tmp_path / "index" / "fingerprints.json").exists())
    # 2: right when the first shard file lands (between its write and its commit, or just after)
    assert _run_until(args, lambda: _shard_files(tmp_path) >= 1)
    # 3: in the middle of the remaining slides
    killed = _run_until(args, lambda: _shard_files(tmp_path) >= 3)
    settings = _settings(tmp_path)
    rerun = _build(settings, archive)
    assert rerun.failed == 0
    if killed:
        assert rerun.indexed >= 1
    _assert_equal(_snapshot(settings), reference)
    cat = Catalog(settings.catalog_url)
    report = verify_index(cat, settings.index_dir)
    cat.dispose()
    assert report.ok, report.problems


def test_torchrun_two_processes_equals_one(tmp_path, archive, reference):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "indexer",
        *_cli_args(tmp_path, archive),
        "--workers",
        "0",
        "--json",
    ]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    summary = json.loads(done.stdout)
    assert summary["indexed"] == len(SLIDES) and summary["failed"] == 0
    assert [r["rank"] for r in summary["ranks"]] == [0, 1]
    assert all(r["indexed"] > 0 for r in summary["ranks"]), summary["ranks"]
    settings = _settings(tmp_path)
    _assert_equal(_snapshot(settings), reference)
    cat = Catalog(settings.catalog_url)
    assert verify_index(cat, settings.index_dir).ok
    cat.dispose()
