"""Turning a data-set item into encoder input (uint8 3 x tile_px x tile_px), in DataLoader
workers: image files through `engine.images`, slide boxes through `engine.slides`."""

from __future__ import annotations

from typing import Sequence

from PIL import Image
from torch.utils.data import Dataset

from engine.errors import DatasetError, HistoseekError
from engine.evaluation.datasets.base import Item
from engine.images import open_rgb, to_uint8_chw
from engine.slides import open_slide, read_box


def rescale_centre(img: Image.Image, src_mpp: float, mpp: float, tile_px: int, name: str = "patch") -> Image.Image:
    """The centre tile_px x tile_px crop of `img` rescaled from src_mpp to mpp microns per
    pixel; an error when the patch covers less than one tile at that resolution."""
    scale = src_mpp / mpp
    width, height = round(img.width * scale), round(img.height * scale)
    if min(width, height) < tile_px:
        largest = min(img.width, img.height) * src_mpp / tile_px
        raise DatasetError(
            f"{name}: covers {min(img.size) * src_mpp:.0f} um, less than a {tile_px} px tile at {mpp} um/px "
            f"({tile_px * mpp:.0f} um); use --mpp <= {largest:.3f}, or no --mpp to resize whole patches"
        )
    img = img.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - tile_px) // 2, (height - tile_px) // 2
    return img.crop((left, top, left + tile_px, top + tile_px))


OPEN_SLIDES = 4


class ItemImages(Dataset):
    """Items -> (row, uint8 tensor or None, error or None). Slides stay open per worker
    (each worker holds its own copy of this object, hence its own cache).

    mpp: rescale image files with a known mpp to it and take the centre tile; None resizes
    whole patches to tile_px (the usual protocol for Kather-style sets). Slide boxes already
    carry the level-0 size of a tile at the chosen mpp.
    """

    def __init__(self, items: Sequence[Item], tile_px: int, mpp: float | None = None):
        self.items = list(items)
        self.tile_px = tile_px
        self.mpp = mpp
        self._slides: dict = {}

    def __len__(self) -> int:
        return len(self.items)

    def _slide(self, path):
        """An open slide; only the last OPEN_SLIDES stay open (items come slide by slide, and
        a thousand open slides per worker would exhaust memory and file handles)."""
        slide = self._slides.pop(path, None)
        if slide is None:
            slide = open_slide(path)
        self._slides[path] = slide  # most recently used last
        while len(self._slides) > OPEN_SLIDES:
            self._slides.pop(next(iter(self._slides))).close()
        return slide

    def image(self, item: Item) -> Image.Image:
        if item.box is not None:
            slide = self._slide(item.path)
            x, y, size0 = item.box
            return read_box(slide, x, y, size0, self.tile_px)
        img = open_rgb(item.path)
        if self.mpp is not None and item.mpp is not None:
            return rescale_centre(img, item.mpp, self.mpp, self.tile_px, name=item.key)
        return img

    def __getitem__(self, row: int):
        try:
            return row, to_uint8_chw(self.image(self.items[row]), self.tile_px), None
        except HistoseekError as exc:
            return row, None, str(exc)
