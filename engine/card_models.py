"""The model side of encoder cards: built-in cards (``--encoder preset:NAME:WEIGHTS_PATH``) for
published pathology foundation models that timm builds, the timm backbone of a card and its
pooling (`CardModel`; the pooling with shapes is documented in engine/cards.py).

Each preset is a card without its ``weights``: architecture, constructor arguments, pooling,
normalisation and native resolution as the model's own published model card gives them
(``source_url``; docs/encoders.md lists them with what each line rests on). The weights are
gated downloads the user holds; histoseek never fetches them.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.errors import EncoderError

if TYPE_CHECKING:
    from engine.cards import EncoderCard

POOLINGS = ("model", "cls+mean", "cls")

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

PRESETS: dict[str, dict] = {
    # UNI (Chen et al., Nat Med 2024): ViT-L/16, DINOv2-trained on Mass-100K at 20x
    "uni": {
        "name": "UNI",
        "architecture": "vit_large_patch16_224",
        "kwargs": {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
        **IMAGENET,
        "input_px": 224,
        "mpp": 0.5,
        "pooling": "model",
        "source_url": "https://huggingface.co/MahmoodLab/UNI",
    },
    # UNI2-h: ViT-H/14 with SwiGLU and 8 register tokens, 1536-d class token
    "uni2-h": {
        "name": "UNI2-h",
        "architecture": "vit_huge_patch14_224",
        "kwargs": {
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "mlp_layer": "SwiGLUPacked",
            "act_layer": "SiLU",
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        **IMAGENET,
        "input_px": 224,
        "mpp": 0.5,
        "pooling": "model",
        "source_url": "https://huggingface.co/MahmoodLab/UNI2-h",
    },
    # Virchow2 (Paige): ViT-H/14, 4 register tokens; embedding = class token + patch-token mean
    "virchow2": {
        "name": "Virchow2",
        "architecture": "vit_huge_patch14_224",
        "kwargs": {
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            "mlp_layer": "SwiGLUPacked",
            "act_layer": "SiLU",
            "reg_tokens": 4,
        },
        **IMAGENET,
        "input_px": 224,
        "mpp": 0.5,
        "pooling": "cls+mean",
        "source_url": "https://huggingface.co/paige-ai/Virchow2",
    },
    # H-optimus-0 (Bioptimus): ViT-g/14 with 4 registers, its own normalisation
    "h-optimus-0": {
        "name": "H-optimus-0",
        "architecture": "vit_giant_patch14_reg4_dinov2",
        "kwargs": {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "num_classes": 0},
        "mean": [0.707223, 0.578729, 0.703617],
        "std": [0.211883, 0.230117, 0.177517],
        "input_px": 224,
        "mpp": 0.5,
        "pooling": "model",
        "source_url": "https://huggingface.co/bioptimus/H-optimus-0",
    },
    # Prov-GigaPath tile encoder: a DINOv2 ViT-g with 16 px patches (its hub config.json args)
    "prov-gigapath": {
        "name": "Prov-GigaPath",
        "architecture": "vit_giant_patch14_dinov2",
        "kwargs": {
            "img_size": 224,
            "in_chans": 3,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "init_values": 1e-05,
            "mlp_ratio": 5.33334,
            "num_classes": 0,
        },
        **IMAGENET,
        "input_px": 224,
        "mpp": 0.5,
        "pooling": "model",
        "source_url": "https://huggingface.co/prov-gigapath/prov-gigapath",
    },
}

ALIASES = {
    "uni2h": "uni2-h",
    "uni2": "uni2-h",
    "hoptimus0": "h-optimus-0",
    "h-optimus": "h-optimus-0",
    "gigapath": "prov-gigapath",
}
PRESETS.update({alias: PRESETS[target] for alias, target in ALIASES.items()})

# the feature width of each preset (checked by tests/test_cards.py on the meta device)
PRESET_DIMS = {"uni": 1024, "uni2-h": 1536, "virchow2": 2560, "h-optimus-0": 1536, "prov-gigapath": 1536}


def preset_names() -> list[str]:
    return [name for name in PRESETS if name not in ALIASES]


def layer_names() -> dict[str, Any]:
    """The layer classes a card's ``*_layer`` arguments may name (JSON cannot hold classes)."""
    from timm import layers

    return {
        "SwiGLUPacked": layers.SwiGLUPacked,
        "SwiGLU": layers.SwiGLU,
        "GluMlp": layers.GluMlp,
        "Mlp": layers.Mlp,
        "SiLU": nn.SiLU,
        "GELU": nn.GELU,
        "ReLU": nn.ReLU,
        "LayerNorm": nn.LayerNorm,
    }


class CardModel(nn.Module):
    """A timm backbone and the card's pooling: normalised N x 3 x H x W -> N x dim features."""

    def __init__(self, backbone: nn.Module, pooling: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pooling == "model":
            return self.backbone(x)
        tokens = self.backbone.forward_features(x)
        if self.pooling == "cls":
            return tokens[:, 0]
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens :].mean(dim=1)], dim=-1)


def create_backbone(card: EncoderCard) -> nn.Module:
    """The card's timm architecture, built with pretrained=False (random init, no hub access)
    on the current default device (build under ``torch.device("meta")`` for a free dry run)."""
    import timm

    if not timm.is_model(card.architecture):
        close = difflib.get_close_matches(card.architecture, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise EncoderError(
            f"encoder card {card.source}: field 'architecture': timm has no model {card.architecture!r}{hint}"
        )
    layers = layer_names()
    kwargs = {k: layers[v] if k.endswith("_layer") else v for k, v in card.kwargs.items() if k != "pretrained"}
    try:
        model = timm.create_model(card.architecture, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise EncoderError(
            f"encoder card {card.source}: field 'kwargs': timm cannot build {card.architecture} with them ({exc})"
        ) from None
    if card.pooling != "model" and int(getattr(model, "num_prefix_tokens", 0)) < 1:
        raise EncoderError(
            f"encoder card {card.source}: field 'pooling': {card.pooling!r} needs a class token, and {card.architecture} has none"
        )
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if (
        img_size is not None
        and tuple(img_size) != (card.input_px, card.input_px)
        and not getattr(patch_embed, "dynamic_img_size", False)
    ):
        raise EncoderError(
            f"encoder card {card.source}: field 'input_px': {card.input_px} px, but the model is built for "
            f"{tuple(img_size)} (set kwargs.img_size, or kwargs.dynamic_img_size: true)"
        )
    return model.eval()


def card_dim(card: EncoderCard) -> int:
    """The feature width of the card, from a forward on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        pooled = CardModel(create_backbone(card), card.pooling)
    with torch.no_grad():
        out = pooled(torch.empty(1, 3, card.input_px, card.input_px, device="meta"))
    if out.ndim != 2:
        raise EncoderError(
            f"encoder card {card.source}: field 'pooling': 'model' gives {out.ndim - 1}-d tokens per image, not a vector "
            "(kwargs.global_pool is ''?): use pooling 'cls' or 'cls+mean'"
        )
    return int(out.shape[1])
