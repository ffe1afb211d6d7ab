"""Open slides and their deep-zoom generators, kept per worker (LRU), looked up by catalog
id only: a request names a slide id, never a path, and the path comes from the catalog.

What is served must be the slide the catalog describes (issue 11: a removed slide's tiles
still answered 200; a slide file overwritten under the archive kept serving old pixels, or
new pixels under old metadata). So every lookup re-reads the slide's catalog row (it must
still exist and be indexed); an entry is keyed by id and content fingerprint; a slide is
opened only after its file's fingerprint matched the catalog's, and a cached handle is used
only while its file's (device, inode, size, mtime) are those it was verified with. Anything
else is a SlideChanged error (409 at the edge), never pixels.

Reads are bounded in memory whatever the slide's size: a deep-zoom tile or a thumbnail of a
slide without a suitable pyramid level is not read as one level-0 region (a 15000 x 15000
single-level TIFF cost +2.7 GB per low-resolution tile), but from a low-resolution overview
built once per slide in bounded blocks, or in bounded blocks itself.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import math
import os
import threading
from pathlib import Path

import openslide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from engine.cache import LRUCache
from engine.catalog import Catalog, models
from engine.errors import NotFound, SlideChanged, SlideError
from engine.slides import fingerprint, flatten_rgba, open_slide
from webapp.archive import get_slide

# Deep-zoom tiles of 254 px + 1 px overlap: 256 px images, the layout OpenSeadragon expects.
DZ_TILE_PX = 254
DZ_OVERLAP = 1
# Pixels of a slide level read by one read_region call: 1024 x 1024, 4 MB as RGBA. A deep-zoom
# tile up to 4x coarser than its pyramid level is one read; anything larger goes in blocks of
# this size (or to the overview). Measured on a 12000 x 12000 single-level TIFF: +64 MB peak,
# half of it OpenSlide's own 32 MB tile cache.
READ_MAX_PX = 1_048_576
# Longer side of a slide's low-resolution overview (at most 12 MB as RGB), built once, in
# bounded blocks, for a slide whose pyramid has no level small enough for its thumbnail and
# its coarsest deep-zoom tiles; kept with the open slide.
OVERVIEW_MAX_PX = 2048


@dataclasses.dataclass
class Overview:
    image: Image.Image
    sx: float  # level-0 pixels per overview pixel, across
    sy: float  # ... and down


@dataclasses.dataclass
class OpenedSlide:
    slide_id: int
    fingerprint: str
    path: Path
    stat: tuple[int, int, int, int]  # (device, inode, size, mtime_ns) the file was verified with
    slide: openslide.OpenSlide
    deepzoom: DeepZoomGenerator
    overview: Overview | None = None
    overview_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def key(self) -> tuple[int, str]:
        return (self.slide_id, self.fingerprint)


class TileBytes:
    """Encoded deep-zoom tiles, least recently used dropped first, bounded in bytes. Viewers
    of one slide ask for the same few hundred tiles again and again; decoding and
    re-encoding them is most of a tile request's cost. (engine.cache.LRUCache bounds the
    number of entries; tiles differ in size, and TILE_CACHE_MB is a budget in bytes.)"""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[tuple, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)


def _file_stat(slide_id: int, path: Path) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime_ns) of a slide's file; SlideChanged when it is gone."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _file_error(slide_id, path, exc) from None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _file_error(slide_id: int, path: Path, exc: OSError) -> SlideError:
    """The error to raise for an OSError on a slide's file: SlideChanged when it is gone."""
    if isinstance(exc, FileNotFoundError):
        return SlideChanged(
            f"slide {slide_id} ({path.name}): its file is gone since it was indexed; restore it, or run `indexer build` to update the catalog"
        )
    return SlideError(f"slide {slide_id} ({path.name}): its file cannot be read ({exc.strerror or exc})")


def _fit(w: int, h: int, max_px: int) -> tuple[int, int]:
    """(w, h) scaled down (never up) so that the longer side is at most max_px."""
    scale = max(w, h) / max_px
    if scale <= 1:
        return w, h
    return max(1, round(w / scale)), max(1, round(h / scale))


def _read_blocks(
    slide: openslide.OpenSlide, x: float, y: float, w: float, h: float, out_w: int, out_h: int
) -> Image.Image:
    """The level-0 box (x, y, w, h) as RGB out_w x out_h, read from the coarsest level with
    enough pixels in blocks of at most READ_MAX_PX level pixels, each reduced before the next
    is read: memory does not grow with the box. Outside-scan pixels are white."""
    sx, sy = w / out_w, h / out_h  # level-0 pixels per output pixel
    level = slide.get_best_level_for_downsample(max(sx, sy, 1.0))
    ds = slide.level_downsamples[level]
    side = math.isqrt(READ_MAX_PX)
    bw_max = max(1, int(side * ds / sx))  # output pixels per block, across and down
    bh_max = max(1, int(side * ds / sy))
    out = Image.new("RGB", (out_w, out_h), (255, 255, 255))
    for oy in range(0, out_h, bh_max):
        bh = min(bh_max, out_h - oy)
        for ox in range(0, out_w, bw_max):
            bw = min(bw_max, out_w - ox)
            size = (max(1, min(side, math.ceil(bw * sx / ds))), max(1, min(side, math.ceil(bh * sy / ds))))
            block = flatten_rgba(slide.read_region((int(x + ox * sx), int(y + oy * sy)), level, size))
            out.paste(block.resize((bw, bh), Image.Resampling.BOX) if block.size != (bw, bh) else block, (ox, oy))
    return out


def _read_direct(
    slide: openslide.OpenSlide, x: float, y: float, w: float, h: float, out_w: int, out_h: int
) -> Image.Image | None:
    """The box from the coarsest level with enough pixels, in one read when that read is at
    most READ_MAX_PX; None when it would be larger."""
    level = slide.get_best_level_for_downsample(max(w / out_w, h / out_h, 1.0))
    ds = slide.level_downsamples[level]
    size = (max(1, math.ceil(w / ds)), max(1, math.ceil(h / ds)))
    if size[0] * size[1] > READ_MAX_PX:
        return None
    rgb = flatten_rgba(slide.read_region((int(x), int(y)), level, size))
    return rgb if rgb.size == (out_w, out_h) else rgb.resize((out_w, out_h), Image.Resampling.LANCZOS)


class _OpenSlides(LRUCache[OpenedSlide]):
    """Open slides by (id, fingerprint). Iterating gives a snapshot of the keys, least
    recently used first (what the tests inspect)."""

    def __iter__(self):
        with self._lock:
            return iter(list(self._items))


class SlideCache:
    def __init__(self, catalog: Catalog, capacity: int = 16, tile_cache_bytes: int = 0):
        self.catalog = catalog
        # Handles pushed out are not closed: a request in another thread may still read from
        # one; the garbage collector closes it once nothing refers to it.
        self._open = _OpenSlides(max(1, capacity))
        # Makes "is it there, else drop this slide's other entries and add it" one step.
        self._lock = threading.Lock()
        self.tile_bytes = TileBytes(tile_cache_bytes)

    # -- which slide ---------------------------------------------------------------------

    def _row(self, slide_id: int):
        """The slide's catalog row as it is now: NotFound when removed, SlideChanged when
        `indexer build` found its file missing or changed, SlideError when not indexed."""
        row = get_slide(self.catalog, slide_id)
        name = Path(row.path).name
        if row.status == models.MISSING:
            raise SlideChanged(
                f"slide {slide_id} ({name}): its file is missing or changed since it was indexed; restore it, or run `indexer build` to re-index it"
            )
        if row.status != models.INDEXED:
            why = f" ({row.error})" if row.error else ""
            raise SlideError(
                f"slide {slide_id} ({name}) cannot be shown: it is {row.status}, not indexed{why}; run `indexer build`"
            )
        return row

    def get(self, slide_id: int) -> OpenedSlide:
        """The open slide of catalog id `slide_id`, checked against the catalog and its file
        on every call (a primary-key query and a stat: cheap next to a tile)."""
        row = self._row(slide_id)
        key = (slide_id, row.fingerprint)
        opened = self._open.get(key)
        if opened is not None:
            try:
                same = opened.path == Path(row.path) and _file_stat(slide_id, opened.path) == opened.stat
            except SlideError:
                self._drop(opened)  # the file is gone: this handle must not serve again
                raise
            if same:
                return opened
            # moved in the catalog, or the file was touched, replaced or rewritten since it
            # was verified: open it afresh, which checks its content again
            self._drop(opened)
        opened = self._open_verified(slide_id, row)
        with self._lock:
            existing = self._open.get(key)
            if existing is not None and existing.path == opened.path and existing.stat == opened.stat:
                opened.slide.close()  # another thread opened it first; this one was never shared
                return existing
            self._open.pop_where(lambda k: k[0] == slide_id)
            self._open.put(key, opened)
        return opened

    def _open_verified(self, slide_id: int, row) -> OpenedSlide:
        """Open the slide only when its file's content is the one indexed (fingerprint), and
        did not change while it was being checked and opened."""
        path = Path(row.path)
        before = _file_stat(slide_id, path)
        try:
            found = fingerprint(path)
        except OSError as exc:
            raise _file_error(slide_id, path, exc) from None
        if found != row.fingerprint:
            raise SlideChanged(
                f"slide {slide_id} ({path.name}): the slide file changed since it was indexed (its content is not the slide the catalog describes); run `indexer build` to re-index it"
            )
        slide = open_slide(path)
        try:
            # limit_bounds=False keeps deep-zoom pixel coordinates equal to level-0
            # coordinates, so matched regions (level-0 boxes) are drawn without an offset.
            deepzoom = DeepZoomGenerator(slide, tile_size=DZ_TILE_PX, overlap=DZ_OVERLAP, limit_bounds=False)
            after = _file_stat(slide_id, path)
        except openslide.OpenSlideError as exc:
            slide.close()
            raise SlideError(f"slide {slide_id} ({path.name}) cannot be read: {exc}") from None
        except SlideError:
            slide.close()
            raise
        if after != before:
            slide.close()
            raise SlideChanged(
                f"slide {slide_id} ({path.name}): the slide file changed while it was being opened; try again, and run `indexer build` if it keeps changing"
            )
        return OpenedSlide(slide_id, row.fingerprint, path, before, slide, deepzoom)

    def _drop(self, opened: OpenedSlide) -> None:
        with self._lock:
            if self._open.get(opened.key) is opened:
                self._open.pop(opened.key)

    @contextlib.contextmanager
    def _reading(self, opened: OpenedSlide, what: str):
        """OpenSlide errors while reading as a SlideError (422). OpenSlide keeps a handle
        in error once a read failed (every later call fails, even `dimensions`), so the
        handle is dropped: the next request opens the file afresh (issue 11, finding 9)."""
        try:
            yield
        except (openslide.OpenSlideError, OSError) as exc:
            self._drop(opened)
            raise SlideError(
                f"cannot read {what} of slide {opened.slide_id} ({opened.path.name}): {exc}; the file may be damaged (`indexer verify` checks slide files)"
            ) from None

    # -- what the routes serve -------------------------------------------------------------

    def dzi(self, slide_id: int) -> str:
        return self.get(slide_id).deepzoom.get_dzi("jpeg")

    def encoded_tile(self, slide_id: int, level: int, col: int, row: int, pil_format: str) -> bytes:
        """A deep-zoom tile encoded as JPEG or PNG, from the tile cache when there. The
        key holds the slide's fingerprint: a cached tile is only ever the indexed content."""
        opened = self.get(slide_id)
        key = (slide_id, opened.fingerprint, level, col, row, pil_format)
        data = self.tile_bytes.get(key)
        if data is None:
            buf = io.BytesIO()
            self._read_tile(opened, level, col, row).save(
                buf, format=pil_format, **({"quality": 80} if pil_format == "JPEG" else {})
            )
            data = buf.getvalue()
            self.tile_bytes.put(key, data)
        return data

    def _read_tile(self, opened: OpenedSlide, level: int, col: int, row: int) -> Image.Image:
        box, size = deepzoom_tile_box(opened, level, col, row)
        with self._reading(opened, f"deep-zoom tile {level}/{col}_{row}"):
            return read_scaled(opened, *box, *size)

    def region(self, slide_id: int, x: int, y: int, w: int, h: int, max_px: int) -> Image.Image:
        """The level-0 box (x, y, w, h) scaled to fit max_px, from the coarsest pyramid level
        that still has enough pixels (or the overview); outside-scan pixels are white. Not
        engine.slides.read_box: that reads squares in one read whatever their size, and a
        box here may be any rectangle of a slide without a pyramid (reads stay bounded)."""
        opened = self.get(slide_id)
        with self._reading(opened, "a region"):
            width, height = opened.slide.dimensions
            if w < 1 or h < 1 or x < 0 or y < 0 or x + w > width or y + h > height:
                raise NotFound(f"region ({x}, {y}, {w}, {h}) is outside the slide ({width} x {height})")
            return read_scaled(opened, x, y, w, h, *_fit(w, h, max_px))

    def thumbnail(self, slide_id: int, max_px: int) -> Image.Image:
        opened = self.get(slide_id)
        with self._reading(opened, "the thumbnail"):
            width, height = opened.slide.dimensions
            return read_scaled(opened, 0, 0, width, height, *_fit(width, height, max_px))


# -- reading, bounded ----------------------------------------------------------------------


def overview_of(opened: OpenedSlide) -> Overview:
    """The slide at most OVERVIEW_MAX_PX on its longer side, built once per open slide
    (under its own lock, so concurrent tile requests wait for one build, not start
    several), read in bounded blocks."""
    with opened.overview_lock:
        if opened.overview is None:
            slide = opened.slide
            width, height = slide.dimensions
            out_w, out_h = _fit(width, height, OVERVIEW_MAX_PX)
            image = _read_direct(slide, 0, 0, width, height, out_w, out_h)
            if image is None:
                image = _read_blocks(slide, 0, 0, width, height, out_w, out_h)
            opened.overview = Overview(image, width / out_w, height / out_h)
        return opened.overview


def read_scaled(opened: OpenedSlide, x: int, y: int, w: int, h: int, out_w: int, out_h: int) -> Image.Image:
    """The level-0 box (x, y, w, h) as RGB out_w x out_h (outside-scan pixels white):
    in one read from the pyramid when that is small; else from the overview when it is
    fine enough; else in bounded blocks (a level-0 region a tile covers)."""
    slide = opened.slide
    image = _read_direct(slide, x, y, w, h, out_w, out_h)
    if image is not None:
        return image
    overview = overview_of(opened)
    if overview.sx <= w / out_w * 1.001 and overview.sy <= h / out_h * 1.001:
        return _from_overview(overview, slide.dimensions, x, y, w, h, out_w, out_h)
    return _read_blocks(slide, x, y, w, h, out_w, out_h)


def deepzoom_tile_box(
    opened: OpenedSlide, level: int, col: int, row: int
) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """Deep-zoom tile (level, col, row) with the geometry of openslide's
    DeepZoomGenerator (limit_bounds=False: level L is level 0 downsampled by
    2^(levels-1-L); tiles of DZ_TILE_PX plus DZ_OVERLAP on inner edges), read bounded."""
    dz = opened.deepzoom
    if not 0 <= level < dz.level_count:
        raise NotFound(f"deep-zoom level {level} does not exist (0..{dz.level_count - 1})")
    cols, rows = dz.level_tiles[level]
    if not (0 <= col < cols and 0 <= row < rows):
        raise NotFound(f"deep-zoom tile {col}_{row} is outside level {level} ({cols} x {rows} tiles)")
    z_w, z_h = dz.level_dimensions[level]
    ds = 2 ** (dz.level_count - 1 - level)

    def span(t: int, n: int, z_lim: int) -> tuple[int, int]:
        before = DZ_OVERLAP if t else 0
        after = DZ_OVERLAP if t < n - 1 else 0
        return DZ_TILE_PX * t - before, min(DZ_TILE_PX, z_lim - DZ_TILE_PX * t) + before + after

    zx, zw = span(col, cols, z_w)
    zy, zh = span(row, rows, z_h)
    return (zx * ds, zy * ds, zw * ds, zh * ds), (zw, zh)


def _from_overview(
    overview: Overview, dims: tuple[int, int], x: float, y: float, w: float, h: float, out_w: int, out_h: int
) -> Image.Image:
    """The level-0 box from the overview; the part beyond the slide's edge (deep-zoom tiles
    at the border reach past it) is white, as read_region gives it."""
    width, height = dims
    cw, ch = min(w, width - x), min(h, height - y)  # the part of the box inside the slide
    out = Image.new("RGB", (out_w, out_h), (255, 255, 255))
    pw, ph = round(out_w * cw / w), round(out_h * ch / h)
    if cw <= 0 or ch <= 0 or pw < 1 or ph < 1:
        return out
    box = (
        x / overview.sx,
        y / overview.sy,
        min(overview.image.width, (x + cw) / overview.sx),
        min(overview.image.height, (y + ch) / overview.sy),
    )
    out.paste(overview.image.resize((pw, ph), Image.Resampling.LANCZOS, box=box), (0, 0))
    return out
