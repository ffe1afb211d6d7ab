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

Difference from OpenSlide kept on purpose: a region starts at the nearest whole pixel of its
level, where OpenSlide renders a level-0 origin that falls between that level's pixels at
the fraction (a generic TIFF's "2x" level is often 2.0003x): measured 1.3 grey levels mean
absolute difference for such a box, within the 2 that index and query tiles may differ by;
at level 0 the pixels are OpenSlide's.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
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

    def read_boxes(
        self, boxes: list[tuple[int, int, int]], out_px: int, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """Level-0 squares (x, y, size0) as a uint8 N x 3 x out_px x out_px batch on `device`:
        OpenSlide's level choice, the JPEG tiles decoded in one decode_jpeg call, outside the
        image white (as engine.slides flattens it), resized with antialiased bilinear."""
        from torchvision.io import ImageReadMode, decode_jpeg

        device = torch.device(device)
        plans = []
        wanted: dict[tuple[int, int], None] = {}
        for x, y, size0 in boxes:
            li = self.best_level(max(size0 / out_px, 1.0))
            lv, ds = self.levels[li], self.level_downsamples[li]
            read_px = max(1, int(round(size0 / ds)))
            lx, ly = int(round(x / ds)), int(round(y / ds))
            tiles = [
                (li, r * lv.cols + c)
                for r in range(
                    max(0, ly // lv.tile_h), min(-(-lv.height // lv.tile_h), -(-(ly + read_px) // lv.tile_h))
                )
                for c in range(max(0, lx // lv.tile_w), min(lv.cols, -(-(lx + read_px) // lv.tile_w)))
            ]
            plans.append((li, lx, ly, read_px, tiles))
            wanted.update(dict.fromkeys(tiles))
        keys = list(wanted)
        streams = [self._stream(self.levels[li], idx) for li, idx in keys]
        present = [i for i, s in enumerate(streams) if s is not None]
        decoded: dict[tuple[int, int], torch.Tensor] = {}
        if present:
            datas = [torch.frombuffer(bytearray(streams[i]), dtype=torch.uint8) for i in present]
            images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
            decoded = {keys[i]: img for i, img in zip(present, images)}
        out = []
        for li, lx, ly, read_px, tiles in plans:
            lv = self.levels[li]
            canvas = torch.full((3, read_px, read_px), 255, dtype=torch.uint8, device=device)
            for key in tiles:
                img = decoded.get(key)
                if img is None:
                    continue
                r, c = divmod(key[1], lv.cols)
                tx, ty = c * lv.tile_w, r * lv.tile_h
                # the part of this tile inside both the image and the region
                x0, y0 = max(lx, tx), max(ly, ty)
                x1 = min(lx + read_px, tx + lv.tile_w, lv.width)
                y1 = min(ly + read_px, ty + lv.tile_h, lv.height)
                if x1 > x0 and y1 > y0:
                    canvas[:, y0 - ly : y1 - ly, x0 - lx : x1 - lx] = img[:, y0 - ty : y1 - ty, x0 - tx : x1 - tx]
            out.append(_resize(canvas, out_px))
        return torch.stack(out)


def _resize(chw: torch.Tensor, out_px: int) -> torch.Tensor:
    if chw.shape[-1] == out_px and chw.shape[-2] == out_px:
        return chw
    if chw.device.type == "cpu":
        # the project's one resampling filter (engine.images), as read_box_array uses it
        from engine.images import resize_bilinear

        return torch.from_numpy(np.ascontiguousarray(resize_bilinear(chw.permute(1, 2, 0).numpy(), out_px))).permute(
            2, 0, 1
        )
    x = chw.unsqueeze(0).float()
    y = torch.nn.functional.interpolate(x, size=(out_px, out_px), mode="bilinear", antialias=True, align_corners=False)
    return y[0].round_().clamp_(0, 255).to(torch.uint8)
