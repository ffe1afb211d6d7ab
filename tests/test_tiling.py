"""The tile grid: level-0 boxes at the target resolution, kept by tissue fraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.slides import SlideInfo
from engine.tiling import tile_grid, tissue_fractions


def _info(width, height, mpp=0.5):
    return SlideInfo(Path("x.tiff"), None, width, height, mpp, "metadata", (1.0,))


def test_grid_is_whole_tiles_at_target_mpp_in_row_order():
    info = _info(2000, 1000, mpp=0.5)
    mask = np.ones((100, 200), bool)  # downsample 10
    boxes = tile_grid(info, mask, 10.0, target_mpp=1.0, tile_px=224, min_tissue=0.5)
    assert {b.size for b in boxes} == {448}
    assert [(b.x, b.y) for b in boxes] == [(x, y) for y in (0, 448) for x in (0, 448, 896, 1344)]
    assert all(b.tissue_fraction == 1.0 for b in boxes)


def test_min_tissue_keeps_only_tissue_tiles():
    info = _info(1792, 896, mpp=0.5)
    mask = np.zeros((90, 180), bool)
    mask[:, :45] = True  # level-0 x < 448 is tissue: the first column of tiles
    mask[:, 45:67] = True  # half of the second column
    boxes = tile_grid(info, mask, 896 / 90, target_mpp=1.0, tile_px=224, min_tissue=0.5)
    assert sorted({b.x for b in boxes}) == [0]
    loose = tile_grid(info, mask, 896 / 90, target_mpp=1.0, tile_px=224, min_tissue=0.4)
    assert sorted({b.x for b in loose}) == [0, 448]
    assert tile_grid(info, np.zeros((90, 180), bool), 896 / 90, 1.0, 224, 0.0) == []


def test_fractions_equal_brute_force():
    rng = np.random.default_rng(0)
    mask = rng.random((123, 157)) > 0.6
    ds = 7.3
    boxes = np.stack([rng.integers(0, 1000, 200), rng.integers(0, 800, 200), rng.integers(10, 300, 200)], axis=1)
    got = tissue_fractions(mask, ds, boxes)
    for (x, y, size), f in zip(boxes, got):
        x0 = min(mask.shape[1] - 1, int(np.floor(x / ds)))
        y0 = min(mask.shape[0] - 1, int(np.floor(y / ds)))
        x1 = min(mask.shape[1], max(x0 + 1, int(np.ceil((x + size) / ds))))
        y1 = min(mask.shape[0], max(y0 + 1, int(np.ceil((y + size) / ds))))
        assert f == pytest.approx(mask[y0:y1, x0:x1].mean())


def test_slide_smaller_than_a_tile_has_no_tiles_and_bad_arguments_fail():
    assert tile_grid(_info(300, 300), np.ones((30, 30), bool), 10.0, 1.0, 224, 0.5) == []
    with pytest.raises(ValueError):
        tile_grid(_info(3000, 3000), np.ones((30, 30), bool), 100.0, 1.0, 224, 1.5)
