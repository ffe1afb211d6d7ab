"""Write a large synthetic whole-slide image made of real H&E patches, for indexer benchmarks.

The slide is a pyramidal tiled TIFF (OpenSlide "generic-tiff", deflate, 0.5 um/px like the
patches, or --mpp 0.25 for a 40x-like slide whose patches are upsampled 2x): an elliptical "tissue" area tiled with randomly chosen, flipped and rotated 224 px
patches of ../shared/data/patches (NCT-CRC-HE-100K and CRC-VAL-HE-7K, 0.5 um/px), on white
glass, so that the tissue mask has real work to do.

    python bench/make_mosaic_slide.py --size 20000 --out /tmp/mosaic-20k.tiff
    python bench/make_mosaic_slide.py --size 20000 --mpp 0.25 --out /tmp/mosaic-20k-40x.tiff
    python bench/make_mosaic_slide.py --size 20000 --level-factor 4 --out /tmp/mosaic-20k-4x.tiff  # levels 1x, 4x, 16x as a 20x SVS
    python bench/make_mosaic_slide.py --size 20000 --level-factor 4 --jpeg 90 --out /tmp/mosaic-20k-4x-jpeg.tiff  # JPEG tiles

`--jpeg QUALITY` writes JPEG tiles (YCbCr 4:2:0, as scanners and vips write generic TIFFs)
instead of deflate: what `indexer build --decoder jpeg` (torchvision's decode_jpeg, nvJPEG
on a GPU) reads. tifffile writes JPEG only with the optional imagecodecs package, so the
tiles are encoded by Pillow and stored as they are, and the compression and photometric
tags set afterwards.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from tqdm import tqdm

from engine.pyramid_tiff import halve, write_pyramidal_tiff

REPO = Path(__file__).resolve().parents[1]

PATCH_PX = 224
PATCH_SETS = ("nct-crc-he-100k", "crc-val-he-7k")


def load_patches(patches_dir: Path, patch_px: int = PATCH_PX) -> list[np.ndarray]:
    """The 224 px patches (0.5 um/px) at patch_px (448 for a 0.25 um/px slide: upsampled)."""
    out = []
    for name in PATCH_SETS:
        for path in sorted((patches_dir / name).glob("*")):
            if path.suffix.lower() in (".png", ".tif", ".tiff", ".jpg") and not path.name.startswith("BACK"):
                img = Image.open(path).convert("RGB")
                if img.size != (PATCH_PX, PATCH_PX):
                    img = img.resize((PATCH_PX, PATCH_PX), Image.Resampling.BILINEAR)
                if patch_px != PATCH_PX:
                    img = img.resize((patch_px, patch_px), Image.Resampling.BICUBIC)
                out.append(np.asarray(img))
    if not out:
        raise SystemExit(f"no 224 px patches found under {patches_dir} ({', '.join(PATCH_SETS)})")
    return out


def mosaic(size_px: int, patches: list[np.ndarray], seed: int = 0) -> np.ndarray:
    """size x size RGB: an ellipse covering ~60 % of the area tiled with patches, glass around."""
    rng = np.random.default_rng(seed)
    rgb = np.full((size_px, size_px, 3), 242, np.uint8)
    patch_px = patches[0].shape[0]
    cells = size_px // patch_px
    centre, radius = cells / 2, cells * 0.44
    for cy in tqdm(range(cells), desc="mosaic rows", unit="row"):
        for cx in range(cells):
            if ((cy + 0.5 - centre) ** 2 + (cx + 0.5 - centre) ** 2) > radius**2:
                continue
            patch = np.rot90(patches[rng.integers(len(patches))], k=int(rng.integers(4)))
            if rng.integers(2):
                patch = patch[:, ::-1]
            rgb[cy * patch_px : (cy + 1) * patch_px, cx * patch_px : (cx + 1) * patch_px] = patch
    return rgb


def _jpeg_tiles(rgb: np.ndarray, tile: int, quality: int):
    """Row-major JPEG streams of the tile x tile tiles of rgb (edge tiles padded with white)."""
    h, w = rgb.shape[:2]
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            block = np.full((tile, tile, 3), 255, np.uint8)
            part = rgb[y : y + tile, x : x + tile]
            block[: part.shape[0], : part.shape[1]] = part
            buf = io.BytesIO()
            Image.fromarray(block).save(buf, "JPEG", quality=quality)  # YCbCr 4:2:0, self-contained stream
            yield buf.getvalue()


def write_jpeg_pyramid(path: Path, rgb: np.ndarray, mpp: float, level_factor: int, quality: int, tile: int = 256):
    """A generic-TIFF pyramid of JPEG tiles: levels as engine.pyramid_tiff makes them (box
    filter, until the longer side is under 512 px), each tile encoded by Pillow."""
    levels = [rgb]
    while max(levels[-1].shape[:2]) >= level_factor * 512:
        nxt = levels[-1]
        for _ in range(level_factor // 2):
            nxt = halve(nxt)
        levels.append(nxt)
    with tifffile.TiffWriter(path, bigtiff=rgb.nbytes > 2**31) as tif:
        for i, level in enumerate(levels):
            px_per_cm = 1e4 / (mpp * level_factor**i)
            tif.write(
                _jpeg_tiles(level, tile, quality),
                shape=level.shape,
                dtype=np.uint8,
                photometric="rgb",
                tile=(tile, tile),
                compression=None,  # the streams are written as given; the tags say JPEG below
                subfiletype=1 if i else 0,
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
    with tifffile.TiffFile(path, mode="r+b") as tif:
        for page in tif.pages:
            page.tags["Compression"].overwrite(7)  # JPEG
            page.tags["PhotometricInterpretation"].overwrite(6)  # YCbCr (Pillow's JFIF streams)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--size", type=int, default=20000, help="edge of the square slide in level-0 pixels (default 20000)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output .tiff path")
    parser.add_argument(
        "--patches",
        type=Path,
        default=REPO.parent / "shared" / "data" / "patches",
        help="folder of the labelled patch sets (default ../shared/data/patches)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mpp",
        type=float,
        default=0.5,
        help="microns per level-0 pixel: 0.5 (the patches' own, default) or 0.25 (a 40x-like slide: patches upsampled 2x)",
    )
    parser.add_argument(
        "--level-factor",
        type=int,
        choices=(2, 4),
        default=2,
        help="downsample between pyramid levels (4: levels at 1x, 4x, 16x, as a 20x SVS)",
    )
    parser.add_argument(
        "--jpeg",
        type=int,
        default=None,
        metavar="QUALITY",
        help="JPEG tiles of this quality (1-100) instead of deflate: a slide for the JPEG/GPU decode path",
    )
    args = parser.parse_args(argv)
    scale = 0.5 / args.mpp if args.mpp > 0 else 0.5
    if abs(scale - round(scale)) > 1e-9 or round(scale) < 1:
        parser.error("--mpp must be 0.5 divided by a whole number (0.5, 0.25, ...): the patches are 0.5 um/px")
    if args.size < 2 * PATCH_PX:
        parser.error(f"--size must be at least {2 * PATCH_PX}")
    patches = load_patches(args.patches, PATCH_PX * int(round(scale)))
    rgb = mosaic(args.size, patches, args.seed)
    if args.jpeg is not None:
        if not 1 <= args.jpeg <= 100:
            parser.error("--jpeg QUALITY must be within 1..100")
        write_jpeg_pyramid(args.out, rgb, args.mpp, args.level_factor, args.jpeg)
    else:
        write_pyramidal_tiff(args.out, rgb, mpp=args.mpp, level_factor=args.level_factor)
    print(
        json.dumps(
            {
                "out": str(args.out),
                "size_px": args.size,
                "patches": len(patches),
                "mpp": args.mpp,
                "level_factor": args.level_factor,
                "compression": f"jpeg q{args.jpeg}" if args.jpeg is not None else "deflate",
                "bytes": args.out.stat().st_size,
            }
        )
    )


if __name__ == "__main__":
    main()
