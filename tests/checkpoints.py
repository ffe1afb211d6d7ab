"""Checkpoints in every layout the encoder accepts, made from seeded random weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torchvision

VIT_ARCH = "vit_small_patch16_224"


def torchvision_resnet(arch: str = "resnet50", seed: int = 1) -> torch.nn.Module:
    """A plain torchvision ResNet with non-trivial BN statistics (so folding them matters)."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model.eval()


def backbone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def save_released_layout(model: torch.nn.Module, path: Path) -> Path:
    """Like RetCCL's best_ckpt.pth: plain ResNet keys, no fc."""
    torch.save(backbone_state(model), path)
    return path


def save_moco_layout(model: torch.nn.Module, path: Path) -> Path:
    """Like the older release: module.encoder_q.* with a projection head, a momentum encoder
    and a queue, inside {"state_dict": ...}."""
    state = {}
    for k, v in backbone_state(model).items():
        state[f"module.encoder_q.{k}"] = v
        state[f"module.encoder_k.{k}"] = v.clone()
    state["module.encoder_q.fc.0.weight"] = torch.randn(2048, 2048)
    state["module.encoder_q.fc.0.bias"] = torch.zeros(2048)
    state["module.encoder_q.fc.2.weight"] = torch.randn(128, 2048)
    state["module.queue"] = torch.randn(128, 64)
    torch.save({"epoch": 3, "arch": "resnet50", "state_dict": state}, path)
    return path


def save_torchvision_layout(model: torch.nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def vit_model(seed: int = 7, **kwargs) -> torch.nn.Module:
    """A randomly initialised timm ViT-S/16 (pooled output, no head)."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(VIT_ARCH, pretrained=False, num_classes=0, **kwargs).eval()


def write_card(folder: Path, filename: str = "card.json", **fields) -> Path:
    """`folder/filename`: an encoder card for a ViT-S/16 whose weights are
    `folder/weights.pth`; `fields` replace the defaults (e.g. `name`, `mpp`)."""
    card = {
        "name": "vit-s-test",
        "library": "timm",
        "architecture": VIT_ARCH,
        "kwargs": {"num_classes": 0},
        "weights": "weights.pth",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "input_px": 224,
        "mpp": 0.5,
        "pooling": "model",
    }
    card.update(fields)
    path = folder / filename
    path.write_text(json.dumps(card))
    return path
