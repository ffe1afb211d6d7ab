"""Settings: one object built at the edge (CLI flags, then HISTOSEEK_* environment, then
defaults) and passed down. No module-level paths, devices or argv anywhere else. The web
app's own settings (upload limits, login throttling, ...) are derived from it in one place,
`webapp.load_config`, with the instance folder named here.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

from engine.errors import ConfigError

ENV_PREFIX = "HISTOSEEK_"
RELEASED_WEIGHTS_NAME = "best_ckpt.pth"
# RetCCL's own grid (1 um/px, 224 px): the grid of every encoder that does not name one
RETCCL_MPP = 1.0
RETCCL_TILE_PX = 224


def default_data_dir(env: Mapping[str, str]) -> Path:
    """Where catalog, shards and weights live unless told otherwise (XDG data home)."""
    base = env.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "histoseek"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a command needs to know about where things are and how to embed.

    data_dir:    folder for the default catalog, index and weights (default: ~/.local/share/histoseek)
    catalog_url: SQLAlchemy URL of the catalog (default: sqlite:///<data_dir>/catalog.sqlite)
    index_dir:   folder of FAISS shard files (default: <data_dir>/index)
    encoder:     encoder spec: a checkpoint path, or `random[:ARCH]` for tests and demos
                 (default: <data_dir>/weights/best_ckpt.pth when that file exists)
    device:      `auto` (CUDA when present, else CPU), `cpu`, `cuda`, `cuda:N`
    precision:   `auto` (fastest numerically safe path) or `fp32` (exact)
    decoder:     how `indexer build` decodes tiles: `auto` (JPEG tiles of SVS/generic TIFFs
                 decoded on the GPU when the encoder runs on CUDA, else OpenSlide),
                 `openslide`, or `jpeg` (JPEG tiles decoded by torchvision, also on CPU)
    target_mpp_given / tile_px_given: the grid override (`--target-mpp`/`--tile-px` or
                 HISTOSEEK_TARGET_MPP/HISTOSEEK_TILE_PX), None when not given: the encoder
                 then sets the grid (`grid_for`: a card's `mpp`/`input_px`, else RetCCL's
                 1.0 um/px, 224 px). `target_mpp`/`tile_px` are the grid for an encoder
                 that names none (RetCCL); code that knows its encoder uses `grid_for`.
    instance_dir: the web app's instance folder: its secret key and `histoseek.cfg`
                 (default: <data_dir>/webapp)
    """

    data_dir: Path
    catalog_url: str
    index_dir: Path
    encoder: str | None
    device: str = "auto"
    precision: str = "auto"
    target_mpp_given: float | None = None
    tile_px_given: int | None = None
    instance_dir: Path | None = None
    decoder: str = "auto"

    def __post_init__(self):
        if self.instance_dir is None:  # built directly (tests): the same default as load()
            object.__setattr__(self, "instance_dir", self.data_dir / "webapp")

    @property
    def target_mpp(self) -> float:
        """The override, else RetCCL's 1.0 um/px (for callers that do not know the encoder)."""
        return RETCCL_MPP if self.target_mpp_given is None else self.target_mpp_given

    @property
    def tile_px(self) -> int:
        """The override, else RetCCL's 224 px (for callers that do not know the encoder)."""
        return RETCCL_TILE_PX if self.tile_px_given is None else self.tile_px_given

    def grid_for(self, info: Any = None) -> tuple[float, int]:
        """(target_mpp, tile_px) an encoder embeds at: each from the flag/environment when
        given, else the encoder's own (a card's `mpp` and `input_px`), else RetCCL's 1.0
        um/px and 224 px. `info`: the encoder's `info` (EncoderInfo or CardInfo), or None."""
        mpp, px = native_grid(info)
        return (
            mpp if self.target_mpp_given is None else self.target_mpp_given,
            px if self.tile_px_given is None else self.tile_px_given,
        )

    def grid_source(self, info: Any = None) -> dict[str, str]:
        """Where each part of `grid_for(info)` comes from: "encoder" (the encoder's own, or
        an override equal to it) or "override" (flag/environment, differing from it)."""
        native = native_grid(info)
        return {
            name: "encoder" if got == own else "override"
            for name, got, own in zip(("target_mpp", "tile_px"), self.grid_for(info), native)
        }

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **flags) -> "Settings":
        """Build settings from CLI flags (keyword arguments; None = not given), then the
        environment (`HISTOSEEK_CATALOG`, `HISTOSEEK_INDEX_DIR`, `HISTOSEEK_ENCODER`,
        `HISTOSEEK_DEVICE`, `HISTOSEEK_PRECISION`, `HISTOSEEK_DECODER`, `HISTOSEEK_TARGET_MPP`, `HISTOSEEK_TILE_PX`,
        `HISTOSEEK_DATA_DIR`, `HISTOSEEK_INSTANCE_DIR`), then defaults."""
        env = os.environ if env is None else env
        known = {f.name for f in dataclasses.fields(cls)} - {"target_mpp_given", "tile_px_given"}
        known |= {"target_mpp", "tile_px"}
        unknown = set(flags) - known
        if unknown:
            raise ValueError(f"unknown settings: {sorted(unknown)}")

        def pick(name: str, env_name: str):
            value = flags.get(name)
            if value is None:
                value = env.get(ENV_PREFIX + env_name) or None
            return value

        data_dir = Path(pick("data_dir", "DATA_DIR") or default_data_dir(env)).expanduser()
        catalog_url = pick("catalog_url", "CATALOG") or f"sqlite:///{data_dir / 'catalog.sqlite'}"
        index_dir = Path(pick("index_dir", "INDEX_DIR") or data_dir / "index").expanduser()
        instance_dir = Path(pick("instance_dir", "INSTANCE_DIR") or data_dir / "webapp").expanduser()
        encoder = pick("encoder", "ENCODER")
        if encoder is None:
            released = data_dir / "weights" / RELEASED_WEIGHTS_NAME
            encoder = str(released) if released.is_file() else None
        device = pick("device", "DEVICE") or "auto"
        precision = pick("precision", "PRECISION") or "auto"
        if precision not in ("auto", "fp32"):
            raise ConfigError(f"precision must be 'auto' or 'fp32', not {precision!r}")
        decoder = pick("decoder", "DECODER") or "auto"
        if decoder not in ("auto", "openslide", "jpeg"):
            raise ConfigError(f"decoder must be 'auto', 'openslide' or 'jpeg', not {decoder!r}")
        try:
            target_mpp = pick("target_mpp", "TARGET_MPP")
            target_mpp = None if target_mpp is None else float(target_mpp)
            tile_px = pick("tile_px", "TILE_PX")
            tile_px = None if tile_px is None else int(tile_px)
        except ValueError as exc:
            raise ConfigError(f"bad number in settings: {exc}") from None
        if (target_mpp is not None and not target_mpp > 0) or (tile_px is not None and tile_px < 16):
            raise ConfigError("target mpp must be > 0 and tile px >= 16")
        return cls(
            data_dir=data_dir,
            catalog_url=str(catalog_url),
            index_dir=index_dir,
            encoder=encoder,
            device=device,
            precision=precision,
            target_mpp_given=target_mpp,
            tile_px_given=tile_px,
            instance_dir=instance_dir,
            decoder=decoder,
        )

    def require_encoder(self) -> str:
        """The encoder spec, or a clear error saying where the weights go."""
        if not self.encoder:
            raise ConfigError(
                "no encoder given: pass --encoder PATH to a RetCCL checkpoint (best_ckpt.pth), "
                f"put it at {self.data_dir / 'weights' / RELEASED_WEIGHTS_NAME}, set "
                "HISTOSEEK_ENCODER, or use --encoder random for a demo (not for diagnosis)"
            )
        return self.encoder


def native_grid(info: Any = None) -> tuple[float, int]:
    """An encoder's own grid: a card's (`mpp`, `input_px`), else RetCCL's (1.0, 224)."""
    mpp, px = getattr(info, "mpp", None), getattr(info, "input_px", None)
    return (RETCCL_MPP if mpp is None else float(mpp), RETCCL_TILE_PX if px is None else int(px))
