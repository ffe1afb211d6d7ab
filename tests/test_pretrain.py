"""CCL pretraining pieces: the queue, the losses against a plain reference, k-means, the
augmentations, the data stream (partition, worker independence, resume skip), the
catalog tile source, a falling loss on an overfit run, and the CLI's refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from engine.encoder import load_backbone
from pretrain.augment import AugmentConfig, hed_jitter, two_views
from pretrain.ccl import CCL, spherical_kmeans
from pretrain.cli import main as pretrain_cli
from pretrain.config import TrainConfig
from pretrain.data import ImageFolderSource, TwoViewBatches, make_loader, open_source, shuffled_stream
from pretrain.train import train


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These models are tiny: on a small shared CI machine, thread hand-offs cost more than
    the arithmetic (a step takes seconds instead of a fraction of one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tile_folder(root: Path, n: int, size: int = 48) -> Path:
    """n small RGB tiles, each its own colour under pixel noise, so views of one tile can be
    told from views of another after crops, flips and rotations (not after colour jitter)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = rng.integers(40, 220, 3)
        arr = np.clip(base + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"tile{i:03d}.png")
    return root


def test_queue_pointer_wraps():
    model = CCL("resnet18", proj_dim=4, queue_size=10)
    batches = [F.normalize(torch.randn(4, 4), dim=1) for _ in range(3)]
    for keys in batches:
        model.enqueue(keys, keys)
    assert int(model.queue_ptr) == 2  # 12 keys written into 10 slots
    assert torch.equal(model.queue[4:8], batches[1])
    assert torch.equal(model.queue[8:10], batches[2][:2])
    assert torch.equal(model.queue[0:2], batches[2][2:])  # wrapped over batch 0's start
    assert torch.equal(model.queue[2:4], batches[0][2:])  # not yet overwritten
    with pytest.raises(ValueError, match="queue"):
        model.enqueue(torch.zeros(11, 4), torch.zeros(11, 4))


@pytest.mark.parametrize("weight", [1.0, 0.5, 0.0])
def test_losses_match_plain_reference(weight):
    """Instance loss = weighted InfoNCE written out with explicit sums; group loss = cross
    entropy of the query's group feature against its key's k-means cluster."""
    torch.manual_seed(0)
    model = CCL(
        "resnet18",
        proj_dim=8,
        queue_size=16,
        temperature=0.1,
        num_clusters=3,
        kmeans_iters=4,
        same_cluster_weight=weight,
    )
    x, y = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    queue, queue_group = model.queue.clone(), model.queue_group.clone()
    _, stats = model(x, y, seed=7)
    with torch.no_grad():
        q, qg = model.encoder_q(x)
        k, kg = model.encoder_k(y)
        centroids = spherical_kmeans(kg, 3, 4, torch.Generator().manual_seed(7))
        assign = (kg @ centroids.T).argmax(1)
        queue_assign = (queue_group @ centroids.T).argmax(1)
    losses = []
    for i in range(6):
        pos = math.exp(float(q[i] @ k[i]) / 0.1)
        neg = sum(
            (weight if queue_assign[j] == assign[i] else 1.0) * math.exp(float(q[i] @ queue[j]) / 0.1)
            for j in range(16)
        )
        losses.append(-math.log(pos / (pos + neg)))
    assert float(stats["loss_instance"]) == pytest.approx(np.mean(losses), rel=1e-4)
    group = F.cross_entropy(qg @ centroids.T / model.group_temperature, assign)
    assert float(stats["loss_group"]) == pytest.approx(float(group), rel=1e-4)
    # the keys went into the queue after the loss was computed
    assert torch.allclose(model.queue[:6], k, atol=1e-6) and int(model.queue_ptr) == 6


def test_spherical_kmeans_finds_separated_groups():
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.eye(3, 16), dim=1)
    truth = torch.arange(60) % 3
    x = F.normalize(centres[truth] + 0.05 * torch.randn(60, 16, generator=gen), dim=1)
    c = spherical_kmeans(x, 3, 10, torch.Generator().manual_seed(1))
    found = (x @ c.T).argmax(1)
    # same partition as the truth, whatever the cluster numbering
    pairs = {(int(a), int(b)) for a, b in zip(truth, found)}
    assert len(pairs) == 3
    with pytest.raises(ValueError):
        spherical_kmeans(x, 61, 1, gen)


def test_momentum_update_moves_keys_towards_queries():
    model = CCL("resnet18", proj_dim=4, queue_size=8, momentum=0.9)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.encoder_k.parameters()]
    model.momentum_update()
    for b, pk, pq in zip(before, model.encoder_k.parameters(), model.encoder_q.parameters()):
        assert torch.allclose(pk, 0.9 * b + 0.1 * pq, atol=1e-6)


def test_views_are_seeded_and_shaped():
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (3, 80, 96), dtype=np.uint8))
    cfg = AugmentConfig(crop_px=40)
    a1, b1 = two_views(img, cfg, torch.Generator().manual_seed(3))
    a2, b2 = two_views(img, cfg, torch.Generator().manual_seed(3))
    c1, _ = two_views(img, cfg, torch.Generator().manual_seed(4))
    assert a1.shape == b1.shape == (3, 40, 40) and a1.dtype == torch.uint8
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1, b1) and not torch.equal(a1, c1)


def test_hed_jitter_identity_and_direction():
    he = torch.tensor([180, 90, 160], dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8).contiguous()
    same = hed_jitter(he, torch.ones(3), torch.zeros(3))
    assert (same.int() - he.int()).abs().max() <= 1
    more_haematoxylin = hed_jitter(he, torch.tensor([1.5, 1.0, 1.0]), torch.zeros(3))
    assert more_haematoxylin.float().mean() < he.float().mean()  # more stain = darker


def test_stream_partition_workers_and_skip(tmp_path):
    source = ImageFolderSource(_tile_folder(tmp_path / "tiles", 23, size=24))
    order = [item for _, item in shuffled_stream(source, seed=0, epoch=0, block=8)]
    assert sorted(order) == sorted(source.items()) and order != list(source.items())
    assert order != [item for _, item in shuffled_stream(source, seed=0, epoch=1, block=8)]

    def batches(rank, workers=0, skip=0):
        ds = TwoViewBatches(
            source,
            epoch=0,
            seed=0,
            rank=rank,
            world=2,
            batch_size=3,
            num_batches=3,
            skip_batches=skip,
            augment=AugmentConfig(crop_px=16),
            shuffle_block=8,
        )
        return list(make_loader(ds, workers))

    plain = batches(0)
    assert [b[0] for b in plain] == [0, 1, 2]
    with_workers = batches(0, workers=2)
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(plain, with_workers))
    resumed = batches(0, skip=2)
    assert len(resumed) == 1 and torch.equal(resumed[0][1], plain[2][1])
    other = batches(1)
    assert not torch.equal(other[0][1], plain[0][1])


def test_catalog_source_reads_indexed_tiles(catalog_url, tmp_path):
    from engine.catalog.db import Catalog
    from engine.catalog.models import FAILED, INDEXED, Slide, Tile
    from engine.slides import open_slide, read_box
    from tests.synthetic_slides import tissue_blobs, write_pyramidal_tiff

    rgb = tissue_blobs(1024, 1024, seed=3)
    write_pyramidal_tiff(tmp_path / "slides" / "a.tiff", rgb, mpp=0.5)
    cat = Catalog(catalog_url)
    with cat.session() as s:
        good = Slide(path="a.tiff", fingerprint="a" * 64, status=INDEXED, mpp=0.5, width=1024, height=1024)
        bad = Slide(path="missing.tiff", fingerprint="b" * 64, status=FAILED)
        s.add_all([good, bad])
        s.flush()
        for i, (x, y) in enumerate([(0, 0), (448, 448), (512, 0), (0, 512), (512, 512), (256, 256)]):
            s.add(Tile(id=100 + i, slide_id=good.id, x=x, y=y, size=448, tissue_fraction=1.0))
        s.add(Tile(id=99, slide_id=bad.id, x=0, y=0, size=448, tissue_fraction=1.0))
    cat.dispose()

    source = open_source(catalog_url, tile_px=64, slide_root=tmp_path / "slides")
    assert source.count() == 6
    items = list(source.items())
    assert [it[0] for it in items] == list(range(100, 106))
    img = source.load(items[1])
    slide = open_slide(tmp_path / "slides" / "a.tiff")
    assert np.array_equal(np.asarray(img), np.asarray(read_box(slide, 448, 448, 448, 64)))
    # and it trains: two steps straight from the slide, no tile written anywhere
    summary = train(
        TrainConfig(
            data=catalog_url,
            out=str(tmp_path / "run"),
            arch="resnet18",
            batch_size=3,
            max_steps=2,
            crop_px=32,
            tile_px=64,
            slide_root=str(tmp_path / "slides"),
            queue_size=6,
            num_clusters=2,
            workers=0,
            checkpoint_every=1,
            log_every=1,
        ),
        progress=False,
    )
    assert summary["steps"] == 2 and summary["images_seen"] == 6


STEPS_OVERFIT = 20


def test_loss_falls_on_small_overfit_run(tmp_path):
    """32 tiles in 4 batches of 8, light augmentation, a queue of the last 2 batches: the
    instance loss must fall well below its level once the queue holds real keys."""
    data = _tile_folder(tmp_path / "tiles", 32, size=64)
    cfg = TrainConfig(
        data=str(data),
        out=str(tmp_path / "run"),
        arch="resnet18",
        batch_size=8,
        max_steps=STEPS_OVERFIT,
        lr=0.32,
        temperature=0.2,
        crop_px=48,
        min_crop_scale=0.6,
        jitter=0.0,
        queue_size=16,
        num_clusters=2,
        kmeans_iters=3,
        key_momentum=0.9,
        workers=0,
        checkpoint_every=STEPS_OVERFIT,
        log_every=1,
    )
    train(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss_instance"] for r in rows]
    assert len(loss) == STEPS_OVERFIT
    # step 1 compares against the random initial queue; from step 3 on the queue holds real keys
    assert np.mean(loss[-5:]) < 0.6 * np.mean(loss[2:7]), loss
    assert (tmp_path / "run" / "loss.png").is_file()


def test_cli_refusals_and_export(tmp_path):
    runner = CliRunner()
    data = _tile_folder(tmp_path / "tiles", 4, size=32)
    run = tmp_path / "run"
    base = [
        "train",
        "--data",
        str(data),
        "--out",
        str(run),
        "--arch",
        "resnet18",
        "--batch-size",
        "2",
        "--max-steps",
        "1",
        "--crop-px",
        "32",
        "--queue-size",
        "4",
        "--num-clusters",
        "1",
        "--workers",
        "0",
    ]

    result = runner.invoke(pretrain_cli, ["export", str(run), "--out", str(tmp_path / "x.pth")])
    assert result.exit_code != 0 and "no checkpoint" in result.output
    result = runner.invoke(pretrain_cli, ["train", "--data", str(tmp_path / "nope"), "--out", str(run)])
    assert result.exit_code != 0 and "no such folder" in result.output
    result = runner.invoke(pretrain_cli, base[:-4] + ["--batch-size", "8", "--workers", "0"])
    assert result.exit_code != 0 and "no full step" in result.output

    result = runner.invoke(pretrain_cli, base)
    assert result.exit_code == 0, result.output
    result = runner.invoke(pretrain_cli, base)
    assert result.exit_code != 0 and "resume" in result.output
    result = runner.invoke(pretrain_cli, base + ["--resume", "--temperature", "0.5"])
    assert result.exit_code != 0 and "temperature" in result.output
    result = runner.invoke(pretrain_cli, [*base[: base.index("--max-steps")], "--max-steps", "2", "--resume"])
    assert result.exit_code == 0, result.output

    out = tmp_path / "backbone.pth"
    result = runner.invoke(pretrain_cli, ["export", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    obj = torch.load(out, weights_only=True)
    assert obj["format"] == "histoseek-backbone" and obj["arch"] == "resnet18" and obj["pretrain"]["step"] == 2
    assert not any(k.startswith(("fc.", "encoder", "module.")) for k in obj["state_dict"])
    model, info = load_backbone(str(out))
    assert info.layout == "histoseek" and not info.dropped_keys


def test_accumulation_counts_steps_and_images(tmp_path):
    data = _tile_folder(tmp_path / "tiles", 8, size=32)
    summary = train(
        TrainConfig(
            data=str(data),
            out=str(tmp_path / "run"),
            arch="resnet18",
            batch_size=2,
            accum_steps=2,
            max_steps=3,
            crop_px=32,
            queue_size=4,
            num_clusters=1,
            workers=0,
            log_every=1,
        ),
        progress=False,
    )
    # 8 tiles = 4 micro-batches of 2 = 2 steps per epoch; step 3 starts epoch 1
    assert summary["steps"] == 3 and summary["images_seen"] == 12
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 0, 1]
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3 and int(state["model"]["queue_ptr"]) == 0  # 6 enqueues of 2 into 4 slots


def test_sigterm_stops_with_a_checkpoint(tmp_path):
    """A preempted run (SIGTERM) finishes its step, writes a checkpoint and says how to resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = _tile_folder(tmp_path / "tiles", 16, size=32)
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "pretrain",
        "train",
        "--data",
        str(data),
        "--out",
        str(run),
        "--arch",
        "resnet18",
        "--batch-size",
        "4",
        "--crop-px",
        "32",
        "--queue-size",
        "8",
        "--num-clusters",
        "2",
        "--workers",
        "1",
        "--max-steps",
        "200",
        "--checkpoint-every",
        "1000",
        "--log-every",
        "1",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while (
        time.monotonic() < deadline and proc.poll() is None and not (metrics.exists() and metrics.read_text().strip())
    ):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "resume the run" in err and json.loads(out)["stopped_early"] is True
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert 1 <= state["step"] < 200 and logged[-1] == state["step"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_training_on_cuda(tmp_path):
    data = _tile_folder(tmp_path / "tiles", 16, size=64)
    summary = train(
        TrainConfig(
            data=str(data),
            out=str(tmp_path / "run"),
            arch="resnet18",
            batch_size=8,
            max_steps=3,
            crop_px=64,
            queue_size=16,
            num_clusters=2,
            workers=0,
            device="cuda",
            log_every=1,
        ),
        progress=False,
    )
    assert summary["amp"] is True and summary["steps"] == 3
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["scaler"]["scale"] > 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows)
