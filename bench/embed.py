"""Embedding throughput: a naive eager fp32 torchvision forward (as RetCCL's get_feature.py:
one image per batch, decoded and normalised in the main process) against the engine's path
(`engine.features.compute_features`: DataLoader workers, channels_last, frozen graph), on the
same images, same machine, same run. Prints JSON.

    python bench/embed.py --images 96 --arch resnet50 --repeats 2 [--int8-probe]

Rounds alternate naive/engine so that load from other processes hits both alike.

Also measured in the same run, to say how far a CPU can go at all: the fp32 roofline, i.e.
the img/s the model would reach if every one of its floating-point operations ran at the
speed of a large fp32 matrix product on this machine (no convolution does better), and
whether the requested speed-up lies above it. `--int8-probe` measures the one path that can
pass that roofline on a CPU without bf16/fp16 units, post-training int8 quantisation (FX
graph mode, x86 backend, calibrated on the probe tiles): its img/s and its cosine to fp32.
The engine never picks it: `Encoder(precision="int8")` is opt-in, and `--int8-retrieval`
measures what it does to retrieval on the real labelled patches of ../shared/data/patches
(labels.csv, label_nct9): top-10 neighbour overlap with fp32, Acc@k and mMV@5 of both, and
their img/s, with one ResNet (random weights, batch-norm statistics re-estimated on the
patches, as for the probe) through the engine's Encoder at both precisions:

    python bench/embed.py --int8-retrieval --arch resnet50 --no-throughput

`--vit` adds ViT rows (ViT-S/B/L at random init through an encoder card, the engine's
default path against a naive fp32 timm forward, same run; bench/embed_vit.py):

    python bench/embed.py --vit --no-throughput --vit-model vit_small_patch16_224:16:1
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

from engine.encoder import IMAGENET_MEAN, IMAGENET_STD, Encoder, build_backbone, cpu_flags
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


def fp32_roofline(model: torch.nn.Module, device: str) -> dict:
    """GFLOP per image of `model` at 224 px and the fp32 GFLOP/s of a 4096^3 matrix product."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 224, 224, device=device))
    gflop = counter.get_total_flops() / 1e9
    a = torch.randn(4096, 4096, device=device)
    b = torch.randn(4096, 4096, device=device)
    rates = []
    for _ in range(4):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        rates.append(2 * 4096**3 / (time.perf_counter() - t) / 1e9)
    gemm = max(rates[1:])  # the first product warms up the BLAS
    return {
        "model_gflop_per_img": round(gflop, 3),
        "gemm_fp32_gflop_per_s": round(gemm, 1),
        "img_per_s": round(gemm / gflop, 2),
    }


def int8_probe(arch: str, paths: list[Path], batch_size: int, source: str) -> dict:
    """img/s and cosine to fp32 of a post-training int8 copy of the model (CPU only).

    Random weights give degenerate activations, so the batch-norm statistics are first
    re-estimated on the probe tiles: the network then scales its activations as a trained
    one does, which is what quantisation error depends on."""
    import copy
    import warnings

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    # the real patches come in several sizes; the engine resizes to 224 px as well
    x = torch.stack([tf(Image.open(p).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)) for p in paths])
    model = build_backbone(arch)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the pass
    with torch.no_grad():
        model.train()(x)
        model.eval()
        ref = model(x)
    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x[:1],))
        with torch.no_grad():
            prepared(x)  # calibration
        quantised = convert_fx(prepared)
    with torch.no_grad():
        out = quantised(x)
        cos = torch.nn.functional.cosine_similarity(ref, out)
        quantised(x[:batch_size])
        start = time.perf_counter()
        for i in range(0, len(x), batch_size):
            quantised(x[i : i + batch_size])
        rate = len(x) / (time.perf_counter() - start)
    return {
        "batch_size": batch_size,
        "img_per_s": round(rate, 2),
        "cosine_to_fp32": {"min": round(float(cos.min()), 5), "mean": round(float(cos.mean()), 5)},
        "tiles": f"{len(paths)} {source}",
    }


def int8_retrieval(arch: str, batch_size: int, seed: int = 0) -> dict:
    """Leave-one-out retrieval over the labelled patches with the engine's Encoder at fp32
    and at int8 (calibrated on its first batch, as in use; the patches are shuffled so that
    batch mixes the classes)."""
    import copy
    import csv

    from engine.encoder import l2_normalise, load_backbone
    from engine.evaluation.metrics import MISSING, acc_at_k, encode_labels, mmv_at_k

    root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "patches"
    if not (root / "labels.csv").is_file():
        raise SystemExit(f"--int8-retrieval needs {root}/labels.csv (../shared/data)")
    with open(root / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["label_nct9"]]
    order = np.random.default_rng(seed).permutation(len(rows))
    rows = [rows[i] for i in order]
    imgs = torch.from_numpy(
        np.stack(
            [
                np.asarray(Image.open(root / r["path"]).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))
                for r in rows
            ]
        )
        .transpose(0, 3, 1, 2)
        .copy()
    )
    model, info = load_backbone(f"random:{arch}")
    # batch-norm statistics from the patches (see int8_probe): activations scaled as in a
    # trained network, which is what quantisation error depends on
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    probe = Encoder(model, info, device="cpu", precision="fp32")
    with torch.no_grad():
        model.train()(probe.normalise(imgs))
    model.eval()
    feats, rates = {}, {}
    for precision in ("fp32", "int8"):
        enc = Encoder(copy.deepcopy(model), info, device="cpu", precision=precision)
        enc.embed(imgs[:batch_size])  # builds (int8: calibrates on this first batch)
        start = time.perf_counter()
        feats[precision] = l2_normalise(
            np.concatenate([enc.embed(imgs[i : i + batch_size]) for i in range(0, len(imgs), batch_size)])
        )
        rates[precision] = len(imgs) / (time.perf_counter() - start)
    codes, classes = encode_labels([r["label_nct9"] for r in rows])
    k_max = 10
    out = {
        "patches": len(rows),
        "classes": classes,
        "arch": arch,
        "weights": "random, BN statistics re-estimated on the patches",
        "batch_size": batch_size,
    }
    neighbours = {}
    for precision, f in feats.items():
        sim = f @ f.T
        np.fill_diagonal(sim, -np.inf)  # leave one out
        neighbours[precision] = np.argsort(-sim, axis=1)[:, :k_max]
        ranked = codes[neighbours[precision]]
        out[precision] = {
            "img_per_s": round(rates[precision], 2),
            **{f"acc@{k}": round(acc_at_k(codes, ranked, k), 4) for k in (1, 3, 5)},
            "mmv@5": round(mmv_at_k(codes, ranked, 5), 4),
        }
    overlap = [len(set(a) & set(b)) / k_max for a, b in zip(neighbours["fp32"], neighbours["int8"])]
    cos = (feats["fp32"] * feats["int8"]).sum(1)
    out["top10_overlap_with_fp32"] = {
        "mean": round(float(np.mean(overlap)), 4),
        "min": round(float(np.min(overlap)), 2),
    }
    out["cosine_int8_to_fp32"] = {"min": round(float(cos.min()), 4), "mean": round(float(cos.mean()), 4)}
    out["int8_speedup_over_fp32_eager"] = round(rates["int8"] / rates["fp32"], 2)
    assert MISSING not in codes
    return out


def real_tiles(n: int) -> list[Path]:
    """Up to n real H&E patches from ../shared/data/patches when present (int8 calibration
    depends on the image statistics), else none."""
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "patches"
    found = (
        sorted(p for p in root.rglob("*") if p.suffix.lower() in {".png", ".tif", ".tiff", ".jpg"})
        if root.is_dir()
        else []
    )
    return found[:n]


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
    ap.add_argument("--target", type=float, default=2.5, help="speed-up asked for, compared with the fp32 roofline")
    ap.add_argument(
        "--int8-probe", action="store_true", help="also measure post-training int8 (speed and cosine to fp32; CPU)"
    )
    ap.add_argument(
        "--int8-retrieval",
        action="store_true",
        help="also measure Encoder(precision='int8') against fp32 on retrieval over the labelled patches",
    )
    ap.add_argument(
        "--no-throughput", action="store_true", help="skip the naive/engine throughput rounds (with --int8-retrieval)"
    )
    ap.add_argument("--vit", action="store_true", help="also the ViT rows (bench/embed_vit.py): engine vs naive fp32")
    ap.add_argument(
        "--vit-model", action="append", default=None, help="ARCH[:BATCH[:ROUNDS]] for --vit (repeatable) [ViT-S/B/L]"
    )
    args = ap.parse_args(argv)
    vit = None
    if args.vit:
        from embed_vit import vit_rows  # bench/ is the script's folder, first on sys.path

        vit = vit_rows(args.vit_model, args.device)
    if args.no_throughput:
        if not (args.int8_retrieval or args.vit):
            ap.error("--no-throughput only makes sense with --int8-retrieval or --vit")
        json.dump(
            {
                "bench": "embed",
                **({"int8_retrieval": int8_retrieval(args.arch, args.batch_size)} if args.int8_retrieval else {}),
                **({"vit": vit} if vit else {}),
                "cpu_flags": cpu_flags(),
                "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
            },
            sys.stdout,
            indent=1,
        )
        print()
        return 0
    workers = default_workers() if args.workers is None else args.workers

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_tiles(Path(tmp), args.images)
        naive_model = build_backbone(args.arch).eval().to(args.device)
        encoder = Encoder.from_spec(f"random:{args.arch}", device=args.device, precision="auto")
        # warm-up: first calls build the engine's frozen graph and warm caches for both
        naive_rate(naive_model, paths[:4], args.naive_batch_size)
        engine_rate(encoder, paths[: max(4, args.batch_size)], args.batch_size, 0)
        naive, fast = [], []
        for _ in range(args.repeats):
            naive.append(naive_rate(naive_model, paths, args.naive_batch_size))
            fast.append(engine_rate(encoder, paths, args.batch_size, workers))
        roofline = fp32_roofline(naive_model, args.device)
        probe = None
        if args.int8_probe:
            real = real_tiles(args.images)
            probe = int8_probe(
                args.arch,
                real or paths,
                args.batch_size,
                "real H&E patches (shared/data/patches)" if real else "synthetic tiles",
            )

    result = {
        "bench": "embed",
        "arch": args.arch,
        "device": args.device,
        "images_per_round": args.images,
        "repeats": args.repeats,
        "naive": {
            "batch_size": args.naive_batch_size,
            "img_per_s": round(statistics.median(naive), 2),
            "rounds": [round(r, 2) for r in naive],
        },
        "engine": {
            "batch_size": args.batch_size,
            "workers": workers,
            "img_per_s": round(statistics.median(fast), 2),
            "rounds": [round(r, 2) for r in fast],
        },
        "speedup": round(statistics.median(fast) / statistics.median(naive), 2),
        "fp32_roofline": {
            **roofline,
            "speedup_over_naive": round(roofline["img_per_s"] / statistics.median(naive), 2),
            "target_speedup": args.target,
            "target_above_roofline": args.target * statistics.median(naive) > roofline["img_per_s"],
        },
        **(
            {"int8_probe": {**probe, "speedup_over_naive": round(probe["img_per_s"] / statistics.median(naive), 2)}}
            if probe
            else {}
        ),
        **({"int8_retrieval": int8_retrieval(args.arch, args.batch_size)} if args.int8_retrieval else {}),
        **({"vit": vit} if vit else {}),
        "cpu_flags": cpu_flags(),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
