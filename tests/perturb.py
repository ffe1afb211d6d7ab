"""Perturbations a copied region goes through before it is searched (issue 13, point 3): the 8
rotations/mirrorings of the square, a rescale, JPEG, brightness, contrast and an H&E stain
shift in HED space. Plain numpy and PIL; the stain shift uses the Ruifrok-Johnston colour
deconvolution matrix, written out here rather than taken from scikit-image (not a
dependency of the project)."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

# Ruifrok & Johnston (2001), "Quantification of histochemical staining by color deconvolution":
# the optical density (OD) of R, G, B per unit of haematoxylin, eosin and DAB (rows), the
# matrix scikit-image's rgb2hed uses. OD = HED concentrations @ RGB_FROM_HED.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 RGB -> H x W x 3 stain concentrations (haematoxylin, eosin, DAB): the
    optical density -log(I / 255) (I floored at 1, black is not infinitely dense) unmixed."""
    od = -np.log(np.maximum(rgb.astype(np.float64), 1.0) / 255.0)
    return od @ HED_FROM_RGB


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """The inverse of rgb_to_hed, rounded and clipped to uint8."""
    od = hed @ RGB_FROM_HED
    return np.clip(np.rint(255.0 * np.exp(-od)), 0, 255).astype(np.uint8)


def stain_shift(image: Image.Image, factors: tuple[float, float, float]) -> Image.Image:
    """Each stain's concentration times its factor (1.05: 5 % more haematoxylin, ...), as a
    different staining batch or scanner calibration would give."""
    hed = rgb_to_hed(np.asarray(image.convert("RGB")))
    return Image.fromarray(hed_to_rgb(hed * np.asarray(factors, np.float64)))


def brightness(image: Image.Image, change: float) -> Image.Image:
    """Every channel times (1 + change), clipped: -0.1 is 10 % darker."""
    a = np.asarray(image.convert("RGB"), np.float64) * (1.0 + change)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def contrast(image: Image.Image, change: float) -> Image.Image:
    """Every pixel's distance from the image's mean grey level times (1 + change), clipped."""
    a = np.asarray(image.convert("RGB"), np.float64)
    mean = a.mean()
    return Image.fromarray(np.clip(np.rint(mean + (a - mean) * (1.0 + change)), 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """The image saved as JPEG at `quality` and read back."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def d8(image: Image.Image, turns: int, mirrored: bool) -> Image.Image:
    """Mirrored left-right (when `mirrored`), then turned `turns` x 90 degrees counter-clockwise."""
    if mirrored:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for _ in range(turns % 4):
        image = image.transpose(Image.Transpose.ROTATE_90)
    return image


def rescale(image: Image.Image, factor: float) -> Image.Image:
    """The image resized by `factor` (0.5: half as many pixels a side, i.e. twice the um/px),
    area-averaged when shrinking, bicubic when enlarging, as a viewer's export would."""
    if factor == 1.0:
        return image
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return image.resize(size, Image.Resampling.BOX if factor < 1 else Image.Resampling.BICUBIC)


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """What happens to a crop, applied in the order a copy goes through it: stain and
    scanner (stain shift, brightness, contrast), then the viewer (turn/mirror, rescale),
    then the export (JPEG). `scale` multiplies the crop's pixels a side, so the perturbed
    image is at slide mpp / scale um/px."""

    turns: int = 0
    mirrored: bool = False
    scale: float = 1.0
    quality: int | None = None
    brightness: float = 0.0
    contrast: float = 0.0
    stain: tuple[float, float, float] | None = None

    def apply(self, crop: Image.Image) -> Image.Image:
        image = crop.convert("RGB")
        if self.stain is not None:
            image = stain_shift(image, self.stain)
        if self.brightness:
            image = brightness(image, self.brightness)
        if self.contrast:
            image = contrast(image, self.contrast)
        image = rescale(d8(image, self.turns, self.mirrored), self.scale)
        return jpeg(image, self.quality) if self.quality is not None else image
