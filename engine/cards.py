"""Encoder cards: pathology foundation models (timm ViTs) the user holds on disk, beside RetCCL.

A card is a small JSON file naming a timm architecture, its constructor arguments, the weights
file, the preprocessing and the pooling (docs/encoders.md)::

    {"name": "uni", "library": "timm", "architecture": "vit_large_patch16_224",
     "kwargs": {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0},
     "weights": "pytorch_model.bin",
     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
     "input_px": 224, "mpp": 0.5, "pooling": "model"}

Built-in cards (`PRESETS`) are named ``preset:NAME:WEIGHTS_PATH``.

Preprocessing: a uint8 N x 3 x H x W RGB batch is resized (bilinear, antialiased) to
``input_px`` x ``input_px`` when it is not that size already, scaled to [0, 1], then
``(x - mean) / std`` per channel: N x 3 x input_px x input_px float.

Pooling, for a ViT of width D with P = num_prefix_tokens (class token + register tokens) and
T patch tokens, ``forward_features(x)`` is the normed token sequence N x (P + T) x D:

- ``model``: ``model(x)``, timm's own pooled output with ``num_classes=0`` (its ``global_pool``:
  the class token for ``token``, the patch mean for ``avg``): N x D;
- ``cls``: ``forward_features(x)[:, 0]``, the class token: N x D;
- ``cls+mean``: ``cat(tokens[:, 0], tokens[:, P:].mean(1))``, the class token beside the mean of
  the patch tokens (register tokens excluded), the Virchow convention: N x 2D.

Nothing is ever downloaded: hub names (``hf-hub:...``) and ``pretrained``/``pretrained_cfg``/
``checkpoint_path`` arguments are refused; timm is always called with ``pretrained=False`` and
the weights come from the card's file only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from engine.card_models import POOLINGS, PRESETS, CardModel, card_dim, create_backbone, layer_names, preset_names
from engine.encoder import Encoder, EncoderInfo
from engine.errors import EncoderError
from engine.files import file_sha256

LOG = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".bin", ".pth", ".pt", ".safetensors")
# constructor arguments that would fetch or load weights behind the card's back
REFUSED_KWARGS = (
    "pretrained",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "pretrained_strict",
    "checkpoint_path",
    "cache_dir",
)
REQUIRED = ("name", "architecture", "weights", "mean", "std", "input_px", "mpp")
OPTIONAL = ("library", "kwargs", "pooling", "state_dict_key", "ignore_keys", "source_url", "notes")


@dataclasses.dataclass(frozen=True)
class EncoderCard:
    """A parsed, validated card. `weights` is absolute (resolved against the card's folder)."""

    name: str
    architecture: str
    weights: Path
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_px: int
    mpp: float
    pooling: str = "model"
    library: str = "timm"
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    state_dict_key: str | None = None
    ignore_keys: tuple[str, ...] = ()
    source: str = ""  # the card file, or ``preset:NAME``

    @classmethod
    def from_dict(cls, data: Any, where: str, base_dir: Path | None = None) -> "EncoderCard":
        """Validate a card's JSON object; `where` names it in every error message."""

        def fail(field: str, why: str) -> EncoderError:
            return EncoderError(f"encoder card {where}: field {field!r}: {why}")

        if not isinstance(data, Mapping):
            raise EncoderError(f"encoder card {where}: expected a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(REQUIRED) - set(OPTIONAL))
        if unknown:
            raise fail(unknown[0], f"unknown field (known: {', '.join(REQUIRED + OPTIONAL)})")
        for field in REQUIRED:
            if field not in data:
                raise fail(field, "missing (required: " + ", ".join(REQUIRED) + ")")
        name, arch = data["name"], data["architecture"]
        if not isinstance(name, str) or not name.strip():
            raise fail("name", "expected a non-empty string")
        library = data.get("library", "timm")
        if library != "timm":
            raise fail("library", f"{library!r} is not supported; the one model library is 'timm'")
        if not isinstance(arch, str) or not arch:
            raise fail("architecture", "expected a timm architecture name, e.g. 'vit_large_patch16_224'")
        if ":" in arch or "/" in arch:
            raise fail(
                "architecture",
                f"{arch!r} is a hub name; nothing is downloaded: give the timm architecture "
                "(e.g. 'vit_large_patch16_224') and pass the weights file in 'weights'",
            )
        kwargs = data.get("kwargs", {})
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise fail("kwargs", "expected a JSON object of constructor arguments")
        for key in REFUSED_KWARGS:
            if key in kwargs and (key != "pretrained" or kwargs[key]):
                raise fail(
                    f"kwargs.{key}",
                    "refused: nothing is downloaded or loaded behind the card; pass the weights file in 'weights'",
                )
        layers = None
        for key, value in kwargs.items():
            if key.endswith("_layer") and not isinstance(value, str):
                raise fail(f"kwargs.{key}", "expected the name of a layer, e.g. 'SwiGLUPacked' or 'SiLU'")
            if key.endswith("_layer"):
                layers = layers or layer_names()
                if value not in layers:
                    raise fail(f"kwargs.{key}", f"unknown layer {value!r}; known: {', '.join(sorted(layers))}")
        weights = data["weights"]
        if not isinstance(weights, str) or not weights:
            raise fail("weights", "expected the path of the weights file (.bin, .pth or .safetensors)")
        if weights.startswith(("hf-hub:", "hf_hub:", "http://", "https://")):
            raise fail(
                "weights", f"{weights!r} is a download; nothing is downloaded: pass the path of the weights file"
            )
        path = Path(weights).expanduser()
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise fail("weights", f"{weights!r}: expected a {', '.join(WEIGHT_SUFFIXES)} file")
        mean, std = _triple(data["mean"], fail, "mean"), _triple(data["std"], fail, "std")
        if min(std) <= 0:
            raise fail("std", "must be positive")
        input_px, mpp = data["input_px"], data["mpp"]
        if not isinstance(input_px, int) or isinstance(input_px, bool) or not 16 <= input_px <= 4096:
            raise fail("input_px", f"expected an integer number of pixels (16-4096), got {input_px!r}")
        if not isinstance(mpp, (int, float)) or isinstance(mpp, bool) or not 0.05 <= mpp <= 50:
            raise fail("mpp", f"expected the native resolution in um/px (e.g. 0.5 for 20x), got {mpp!r}")
        pooling = data.get("pooling", "model")
        if pooling not in POOLINGS:
            raise fail("pooling", f"{pooling!r}; choose one of {', '.join(POOLINGS)}")
        key = data.get("state_dict_key")
        if key is not None and not (isinstance(key, str) and key):
            raise fail("state_dict_key", "expected the key (a string) the state dict sits under")
        ignore = data.get("ignore_keys", [])
        if not isinstance(ignore, list) or not all(isinstance(k, str) and k for k in ignore):
            raise fail("ignore_keys", "expected a list of state-dict keys (or prefixes ending with '.') to drop")
        return cls(
            name=name.strip(),
            architecture=arch,
            weights=path,
            mean=mean,
            std=std,
            input_px=input_px,
            mpp=float(mpp),
            pooling=pooling,
            library=library,
            kwargs=dict(kwargs),
            state_dict_key=key,
            ignore_keys=tuple(ignore),
            source=where,
        )

    def to_dict(self) -> dict[str, Any]:
        """The card as JSON-ready data (what the catalog or a report records)."""
        out = dataclasses.asdict(self)
        out.update(
            weights=str(self.weights), mean=list(self.mean), std=list(self.std), ignore_keys=list(self.ignore_keys)
        )
        return out


def _triple(value: Any, fail, field: str) -> tuple[float, float, float]:
    if not (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise fail(field, f"expected 3 numbers (R, G, B, on the 0-1 scale), got {value!r}")
    if max(abs(v) for v in value) > 1.5:
        raise fail(field, f"{value!r}: expected the 0-1 scale (e.g. 0.485), not 0-255")
    return (float(value[0]), float(value[1]), float(value[2]))


def load_card(path: str | Path) -> EncoderCard:
    """Read and validate a card file; its `weights` are resolved against the card's folder."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EncoderError(f"encoder card {path} not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EncoderError(f"encoder card {path}: not readable JSON ({exc})") from None
    return EncoderCard.from_dict(data, where=str(path), base_dir=path.resolve().parent)


def preset_card(name: str, weights: str | Path) -> EncoderCard:
    """A built-in card (engine.card_models.PRESETS) with the user's weights file."""
    key = name.strip().lower()
    if key not in PRESETS:
        raise EncoderError(f"unknown encoder preset {name!r}; presets: {', '.join(preset_names())}")
    data = dict(PRESETS[key], weights=str(weights))
    return EncoderCard.from_dict(data, where=f"preset:{key}", base_dir=Path.cwd())


def is_card_spec(spec: str | None) -> bool:
    """Whether an encoder spec names a card (``preset:...`` or a ``.json`` file) rather than a
    RetCCL checkpoint or ``random``."""
    return spec is not None and (spec.startswith("preset:") or spec.lower().endswith(".json"))


def card_from_spec(spec: str) -> EncoderCard:
    """``preset:NAME:WEIGHTS_PATH`` or the path of a card file."""
    if spec.startswith("preset:"):
        parts = spec.split(":", 2)
        if len(parts) < 3 or not parts[1] or not parts[2]:
            raise EncoderError(
                f"encoder {spec!r}: write preset:NAME:WEIGHTS_PATH; presets: {', '.join(preset_names())}"
            )
        return preset_card(parts[1], parts[2])
    return load_card(spec)


@dataclasses.dataclass(frozen=True)
class CardInfo(EncoderInfo):
    """EncoderInfo of a card encoder: `checkpoint_sha256` is the sha256 of the weights file;
    the preprocessing, pooling and native resolution come from the card."""

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    input_px: int = 224
    mpp: float = 0.5
    pooling: str = "model"

    @property
    def normalisation(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "input_px": self.input_px, "pooling": self.pooling}


def read_state_dict(card: EncoderCard) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The card's weights file as a state dict (under `state_dict_key` if named), less the
    `ignore_keys`; returns (state, dropped keys)."""
    path = card.weights
    if not path.is_file():
        raise EncoderError(f"encoder card {card.source}: field 'weights': {path} not found")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a bad file
        raise EncoderError(f"encoder card {card.source}: field 'weights': cannot read {path}: {exc}") from None
    if card.state_dict_key is not None:
        if not isinstance(obj, Mapping) or card.state_dict_key not in obj:
            keys = sorted(obj)[:10] if isinstance(obj, Mapping) else []
            raise EncoderError(
                f"encoder card {card.source}: field 'state_dict_key': {path.name} has no key {card.state_dict_key!r} (top-level keys: {keys})"
            )
        obj = obj[card.state_dict_key]
    if not isinstance(obj, Mapping) or not obj:
        raise EncoderError(
            f"encoder card {card.source}: field 'weights': {path.name} holds no state dict (a mapping of names to tensors); set 'state_dict_key' if it sits under a key"
        )
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise EncoderError(
            f"encoder card {card.source}: field 'weights': {path.name} holds non-tensor entries {sorted(bad)[:8]}; set 'state_dict_key' to the state dict's key"
        )
    dropped = [k for k in obj if any(k == p or (p.endswith(".") and k.startswith(p)) for p in card.ignore_keys)]
    return {k: v for k, v in obj.items() if k not in set(dropped)}, dropped


def _key_list(keys: list[str]) -> str:
    return f"{keys[:8]}{f' (+{len(keys) - 8} more)' if len(keys) > 8 else ''}"


def build_card_model(card: EncoderCard) -> tuple[CardModel, CardInfo]:
    """The card's model with its weights loaded (eval, float32, CPU) and its info.

    The backbone is built on the meta device and the weights assigned to it, so a ViT-g costs
    one copy of its weights and no random initialisation."""
    state, dropped = read_state_dict(card)
    with torch.device("meta"):
        backbone = create_backbone(card)
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise EncoderError(
            f"encoder card {card.source}: weights {card.weights.name} do not fit {card.architecture} with these kwargs: "
            f"missing keys {_key_list(missing)}, unexpected keys {_key_list(unexpected)}"
            + (" (add them to 'ignore_keys' to drop them)" if unexpected and not missing else "")
        )
    shapes = sorted(k for k in expected if tuple(expected[k].shape) != tuple(state[k].shape))
    if shapes:
        detail = ", ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in shapes[:5])
        raise EncoderError(
            f"encoder card {card.source}: weights {card.weights.name} do not fit {card.architecture} (weights vs model shapes): {detail}"
        )
    backbone.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True, assign=True
    )
    if any(t.is_meta for t in [*backbone.parameters(), *backbone.buffers()]):
        # a buffer outside the state dict (e.g. non-persistent rope tables): build for real
        backbone = create_backbone(card)
        backbone.load_state_dict(state, strict=True)
    model = CardModel(backbone.eval(), card.pooling).eval()
    if dropped:
        LOG.info("encoder card %s: dropped %d ignored keys: %s", card.source, len(dropped), ", ".join(dropped[:10]))
    info = CardInfo(
        name=card.name,
        architecture=card.architecture,
        checkpoint_sha256=file_sha256(card.weights),
        dim=card_dim(card),
        layout="card",
        source=card.source if card.source.startswith("preset:") else str(card.source),
        dropped_keys=tuple(dropped),
        mean=card.mean,
        std=card.std,
        input_px=card.input_px,
        mpp=card.mpp,
        pooling=card.pooling,
    )
    return model, info


class CardEncoder(Encoder):
    """An `Encoder` over a card model: the same `embed`/`embed_unit`/`warm_up` API and the same
    precision rules (the inherited fast path: fp16 autocast on CUDA, bf16 autocast on CPUs with
    native bf16, plain fp32 elsewhere; ``fp32`` exact eager), with the card's preprocessing."""

    def __init__(self, model: nn.Module, info: CardInfo, device: str = "auto", precision: str = "auto"):
        if precision == "int8":
            raise EncoderError("precision 'int8' is the ResNet CPU path; card encoders take 'auto' or 'fp32'")
        super().__init__(model, info, device=device, precision=precision)  # the card's preprocessing

    @classmethod
    def from_card(cls, card: EncoderCard, device: str = "auto", precision: str = "auto") -> "CardEncoder":
        model, info = build_card_model(card)
        return cls(model, info, device=device, precision=precision)

    @classmethod
    def from_spec(cls, spec: str, device: str = "auto", precision: str = "auto") -> "CardEncoder":
        return cls.from_card(card_from_spec(spec), device=device, precision=precision)

    def _build_fast(self, example: torch.Tensor):
        # autocast (fp16 on CUDA, bf16 on CPUs with native bf16) is applied by the inherited
        # _forward_fast; a traced + frozen graph gains nothing on a ViT's GEMMs, so the fast
        # model is the eager one (inference mode)
        return self.model

    def warm_up(self) -> None:
        if self.precision == "auto":
            with torch.inference_mode():
                blank = torch.zeros((1, 3, self.input_px, self.input_px), dtype=torch.uint8)
                self._forward_fast(self.normalise(blank))
