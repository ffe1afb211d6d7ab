"""Indexer pipeline efficiency, the whole chain in one run: OpenSlide's raw `read_region` of
the build's own tile regions (at the level and size the decode path reads them), the
indexer's decode path alone (plan, sampler, DataLoader with `--workers` processes, no
encoder), the encoder alone on decoded tiles in memory, and `indexer build` end to end
(tissue mask, tile grid, decoding in DataLoader workers, encoder, shard write, catalog
commit) with one warmed-up encoder. Prints one JSON document (`--json FILE` also writes it).

    python bench/make_mosaic_slide.py --size 20000 --out /tmp/mosaic-20k.tiff
    python bench/indexer.py --slide /tmp/mosaic-20k.tiff --encoder random:resnet50
    python bench/indexer.py --slide /tmp/mosaic-20k.tiff --decode-only --workers 0

Raw reads and the decode path alternate for `--repeats` rounds (each round a fresh slide
handle, so neither profits from the other's OpenSlide tile cache); the ratio of their
medians is `decode_over_raw` (issue 14 asks >= 0.8 per decoding process).

`--decoder jpeg` (or `auto` on CUDA) also times the JPEG-tile decode path in the same rounds
(`jpeg_decode_tiles_per_s`, `jpeg_over_raw`: compressed tiles read in the DataLoader,
decoded by torchvision on the device, CPU here) and builds with it; the slide must be a
TIFF of JPEG tiles (an SVS, or `bench/make_mosaic_slide.py --jpeg 90`).

    python bench/make_mosaic_slide.py --size 20000 --jpeg 90 --out /tmp/mosaic-20k-jpeg.tiff
    python bench/indexer.py --slide /tmp/mosaic-20k-jpeg.tiff --decode-only --workers 0 --decoder jpeg

The encoder-only rate is measured before and after the end-to-end run (other load on the
machine drifts); efficiency = end-to-end / mean of the two. encoder_busy_fraction = time
inside the encoder / wall time of the end-to-end run: free of that drift, it says how much
the encoder waited for tiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path and its name would shadow
# the `indexer` package; the repo root goes in its place.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from engine.config import Settings  # noqa: E402
from engine.encoder import Encoder, cpu_flags, resolve_device  # noqa: E402
from engine.features import default_workers  # noqa: E402
from engine.jpeg_tiles import JpegTiles  # noqa: E402
from engine.slides import open_slide, read_box  # noqa: E402
from indexer.build import build_archive  # noqa: E402
from indexer.pipeline import PlanSampler, plan_slide, resolve_decoder, tile_batches  # noqa: E402


def raw_read_rate(slide_path: Path, boxes, tile_px: int) -> float:
    """Tiles/s of OpenSlide's read_region alone for the same regions at the same level and
    size as the decode path (OpenSlide's level choice for the box's downsample)."""
    slide = open_slide(slide_path)
    try:
        start = time.perf_counter()
        for b in boxes:
            level = slide.get_best_level_for_downsample(max(b.size / tile_px, 1.0))
            px = max(1, int(round(b.size / slide.level_downsamples[level])))
            slide.read_region((b.x, b.y), level, (px, px))
        return len(boxes) / (time.perf_counter() - start)
    finally:
        slide.close()


def decode_rate(plan, tile_px: int, batch_size: int, workers: int, decoder: str = "openslide", device=None) -> float:
    """Tiles/s of the indexer's decode path: PlanSampler -> DataLoader(TileReader) batches,
    as `indexer build` runs it, without the encoder; `decoder` "jpeg": the JPEG-tile path,
    decoded on `device`. With workers=0 this process decodes, with one torch thread as a
    DataLoader worker has (torch sets it there): "per decoding process"."""
    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        n = 0
        sampler = PlanSampler([plan], tile_px, lambda _p: None, decoder=decoder, device=device)
        for keys, _batch, errors in tile_batches(sampler, batch_size, workers, device):
            if errors:
                raise SystemExit(f"decode errors: {errors[:3]}")
            n += len(keys)
    finally:
        torch.set_num_threads(threads)
    if plan.decoder != decoder:
        raise SystemExit(f"{plan.path.name} was read through {plan.decoder}, not {decoder}: {plan.note}")
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()  # the tiles are decoded asynchronously on the GPU
    if n != len(plan.boxes):
        raise SystemExit(f"decoded {n} tiles of {len(plan.boxes)}")
    return n / (time.perf_counter() - start)


def sample_tiles(slide_path: Path, settings: Settings, min_tissue: float, n: int) -> tuple[torch.Tensor, int]:
    """(up to n decoded tiles of the slide's grid, the build's own plan, as uint8
    N x 3 x H x W, grid size)."""
    plan = plan_slide(
        0, slide_path, default_mpp=None, target_mpp=settings.target_mpp, tile_px=settings.tile_px, min_tissue=min_tissue
    )
    if plan.error:
        raise SystemExit(f"{slide_path}: {plan.error}")
    boxes = plan.boxes
    step = max(1, len(boxes) // n)
    slide = open_slide(slide_path)
    try:
        tiles = [np.asarray(read_box(slide, b.x, b.y, b.size, settings.tile_px)) for b in boxes[::step][:n]]
    finally:
        slide.close()
    return torch.from_numpy(np.stack(tiles).transpose(0, 3, 1, 2).copy()), len(boxes)


def encoder_only(encoder: Encoder, cache: torch.Tensor, total: int, batch_size: int) -> float:
    """Tiles/s embedding `total` tiles cycled from the in-memory cache."""
    done = 0
    start = time.perf_counter()
    while done < total:
        idx = torch.arange(done, min(total, done + batch_size)) % len(cache)
        encoder.embed(cache[idx])
        done += len(idx)
    return total / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, required=True, help="a slide file (e.g. from bench/make_mosaic_slide.py)")
    parser.add_argument(
        "--encoder", default="random:resnet50", help="encoder spec (default random:resnet50, RetCCL's architecture)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="decoding workers (default: cores - 1)")
    parser.add_argument("--min-tissue", type=float, default=0.5)
    parser.add_argument("--cache-tiles", type=int, default=128, help="tiles decoded up front for the encoder-only rate")
    parser.add_argument(
        "--target-mpp", type=float, default=None, help="tile resolution in um/px (default: the settings' default, 1.0)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating rounds of raw reads and decode path (default 3)"
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=0,
        help="alternate raw reads and decode path every CHUNK tiles within a round (0: whole plan; for loaded machines)",
    )
    parser.add_argument(
        "--decode-only", action="store_true", help="only raw reads and the decode path: skip the encoder and the build"
    )
    parser.add_argument(
        "--decoder",
        choices=("auto", "openslide", "jpeg"),
        default="auto",
        help="the build's tile decoding (auto: JPEG tiles on CUDA); jpeg/auto-on-CUDA also times the JPEG decode path",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON document to this file")
    args = parser.parse_args(argv)
    if not args.slide.is_file():
        parser.error(f"{args.slide} is not a file; make one with bench/make_mosaic_slide.py")

    workers = default_workers() if args.workers is None else args.workers
    overrides = {"target_mpp": args.target_mpp} if args.target_mpp else {}
    doc = {
        "bench": "indexer",
        "command": "python bench/indexer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "slide": args.slide.name,
        "workers": workers,
        "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "cpu_flags": cpu_flags(),
        "torch_threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-indexer-") as tmp:
        tmp = Path(tmp)
        archive = tmp / "archive"
        archive.mkdir()
        os.symlink(args.slide.resolve(), archive / args.slide.name)
        settings = Settings.load(
            env={},
            data_dir=str(tmp),
            catalog_url=f"sqlite:///{tmp / 'cat.sqlite'}",
            index_dir=str(tmp / "index"),
            encoder=args.encoder,
            device=args.device,
            decoder=args.decoder,
            **overrides,
        )
        device = resolve_device(settings.device)
        jpeg = resolve_decoder(settings.decoder, device) == "jpeg"
        if jpeg and JpegTiles.open(args.slide) is None:
            raise SystemExit(f"{args.slide} has no JPEG tiles: make one with bench/make_mosaic_slide.py --jpeg 90")

        plan = plan_slide(
            0,
            args.slide,
            default_mpp=None,
            target_mpp=settings.target_mpp,
            tile_px=settings.tile_px,
            min_tissue=args.min_tissue,
        )
        if plan.error:
            raise SystemExit(f"{args.slide}: {plan.error}")
        raw, dec, jdec = [], [], []
        step = args.chunk or len(plan.boxes)
        # warm-up, untimed: one-time costs (lazy imports, the DataLoader's first iterator)
        # would otherwise land on the first chunk of the decode path only
        warm = dataclasses.replace(plan, boxes=plan.boxes[:8])
        decode_rate(warm, settings.tile_px, args.batch_size, 0)
        if jpeg:
            decode_rate(warm, settings.tile_px, args.batch_size, 0, "jpeg", device)
        for _ in range(args.repeats):
            # each round in chunks of `step` tiles, the paths alternating chunk by chunk: on
            # shared cores whose load swings within seconds, both see the same load
            secs = np.zeros(3)
            for k in range(0, len(plan.boxes), step):
                part = dataclasses.replace(plan, boxes=plan.boxes[k : k + step])
                n = len(part.boxes)
                secs[0] += n / raw_read_rate(args.slide, part.boxes, settings.tile_px)
                secs[1] += n / decode_rate(part, settings.tile_px, args.batch_size, workers)
                if jpeg:
                    secs[2] += n / decode_rate(part, settings.tile_px, args.batch_size, workers, "jpeg", device)
            raw.append(len(plan.boxes) / secs[0])
            dec.append(len(plan.boxes) / secs[1])
            if jpeg:
                jdec.append(len(plan.boxes) / secs[2])
        raw_med, dec_med = float(np.median(raw)), float(np.median(dec))
        slide = open_slide(args.slide)
        size0 = plan.boxes[0].size
        level = slide.get_best_level_for_downsample(max(size0 / settings.tile_px, 1.0))
        doc.update(
            {
                "slide_mpp": plan.info.mpp,
                "level_downsamples": [round(d, 4) for d in plan.info.level_downsamples],
                "target_mpp": settings.target_mpp,
                "tile_px": settings.tile_px,
                "tile_size0": size0,
                "read_level": level,
                "read_px": int(round(size0 / slide.level_downsamples[level])),
                "tiles": len(plan.boxes),
                "raw_read_tiles_per_s": round(raw_med, 1),
                "decode_tiles_per_s": round(dec_med, 1),
                "decode_over_raw": round(dec_med / raw_med, 3),
                "raw_read_rounds": [round(r, 1) for r in raw],
                "decode_rounds": [round(d, 1) for d in dec],
                "chunk": args.chunk or None,
                "load_average_1min": round(os.getloadavg()[0], 2),
            }
        )
        if jpeg:
            doc.update(
                {
                    "jpeg_decode_device": str(device),
                    "jpeg_decode_tiles_per_s": round(float(np.median(jdec)), 1),
                    "jpeg_over_raw": round(float(np.median(jdec)) / raw_med, 3),
                    "jpeg_decode_rounds": [round(d, 1) for d in jdec],
                }
            )
        slide.close()

        if not args.decode_only:
            encoder = Encoder.from_spec(args.encoder, device=settings.device, precision=settings.precision)
            cache, n_tiles = sample_tiles(args.slide, settings, args.min_tissue, args.cache_tiles)
            encoder.embed(cache[: args.batch_size])  # warm-up: JIT trace / cuDNN autotune
            before = encoder_only(encoder, cache, n_tiles, args.batch_size)
            summary = build_archive(
                settings,
                archive,
                min_tissue=args.min_tissue,
                workers=workers,
                batch_size=args.batch_size,
                progress=sys.stderr.isatty(),
                encoder=encoder,
            )
            after = encoder_only(encoder, cache, n_tiles, args.batch_size)
            if summary.failed or summary.tiles != n_tiles:
                raise SystemExit(f"build did not index the slide as expected: {summary.to_json()}")
            enc_rate = (before + after) / 2
            doc.update(
                {
                    "encoder": encoder.info.name,
                    "device": str(encoder.device),
                    "precision": encoder.precision,
                    "encoder_tiles_per_s": round(enc_rate, 2),
                    "encoder_only_tiles_per_s": [round(before, 2), round(after, 2)],
                    "end_to_end_s": round(summary.seconds, 2),
                    "end_to_end_tiles_per_s": round(summary.tiles_per_s, 2),
                    "efficiency": round(summary.tiles_per_s / enc_rate, 3),
                    "encoder_busy_fraction": round(summary.encoder_seconds / summary.seconds, 3),
                }
            )
    text = json.dumps(doc, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
