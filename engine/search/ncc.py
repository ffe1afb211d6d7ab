"""Normalised cross-correlation (NCC) of grey images, the measure engine.search.localise
places a region with: the correlation of the zero-mean template with the image at every
placement at once by FFT (numpy.fft), divided by the template's norm and each window's
standard deviation from summed-area tables. NCC ignores changes of brightness and contrast
(stain, scanner, JPEG) between a copy and the slide. Grey signal: 255 - mean(R, G, B), so
glass is ~0 and stained tissue is high. Also the region's flat margins and the 8
rotations/mirrorings of the square (the D8 group) that a template is tried in."""

from __future__ import annotations

import numpy as np
from PIL import Image

MARGIN_STD = 4.0  # grey levels; an edge row or column of a region flatter than this is a margin


# -- signals -------------------------------------------------------------------------------


def grey(img: Image.Image) -> np.ndarray:
    """255 - mean of R, G, B as float32: glass ~0, stain high (the mean taken by PIL, in C:
    numpy's float mean over a few megapixels is ten times slower)."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    return 255.0 - np.asarray(rgb.convert("L", (1 / 3, 1 / 3, 1 / 3, 0)), np.float32)


def _sat(a: np.ndarray) -> np.ndarray:
    """Summed-area table of `a` with a zero first row and column, in float64 (the variance
    below subtracts two large sums)."""
    sat = np.zeros((a.shape[0] + 1, a.shape[1] + 1), np.float64)
    sat[1:, 1:] = a.cumsum(0, dtype=np.float64).cumsum(1)
    return sat


def _window_sums(sat: np.ndarray, h: int, w: int) -> np.ndarray:
    """Sums over every h x w window (indexed by its top-left corner) from a summed-area table."""
    return sat[h:, w:] - sat[:-h, w:] - sat[h:, :-w] + sat[:-h, :-w]


def box_sums(a: np.ndarray, h: int, w: int) -> np.ndarray:
    return _window_sums(_sat(a), h, w)


def _box_mean(g: np.ndarray, r: int) -> np.ndarray:
    """Mean over the (2r+1) x (2r+1) box around each pixel (edges reflected)."""
    k = 2 * r + 1
    return box_sums(np.pad(g, r, mode="reflect"), k, k) / (k * k)


def high_pass(g: np.ndarray, r: int) -> np.ndarray:
    """g minus its mean over the (2r+1) x (2r+1) box around each pixel (edges reflected)."""
    return (g - _box_mean(g, r)).astype(np.float32)


def uniform_margins(g: np.ndarray, max_std: float = MARGIN_STD) -> tuple[int, int, int, int]:
    """Rows and columns at the edges of a grey image that are each one flat colour
    (standard deviation under `max_std`), as (top, right, bottom, left) counts: the band a
    screenshot or crop shows beyond the slide's edge (black, white or the viewer's
    background). It does not match the slide's glass, and cutting it off costs nothing,
    since flat pixels carry nothing to match. Repeated on what is left, so that bands of
    one colour meeting at a corner both go; at most 3/8 of each side is cut."""
    h, w = g.shape
    cap_h, cap_w = 3 * h // 8, 3 * w // 8

    def lead(flat: np.ndarray) -> int:
        return len(flat) if flat.all() else int(np.argmin(flat))

    t = r = b = l = 0
    while True:
        core = g[t : h - b, l : w - r]
        rows, cols = core.std(axis=1) < max_std, core.std(axis=0) < max_std
        cut = (
            min(cap_h, t + lead(rows)),
            min(cap_w, r + lead(cols[::-1])),
            min(cap_h, b + lead(rows[::-1])),
            min(cap_w, l + lead(cols)),
        )
        if cut == (t, r, b, l):
            return cut
        t, r, b, l = cut


def turn_margins(margins: tuple[int, int, int, int], turns: int, mirrored: bool) -> tuple[int, int, int, int]:
    """(top, right, bottom, left) margins of an image after `transform` (mirror left-right,
    then rot90 `turns` times counter-clockwise: each turn brings the right side to the top)."""
    t, r, b, l = margins
    if mirrored:
        r, l = l, r
    for _ in range(turns % 4):
        t, r, b, l = r, b, l, t
    return t, r, b, l


# -- NCC -------------------------------------------------------------------------------------


def _fast_len(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n: FFT sizes numpy transforms quickly."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


class Matcher:
    """NCC of templates against one image: the image's FFT and its windows' energies are
    computed once and shared by the 8 transforms of a template."""

    def __init__(self, image: np.ndarray):
        self.image = image
        self.fft_shape = (_fast_len(image.shape[0]), _fast_len(image.shape[1]))
        self.fft = np.fft.rfft2(image, self.fft_shape)
        self._sat, self._sat_sq = _sat(image), _sat(image.astype(np.float64) ** 2)
        self._energy: dict[tuple[int, int], np.ndarray] = {}

    def energy(self, h: int, w: int) -> np.ndarray:
        """Sum of squared deviations from the window mean, sum(x^2) - sum(x)^2 / n, of
        every h x w window."""
        if (h, w) not in self._energy:
            self._energy[(h, w)] = _window_sums(self._sat_sq, h, w) - _window_sums(self._sat, h, w) ** 2 / (h * w)
        return self._energy[(h, w)]

    def ncc(self, template: np.ndarray) -> np.ndarray:
        """NCC of `template` at every placement fully inside the image (indexed by top-left
        corner). The FFT is at least as big as the image, so valid placements never wrap
        around. Windows much flatter than the template (glass) get a floor on their energy,
        so rounding noise over blank glass cannot make a peak."""
        H, W = self.image.shape
        h, w = template.shape
        t = template - template.mean()
        corr = np.fft.irfft2(self.fft * np.conj(np.fft.rfft2(t, self.fft_shape)), self.fft_shape)[
            : H - h + 1, : W - w + 1
        ]
        t_energy = float((t * t).sum())
        window = np.maximum(self.energy(h, w), 0.0625 * t_energy)  # floor: a quarter of the template's std
        return corr / np.sqrt(t_energy * window)


def subpixel(m: np.ndarray, i: int, j: int) -> tuple[float, float]:
    """The peak at (i, j) refined by a parabola through its neighbours in each axis."""

    def offset(a: float, b: float, c: float) -> float:
        d = a - 2 * b + c
        return 0.0 if d >= 0 else float(np.clip(0.5 * (a - c) / d, -0.5, 0.5))

    di = offset(m[i - 1, j], m[i, j], m[i + 1, j]) if 0 < i < m.shape[0] - 1 else 0.0
    dj = offset(m[i, j - 1], m[i, j], m[i, j + 1]) if 0 < j < m.shape[1] - 1 else 0.0
    return i + di, j + dj


def transform(a: np.ndarray, turns: int, mirrored: bool) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(a[:, ::-1] if mirrored else a, turns))


def coarse_peaks(
    view: np.ndarray, template: np.ndarray, matcher: Matcher | None = None
) -> list[tuple[float, float, float, int, bool]]:
    """For each of the 8 transforms of `template` that fits in `view`, its best placement:
    (NCC, top-left row, column in view pixels, turns, mirrored), best first. `matcher`: the
    view's Matcher, when templates at several scales are matched against it."""
    matcher = matcher if matcher is not None else Matcher(view)
    peaks = []
    for mirrored in (False, True):
        for turns in range(4):
            t = transform(template, turns, mirrored)
            if t.shape[0] > view.shape[0] or t.shape[1] > view.shape[1]:
                continue
            m = matcher.ncc(t)
            i, j = np.unravel_index(int(np.argmax(m)), m.shape)
            peaks.append((float(m[i, j]), *subpixel(m, i, j), turns, mirrored))
    return sorted(peaks, key=lambda p: -p[0])
