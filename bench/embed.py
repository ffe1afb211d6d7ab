"""Embedding throughput: a naive eager fp32 torchvision forward (as RetCCL's get_feature.py:
one image per batch, decoded and normalised in the main process) against the engine's path
(`engine.features.compute_features`: DataLoader workers, channels_last, frozen graph), on the
same images, same machine, same run. Prints JSON.

    python bench/embed.py --images 96 --arch resnet50 --repeats 2

Rounds alternate naive/engine so that load from other processes hits both alike.
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
from torchvision import transforms

from engine.encoder import IMAGENET_MEAN, IMAGENET_STD, Encoder, build_backbone
from engine.features import compute_features, default_workers


def make_tiles(folder: Path, n: int, px: int = 224) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        low = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        path = folder / f"tile_{i:05d}.png"
        Image.fromarray(low).resize((px, px), Image.Resampling.BILINEAR).save(path)
        paths.append(path)
    return paths


def naive_rate(model: torch.nn.Module, paths: list[Path], batch_size: int) -> float:
    """get_feature.py's loop: PIL -> ToTensor -> Normalize in the main process, eager fp32."""
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            batch = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[i : i + batch_size]])
            model(batch).numpy()
    return len(paths) / (time.perf_counter() - start)


def engine_rate(encoder: Encoder, paths: list[Path], batch_size: int, workers: int) -> float:
    start = time.perf_counter()
    compute_features(encoder, paths, batch_size=batch_size, workers=workers, progress=False)
    return len(paths) / (time.perf_counter() - start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96, help="tiles per round (224x224 PNG)")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of each path (alternating)")
    ap.add_argument("--naive-batch-size", type=int, default=1, help="get_feature.py uses 1")
    ap.add_argument("--batch-size", type=int, default=32, help="engine batch size")
    ap.add_argument("--workers", type=int, default=None, help="engine decoding workers [cores - 1]")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    workers = default_workers() if args.workers is None else args.workers

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_tiles(Path(tmp), args.images)
        naive_model = build_backbone(args.arch).eval().to(args.device)
        encoder = Encoder(build_backbone(args.arch), _info(args.arch), device=args.device, precision="auto")
        # warm-up: first calls build the engine's frozen graph and warm caches for both
        naive_rate(naive_model, paths[:4], args.naive_batch_size)
        engine_rate(encoder, paths[: max(4, args.batch_size)], args.batch_size, 0)
        naive, fast = [], []
        for _ in range(args.repeats):
            naive.append(naive_rate(naive_model, paths, args.naive_batch_size))
            fast.append(engine_rate(encoder, paths, args.batch_size, workers))

    result = {
        "bench": "embed",
        "arch": args.arch,
        "device": args.device,
        "images_per_round": args.images,
        "repeats": args.repeats,
        "naive": {"batch_size": args.naive_batch_size, "img_per_s": round(statistics.median(naive), 2), "rounds": [round(r, 2) for r in naive]},
        "engine": {"batch_size": args.batch_size, "workers": workers, "img_per_s": round(statistics.median(fast), 2), "rounds": [round(r, 2) for r in fast]},
        "speedup": round(statistics.median(fast) / statistics.median(naive), 2),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


def _info(arch: str):
    from engine.encoder import ARCH_DIMS, EncoderInfo

    return EncoderInfo(name=f"bench-{arch}", architecture=arch, checkpoint_sha256="0" * 64, dim=ARCH_DIMS[arch], layout="random", source="bench", is_random=True)


if __name__ == "__main__":
    raise SystemExit(main())
