"""Tiles of JPEG-compressed TIFF pyramids (Aperio SVS, generic tiled TIFF) decoded in batches by
torchvision's `decode_jpeg`, on a CUDA device (nvJPEG) where there is one (issue 14).

On a GPU the encoder embeds thousands of tiles a second while one CPU core decodes a few
hundred through OpenSlide; decoding there too keeps it fed. tifffile gives the compressed tile
bytes without decoding them (offsets, byte counts, the shared JPEG tables); a batch of regions
is read as the set of JPEG tiles it touches (each decoded once, however many regions share
it), pasted, and resized with the same antialiased bilinear filter as `engine.slides`.

OpenSlide stays the reader for every other format and for CPU machines; this module says
whether a slide qualifies (`JpegTiles.open` returns None otherwise). On CPU, decode_jpeg uses
libjpeg-turbo like OpenSlide, and the pixels are equal (tests/test_decode.py).

A level-0 origin that falls between a coarser level's pixels (a generic TIFF's "2x" level is
often 2.0003x) is rendered as OpenSlide renders it, a bilinear sub-pixel shift: ~0.2 grey
levels mean absolute difference from OpenSlide there (at most 2 per pixel); at level 0 the
pixels are OpenSlide's. Starting at the nearest whole pixel instead moved dense tissue by up
to 12 grey levels per tile (tests/test_decode_jpeg_build.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import tifffile
import torch

# An Adobe APP14 segment with transform 0: "these three components are RGB, not YCbCr".
# Aperio writes RGB-coded JPEG tiles (TIFF photometric RGB) without saying so in the JPEG
# stream; libjpeg (and nvJPEG) would take them for YCbCr. OpenSlide tells libjpeg through its
# API; decode_jpeg has no such option, so the stream says it.
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
_TIFF_JPEG = 7
_PHOTOMETRIC_RGB = 2
_PHOTOMETRIC_YCBCR = 6


@dataclasses.dataclass(frozen=True)
class _Level:
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    tables: bytes
    rgb_coded: bool

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile_w)


class JpegTiles:
    """A slide's tiled-JPEG pyramid as compressed tiles; see the module docstring."""

    def __init__(self, path: Path, levels: list[_Level]):
        self.path = path
        self.levels = levels
        w0, h0 = levels[0].width, levels[0].height
        # as OpenSlide computes a level's downsample when the format does not state it
        self.level_downsamples = tuple((w0 / lv.width + h0 / lv.height) / 2 for lv in levels)
        self._fd = os.open(path, os.O_RDONLY)

    @classmethod
    def open(cls, path: str | Path) -> "JpegTiles | None":
        """The slide's pyramid if every level is a tiled, 8-bit, 3-sample JPEG page (RGB or
        YCbCr); None for anything else (other compressions, strips, other formats), which
        OpenSlide then reads."""
        path = Path(path)
        try:
            with tifffile.TiffFile(path) as tif:
                if not tif.series:
                    return None
                levels = []
                for level in tif.series[0].levels:
                    page = level.keyframe if hasattr(level, "keyframe") else level.pages[0]
                    if not (
                        page.is_tiled
                        and page.compression == _TIFF_JPEG
                        and page.samplesperpixel == 3
                        and page.bitspersample == 8
                        and page.planarconfig == 1
                        and page.photometric in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR)
                        and page.tiledepth == 1
                    ):
                        return None
                    levels.append(
                        _Level(
                            page.imagewidth,
                            page.imagelength,
                            page.tilewidth,
                            page.tilelength,
                            tuple(page.dataoffsets),
                            tuple(page.databytecounts),
                            bytes(page.jpegtables or b""),
                            page.photometric == _PHOTOMETRIC_RGB,
                        )
                    )
        except (tifffile.TiffFileError, OSError, ValueError, IndexError, AttributeError):
            return None
        return cls(path, levels) if levels else None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "JpegTiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def best_level(self, downsample: float) -> int:
        """OpenSlide's choice: the coarsest level at no more than `downsample`."""
        level = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample:
                level = i
        return level

    def _stream(self, level: _Level, index: int) -> bytes | None:
        count = level.counts[index]
        if count == 0:
            return None  # sparse tile: not scanned
        data = os.pread(self._fd, count, level.offsets[index])
        if level.tables:  # abbreviated stream: the shared tables (without their EOI) + the tile (without its SOI)
            data = level.tables[:-2] + data[2:]
        if level.rgb_coded:
            data = data[:2] + _ADOBE_RGB + data[2:]
        return data

    def region(self, x: int, y: int, size0: int, out_px: int) -> "Region":
        """The level-0 square (x, y, size0) as the compressed JPEG tiles it touches, at
        OpenSlide's level choice: what `decode_regions` turns into an out_px tile. Only file
        reads, no decoding: a DataLoader worker prepares regions, the encoder's process
        decodes them on its device."""
        li = self.best_level(max(size0 / out_px, 1.0))
        lv, ds = self.levels[li], self.level_downsamples[li]
        read_px = max(1, int(round(size0 / ds)))
        # OpenSlide places the origin at x / ds on the level, between pixels when that is not
        # whole, and renders the fraction (a bilinear sub-pixel shift): so do we, from one
        # more row and column (up to 12 grey levels on dense tissue otherwise)
        lx, ly = int(math.floor(x / ds)), int(math.floor(y / ds))
        fx, fy = x / ds - lx, y / ds - ly
        fx, fy = (0.0 if f < 1e-6 else f for f in (fx, fy))
        span = read_px + (1 if fx or fy else 0)
        rows = range(max(0, ly // lv.tile_h), min(-(-lv.height // lv.tile_h), -(-(ly + span) // lv.tile_h)))
        cols = range(max(0, lx // lv.tile_w), min(lv.cols, -(-(lx + span) // lv.tile_w)))
        streams = {r * lv.cols + c: self._stream(lv, r * lv.cols + c) for r in rows for c in cols}
        return Region(
            str(self.path), li, lv.width, lv.height, lv.tile_w, lv.tile_h, lx, ly, fx, fy, read_px, out_px, streams
        )

    def read_boxes(
        self, boxes: list[tuple[int, int, int]], out_px: int, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """Level-0 squares (x, y, size0) as a uint8 N x 3 x out_px x out_px batch on `device`:
        OpenSlide's level choice, the JPEG tiles decoded in one decode_jpeg call, outside the
        image white (as engine.slides flattens it), resized with antialiased bilinear."""
        return torch.stack(decode_regions([self.region(x, y, s, out_px) for x, y, s in boxes], device))


@dataclasses.dataclass
class Region:
    """One tile's square as compressed JPEG tiles of one pyramid level (picklable, small:
    no offset tables), from `JpegTiles.region`."""

    source: str  # the slide: with level and tile index it names a JPEG tile across regions
    level: int
    width: int  # the level's size and tile size
    height: int
    tile_w: int
    tile_h: int
    lx: int  # the square at that level: whole pixel origin, the fraction OpenSlide renders
    ly: int
    fx: float
    fy: float
    read_px: int
    out_px: int
    streams: dict[int, bytes | None]  # tile index (row-major) -> JPEG stream, None for a sparse tile


def decode_regions(regions: list[Region], device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Each region as a uint8 3 x out_px x out_px tensor on `device`. Every JPEG tile is
    decoded once however many regions share it, all in one decode_jpeg call (a batch for
    nvJPEG on CUDA); regions are pasted on white and resized in groups of equal size."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    unique: dict[tuple[str, int, int], bytes] = {}
    for reg in regions:
        for idx, data in reg.streams.items():
            if data is not None:
                unique.setdefault((reg.source, reg.level, idx), data)
    keys = list(unique)
    decoded: dict[tuple[str, int, int], torch.Tensor] = {}
    if keys:
        datas = [torch.frombuffer(bytearray(unique[k]), dtype=torch.uint8) for k in keys]
        decoded = dict(zip(keys, decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)))
    canvases = []
    for reg in regions:
        span = reg.read_px + (1 if reg.fx or reg.fy else 0)
        canvas = torch.full((3, span, span), 255, dtype=torch.uint8, device=device)
        cols = -(-reg.width // reg.tile_w)
        for idx in reg.streams:
            img = decoded.get((reg.source, reg.level, idx))
            if img is None:
                continue
            r, c = divmod(idx, cols)
            tx, ty = c * reg.tile_w, r * reg.tile_h
            # the part of this tile inside both the image and the region
            x0, y0 = max(reg.lx, tx), max(reg.ly, ty)
            x1 = min(reg.lx + span, tx + reg.tile_w, reg.width)
            y1 = min(reg.ly + span, ty + reg.tile_h, reg.height)
            if x1 > x0 and y1 > y0:
                canvas[:, y0 - reg.ly : y1 - reg.ly, x0 - reg.lx : x1 - reg.lx] = img[
                    :, y0 - ty : y1 - ty, x0 - tx : x1 - tx
                ]
        canvases.append(_shift(canvas, reg.fx, reg.fy) if span != reg.read_px else canvas)
    out: list[torch.Tensor | None] = [None] * len(regions)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, reg in enumerate(regions):
        groups.setdefault((reg.read_px, reg.out_px), []).append(i)
    for (read_px, out_px), members in groups.items():
        if read_px == out_px:
            for i in members:
                out[i] = canvases[i]
            continue
        resized = _resize(torch.stack([canvases[i] for i in members]), out_px)
        for i, tile in zip(members, resized):
            out[i] = tile
    return out


def _shift(chw: torch.Tensor, fx: float, fy: float) -> torch.Tensor:
    """The (n+1)-pixel canvas sampled at (fx, fy) + whole pixels, bilinear: n pixels, as
    OpenSlide renders a fractional origin (mean difference ~0.2 grey levels, at most 2)."""
    c = chw.float()
    top = c[:, :-1, :-1] * (1 - fx) + c[:, :-1, 1:] * fx
    bottom = c[:, 1:, :-1] * (1 - fx) + c[:, 1:, 1:] * fx
    return (top * (1 - fy) + bottom * fy).round_().clamp_(0, 255).to(torch.uint8)


def _resize(nchw: torch.Tensor, out_px: int) -> torch.Tensor:
    """A uint8 N x 3 x H x W batch resized to out_px with the project's one filter
    (antialiased bilinear)."""
    if nchw.device.type == "cpu":
        # engine.images.resize_bilinear's kernel, as read_box_array uses it: uint8 channels-last
        # with a fourth band (fast for four bands); the same rounding, so equal pixels
        rgba = torch.full((nchw.shape[0], 4, *nchw.shape[2:]), 255, dtype=torch.uint8)
        rgba[:, :3] = nchw
        rgba = rgba.contiguous(memory_format=torch.channels_last)
        out = torch.nn.functional.interpolate(
            rgba, size=(out_px, out_px), mode="bilinear", antialias=True, align_corners=False
        )
        return out[:, :3]
    # CUDA has no uint8 antialiased kernel: float, rounded back
    y = torch.nn.functional.interpolate(
        nchw.float(), size=(out_px, out_px), mode="bilinear", antialias=True, align_corners=False
    )
    return y.round_().clamp_(0, 255).to(torch.uint8)
