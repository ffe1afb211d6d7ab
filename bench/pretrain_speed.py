"""CCL pretraining throughput (tiles per second, two views each), against a baseline in the
same run. Prints JSON.

- backbone: the compute floor of any MoCo-style step: query backbone forward + backward on
  one view, key backbone forward (no grad) on the other, SGD step. No heads, queue, k-means.
- ccl:      the full `pretrain.ccl.CCL` step (heads, shuffle-free single process keys,
            k-means, weighted InfoNCE, group loss, queue, momentum update).
- train:    `pretrain.train.train` end to end on generated PNG tiles: decoding, the H&E
            augmentations in loader workers, the step, logging, one checkpoint at the end.

Rounds of backbone/ccl alternate so that load from other processes hits both alike.

    python bench/pretrain_speed.py --arch resnet50 --batch-size 16 --steps 4
    python bench/pretrain_speed.py --arch resnet50 --batch-size 128 --steps 20 --device cuda   # per GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.encoder import build_backbone
from pretrain.ccl import CCL
from pretrain.config import TrainConfig
from pretrain.train import train


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backbone_rate(arch: str, batch: int, px: int, steps: int, device: torch.device, amp: bool) -> float:
    torch.manual_seed(0)
    q, k = build_backbone(arch).to(device).train(), build_backbone(arch).to(device).train()
    opt = torch.optim.SGD(q.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, px, px, device=device), torch.randn(batch, 3, px, px, device=device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            with torch.no_grad():
                k(y)
            loss = q(x).float().pow(2).mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return _rate(step, batch, steps, device)


def ccl_rate(arch: str, batch: int, px: int, steps: int, device: torch.device, amp: bool) -> float:
    torch.manual_seed(0)
    model = CCL(arch, queue_size=max(4096, batch)).to(device).train()
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, px, px, device=device), torch.randn(batch, 3, px, px, device=device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    seed = [0]

    def step():
        seed[0] += 1
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss, _ = model(x, y, seed=seed[0])
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        model.momentum_update()

    return _rate(step, batch, steps, device)


def _rate(step, batch: int, steps: int, device: torch.device) -> float:
    step()  # warm-up: allocations, cuDNN autotuning
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def end_to_end_rate(arch: str, batch: int, px: int, steps: int, device: str, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tiles = Path(tmp) / "tiles"
        tiles.mkdir()
        rng = np.random.default_rng(0)
        for i in range(batch * (steps + 1)):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize(
                (px, px), Image.Resampling.BILINEAR
            ).save(tiles / f"t{i:05d}.png")
        cfg = TrainConfig(
            data=str(tiles),
            out=str(Path(tmp) / "run"),
            arch=arch,
            batch_size=batch,
            max_steps=steps + 1,
            crop_px=px,
            tile_px=px,
            queue_size=max(4096, batch),
            workers=workers,
            device=device,
            log_every=1,
            checkpoint_every=steps + 1,
        )
        summary = train(cfg, progress=False)
    return {"img_per_s": summary["img_per_s"], "workers": workers, "note": "first step (start-up) left out"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=16, help="tiles per step (per GPU)")
    parser.add_argument("--crop-px", type=int, default=224)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--workers",
        type=int,
        default=max(0, min(4, (os.cpu_count() or 1) - 1)),
        help="loader workers of the end-to-end run",
    )
    parser.add_argument("--no-end-to-end", action="store_true", help="skip the end-to-end train() run")
    args = parser.parse_args(argv)

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    amp = device.type == "cuda"
    rates: dict[str, list[float]] = {"backbone": [], "ccl": []}
    for _ in range(args.repeats):
        rates["backbone"].append(backbone_rate(args.arch, args.batch_size, args.crop_px, args.steps, device, amp))
        rates["ccl"].append(ccl_rate(args.arch, args.batch_size, args.crop_px, args.steps, device, amp))
    result = {
        "benchmark": "pretrain",
        "command": "python bench/pretrain_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "arch": args.arch,
        "batch_size": args.batch_size,
        "crop_px": args.crop_px,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
        "amp": amp,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "backbone_img_per_s": statistics.median(rates["backbone"]),
        "ccl_img_per_s": statistics.median(rates["ccl"]),
        "rounds": rates,
    }
    result["ccl_over_backbone"] = result["ccl_img_per_s"] / result["backbone_img_per_s"]
    if not args.no_end_to_end:
        result["train_end_to_end"] = end_to_end_rate(
            args.arch, args.batch_size, args.crop_px, args.steps, str(device), args.workers
        )
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
