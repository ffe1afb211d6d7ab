"""The settings of one pretraining run (`TrainConfig`), their checks, and which settings a
resumed run may change: the run's config is saved in its checkpoint, and `resolve_config`
decides what a fresh or resumed run (pretrain/train.py) actually runs with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from engine.encoder import ARCH_DIMS
from engine.errors import ConfigError
from pretrain.checkpoint import checkpoint_path, load_run_checkpoint

# what a resumed run may change; everything else must match the run it continues
RESUME_OVERRIDES = {"epochs", "max_steps", "workers", "checkpoint_every", "log_every", "device", "data", "slide_root"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One pretraining run. CCL hyperparameters are documented on `pretrain.ccl.CCL`."""

    data: str
    out: str
    arch: str = "resnet50"
    batch_size: int = 32  # per rank and micro-batch
    accum_steps: int = 1
    epochs: int = 100
    max_steps: int | None = None
    lr: float = 0.03  # per 256 images of global batch (MoCo v2)
    sgd_momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    proj_dim: int = 128
    queue_size: int = 65536
    key_momentum: float = 0.999
    temperature: float = 0.07
    num_clusters: int = 32
    kmeans_iters: int = 10
    group_temperature: float = 0.2
    group_weight: float = 0.25
    same_cluster_weight: float = 0.5
    crop_px: int = 224
    min_crop_scale: float = 0.2
    jitter: float = 1.0
    tile_px: int = 224
    slide_root: str | None = None
    shuffle_block: int = 16384
    workers: int = 4
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None  # None: on for CUDA, off on CPU
    sync_bn: bool = False
    checkpoint_every: int = 500
    log_every: int = 10

    def validate(self) -> None:
        if self.arch not in ARCH_DIMS:
            raise ConfigError(f"architecture {self.arch!r}: choose one of {', '.join(sorted(ARCH_DIMS))}")
        for name in (
            "batch_size",
            "accum_steps",
            "epochs",
            "checkpoint_every",
            "log_every",
            "crop_px",
            "tile_px",
            "shuffle_block",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps must be at least 1")
        if self.lr <= 0:
            raise ConfigError("the learning rate (lr) must be > 0")
        if not 0 < self.min_crop_scale <= 1 or self.jitter < 0:
            raise ConfigError("min_crop_scale must be in (0, 1] and jitter >= 0")
        if not 0 <= self.same_cluster_weight <= 1:
            raise ConfigError("same_cluster_weight must be in [0, 1]")
        if min(self.queue_size, self.num_clusters, self.proj_dim) < 1 or self.kmeans_iters < 0:
            raise ConfigError("queue_size, num_clusters and proj_dim must be at least 1, kmeans_iters at least 0")
        if min(self.temperature, self.group_temperature) <= 0 or not 0 <= self.key_momentum < 1:
            raise ConfigError("temperatures must be > 0 and key_momentum in [0, 1)")


def resolve_config(cfg: TrainConfig, explicit: set[str], resume: bool) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The config to run and the checkpoint to resume from (None for a fresh run)."""
    ckpt = checkpoint_path(Path(cfg.out))
    if not resume:
        if ckpt.exists():
            raise ConfigError(
                f"{cfg.out} already holds a run ({ckpt.name}); resume it to continue it, or choose another run folder"
            )
        return cfg, None
    state = load_run_checkpoint(Path(cfg.out))
    saved = TrainConfig(**state["config"])
    clashes = sorted(k for k in explicit - RESUME_OVERRIDES if getattr(cfg, k) != getattr(saved, k))
    if clashes:
        raise ConfigError(
            f"resuming continues the run as it was configured; these settings differ from it: {', '.join(clashes)} (only {', '.join(sorted(RESUME_OVERRIDES))} may change)"
        )
    # the run folder is where it is now, even if it was moved since
    return dataclasses.replace(saved, out=cfg.out, **{k: getattr(cfg, k) for k in explicit & RESUME_OVERRIDES}), state
