"""Settings: one object built at the edge (CLI flags, then HISTOSEEK_* environment, then
defaults) and passed down. No module-level paths, devices or argv anywhere else. The web
app's own settings (upload limits, login throttling, ...) are derived from it in one place,
`webapp.load_config`, with the instance folder named here.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping

from engine.errors import ConfigError

ENV_PREFIX = "HISTOSEEK_"
RELEASED_WEIGHTS_NAME = "best_ckpt.pth"


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
    target_mpp:  microns per pixel that tiles are embedded at (default 1.0, as RetCCL)
    tile_px:     tile edge in pixels at target_mpp (default 224)
    instance_dir: the web app's instance folder: its secret key and `histoseek.cfg`
                 (default: <data_dir>/webapp)
    """

    data_dir: Path
    catalog_url: str
    index_dir: Path
    encoder: str | None
    device: str = "auto"
    precision: str = "auto"
    target_mpp: float = 1.0
    tile_px: int = 224
    instance_dir: Path | None = None

    def __post_init__(self):
        if self.instance_dir is None:  # built directly (tests): the same default as load()
            object.__setattr__(self, "instance_dir", self.data_dir / "webapp")

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **flags) -> "Settings":
        """Build settings from CLI flags (keyword arguments; None = not given), then the
        environment (`HISTOSEEK_CATALOG`, `HISTOSEEK_INDEX_DIR`, `HISTOSEEK_ENCODER`,
        `HISTOSEEK_DEVICE`, `HISTOSEEK_PRECISION`, `HISTOSEEK_TARGET_MPP`, `HISTOSEEK_TILE_PX`,
        `HISTOSEEK_DATA_DIR`, `HISTOSEEK_INSTANCE_DIR`), then defaults."""
        env = os.environ if env is None else env
        known = {f.name for f in dataclasses.fields(cls)}
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
        try:
            target_mpp = float(pick("target_mpp", "TARGET_MPP") or 1.0)
            tile_px = int(pick("tile_px", "TILE_PX") or 224)
        except ValueError as exc:
            raise ConfigError(f"bad number in settings: {exc}") from None
        if target_mpp <= 0 or tile_px < 16:
            raise ConfigError("target mpp must be > 0 and tile px >= 16")
        return cls(
            data_dir=data_dir,
            catalog_url=str(catalog_url),
            index_dir=index_dir,
            encoder=encoder,
            device=device,
            precision=precision,
            target_mpp=target_mpp,
            tile_px=tile_px,
            instance_dir=instance_dir,
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
