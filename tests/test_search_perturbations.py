"""Copies found first under every perturbation (issue 13, point 3): a region cut from a real
archived slide and then turned or mirrored (all 8), rescaled (0.5x - 2x), saved as JPEG q60,
made 10 % darker, brighter, flatter or more contrasted, stain-shifted by 5 % per channel in
HED space (tests/perturb.py), 224 or 1024 px across, or several of these at once, finds its
source slide at rank 1, verified on pixels ("exact"), and the box it was cut from; with its
um/px given, and with it unknown (estimated by the engine).

The box: IoU >= 0.5 with the box cut, in level-0 pixels. IoU rather than "centre within a
quarter side" because it checks the box's size as well as its place: at an unknown scale a
box found at the wrong scale can sit on the right centre, and IoU fails a box more than ~1.41x
(one step of the scale ladder) too large or too small a side. Measured: every case here
finds the box at IoU >= 0.98.

The archive holds three real slides, each the others' distractors: CMU-1 (Aperio, 0.499
um/px), the TCGA frozen section (no mpp; the archive's default 0.5) and tiatoolbox's
TCGA-HE-7130 region (1000 px, no recorded resolution; written as a pyramidal TIFF at 0.5
um/px). A 1024 px crop does not fit in the last. CMU-1 runs every family at a known and an unknown um/px (the known ones and a few unknown
by default, the rest marked slow); the other two slides a cross-section (OTHER_SLIDES), slow."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from engine.catalog.models import Slide
from engine.search import SearchEngine
from engine.slides import open_slide
from tests.indexed_archive import make_indexed_archive
from tests.perturb import Perturbation
from tests.synthetic_slides import write_pyramidal_tiff

EDGE = 512  # level-0 px a side of the crop, unless the case says otherwise
MIN_IOU = 0.5

# slide key -> (file name in the archive, centre of the crops in level-0 px: tissue all round)
SOURCES = {
    "cmu": ("CMU-1-Small-Region.svs", (1110, 1050)),
    "tcga": ("tcga-cr-7395-01a-01-ts1.svs", (1500, 1400)),
    "he7130": ("tcga-he-7130.tiff", (500, 500)),
}
MAX_EDGE = {"he7130": 1000}  # the slide is 1000 px a side

UP, DOWN = (1.05, 0.95, 1.05), (0.95, 1.05, 0.95)  # H, E, DAB factors
FAMILIES: dict[str, tuple[int, Perturbation]] = {
    **{
        f"{'mirror-' if m else ''}rot{90 * t}": (EDGE, Perturbation(turns=t, mirrored=m))
        for m in (False, True)
        for t in range(4)
    },
    **{f"scale-{s:g}x": (EDGE, Perturbation(scale=s)) for s in (0.5, 0.7, 1.4, 2.0)},
    "jpeg-q60": (EDGE, Perturbation(quality=60)),
    "brightness-10%": (EDGE, Perturbation(brightness=-0.1)),
    "brightness+10%": (EDGE, Perturbation(brightness=0.1)),
    "contrast-10%": (EDGE, Perturbation(contrast=-0.1)),
    "contrast+10%": (EDGE, Perturbation(contrast=0.1)),
    "stain-H+5E-5D+5": (EDGE, Perturbation(stain=UP)),
    "stain-H-5E+5D-5": (EDGE, Perturbation(stain=DOWN)),
    "size-224": (224, Perturbation()),
    "size-1024": (1024, Perturbation()),
    # several at once, the worst a pathologist's copy is likely to meet
    "worst-mirror-rot90-0.7x-q60-dark-stain": (
        EDGE,
        Perturbation(turns=1, mirrored=True, scale=0.7, quality=60, brightness=-0.1, stain=UP),
    ),
    "worst-224-mirror-rot270-2x-q60-flat-stain": (
        224,
        Perturbation(turns=3, mirrored=True, scale=2.0, quality=60, contrast=-0.1, stain=DOWN),
    ),
    "worst-1024-rot180-0.5x-q60-bright-contrast-stain": (
        1024,
        Perturbation(turns=2, scale=0.5, quality=60, brightness=0.1, contrast=0.1, stain=(1.05, 1.05, 0.95)),
    ),
}
# at an unknown um/px, these run by default (on CMU-1); the rest of the grid is slow
UNKNOWN_FAST = {"mirror-rot90", "scale-0.5x", "scale-2x", "jpeg-q60", "stain-H+5E-5D+5", "size-224"}


# on the other two slides, a cross-section of the families (each family runs in full on CMU-1):
# the whole grid on all three slides is ~140 searches, too long for the suite on 2 cores
OTHER_SLIDES = {"mirror-rot90", "rot180", "scale-0.5x", "scale-2x", "jpeg-q60", "contrast-10%", "stain-H-5E+5D-5"}
OTHER_SLIDES.add("worst-mirror-rot90-0.7x-q60-dark-stain")


def cases():
    for key in SOURCES:
        for mode in ("known-mpp", "unknown-mpp"):
            for name, (edge, _) in FAMILIES.items():
                if edge > MAX_EDGE.get(key, edge) or (key != "cmu" and name not in OTHER_SLIDES):
                    continue
                fast = key == "cmu" and (mode == "known-mpp" or name in UNKNOWN_FAST)
                yield pytest.param(key, name, mode, id=f"{key}-{name}-{mode}", marks=() if fast else pytest.mark.slow)


@pytest.fixture(scope="module")
def archive(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("perturbations")
    region = Image.open(shared_data / "images" / "tiatoolbox" / "TCGA-HE-7130-01Z-00-DX1.png").convert("RGB")
    he7130 = write_pyramidal_tiff(tmp / "src" / SOURCES["he7130"][0], np.asarray(region), mpp=0.5)
    files = [shared_data / "slides" / "real" / SOURCES[k][0] for k in ("cmu", "tcga")] + [he7130]
    settings = make_indexed_archive(tmp / "archive", files, default_mpp=0.5)
    engine = SearchEngine(settings)
    with engine.catalog.session() as s:
        slides = {Path(sl.path).name: (sl.id, sl.path, sl.mpp) for sl in s.scalars(sa.select(Slide))}
    yield engine, slides
    engine.catalog.dispose()


@functools.lru_cache(maxsize=None)
def _crop(path: str, centre: tuple[int, int], edge: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The square of `edge` level-0 px around `centre`, and its box (x, y, w, h); shared by the
    cases of a slide and size."""
    slide = open_slide(path)
    try:
        x, y = centre[0] - edge // 2, centre[1] - edge // 2
        return slide.read_region((x, y), 0, (edge, edge)).convert("RGB"), (x, y, edge, edge)
    finally:
        slide.close()


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    iw = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@pytest.mark.parametrize(("key", "family", "mode"), list(cases()))
def test_a_perturbed_copy_finds_its_source_first_and_its_box(archive, key, family, mode):
    engine, slides = archive
    name, centre = SOURCES[key]
    slide_id, path, slide_mpp = slides[name]
    edge, perturbation = FAMILIES[family]
    crop, box = _crop(path, centre, edge)
    image = perturbation.apply(crop)
    mpp = slide_mpp / perturbation.scale if mode == "known-mpp" else None

    result = engine.search_region(image, mpp=mpp, top_k=3)

    first = result.results[0]
    got = [(h.slide["id"], h.regions[0].match if h.regions else None) for h in result.results]
    assert first.slide["id"] == slide_id, f"{name} not at rank 1: {got}, pixel check {result.query['pixel_check']}"
    found = first.regions[0]
    assert found.match == "pixels", f"{name} at rank 1 on features only: {got}"
    assert iou((found.x, found.y, found.w, found.h), box) >= MIN_IOU, (found, box)
    verified = [any(r.match == "pixels" for r in h.regions) for h in result.results]
    assert verified == sorted(verified, reverse=True)  # every copy above every feature-only match
    if mode == "unknown-mpp":  # measured on the copy's pixels, to within the fine step's 1.5 %
        assert result.query["scale"]["evidence"] == "pixels"
        assert result.query["mpp"] == pytest.approx(slide_mpp / perturbation.scale, rel=0.03)
