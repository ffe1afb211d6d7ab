"""Run checkpoints (everything a killed run needs to resume exactly) and the backbone export.

A run directory holds `checkpoint.pt` (the latest state, replaced atomically: written to a
temporary file, flushed, then `os.replace`d, so a kill never leaves half a checkpoint),
`metrics.jsonl` (one line per logged step) and `loss.png`.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.encoder import ARCH_DIMS
from engine.errors import ConfigError
from engine.files import atomic_output, file_sha256

LOG = logging.getLogger(__name__)
CHECKPOINT_NAME = "checkpoint.pt"
RUN_FORMAT = "histoseek-ccl-run"
BACKBONE_FORMAT = "histoseek-backbone"


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename over `path`."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, numpy, python), as plain values."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(_as_tuples(state["python"]))


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def load_run_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The latest checkpoint of a run directory, or ConfigError saying what is there."""
    path = checkpoint_path(run_dir)
    if not path.is_file():
        raise ConfigError(
            f"no checkpoint in {run_dir} (expected {CHECKPOINT_NAME}); is it the run folder of `pretrain train`?"
        )
    try:
        # our own run file: it holds optimiser state and RNG states, not only tensors
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a bad file; all mean the same here
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != RUN_FORMAT:
        raise ConfigError(f"{path} is not a histoseek pretraining checkpoint")
    return state


def backbone_state_dict(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The query encoder's backbone in plain torchvision keys (no fc: it is Identity)."""
    prefix = "encoder_q.backbone."
    return {k[len(prefix) :]: v.clone() for k, v in model_state.items() if k.startswith(prefix)}


def export_backbone(run_dir: Path, out: Path) -> dict[str, Any]:
    """Write the trained backbone as {"format": "histoseek-backbone", "arch", "state_dict",
    "pretrain": {...}}: the released RetCCL key layout plus the architecture name, which
    `engine.encoder.load_backbone` (--encoder everywhere) reads. Returns a summary."""
    state = load_run_checkpoint(run_dir)
    arch = state["config"]["arch"]
    backbone = backbone_state_dict(state["model"])
    if not backbone or arch not in ARCH_DIMS:
        raise ConfigError(f"checkpoint in {run_dir} holds no {arch} backbone")
    meta = {
        "step": int(state["step"]),
        "epoch": int(state["epoch"]),
        "images_seen": int(state["images_seen"]),
        "data": str(state["config"]["data"]),
    }
    atomic_save({"format": BACKBONE_FORMAT, "arch": arch, "state_dict": backbone, "pretrain": meta}, Path(out))
    return {"path": str(out), "arch": arch, "dim": ARCH_DIMS[arch], "sha256": file_sha256(out), **meta}
