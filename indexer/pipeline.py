"""The tile pipeline: slide -> tissue -> tile grid (a "plan"), then tiles decoded in
DataLoader workers and handed to the encoder in batches that may span slides.

Two tile readers: OpenSlide (every format; tiles decoded in the workers), and, for TIFF
pyramids of JPEG tiles (SVS, generic TIFF), the compressed tiles read in the workers and
decoded in batches by torchvision on the encoder's device (`engine.jpeg_tiles`; nvJPEG on a
GPU, so decoded tiles never leave it before the encoder). `decoder`: "auto" (JPEG tiles when
the encoder runs on CUDA), "openslide", or "jpeg" (also on CPU: testable anywhere).

The DataLoader's sampler walks the plans lazily and yields one key per tile; planning
(thumbnail + mask) runs a few slides ahead in a thread pool, so neither the encoder nor the
decoding workers wait on it. Workers keep their last few slides open. Keys carry
everything a worker needs, so no state is shared between processes.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import functools
import logging
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import openslide
import tifffile
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from engine.cache import LRUCache
from engine.errors import SlideError
from engine.images import encoder_input
from engine.jpeg_tiles import JpegTiles, Region, decode_regions
from engine.slides import SlideInfo, describe_slide, open_slide, read_box_array, tile_size0
from engine.tiling import TileBox, tile_grid
from engine.tissue import slide_tissue_mask
from indexer.writer import TILE_ID_STRIDE

LOG = logging.getLogger(__name__)


_OPEN_SLIDES_PER_WORKER = 4


@dataclasses.dataclass
class SlidePlan:
    """What to embed of one slide: its tiles (row by row), or why it cannot be indexed."""

    slide_id: int
    path: Path
    info: SlideInfo | None = None
    boxes: list[TileBox] = dataclasses.field(default_factory=list)
    error: str | None = None
    decoder: str = "openslide"  # which reader the sampler routed its tiles to
    note: str | None = None  # for the build's summary (a `--decoder jpeg` slide read through OpenSlide)


DECODERS = ("auto", "openslide", "jpeg")
# OpenSlide vendors whose JPEG-tiled pyramids engine.jpeg_tiles reads as OpenSlide does
_JPEG_VENDORS = ("aperio", "generic-tiff")


def resolve_decoder(choice: str, device: str | torch.device | None) -> str:
    """The reader a `decoder` choice means: auto is "jpeg" where the encoder runs on CUDA
    (the CPU path of decode_jpeg gains nothing over OpenSlide's libjpeg-turbo), "openslide"
    elsewhere; the others as given."""
    if choice not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, not {choice!r}")
    if choice == "auto":
        return "jpeg" if device is not None and torch.device(device).type == "cuda" else "openslide"
    return choice


def explain_unopenable(path: Path, openslide_message: str) -> str:
    """A better reason than OpenSlide's for a TIFF that is not brightfield RGB
    (fluorescence, multiplex); OpenSlide's own message otherwise."""
    try:
        with tifffile.TiffFile(path) as tif:
            page, series = tif.pages[0], tif.series[0]
            rgb = page.samplesperpixel in (3, 4) and page.dtype == np.uint8
            if not rgb:
                return (
                    f"{path.name}: not a brightfield RGB slide ({series.axes} {series.shape} {series.dtype}: "
                    "fluorescence/multiplex channels); histoseek indexes brightfield (H&E, IHC) slides only"
                )
    except (tifffile.TiffFileError, OSError, IndexError, ValueError):
        pass
    return openslide_message


def plan_slide(
    slide_id: int, path: Path, *, default_mpp: float | None, target_mpp: float, tile_px: int, min_tissue: float
) -> SlidePlan:
    """Open the slide, find its tissue and its tile grid. Never raises for a bad slide:
    the plan carries the error instead, also for errors no one foresaw (a malformed file
    can break a reader in any way; one slide must not stop a days-long run)."""
    try:
        return _plan(
            slide_id, path, default_mpp=default_mpp, target_mpp=target_mpp, tile_px=tile_px, min_tissue=min_tissue
        )
    except Exception as exc:  # noqa: BLE001 - recorded as the slide's failure, with a traceback in the log
        LOG.warning("%s: unexpected error while reading it", path, exc_info=True)
        return SlidePlan(
            slide_id, Path(path), error=f"unexpected error while reading the slide: {type(exc).__name__}: {exc}"
        )


def _plan(
    slide_id: int, path: Path, *, default_mpp: float | None, target_mpp: float, tile_px: int, min_tissue: float
) -> SlidePlan:
    plan = SlidePlan(slide_id, Path(path))
    try:
        slide = open_slide(path)
    except SlideError as exc:
        plan.error = explain_unopenable(Path(path), str(exc))
        return plan
    try:
        plan.info = describe_slide(path, slide, default_mpp)
        # Pixels first: a slide that opens but cannot be decoded should say so, whatever its size.
        try:
            mask, downsample = slide_tissue_mask(slide)
        except openslide.OpenSlideError as exc:
            raise SlideError(f"cannot read the slide's pixels: {exc}") from None
        size0 = tile_size0(plan.info, target_mpp, tile_px)
        if size0 > min(plan.info.width, plan.info.height):
            raise SlideError(
                f"slide is {plan.info.width} x {plan.info.height} px at {plan.info.mpp:g} um/px, smaller than one "
                f"{tile_px} px tile at {target_mpp:g} um/px ({size0} level-0 px)"
            )
        plan.boxes = tile_grid(plan.info, mask, downsample, target_mpp, tile_px, min_tissue)
        if len(plan.boxes) > TILE_ID_STRIDE:
            raise SlideError(f"slide has {len(plan.boxes)} tiles, more than the {TILE_ID_STRIDE} one slide may have")
        if not plan.boxes:
            raise SlideError(
                f"no tile has at least {min_tissue:.0%} tissue (tissue covers {mask.mean():.1%} of the slide); lower the minimum tissue fraction to index it"
            )
    except SlideError as exc:
        plan.error = str(exc)
    finally:
        slide.close()
    return plan


def iter_plans(
    jobs: list[tuple[int, Path]], plan_fn: Callable[[int, Path], SlidePlan], lookahead: int = 4
) -> Iterator[SlidePlan]:
    """Plans of `jobs` (slide id, path) in order, computed `lookahead` slides ahead in
    threads (OpenSlide and scikit-image release the GIL for most of the work)."""
    if not jobs:
        return
    with cf.ThreadPoolExecutor(max_workers=max(1, min(lookahead, 4)), thread_name_prefix="plan") as pool:
        pending: collections.deque = collections.deque()
        todo = iter(jobs)
        for slide_id, path in todo:
            pending.append(pool.submit(plan_fn, slide_id, path))
            if len(pending) >= lookahead:
                break
        while pending:
            plan = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(plan_fn, *nxt))
            yield plan


# A tile key: (slide id, tile index, path, x, y, size0, out_px, decoder "openslide"|"jpeg").
TileKey = tuple[int, int, str, int, int, int, int, str]


class TileReader(Dataset):
    """key -> (slide id, tile index, uint8 3 x out_px x out_px tensor, or for a "jpeg" key
    the compressed `Region` the collation decodes, or None; error). Each worker keeps its
    last few slides open (closed as they drop out of its cache)."""

    def __init__(self) -> None:
        self._open: LRUCache[openslide.OpenSlide] = LRUCache(
            _OPEN_SLIDES_PER_WORKER, on_evict=lambda slide: slide.close()
        )
        self._jpeg: LRUCache[JpegTiles | None] = LRUCache(
            _OPEN_SLIDES_PER_WORKER, on_evict=lambda tiles: tiles and tiles.close()
        )

    def __getstate__(self):
        # open slides (and the cache's lock) do not cross into worker processes
        return {}

    def __setstate__(self, state) -> None:
        self.__init__()

    def _slide(self, path: str) -> openslide.OpenSlide:
        return self._open.get_or_build(path, lambda: open_slide(path))

    def __getitem__(self, key: TileKey):
        slide_id, index, path, x, y, size0, out_px, decoder = key
        try:
            tiles = self._jpeg.get_or_build(path, lambda: JpegTiles.open(path)) if decoder == "jpeg" else None
            if tiles is not None:
                return slide_id, index, tiles.region(x, y, size0, out_px), None
            rgb = read_box_array(self._slide(path), x, y, size0, out_px)
        except SlideError as exc:
            return slide_id, index, None, str(exc)
        except Exception as exc:  # noqa: BLE001 - a broken tile fails its slide, not the run
            return slide_id, index, None, f"unexpected error: {type(exc).__name__}: {exc}"
        # uint8 end to end and no copy here: encoder_input makes the array (a writable,
        # strided H x W x 3 view of the RGBA read_box_array decoded into) a C x H x W view;
        # the batch's torch.stack gathers it in the one copy it makes anyway. A per-tile copy
        # cost a quarter of the read (issue 14).
        return slide_id, index, encoder_input(rgb, out_px), None


class PlanSampler(Sampler):
    """Yields tile keys plan by plan; every plan it reaches (also the failed and the empty
    ones) is announced through `on_plan` before its first tile key goes out. `decoder` and
    `device` choose each slide's reader (`resolve_decoder`); a slide that is not a tiled-JPEG
    TIFF is read through OpenSlide, with a note on its plan when "jpeg" was asked for."""

    def __init__(
        self,
        plans: Iterable[SlidePlan],
        tile_px: int,
        on_plan: Callable[[SlidePlan], None],
        decoder: str = "openslide",
        device: str | torch.device | None = None,
    ):
        self.plans = plans
        self.tile_px = tile_px
        self.on_plan = on_plan
        self.asked = decoder
        self.decoder = resolve_decoder(decoder, device)

    def _route(self, plan: SlidePlan) -> None:
        plan.decoder, plan.note = "openslide", None
        if self.decoder != "jpeg":
            return
        tiles = JpegTiles.open(plan.path)
        if tiles is not None:
            tiles.close()
            info = plan.info
            # Only the formats whose pyramid OpenSlide reads as tifffile does (checked: same
            # levels): others with JPEG tiles (Ventana BIF overlaps its tiles, Philips TIFF
            # has its own level rules) stay with OpenSlide.
            if (
                info is not None
                and info.vendor in _JPEG_VENDORS
                and (tiles.levels[0].width, tiles.levels[0].height) == (info.width, info.height)
                and np.allclose(tiles.level_downsamples, info.level_downsamples, rtol=1e-6)
            ):
                plan.decoder = "jpeg"
                return
        if self.asked == "jpeg":
            plan.note = f"{plan.path.name}: not a TIFF of JPEG tiles (SVS, generic TIFF); read through OpenSlide"

    def __iter__(self) -> Iterator[TileKey]:
        for plan in self.plans:
            if not plan.error:
                self._route(plan)
            self.on_plan(plan)
            if plan.error:
                continue
            path = str(plan.path)
            for i, box in enumerate(plan.boxes):
                yield (plan.slide_id, i, path, box.x, box.y, box.size, self.tile_px, plan.decoder)


def _decode(pending: list[tuple[int, int, Region]], device) -> tuple[list, list, list]:
    """JPEG regions -> (keys, tiles on `device`, errors): one batched decode; should it
    fail (a corrupt tile), each region alone, so the error stays with its tiles."""
    try:
        return [(s, i) for s, i, _ in pending], decode_regions([r for _, _, r in pending], device), []
    except RuntimeError:
        keys, tiles, errors = [], [], []
        for s, i, region in pending:
            try:
                tiles.append(decode_regions([region], device)[0])
                keys.append((s, i))
            except RuntimeError as exc:
                errors.append((s, i, f"cannot decode the JPEG tiles of the region: {exc}"))
        return keys, tiles, errors


def _collate(items, decode_jpeg_here: bool = True):
    """(keys, uint8 batch or None, errors, JPEG regions left to decode). With
    `decode_jpeg_here` (CPU) the regions are decoded here, in the worker."""
    ok = [(s, i, t) for s, i, t, e in items if isinstance(t, torch.Tensor)]
    pending = [(s, i, t) for s, i, t, e in items if isinstance(t, Region)]
    errors = [(s, i, e) for s, i, t, e in items if t is None]
    keys = [(s, i) for s, i, _ in ok]
    tiles = [t for _, _, t in ok]
    if pending and decode_jpeg_here:
        more_keys, more_tiles, more_errors = _decode(pending, "cpu")
        keys, tiles, errors, pending = keys + more_keys, tiles + more_tiles, errors + more_errors, []
    return keys, _gather(tiles), errors, pending


def _gather(tiles: list[torch.Tensor]) -> torch.Tensor | None:
    """The tiles (C x H x W views of the decoded pixel arrays) copied once into one
    contiguous batch, by numpy: single-threaded. torch.stack ran its copy on the process's
    intra-op threads, and on shared, loaded cores their barriers made it 15-50x slower (0.7 s
    for 32 tiles at load 11 on 2 cores; docs/benchmarks.md, issue 14). In a DataLoader worker
    the batch is allocated in shared memory, as default_collate does, so that handing it to
    the main process copies nothing more."""
    if not tiles:
        return None
    shape = (len(tiles), *tiles[0].shape)
    if all(t.device.type == "cpu" and t.shape == shape[1:] for t in tiles):
        if torch.utils.data.get_worker_info() is not None:
            out = torch.empty(shape, dtype=torch.uint8).share_memory_()
        else:
            out = torch.empty(shape, dtype=torch.uint8)
        arr = out.numpy()
        for i, tile in enumerate(tiles):
            arr[i] = tile.numpy()
        return out
    return torch.stack(tiles)  # on a GPU, or tiles of different sizes (an error then, as before)


def tile_batches(
    sampler: PlanSampler, batch_size: int, workers: int, device: str | torch.device | None = None
) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor | None, list[tuple[int, int, str]]]]:
    """Batches of (list of (slide id, tile index), uint8 N x 3 x H x W or None, errors).
    On a CUDA `device` the JPEG regions are decoded there (in this process, which owns the
    CUDA context) and the whole batch is on that device; otherwise on the CPU, in the workers."""
    on_cuda = device is not None and torch.device(device).type == "cuda"
    loader = DataLoader(
        TileReader(),
        sampler=sampler,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=functools.partial(_collate, decode_jpeg_here=not on_cuda),
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers else None,
    )
    for keys, batch, errors, pending in loader:
        if pending:
            more_keys, more_tiles, more_errors = _decode(pending, device)
            if batch is not None:
                more_tiles = [*batch.to(device, non_blocking=True), *more_tiles]
            keys, errors = keys + more_keys, errors + more_errors
            batch = torch.stack(more_tiles) if more_tiles else None
        yield keys, batch, errors
