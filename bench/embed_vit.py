"""The ViT rows of `python bench/embed.py --vit`: a card encoder's default path (`CardEncoder`,
precision "auto": fp16 autocast on CUDA, bf16 autocast on CPUs with native bf16, eager fp32
elsewhere) against a naive eager fp32 timm forward, same random-init weights, same tiles,
same run.

    python bench/embed.py --vit --no-throughput                  # ViT-S/B/L at 224 px only
    python bench/embed.py --vit --vit-model vit_small_patch16_224:32:2 --vit-model vit_base_patch16_224:16:1

Each model is ARCH[:BATCH[:ROUNDS]]; rounds alternate naive/engine so that load from other
processes hits both alike; each side is warmed up once before timing. The naive side is what
a user script does: uint8 -> float, ImageNet-normalise, ``model(x)`` under no_grad.

Kept apart from bench/embed.py (the one command) only because together they pass the
house's 400-line limit for a module.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engine.cards import CardEncoder, load_card

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
DEFAULT_MODELS = ["vit_small_patch16_224:32:2", "vit_base_patch16_224:32:1", "vit_large_patch16_224:8:1"]


def tiles(n: int, px: int = 224) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    low = torch.randint(0, 256, (n, 3, 14, 14), generator=g, dtype=torch.uint8).float()
    return torch.nn.functional.interpolate(low, size=(px, px), mode="bilinear").round().clamp(0, 255).to(torch.uint8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def auto_path(encoder: CardEncoder) -> str:
    from engine import encoder as enc

    if encoder.device.type == "cuda":
        return "fp16 autocast (CUDA)"
    return (
        "bf16 autocast (native bf16 CPU)"
        if enc._cpu_has_native_bf16()
        else "fp32 eager, inference mode (CPU without native bf16)"
    )


def bench_model(spec: str, device: str, folder: Path) -> dict:
    import timm

    arch, *rest = spec.split(":")
    batch = int(rest[0]) if rest else 32
    rounds = int(rest[1]) if len(rest) > 1 else 2
    torch.manual_seed(0)
    naive = timm.create_model(arch, pretrained=False, num_classes=0).eval()
    weights = folder / f"{arch}.pth"
    torch.save(naive.state_dict(), weights)
    card = folder / f"{arch}.json"
    card.write_text(
        json.dumps(
            {
                "name": arch,
                "architecture": arch,
                "kwargs": {"num_classes": 0},
                "weights": weights.name,
                "mean": MEAN.flatten().tolist(),
                "std": STD.flatten().tolist(),
                "input_px": 224,
                "mpp": 0.5,
                "pooling": "model",
            }
        )
    )
    engine = CardEncoder.from_card(load_card(card), device=device, precision="auto")
    dev = engine.device
    naive = naive.to(dev)
    x = tiles(batch)
    mean, std = MEAN.to(dev), STD.to(dev)

    def run_naive() -> np.ndarray:
        with torch.no_grad():
            return naive((x.to(dev).float() / 255 - mean) / std).cpu().numpy()

    engine.warm_up()
    ref, got = run_naive(), engine.embed(x)  # warm both
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    times = {"naive": 0.0, "engine": 0.0}
    for _ in range(rounds):
        for side, fn in (("naive", run_naive), ("engine", lambda: engine.embed(x))):
            sync(dev)
            t = time.perf_counter()
            fn()
            sync(dev)
            times[side] += time.perf_counter() - t
    naive_rate, engine_rate = batch * rounds / times["naive"], batch * rounds / times["engine"]
    return {
        "arch": arch,
        "params_m": round(sum(p.numel() for p in naive.parameters()) / 1e6, 1),
        "batch": batch,
        "rounds": rounds,
        "naive_fp32_img_per_s": round(naive_rate, 2),
        "engine_auto_img_per_s": round(engine_rate, 2),
        "speedup": round(engine_rate / naive_rate, 2),
        "engine_auto_path": auto_path(engine),
        "cosine_auto_to_fp32": {"min": round(float(cos.min()), 5), "mean": round(float(cos.mean()), 5)},
    }


def vit_rows(specs: list[str] | None, device: str) -> dict:
    """Every model's row (DEFAULT_MODELS when `specs` is empty), plus the versions and CPU
    flags they were measured with."""
    import timm

    out = {
        "timm": timm.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_before": [round(v, 2) for v in os.getloadavg()],
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs or DEFAULT_MODELS:
            out["rows"].append(bench_model(spec, device, Path(tmp)))
            print(json.dumps(out["rows"][-1]), file=sys.stderr, flush=True)
    out["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    return out
