"""The RetCCL encoder: a torchvision ResNet with fc = Identity, and its checkpoint loader.

The architecture lives here once; `pretrain` trains it and exports checkpoints that load
exactly like the released RetCCL weights. Accepted checkpoint layouts:

- ``retccl``: the released `best_ckpt.pth`, a plain torchvision ResNet-50 state dict, no fc;
- ``moco``: the older release, keys under ``module.`` / ``encoder_q.`` with projection heads
  (``fc.*``), the momentum encoder and the queue, all dropped and reported;
- ``torchvision``: an ImageNet classification state dict (its ``fc.*`` is dropped and reported);
- ``histoseek``: ``{"arch": "resnet18", "state_dict": {...}}`` as written by `pretrain export`;
- ``random[:ARCH[:SEED]]``: seeded random weights for tests and demos, never for diagnosis.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import re
import threading
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torchvision
from torch import nn

from engine.errors import EncoderError
from engine.files import file_sha256

LOG = logging.getLogger(__name__)

RELEASED_RETCCL_SHA256 = "931956f31d3f1a3f6047f3172b9e59ee3460d29f7c0c2bb219cbc8e9207795ff"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_PX = 224
# feature width of each supported torchvision ResNet (the output of avgpool)
ARCH_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}
# blocks per stage, used to recognise the architecture of a bare state dict
ARCH_BLOCKS = {
    ("basic", 2, 2, 2, 2): "resnet18",
    ("basic", 3, 4, 6, 3): "resnet34",
    ("bottleneck", 3, 4, 6, 3): "resnet50",
    ("bottleneck", 3, 4, 23, 3): "resnet101",
    ("bottleneck", 3, 8, 36, 3): "resnet152",
}
_DROP_PREFIXES = ("module.", "encoder_q.", "backbone.")


@dataclasses.dataclass(frozen=True)
class EncoderInfo:
    """What a loaded encoder is; recorded in the catalog and in every shard."""

    name: str
    architecture: str
    checkpoint_sha256: str
    dim: int
    layout: str
    source: str
    is_random: bool = False
    dropped_keys: tuple[str, ...] = ()

    @property
    def is_released_retccl(self) -> bool:
        return self.checkpoint_sha256 == RELEASED_RETCCL_SHA256

    @property
    def normalisation(self) -> dict[str, Any]:
        return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "input_px": INPUT_PX}

    def describe(self) -> str:
        text = f"{self.name} ({self.architecture}, {self.dim}-d, sha256 {self.checkpoint_sha256[:12]})"
        if self.is_released_retccl:
            text += " [released RetCCL weights]"
        if self.is_random:
            text += " [random weights: NOT FOR DIAGNOSIS]"
        return text


def build_backbone(arch: str = "resnet50") -> nn.Module:
    """A torchvision ResNet without weights and with fc = Identity (avgpool features)."""
    if arch not in ARCH_DIMS:
        raise EncoderError(f"unsupported architecture {arch!r}; choose one of {sorted(ARCH_DIMS)}")
    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = nn.Identity()
    return model


def infer_architecture(state: Mapping[str, Any]) -> str:
    """Recognise a torchvision ResNet from the keys of its state dict."""
    kind = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    blocks = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(max(idx) + 1 if idx else 0)
    arch = ARCH_BLOCKS.get((kind, *blocks))
    if arch is None:
        raise EncoderError(f"checkpoint is not a torchvision ResNet ({kind} blocks per stage {blocks})")
    return arch


def split_checkpoint(obj: Any) -> tuple[str | None, dict[str, torch.Tensor], str, list[str]]:
    """Normalise any accepted checkpoint object into (arch or None, backbone state dict,
    layout name, dropped keys)."""
    arch = None
    layout = "retccl"
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        arch = obj.get("arch")
        layout = "histoseek" if obj.get("format") == "histoseek-backbone" else "moco"
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise EncoderError("checkpoint holds no state dict (expected a mapping of parameter names to tensors)")
    state: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in obj.items():
        if not torch.is_tensor(value):
            dropped.append(key)
            continue
        name = key
        stripped = False
        while name.startswith(_DROP_PREFIXES):
            name = name.split(".", 1)[1]
            stripped = True
        if stripped:
            layout = "moco" if layout != "histoseek" else layout
        # momentum encoder, queue and projection/classification heads are not the backbone
        if key.startswith(("module.encoder_k.", "encoder_k.")) or name.startswith(("fc.", "queue")) or "." not in name:
            dropped.append(key)
            continue
        state[name] = value
    if any(k.startswith("fc.") for k in obj) and layout == "retccl":
        layout = "torchvision"
    return arch, state, layout, dropped


def is_random_spec(spec: str | None) -> bool:
    """Whether an encoder spec names random weights (``random[:ARCH[:SEED]]``): the one test
    of it, for the web app's banner and the demo as much as for loading."""
    return spec is not None and (spec == "random" or spec.startswith("random:"))


def load_backbone(spec: str) -> tuple[nn.Module, EncoderInfo]:
    """Build the backbone named by `spec` (a checkpoint path or ``random[:ARCH[:SEED]]``)."""
    if is_random_spec(spec):
        parts = spec.split(":")
        arch = parts[1] if len(parts) > 1 and parts[1] else "resnet50"
        seed = int(parts[2]) if len(parts) > 2 else 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_backbone(arch)
        canonical = f"random:{arch}:{seed}"
        info = EncoderInfo(
            name=canonical,
            architecture=arch,
            checkpoint_sha256=hashlib.sha256(canonical.encode()).hexdigest(),
            dim=ARCH_DIMS[arch],
            layout="random",
            source=canonical,
            is_random=True,
        )
        return model.eval(), info

    path = Path(spec).expanduser()
    if not path.is_file():
        raise EncoderError(
            f"encoder checkpoint {spec!r} not found: pass the path of a RetCCL checkpoint "
            "(best_ckpt.pth), a `pretrain export` file, or `random` for a demo"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; all mean the same here
        raise EncoderError(f"cannot read checkpoint {path}: {exc}") from None
    arch, state, layout, dropped = split_checkpoint(obj)
    arch = arch or infer_architecture(state)
    model = build_backbone(arch)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise EncoderError(
            f"checkpoint {path} does not fit {arch}: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    model.load_state_dict(state, strict=True)
    sha = file_sha256(path)
    if dropped:
        LOG.info(
            "checkpoint %s (%s layout): dropped %d non-backbone keys: %s",
            path.name,
            layout,
            len(dropped),
            ", ".join(dropped[:10]),
        )
    name = "RetCCL" if sha == RELEASED_RETCCL_SHA256 else path.stem
    info = EncoderInfo(
        name=name,
        architecture=arch,
        checkpoint_sha256=sha,
        dim=ARCH_DIMS[arch],
        layout=layout,
        source=str(path),
        dropped_keys=tuple(dropped),
    )
    return model.eval(), info


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EncoderError(f"device {device!r} asked for, but CUDA is not available here; use the cpu device")
    return torch.device(device)


# "auto" is the default everywhere; "int8" only where a caller asks for it by name.
PRECISIONS = ("auto", "fp32", "int8")


class Encoder:
    """Batched embedding of uint8 RGB tiles into raw (not normalised) features.

    precision="fp32": the plain eager model, exact. precision="auto": the fastest numerically
    safe path for the hardware: on CUDA, fp16 autocast + channels_last; on CPU, channels_last
    with a frozen TorchScript graph (conv+BN folded, oneDNN kernels), which keeps > 0.999
    cosine to fp32 (bf16 autocast is used only where the CPU has native bf16).
    precision="int8" (CPU only, opt-in, never chosen by "auto"): post-training static int8
    quantisation (FX graph mode, x86 backend), calibrated on the first batch embedded. Faster
    on CPUs without native bf16 but NOT numerically safe (about 0.96-0.98 cosine to fp32);
    what it does to retrieval is measured in docs/benchmarks.md (issue 14).
    """

    def __init__(self, model: nn.Module, info: EncoderInfo, device: str = "auto", precision: str = "auto"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.info = info
        self.device = resolve_device(device)
        if precision == "int8" and self.device.type != "cpu":
            raise EncoderError(
                f"precision 'int8' is a CPU path (x86 quantised kernels); on {self.device.type} use 'auto'"
            )
        self.precision = precision
        self.model = model.eval().to(self.device)
        # preprocessing as the encoder's info describes it (ImageNet statistics at 224 px for
        # RetCCL, a card's own for card encoders): one `normalise` for every encoder
        norm = info.normalisation
        self.input_px = int(norm["input_px"])
        self._mean = torch.tensor(norm["mean"], device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(norm["std"], device=self.device).view(1, 3, 1, 1) * 255
        # The fast path (channels_last model, or a traced + frozen TorchScript graph on CPU)
        # is built once: by warm_up() before serving, else by the first batch. Building it
        # changes the model's memory format in place and tracing runs the model, so two
        # threads doing it at once crash the process (SIGSEGV, issue 11): it happens under
        # this lock, and _fast is published only when complete.
        self._fast = None
        self._fast_lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: str, device: str = "auto", precision: str = "auto") -> "Encoder":
        """The encoder a spec names: a checkpoint, ``random[:ARCH[:SEED]]``, or an encoder card
        (``CARD.json`` or ``preset:NAME:WEIGHTS``, engine.cards)."""
        from engine.cards import CardEncoder, is_card_spec  # cards build on this module

        if is_card_spec(spec):
            return CardEncoder.from_spec(spec, device=device, precision=precision)
        model, info = load_backbone(spec)
        return cls(model, info, device=device, precision=precision)

    @property
    def dim(self) -> int:
        return self.info.dim

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x H x W (RGB) -> float N x 3 x input_px x input_px, normalised."""
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a N x 3 x H x W batch, got shape {tuple(batch.shape)}")
        x = batch.to(self.device, non_blocking=True).float()
        size = (self.input_px, self.input_px)
        if x.shape[-2:] != size:
            x = nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return (x - self._mean) / self._std

    def _fast_model(self, example: torch.Tensor):
        """The fast-path model, built on first use under the lock (double-checked, so later
        calls take no lock)."""
        fast = self._fast
        if fast is not None:
            return fast
        with self._fast_lock:
            if self._fast is None:
                # int8 calibrates its activation ranges on the whole first batch; the others
                # only trace with one image
                self._fast = self._build_int8(example) if self.precision == "int8" else self._build_fast(example[:1])
            return self._fast

    def _build_int8(self, calibration: torch.Tensor):
        """Post-training static int8 copy of the model, activation ranges observed on
        `calibration` (normalised float tiles). Observing one batch is what makes int8 data
        dependent: the first batch of a run decides the scales of all later ones."""
        import copy

        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = "x86"
        example = calibration.contiguous()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
            prepared = prepare_fx(copy.deepcopy(self.model).eval(), get_default_qconfig_mapping("x86"), (example[:1],))
            prepared(example)
            return convert_fx(prepared)

    def _build_fast(self, example: torch.Tensor):
        model = self.model.to(memory_format=torch.channels_last)
        if self.device.type == "cuda" or _cpu_has_native_bf16():
            return model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated upstream but still the fastest CPU path here
            traced = torch.jit.trace(model, example, check_trace=False)
            fast = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        self.model.to(memory_format=torch.contiguous_format)
        # TorchScript's profiling executor specialises the graph over its first runs; run
        # them here, under the lock, rather than in concurrent first requests
        for _ in range(2):
            fast(example)
        return fast

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        if self.precision == "int8":
            return self._fast_model(x)(x.contiguous())
        x = x.contiguous(memory_format=torch.channels_last)
        fast = self._fast_model(x)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                return fast(x).float()
        if _cpu_has_native_bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fast(x).float()
        return fast(x)

    def warm_up(self) -> None:
        """Prepare the fast path now (seconds on CPU) rather than in the first request:
        servers call this once before serving."""
        # int8 is not built here: calibrating it on a blank image would fix its scales to
        # nothing; it builds on the first real batch
        if self.precision == "auto":
            with torch.inference_mode():
                self._fast_model(
                    self.normalise(torch.zeros((1, 3, self.input_px, self.input_px), dtype=torch.uint8)).contiguous(
                        memory_format=torch.channels_last
                    )
                )

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """Raw features (N x dim float32) of a uint8 N x 3 x H x W RGB batch."""
        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        x = self.normalise(batch)
        out = self.model(x) if self.precision == "fp32" else self._forward_fast(x)
        return out.float().cpu().numpy()

    def embed_unit(self, batch: torch.Tensor) -> np.ndarray:
        """Unit-length features of a uint8 batch: the form the index stores and every query
        is searched with (cosine similarity = inner product). Index and queries both come
        through here, so they cannot be normalised differently."""
        return l2_normalise(self.embed(batch))


def cpu_flags() -> list[str]:
    """The CPU's SIMD flags that decide the CPU paths (AVX2 / AVX-512 / native bf16 / AMX),
    from /proc/cpuinfo; benchmarks print them beside every figure."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))


@functools.cache  # asked on every CPU batch; the CPU does not change under a process
def _cpu_has_native_bf16() -> bool:
    return bool({"amx_bf16", "avx512_bf16"} & set(cpu_flags()))


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity = inner product); zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
