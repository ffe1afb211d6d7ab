"""Pixel registration of a region whose scale is only estimated (engine.search.scale).

engine.search.localise pins a region on a slide when its um/px is known to within a per cent
or two: its fine step matches high-passed texture (nuclei, fibres), which a scale error of
2 % already blurs past the acceptance threshold (a 700 px crop of CMU-1 at 0.499 um/px:
fine NCC 0.95 at 0.499, no match at 0.51). A region of unknown magnification comes with an
estimate good to about half a ladder step (~19 %), so here:

1. *Find*: the coarse step of localise (whole-slide view, all 8 rotations/mirrorings) at the
   estimate, then (when nothing verifies) at the estimate x / COARSE_SPREAD, then at the other
   candidate scales (random or
   weak features may estimate far off): at 4 um/px the outline of tissue survives a scale
   error of ~16 % (measured: a CMU-1 crop at 0.499 um/px found from guesses 0.42 - 0.58).
2. *Verify over scales*: for the best coarse peaks, one window of the slide around the
   region's place (large enough for any scale tried) is read and high-passed once, and the
   region's most textured patch is matched in it at scales from the peak's / FINE_SPREAD to
   x FINE_SPREAD in steps of FINE_STEP (1.5 %, within the fine step's tolerance): cheap
   NCCs in one small window. The best fine NCC from localise.ACCEPT_NCC up is a copy, and its
   scale is the region's um/px, measured on pixels.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from engine.search.localise import (
    ACCEPT_NCC,
    CANDIDATES,
    COARSE_MIN,
    FINE_MAX_PX,
    FINE_MPP,
    HIGHPASS_UM,
    Placement,
    RegionQuery,
    cached_view,
    choose_view_mpp,
    read_view,
    read_window,
)
from engine.search.ncc import Matcher, coarse_peaks, high_pass, transform, turn_margins

COARSE_SPREAD = 1.19  # coarse views are matched at the estimate and at x / this
FINE_SPREAD = 1.12  # the fine step tries scales from a coarse peak's / this to x this ...
FINE_STEP = 1.015  # ... in steps of this factor


def _scales(centre: float) -> list[float]:
    n = int(math.ceil(math.log(FINE_SPREAD) / math.log(FINE_STEP)))
    return sorted((centre * FINE_STEP**k for k in range(-n, n + 1)), key=lambda m: abs(math.log(m / centre)))


def register_any_scale(
    slide,
    slide_mpp: float,
    image: Image.Image,
    mpp_guess: float,
    *,
    views=None,
    path=None,
    also: tuple[float, ...] = (),
    queries: dict | None = None,
) -> tuple[Placement, float] | None:
    """Where `image`, at about `mpp_guess` um/px (or any of `also`: the other candidate
    scales), lies in `slide` (level-0 at `slide_mpp`): (placement, the region's um/px found),
    or None (no copy found). `queries`: RegionQuery by mpp, kept across slides."""
    queries = {} if queries is None else queries

    def query(m: float) -> RegionQuery:
        if m not in queries:
            queries[m] = RegionQuery(image, m)
        return queries[m]

    guess = query(mpp_guess)
    w0, h0 = slide.dimensions
    view_mpp = choose_view_mpp((w0 * slide_mpp, h0 * slide_mpp), guess.core_um)
    if view_mpp is None:
        return None
    if views is not None and path is not None:
        view = cached_view(views, path, view_mpp, lambda: read_view(slide, slide_mpp, view_mpp))
    else:
        view = read_view(slide, slide_mpp, view_mpp)
    peaks = []
    # stages, cheapest and likeliest first: the estimate, its neighbours, the other candidates;
    # a stage whose peaks verify ends the search
    tried: list[float] = []
    best = None
    matcher = Matcher(view.grey)  # the view's FFT, shared by every scale tried
    for stage in ([mpp_guess], [mpp_guess / COARSE_SPREAD, mpp_guess * COARSE_SPREAD], list(also)):
        stage = [m for m in stage if all(abs(math.log(m / c)) > 0.1 for c in tried)]
        tried += stage
        peaks = []
        for m in stage:
            template = query(m).coarse(view_mpp)
            if min(template.shape) < 8 or float(template.std()) < 2.0:
                continue
            peaks += [
                (*p, m) for p in coarse_peaks(view.grey, template, matcher)[:CANDIDATES] if p[0] >= COARSE_MIN - 0.1
            ]
        for _, row, col, turns, mirrored, m in sorted(peaks, key=lambda p: -p[0])[:CANDIDATES]:
            found = _verify(slide, slide_mpp, query, view, view_mpp, row, col, turns, mirrored, m)
            if found is not None and (best is None or found[0] > best[0]):
                best = (*found, turns, mirrored)
            if best is not None and best[0] >= ACCEPT_NCC:
                break
        if best is not None and best[0] >= ACCEPT_NCC:
            break
    if best is None or best[0] < ACCEPT_NCC:
        return None
    ncc, x, y, m, margins, turns, mirrored = best
    to0 = m / slide_mpp
    t, _, _, left = turn_margins(margins, turns, mirrored)
    w, h = (image.width, image.height) if turns % 2 == 0 else (image.height, image.width)
    return Placement(round(x - left * to0), round(y - t * to0), round(w * to0), round(h * to0), ncc, turns, mirrored), m


def _verify(slide, slide_mpp, query, view, view_mpp, row, col, turns, mirrored, m_peak):
    """The best fine match over scales around `m_peak` near the coarse peak: (NCC, level-0 x, y
    of the core's corner, scale, region margins), or None. `query(m)`: the RegionQuery at m,
    kept across peaks and slides (its fine patches are most of the cost)."""
    scales = _scales(m_peak)
    queries = [query(m) for m in scales]
    core_um = max(max(q.core_um) for q in queries)
    fine_mpp = max(FINE_MPP, core_um / FINE_MAX_PX, slide_mpp, max(scales))
    r = max(1, round(HIGHPASS_UM / fine_mpp))
    sx, sy = view.scale
    # the window: the core's place at the largest scale tried, plus the coarse uncertainty
    big = queries[int(np.argmax(scales))]
    cw, ch = (big.core.width, big.core.height) if turns % 2 == 0 else (big.core.height, big.core.width)
    margin0 = (3 * view_mpp + r * fine_mpp) / slide_mpp
    box0 = (
        round(col * sx - margin0 - 0.1 * cw * max(scales) / slide_mpp),
        round(row * sy - margin0 - 0.1 * ch * max(scales) / slide_mpp),
        round(cw * max(scales) / slide_mpp * 1.2 + 2 * margin0),
        round(ch * max(scales) / slide_mpp * 1.2 + 2 * margin0),
    )
    window, (wx, wy) = read_window(slide, slide_mpp, box0, fine_mpp)
    if min(window.shape) <= 2 * r:
        return None
    matcher = Matcher(high_pass(window, r))
    to0 = fine_mpp / slide_mpp
    best = None
    for m, q in zip(scales, queries):
        patch, patch_margins, _ = q.fine(fine_mpp)
        if not patch.size:
            continue
        t = transform(patch, turns, mirrored)
        if t.shape[0] > window.shape[0] or t.shape[1] > window.shape[1]:
            continue
        ncc = matcher.ncc(t)
        i, j = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
        if best is None or ncc[i, j] > best[0]:
            top, _, _, left = turn_margins(patch_margins, turns, mirrored)
            best = (float(ncc[i, j]), wx + (j - left) * to0, wy + (i - top) * to0, m, q.margins)
        if best[0] >= ACCEPT_NCC + 0.3:
            break  # unmistakable: no other scale can matter
    return best


def any_scale_matcher(image: Image.Image, mpp_guess: float, views, found_mpp: dict, also: tuple[float, ...] = ()):
    """A `match(slide info, slide mpp)` for engine.search.copies.verify at an estimated scale:
    the Region the image is a copy of (match "pixels") or None; the region's um/px measured on
    each matched slide goes into `found_mpp` (slide id -> um/px). A slide that cannot be
    opened or read gives None. Once a copy has measured the scale, the other slides are
    verified at that scale only (engine.search.placement.pixel_match, as at a known mpp)."""
    import openslide

    from engine.errors import SlideError
    from engine.search.placement import pixel_match
    from engine.search.results import Region
    from engine.slides import open_slide

    queries: dict[float, RegionQuery] = {}

    def match(info: dict, slide_mpp: float):
        if found_mpp:  # the scale is measured on a copy already: the other slides at that scale
            known = next(iter(found_mpp.values()))
            found = pixel_match(info, queries.setdefault(-known, RegionQuery(image, known)), slide_mpp, views)
            if found is not None:
                found_mpp[info["id"]] = known
            return found
        try:
            slide = open_slide(info["path"])
        except SlideError:
            return None
        try:
            got = register_any_scale(
                slide, slide_mpp, image, mpp_guess, views=views, path=info["path"], also=also, queries=queries
            )
        except (openslide.OpenSlideError, OSError, SlideError):
            return None
        finally:
            slide.close()
        if got is None:
            return None
        placed, found_mpp[info["id"]] = got
        return Region(placed.x, placed.y, placed.w, placed.h, placed.ncc, match="pixels")

    return match
