"""Tile decoding at the read limit (issue 14): the fast read_box path (OpenSlide's level,
torch's uint8 antialiased bilinear resize, alpha flattened only where not
opaque, uint8 end to end)
against the reference path it replaced, on real slides. Index tiles and query tiles both go
through read_box, so any change of pixels must stay within resampling noise: mean absolute
difference <= 2 grey levels, features within cosine 0.999."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import torch
from PIL import Image

from engine.encoder import Encoder, l2_normalise
from engine.slides import describe_slide, open_slide, read_box, read_box_array, tile_size0
from indexer.pipeline import TileReader

MAD_LIMIT = 2.0
COSINE_LIMIT = 0.999


def reference_read_box(slide: openslide.OpenSlide, x: int, y: int, size0: int, out_px: int) -> Image.Image:
    """read_box as it was before issue 14 (OpenSlide's level choice, PIL flatten of every
    region, general bilinear resampling): the baseline the tolerances are measured against."""
    downsample = size0 / out_px
    level = slide.get_best_level_for_downsample(max(downsample, 1.0))
    size_level = max(1, int(round(size0 / slide.level_downsamples[level])))
    region = slide.read_region((int(x), int(y)), level, (size_level, size_level))
    rgb = Image.new("RGB", region.size, (255, 255, 255))
    rgb.paste(region, mask=region.getchannel("A"))
    if rgb.size != (out_px, out_px):
        rgb = rgb.resize((out_px, out_px), Image.Resampling.BILINEAR)
    return rgb


def _boxes(slide, size0: int, n: int, edge: bool) -> list[tuple[int, int]]:
    """n boxes spread over the slide; with edge, the last ones reach past its right and bottom
    borders (outside-scan pixels, transparent in OpenSlide, flattened to white)."""
    w, h = slide.dimensions
    xs = np.linspace(0, w - size0, n).astype(int)
    ys = np.linspace(0, h - size0, n)[::-1].astype(int)
    boxes = list(zip(xs.tolist(), ys.tolist()))
    if edge:
        boxes += [(w - size0 // 2, h // 2), (w // 3, h - size0 // 3), (w - size0 // 4, h - size0 // 4)]
    return boxes


CASES = [
    # slide, target um/px, what the case exercises
    ("CMU-1-Small-Region.svs", 1.0, "0.499 um/px single level: 449 px resampled to 224"),
    ("CMU-1-Small-Region.svs", None, "own resolution: no resampling"),
    ("CMU-1-Small-Region.svs", 0.8, "factor 1.6"),
    ("CMU-1-Small-Region.generic-pyramid.tiff", 1.0, "2x level at exactly 1.0 um/px"),
    ("CMU-1-Small-Region.generic-pyramid.tiff", 4.0, "coarse level (8x) at 4 um/px"),
    ("CMU-1-Small-Region.generic-pyramid.tiff", 0.997, "2x level 0.2 % finer than asked: level 0 resampled, as before"),
]


@pytest.mark.parametrize("name,target_mpp,why", CASES, ids=[f"{c[0]}@{c[1]}" for c in CASES])
def test_tile_pixels_within_resampling_noise_of_reference(shared_data, name, target_mpp, why):
    path = shared_data / "slides" / "real" / name
    slide = open_slide(path)
    try:
        info = describe_slide(path, slide)
        mpp = target_mpp or info.mpp
        size0 = tile_size0(info, mpp, 224)
        mads = []
        for x, y in _boxes(slide, size0, 8, edge=True):
            new = read_box_array(slide, x, y, size0, 224)
            ref = np.asarray(reference_read_box(slide, x, y, size0, 224))
            assert new.shape == ref.shape == (224, 224, 3) and new.dtype == np.uint8
            mads.append(float(np.abs(new.astype(np.int16) - ref.astype(np.int16)).mean()))
            # read_box is the same pixels as a PIL image (search queries, localisation)
            assert np.array_equal(np.asarray(read_box(slide, x, y, size0, 224)), new)
    finally:
        slide.close()
    assert max(mads) <= MAD_LIMIT, f"{why}: mean absolute difference per tile {mads}"


def test_outside_scan_is_white_glass_as_before(shared_data):
    """A box reaching past the slide: the transparent part is white in both paths."""
    path = shared_data / "slides" / "real" / "CMU-1-Small-Region.svs"
    slide = open_slide(path)
    try:
        w, h = slide.dimensions
        new = read_box_array(slide, w - 224, h - 224, 448, 224)
        ref = np.asarray(reference_read_box(slide, w - 224, h - 224, 448, 224))
    finally:
        slide.close()
    assert (new[120:, 120:] == 255).all() and (ref[120:, 120:] == 255).all()
    assert np.abs(new.astype(int) - ref.astype(int)).mean() <= MAD_LIMIT


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    # seeded random weights with non-trivial BatchNorm statistics: what matters is how the
    # network reacts to pixel changes, not what it has learnt
    import tempfile
    from pathlib import Path

    from tests.checkpoints import save_released_layout, torchvision_resnet

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_released_layout(torchvision_resnet("resnet18"), Path(tmp) / "r18.pth")
        return Encoder.from_spec(str(ckpt), device="cpu", precision="fp32")


def test_features_within_cosine_of_reference(shared_data, encoder):
    """The indexer's decode path (TileReader) against the reference tiles, through the
    encoder: cosine >= 0.999 per tile. The same comparison between neighbouring tiles of the
    slide is far below the bar, so the bar can tell tiles apart."""
    path = shared_data / "slides" / "real" / "CMU-1-Small-Region.svs"
    slide = open_slide(path)
    try:
        info = describe_slide(path, slide)
        size0 = tile_size0(info, 1.0, 224)
        boxes = _boxes(slide, size0, 12, edge=False)
        ref = torch.from_numpy(
            np.stack([np.asarray(reference_read_box(slide, x, y, size0, 224)) for x, y in boxes])
            .transpose(0, 3, 1, 2)
            .copy()
        )
        shifted = torch.from_numpy(
            np.stack([np.asarray(reference_read_box(slide, x + size0 // 4, y, size0, 224)) for x, y in boxes])
            .transpose(0, 3, 1, 2)
            .copy()
        )
    finally:
        slide.close()
    reader = TileReader()
    new = torch.stack([reader[(1, i, str(path), x, y, size0, 224, "openslide")][2] for i, (x, y) in enumerate(boxes)])
    f_ref, f_new, f_shift = (l2_normalise(encoder.embed(b)) for b in (ref, new, shifted))
    cos = (f_ref * f_new).sum(axis=1)
    cos_shift = (f_ref * f_shift).sum(axis=1)
    assert cos.min() >= COSINE_LIMIT, cos
    assert cos_shift.mean() < COSINE_LIMIT, f"the encoder cannot tell a quarter-tile shift apart: {cos_shift}"


def test_tile_reader_errors_stay_per_tile(shared_data):
    """A slide that opens but cannot be decoded fails its tile, not the worker."""
    path = shared_data / "slides" / "fixtures" / "unreadable.svs"
    slide_id, index, tensor, error = TileReader()[(3, 0, str(path), 0, 0, 448, 224, "openslide")]
    assert (slide_id, index, tensor) == (3, 0, None) and "cannot read region" in error


# --- JPEG tiles decoded by torchvision (the GPU path, tested on CPU) ------------------------


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "CMU-1-Small-Region.generic-pyramid.tiff"])
def test_jpeg_tiles_equal_openslide_on_cpu(shared_data, name):
    """decode_jpeg (libjpeg-turbo on CPU, like OpenSlide) on the compressed tile bytes gives
    OpenSlide's tiles: the Aperio SVS (RGB-coded JPEG, shared tables) and the generic TIFF
    (YCbCr), at level 0 and on coarser levels, with regions across tile borders and past
    the image's edge (white)."""
    from engine.jpeg_tiles import JpegTiles

    path = shared_data / "slides" / "real" / name
    tiles = JpegTiles.open(path)
    assert tiles is not None
    slide = open_slide(path)
    try:
        assert len(tiles.levels) == slide.level_count
        assert np.allclose(tiles.level_downsamples, slide.level_downsamples)
        w, h = slide.dimensions
        boxes = [(0, 0, 224), (300, 250, 448), (1000, 1100, 448), (w - 200, h - 300, 448), (896, 896, 896)]
        got = tiles.read_boxes(boxes, 224, device="cpu")
        assert got.shape == (len(boxes), 3, 224, 224) and got.dtype == torch.uint8
        for (x, y, size0), tile in zip(boxes, got):
            ref = read_box_array(slide, x, y, size0, 224)
            diff = np.abs(tile.permute(1, 2, 0).numpy().astype(int) - ref.astype(int))
            # same decoder library, same resize kernel and, off level 0, OpenSlide's sub-pixel
            # rendering of an origin between the level's pixels (level downsample 2.0003):
            # equal up to decoder and interpolation rounding
            assert diff.mean() <= 0.5 and diff.max() <= 8, (name, x, y, size0, diff.mean(), diff.max())
    finally:
        tiles.close()
        slide.close()


def test_jpeg_tiles_refuse_other_compressions(shared_data, tmp_path):
    """Deflate TIFFs (our own pyramids), JPEG 2000 SVS and non-TIFF files go to OpenSlide."""
    from engine.jpeg_tiles import JpegTiles
    from engine.pyramid_tiff import write_pyramidal_tiff

    deflate = write_pyramidal_tiff(tmp_path / "d.tiff", np.full((600, 600, 3), 200, np.uint8), mpp=0.5)
    assert JpegTiles.open(deflate) is None
    assert JpegTiles.open(shared_data / "slides" / "real" / "tcga-cr-7395-01a-01-ts1.svs") is None
    assert JpegTiles.open(shared_data / "slides" / "fixtures" / "broken.svs") is None
