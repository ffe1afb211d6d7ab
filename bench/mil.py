"""Training time of attention MIL (engine.mil) on synthetic features: N slides x T tiles x D
(default 500 x 2,000 x 2,048, RetCCL's width), the label carried by 2 % of each positive
slide's tiles. The features go straight to the trainer (reading them from shards is a
separate, I/O-bound cost). Trains one cross-validation fold (80 % of the slides, a 20 %
validation split inside it) for --epochs epochs and prints JSON: seconds per epoch and the
projection for a 5-fold run.

    python bench/mil.py [--slides 500 --tiles 2000 --dim 2048 --epochs 2 --device auto]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = [f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f" {f}" in text]
    return f"{model}, {text.count('processor')} cores visible, flags {' '.join(flags)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=500)
    ap.add_argument("--tiles", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-tiles", type=int, default=None)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from engine.encoder import resolve_device
    from engine.mil.train import TrainOptions, infer, train_model

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    signal = rng.standard_normal(args.dim).astype(np.float32)
    signal /= np.linalg.norm(signal)
    y = np.arange(args.slides) % 2
    xs = []
    for i in range(args.slides):  # float16 in memory: 500 x 2,000 x 2,048 is 4 GB instead of 8
        x = rng.standard_normal((args.tiles, args.dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        if y[i]:
            x[: max(1, args.tiles // 50)] += 0.5 * signal
        xs.append(x.astype(np.float16))
    make_s = time.perf_counter() - t0
    train_rows = np.arange(int(0.8 * args.slides))
    device = resolve_device(args.device)
    opts = TrainOptions(
        max_epochs=args.epochs, min_epochs=args.epochs, patience=args.epochs + 1, max_tiles=args.max_tiles
    )
    t0 = time.perf_counter()
    model, info = train_model(
        [xs[i] for i in train_rows],
        y[train_rows],
        np.arange(len(train_rows)).astype(str),
        2,
        opts,
        device=device,
        seed=0,
        progress=True,
        desc="bench",
    )
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    test = np.arange(len(train_rows), args.slides)
    probs = np.stack([infer(model, xs[i], device)[0] for i in test])
    infer_s = time.perf_counter() - t0
    from sklearn.metrics import roc_auc_score

    per_epoch = train_s / info["epochs"]
    print(
        json.dumps(
            {
                "slides": args.slides,
                "tiles_per_slide": args.tiles,
                "dim": args.dim,
                "max_tiles": args.max_tiles,
                "device": str(device),
                "torch_threads": torch.get_num_threads(),
                "cpu": cpu_name(),
                "epochs": info["epochs"],
                "train_slides": info["train_slides"],
                "val_slides": info["val_slides"],
                "train_s": round(train_s, 1),
                "s_per_epoch": round(per_epoch, 1),
                "ms_per_slide_step": round(1000 * per_epoch / (info["train_slides"] + info["val_slides"]), 1),
                "infer_ms_per_slide": round(1000 * infer_s / len(test), 1),
                "projected_5fold_20epochs_min": round(5 * 20 * per_epoch / 60, 1),
                "test_auc_after_these_epochs": round(float(roc_auc_score(y[test], probs[:, 1])), 3),
                "make_features_s": round(make_s, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
