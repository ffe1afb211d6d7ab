"""Where exactly a region query lies in a slide, from its pixels.

Encoder features find the right slides and a coarse place, but they cannot pin a region to
a spot inside fairly uniform tissue: neighbouring tiles have nearly the same features, and
a region cut off the tile grid matches no tile exactly. Yet a region query is very often a
copy of an archived slide (a screenshot, an export, a crop), so image registration can
settle it, in two steps:

1. **Find** (coarse): the region is matched against a low-resolution greyscale view of the
   whole slide (4 um/px; cached by the caller, since the same slides are queried again) in
   each of the 8 rotations/mirrorings of the square (the D8 group). At that scale a region
   is mostly its outline of tissue and glass, which finds the true place reliably but also
   resembles the outline of unrelated tissue: a coarse peak alone does not prove anything.
2. **Verify** (fine): for the best coarse peaks, the region's most textured patch (at most
   192 um a side) is matched again at about 1 um/px in a small window of the slide read
   around its coarse place, after removing each image's local mean (a high-pass that keeps
   nuclei and fibres and drops the outline). Only a copy of that slide has the same
   texture: the fine peak is the evidence (its NCC is the score), and its place gives the
   box to a micron or two.

Matching is normalised cross-correlation (engine.search.ncc), which ignores changes of
brightness and contrast (stain, scanner, JPEG) between the copy and the slide.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from engine.cache import LRUCache
from engine.search.ncc import (
    Matcher,
    box_sums,
    coarse_peaks,
    grey,
    high_pass,
    subpixel,
    transform,
    turn_margins,
    uniform_margins,
)
from engine.slides import flatten_rgba

LOG = logging.getLogger(__name__)

VIEW_MPP = 4.0  # um per pixel of the whole-slide view (step 1)
MAX_VIEW_PX = 1_000_000  # coarser views (x 2 steps) for slides bigger than this at VIEW_MPP ...
MIN_TEMPLATE_PX = 24  # ... but never so coarse that the region's shorter side gets below this
HARD_MAX_VIEW_PX = 4_000_000  # a small region in a huge slide would need a bigger view: not refined
MIN_TEMPLATE_STD = 2.0  # grey levels; a flatter region (blank glass) has nothing to match
CANDIDATES = 3  # coarse peaks (best first, one per transform) verified at the fine scale ...
COARSE_MIN = 0.6  # ... when their coarse NCC reaches this (copies: 0.73 - 1.0; other slides: median 0.39, 90 % < 0.66)
FINE_MPP = 1.0  # um per pixel of the verification (step 2) ...
FINE_MAX_PX = 1024  # ... coarser for large regions, so the region's longer side stays under this
FINE_PATCH_PX = 192  # the region's most textured patch of at most this many pixels a side is matched
HIGHPASS_UM = 4.0  # the fine step compares each pixel with its mean over +- this (about a nucleus)
# Accept a placement when its fine NCC reaches this. Measured (numpy 2.4) on regions of 224,
# 448 and 896 level-0 px (112 - 448 um) with >= 50 % tissue, cut at random from
# CMU-1-Small-Region.svs, the TCGA frozen section and a synthetic blob slide, turned or
# mirrored, rescaled by 0.9 or 1.1 and saved as JPEG q70 (as tests/test_search.py does),
# plus regions of tiatoolbox's TCGA-HE-7130, colon, glands and nuclei, histoprep's slide
# thumbnail and HistoQC's templates:
#   true pairs, real slides (the region against its slide or the CMU twin file), n = 36:
#     fine NCC 0.80 - 0.99, median 0.90, every box within 2 level-0 px of the truth;
#     unaltered copies 0.84 - 0.94 (resampled to 1 um/px at another phase than the slide);
#   true pairs, synthetic blobs (per-pixel noise, which JPEG and resampling mostly erase),
#     n = 10: 0.42 - 0.81 where the coarse step found the place; in 1 case it did not, and
#     the best wrong place along the blob's smooth edge scored 0.31;
#   false pairs (each region against every slide it does not come from, all candidates
#     verified), n = 198: 0.010 - 0.161, median 0.036.
# 0.5 sits 0.3 below the weakest real copy, 0.34 above the best false pair and 0.19 above
# the wrong place on the synthetic edge.
ACCEPT_NCC = 0.5
_READ_BAND_PX = 16_000_000  # pyramid-level pixels read at once when building a view


@dataclasses.dataclass(frozen=True)
class SlideView:
    """A slide's greyscale view at `mpp` um/px; `scale` = level-0 pixels per view pixel."""

    grey: np.ndarray  # H x W float32, 255 - mean(RGB)
    mpp: float
    scale: tuple[float, float]  # (x, y)


@dataclasses.dataclass(frozen=True)
class Placement:
    """The region's box in level-0 pixels of the slide, its fine NCC peak, and the transform
    that maps the region onto the slide: first mirrored left-right (`mirrored`), then
    rotated `turns` x 90 degrees counter-clockwise (numpy.rot90)."""

    x: int
    y: int
    w: int
    h: int
    ncc: float
    turns: int
    mirrored: bool


def view_cache(maxsize: int = 16) -> LRUCache[SlideView]:
    """A cache for slide views (register_region's `views`): the same slides come back query
    after query. Views are ~1 Mpx at most (4 MB), often far less."""
    return LRUCache(maxsize)


def cached_view(
    views: LRUCache[SlideView], path: str | Path, view_mpp: float, build: Callable[[], SlideView]
) -> SlideView:
    """The view of the file at `path` from `views`, else `build()` (and cached). Keyed by
    (path, file size, mtime, view mpp), so a slide queried again is not read again and a
    replaced file is."""
    st = os.stat(path)
    return views.get_or_build((str(path), st.st_size, st.st_mtime_ns, view_mpp), build)


# -- views -----------------------------------------------------------------------------------
# Not engine.slides.read_box_array: that reads one square tile in colour and resizes it
# bilinearly, as the indexer does; a view is the whole slide (read in bands, it can be huge
# at level 0) and a window is any rectangle, both area-averaged (BOX) into grey, which the
# NCC thresholds above were measured with.


def choose_view_mpp(slide_um: tuple[float, float], region_um: tuple[float, float]) -> float | None:
    """The view's um/px for a slide (width, height in um) and a region (its size in um):
    VIEW_MPP, doubled while the view would exceed MAX_VIEW_PX, halved while the region's
    shorter side would be under MIN_TEMPLATE_PX; None when that view would exceed
    HARD_MAX_VIEW_PX. Powers of two of VIEW_MPP, and the same for all but the smallest
    regions, so one cached view per slide serves query after query."""
    if min(region_um) <= 0:
        return None
    mpp = VIEW_MPP

    def pixels(m: float) -> float:
        return (slide_um[0] / m) * (slide_um[1] / m)

    while pixels(mpp) > MAX_VIEW_PX and min(region_um) / (2 * mpp) >= MIN_TEMPLATE_PX:
        mpp *= 2
    while min(region_um) / mpp < MIN_TEMPLATE_PX:
        mpp /= 2
    return mpp if pixels(mpp) <= HARD_MAX_VIEW_PX else None


def read_view(slide: openslide.OpenSlide, slide_mpp: float, view_mpp: float) -> SlideView:
    """The whole slide at `view_mpp` um/px as grey, from the pyramid level just finer than
    that, read in bands (a slide without a pyramid can be huge at level 0) and area-averaged."""
    w0, h0 = slide.dimensions
    out_w, out_h = max(1, round(w0 * slide_mpp / view_mpp)), max(1, round(h0 * slide_mpp / view_mpp))
    level = slide.get_best_level_for_downsample(max(view_mpp / slide_mpp, 1.0))
    lw, lh = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    rows_per_band = max(1, int(_READ_BAND_PX / lw * out_h / lh))  # output rows per band
    view = np.empty((out_h, out_w), np.float32)
    for r0 in range(0, out_h, rows_per_band):
        r1 = min(out_h, r0 + rows_per_band)
        y0, y1 = round(r0 * lh / out_h), round(r1 * lh / out_h)  # level rows of this band
        band = flatten_rgba(slide.read_region((0, round(y0 * ds)), level, (lw, max(1, y1 - y0))))
        view[r0:r1] = grey(band.resize((out_w, r1 - r0), Image.Resampling.BOX))
    return SlideView(view, view_mpp, (w0 / out_w, h0 / out_h))


def read_window(
    slide: openslide.OpenSlide, slide_mpp: float, box0: tuple[int, int, int, int], mpp: float
) -> tuple[np.ndarray, tuple[int, int]]:
    """Grey pixels of the level-0 box (x, y, w, h), clipped to the slide, at `mpp` um/px;
    returns them and the clipped box's level-0 top-left corner."""
    w0, h0 = slide.dimensions
    x, y = max(0, box0[0]), max(0, box0[1])
    x1, y1 = min(w0, box0[0] + box0[2]), min(h0, box0[1] + box0[3])
    level = slide.get_best_level_for_downsample(max(mpp / slide_mpp, 1.0))
    ds = slide.level_downsamples[level]
    size_level = (max(1, round((x1 - x) / ds)), max(1, round((y1 - y) / ds)))
    out = (max(1, round((x1 - x) * slide_mpp / mpp)), max(1, round((y1 - y) * slide_mpp / mpp)))
    img = flatten_rgba(slide.read_region((x, y), level, size_level))
    return grey(img.resize(out, Image.Resampling.BOX)), (x, y)


# -- the placement ----------------------------------------------------------------------------


class RegionQuery:
    """A region image at `mpp` um/px prepared for matching against several slides (a search
    tries up to three): its flat margins found once, and its grey templates kept for each
    resolution asked for."""

    def __init__(self, image: Image.Image, mpp: float):
        self.image = image.convert("RGB")
        self.mpp = float(mpp)
        # flat margins (beyond the slide's edge) are cut off for matching and added back to
        # the box; found at about the fine step's resolution, which is plenty and fast
        f = max(1, int(FINE_MPP / self.mpp))
        self.margins = tuple(m * f for m in uniform_margins(grey(self.image.reduce(f) if f > 1 else self.image)))
        top, right, bottom, left = self.margins
        self.core = self.image.crop((left, top, self.image.width - right, self.image.height - bottom))
        self.core_um = (self.core.width * self.mpp, self.core.height * self.mpp)
        self._coarse: dict[float, np.ndarray] = {}
        self._fine: dict[float, tuple[np.ndarray, tuple[int, int, int, int], int]] = {}

    def _grey_at(self, mpp: float) -> np.ndarray:
        size = (max(1, round(self.core_um[0] / mpp)), max(1, round(self.core_um[1] / mpp)))
        return grey(self.core.resize(size, Image.Resampling.BOX))

    def coarse(self, mpp: float) -> np.ndarray:
        """The core as grey at the coarse view's `mpp`."""
        if mpp not in self._coarse:
            self._coarse[mpp] = self._grey_at(mpp)
        return self._coarse[mpp]

    def fine(self, mpp: float) -> tuple[np.ndarray, tuple[int, int, int, int], int]:
        """The core's most textured patch at `mpp`, high-passed (reading a window around a
        small patch is what keeps the fine step fast), its (top, right, bottom, left)
        margins in the core in pixels at `mpp`, and the high-pass radius r."""
        if mpp not in self._fine:
            r = max(1, round(HIGHPASS_UM / mpp))
            g = self._grey_at(mpp)
            # cut r off each side: the local means there saw only part of their box
            hp = high_pass(g, r)[r:-r, r:-r] if min(g.shape) > 2 * r else np.zeros((0, 0), np.float32)
            ph, pw = min(FINE_PATCH_PX, hp.shape[0]), min(FINE_PATCH_PX, hp.shape[1])
            if min(ph, pw) < MIN_TEMPLATE_PX:
                self._fine[mpp] = (np.zeros((0, 0), np.float32), (0, 0, 0, 0), r)
            else:
                pi, pj = np.unravel_index(
                    int(np.argmax(box_sums(hp * hp, ph, pw))), (hp.shape[0] - ph + 1, hp.shape[1] - pw + 1)
                )
                margins = (r + pi, r + hp.shape[1] - pj - pw, r + hp.shape[0] - pi - ph, r + pj)
                self._fine[mpp] = (hp[pi : pi + ph, pj : pj + pw], margins, r)
        return self._fine[mpp]


def register_region(
    slide: openslide.OpenSlide,
    slide_mpp: float,
    region: Image.Image | RegionQuery,
    region_mpp: float | None = None,
    *,
    views: LRUCache[SlideView] | None = None,
    path: str | Path | None = None,
    min_ncc: float = ACCEPT_NCC,
) -> Placement | None:
    """Where `region` (an RGB image at `region_mpp` um/px, or a RegionQuery made once for
    several slides) lies in `slide` (level-0 at `slide_mpp` um/px), as a level-0 box over
    the 8 rotations/mirrorings, scored by the fine NCC; None when no placement reaches
    `min_ncc` (the region does not come from this slide), when the region is blank, or
    when the slide is too big for a view at the region's scale. `views` + `path`: reuse
    the slide's view from an earlier query."""
    if isinstance(region, RegionQuery):
        query = region
    elif region_mpp is None:
        raise ValueError("register_region needs the region's um/px (region_mpp) with an image")
    else:
        query = RegionQuery(region, region_mpp)
    found = _place(slide, slide_mpp, query, views, path, min_ncc)
    if found is None or found[0] < min_ncc:
        return None
    ncc, x, y, turns, mirrored = found
    to0 = query.mpp / slide_mpp  # level-0 pixels per region pixel
    t, _, _, l = turn_margins(query.margins, turns, mirrored)
    # the box is the whole region's, margins included, sides swapped by an odd turn
    w, h = (query.image.width, query.image.height) if turns % 2 == 0 else (query.image.height, query.image.width)
    return Placement(round(x - l * to0), round(y - t * to0), round(w * to0), round(h * to0), ncc, turns, mirrored)


def _place(
    slide: openslide.OpenSlide,
    slide_mpp: float,
    query: RegionQuery,
    views: LRUCache[SlideView] | None,
    path: str | Path | None,
    min_ncc: float,
) -> tuple[float, float, float, int, bool] | None:
    """The best verified placement of the query's core: (fine NCC, level-0 x, y of its
    top-left corner, turns, mirrored), or None when there is nothing to verify. Stops at
    the first candidate that reaches `min_ncc`."""
    w0, h0 = slide.dimensions
    view_mpp = choose_view_mpp((w0 * slide_mpp, h0 * slide_mpp), query.core_um)
    if view_mpp is None:
        LOG.debug(
            "not refined: a %.0f x %.0f um region in a %d x %d px slide needs too big a view", *query.core_um, w0, h0
        )
        return None
    if views is not None and path is not None:
        view = cached_view(views, path, view_mpp, lambda: read_view(slide, slide_mpp, view_mpp))
    else:
        view = read_view(slide, slide_mpp, view_mpp)
    template = query.coarse(view_mpp)
    if float(template.std()) < MIN_TEMPLATE_STD:
        return None
    peaks = [p for p in coarse_peaks(view.grey, template)[:CANDIDATES] if p[0] >= COARSE_MIN]

    # step 2: each candidate's transform of the query's most textured patch is matched at
    # the fine scale in a window around its coarse place (a margin of 2 view pixels, the
    # coarse step's uncertainty)
    fine_mpp = max(FINE_MPP, max(query.core_um) / FINE_MAX_PX, slide_mpp, query.mpp)
    patch, patch_margins, r = query.fine(fine_mpp)
    if not patch.size:
        return None
    to0 = fine_mpp / slide_mpp  # level-0 pixels per fine pixel
    margin0 = (2 * view_mpp + r * fine_mpp) / slide_mpp
    sx, sy = view.scale
    best = None
    for coarse_ncc, row, col, turns, mirrored in peaks:
        t = transform(patch, turns, mirrored)
        top, _, _, left = turn_margins(patch_margins, turns, mirrored)
        # where the patch should be (level-0): the core's coarse corner + the patch's offset in it
        px, py = col * sx + left * to0, row * sy + top * to0
        box0 = (
            round(px - margin0),
            round(py - margin0),
            round(t.shape[1] * to0 + 2 * margin0),
            round(t.shape[0] * to0 + 2 * margin0),
        )
        window, (wx, wy) = read_window(slide, slide_mpp, box0, fine_mpp)
        if window.shape[0] < t.shape[0] or window.shape[1] < t.shape[1]:
            continue  # the window was clipped by the slide's edge to less than the patch
        m = Matcher(high_pass(window, r)).ncc(t)
        i, j = np.unravel_index(int(np.argmax(m)), m.shape)
        LOG.debug(
            "candidate %d turns mirrored %s: coarse NCC %.3f, fine NCC %.3f", turns, mirrored, coarse_ncc, m[i, j]
        )
        if best is None or m[i, j] > best[0]:
            fi, fj = subpixel(m, i, j)
            best = (float(m[i, j]), wx + (fj - left) * to0, wy + (fi - top) * to0, turns, mirrored)
        if best[0] >= min_ncc:
            break  # verified: a copy's texture matches in one transform only, so no other can beat it
    return best
