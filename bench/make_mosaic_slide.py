"""Write a large synthetic whole-slide image made of real H&E patches, for indexer benchmarks.

The slide is a pyramidal tiled TIFF (OpenSlide "generic-tiff", deflate, 0.5 um/px like the
patches): an elliptical "tissue" area tiled with randomly chosen, flipped and rotated 224 px
patches of ../shared/data/patches (NCT-CRC-HE-100K and CRC-VAL-HE-7K, 0.5 um/px), on white
glass, so that the tissue mask has real work to do.

    python bench/make_mosaic_slide.py --size 20000 --out /tmp/mosaic-20k.tiff
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from engine.pyramid_tiff import write_pyramidal_tiff

REPO = Path(__file__).resolve().parents[1]

PATCH_PX = 224
PATCH_SETS = ("nct-crc-he-100k", "crc-val-he-7k")


def load_patches(patches_dir: Path) -> list[np.ndarray]:
    out = []
    for name in PATCH_SETS:
        for path in sorted((patches_dir / name).glob("*")):
            if path.suffix.lower() in (".png", ".tif", ".tiff", ".jpg") and not path.name.startswith("BACK"):
                img = Image.open(path).convert("RGB")
                if img.size != (PATCH_PX, PATCH_PX):
                    img = img.resize((PATCH_PX, PATCH_PX), Image.Resampling.BILINEAR)
                out.append(np.asarray(img))
    if not out:
        raise SystemExit(f"no 224 px patches found under {patches_dir} ({', '.join(PATCH_SETS)})")
    return out


def mosaic(size_px: int, patches: list[np.ndarray], seed: int = 0) -> np.ndarray:
    """size x size RGB: an ellipse covering ~60 % of the area tiled with patches, glass around."""
    rng = np.random.default_rng(seed)
    rgb = np.full((size_px, size_px, 3), 242, np.uint8)
    cells = size_px // PATCH_PX
    centre, radius = cells / 2, cells * 0.44
    for cy in tqdm(range(cells), desc="mosaic rows", unit="row"):
        for cx in range(cells):
            if ((cy + 0.5 - centre) ** 2 + (cx + 0.5 - centre) ** 2) > radius**2:
                continue
            patch = np.rot90(patches[rng.integers(len(patches))], k=int(rng.integers(4)))
            if rng.integers(2):
                patch = patch[:, ::-1]
            rgb[cy * PATCH_PX : (cy + 1) * PATCH_PX, cx * PATCH_PX : (cx + 1) * PATCH_PX] = patch
    return rgb


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20000, help="edge of the square slide in level-0 pixels (default 20000)")
    parser.add_argument("--out", type=Path, required=True, help="output .tiff path")
    parser.add_argument("--patches", type=Path, default=REPO.parent / "shared" / "data" / "patches", help="folder of the labelled patch sets (default ../shared/data/patches)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.size < 2 * PATCH_PX:
        parser.error(f"--size must be at least {2 * PATCH_PX}")
    patches = load_patches(args.patches)
    rgb = mosaic(args.size, patches, args.seed)
    write_pyramidal_tiff(args.out, rgb, mpp=0.5)
    print(json.dumps({"out": str(args.out), "size_px": args.size, "patches": len(patches), "mpp": 0.5, "bytes": args.out.stat().st_size}))


if __name__ == "__main__":
    main()
