"""Open slides and their deep-zoom generators, kept per worker (LRU), looked up by catalog
id only: a request names a slide id, never a path, and the path comes from the catalog."""

from __future__ import annotations

import collections
import dataclasses
import io
import threading
from pathlib import Path

import openslide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from engine.catalog import Catalog
from engine.errors import NotFound, SlideError
from engine.slides import flatten_rgba, open_slide
from webapp.archive import get_slide

# Deep-zoom tiles of 254 px + 1 px overlap: 256 px images, the layout OpenSeadragon expects.
DZ_TILE_PX = 254
DZ_OVERLAP = 1


@dataclasses.dataclass
class OpenedSlide:
    slide_id: int
    path: Path
    slide: openslide.OpenSlide
    deepzoom: DeepZoomGenerator


class TileBytes:
    """Encoded deep-zoom tiles, least recently used dropped first, bounded in bytes. Viewers
    of one slide ask for the same few hundred tiles again and again; decoding and
    re-encoding them is most of a tile request's cost."""

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


class SlideCache:
    def __init__(self, catalog: Catalog, capacity: int = 16, tile_cache_bytes: int = 0):
        self.catalog = catalog
        self.capacity = max(1, capacity)
        self._open: collections.OrderedDict[int, OpenedSlide] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.tile_bytes = TileBytes(tile_cache_bytes)

    def get(self, slide_id: int) -> OpenedSlide:
        with self._lock:
            opened = self._open.get(slide_id)
            if opened is not None:
                self._open.move_to_end(slide_id)
                return opened
        path = Path(get_slide(self.catalog, slide_id).path)
        slide = open_slide(path)
        # limit_bounds=False keeps deep-zoom pixel coordinates equal to level-0 coordinates,
        # so matched regions (level-0 boxes) are drawn without an offset.
        opened = OpenedSlide(slide_id, path, slide, DeepZoomGenerator(slide, tile_size=DZ_TILE_PX, overlap=DZ_OVERLAP, limit_bounds=False))
        with self._lock:
            existing = self._open.get(slide_id)
            if existing is not None:
                slide.close()
                return existing
            self._open[slide_id] = opened
            while len(self._open) > self.capacity:
                # Not closed: a request in another thread may still read from it; the
                # garbage collector closes it once nothing refers to it.
                self._open.popitem(last=False)
        return opened

    def encoded_tile(self, slide_id: int, level: int, col: int, row: int, pil_format: str) -> bytes:
        """A deep-zoom tile encoded as JPEG or PNG, from the tile cache when there.
        The key holds the slide's path, so a re-used id never serves another slide's tile."""
        opened = self.get(slide_id)
        key = (slide_id, str(opened.path), level, col, row, pil_format)
        data = self.tile_bytes.get(key)
        if data is None:
            buf = io.BytesIO()
            self._read_tile(opened, level, col, row).save(buf, format=pil_format, **({"quality": 80} if pil_format == "JPEG" else {}))
            data = buf.getvalue()
            self.tile_bytes.put(key, data)
        return data

    @staticmethod
    def _read_tile(opened: OpenedSlide, level: int, col: int, row: int) -> Image.Image:
        dz = opened.deepzoom
        if not 0 <= level < dz.level_count:
            raise NotFound(f"deep-zoom level {level} does not exist (0..{dz.level_count - 1})")
        cols, rows = dz.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise NotFound(f"deep-zoom tile {col}_{row} is outside level {level} ({cols} x {rows} tiles)")
        try:
            return dz.get_tile(level, (col, row)).convert("RGB")
        except openslide.OpenSlideError as exc:
            raise SlideError(f"cannot read tile of slide {opened.slide_id}: {exc}") from None

    def region(self, slide_id: int, x: int, y: int, w: int, h: int, max_px: int) -> Image.Image:
        """The level-0 box (x, y, w, h) scaled to fit max_px, from the coarsest pyramid level
        that still has enough pixels; outside-scan pixels are white."""
        opened = self.get(slide_id)
        width, height = opened.slide.dimensions
        if w < 1 or h < 1 or x < 0 or y < 0 or x + w > width or y + h > height:
            raise NotFound(f"region ({x}, {y}, {w}, {h}) is outside the slide ({width} x {height})")
        scale = max(w, h) / max_px
        level = opened.slide.get_best_level_for_downsample(max(scale, 1.0))
        ds = opened.slide.level_downsamples[level]
        size = (max(1, int(round(w / ds))), max(1, int(round(h / ds))))
        try:
            rgba = opened.slide.read_region((x, y), level, size)
        except openslide.OpenSlideError as exc:
            raise SlideError(f"cannot read region of slide {slide_id}: {exc}") from None
        rgb = flatten_rgba(rgba)
        rgb.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
        return rgb

    def thumbnail(self, slide_id: int, max_px: int) -> Image.Image:
        opened = self.get(slide_id)
        width, height = opened.slide.dimensions
        return self.region(slide_id, 0, 0, width, height, max_px)
