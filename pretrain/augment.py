"""Augmentations for H&E tiles: two random views of one tile.

MoCo v2's recipe adapted to histology: random resized crop, horizontal and vertical flips
and 90-degree rotations (tissue has no up), colour jitter, a stain jitter in HED space
(Tellez et al. 2018: scale and shift the haematoxylin, eosin and DAB densities), and blur.
No grayscale: colour carries the stain.

Every random draw comes from the generator passed in, seeded per tile by the data stream,
so a view depends only on (seed, epoch, position): a resumed run sees the very same views
however many loader workers it uses.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torchvision.transforms.v2.functional as TF

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB) in optical density
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED[2] = torch.linalg.cross(_RGB_FROM_HED[0], _RGB_FROM_HED[1])
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_MIN_INTENSITY = 1e-6


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """crop_px:      output edge in pixels (default 224)
    crop_scale:      area fraction range of the random crop (default 0.2-1.0, MoCo v2)
    colour_p:        probability of colour jitter (default 0.8)
    brightness, contrast, saturation, hue: jitter strengths (default 0.4, 0.4, 0.4, 0.1)
    hed_p:           probability of the HED stain jitter (default 0.5)
    hed_sigma:       stain density scale/shift range (default 0.05)
    blur_p:          probability of Gaussian blur (default 0.5)
    blur_sigma:      blur sigma range in pixels at 224 px (default 0.1-2.0, scaled with crop_px)
    """

    crop_px: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)
    colour_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    hed_p: float = 0.5
    hed_sigma: float = 0.05
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)


def augment_config(crop_px: int = 224, min_crop_scale: float = 0.2, jitter: float = 1.0) -> AugmentConfig:
    """The default recipe at a crop size, with the crop scale floor and the colour/stain
    jitter strength scaled (jitter 0 turns colour and stain jitter off; lighter settings
    suit continued pretraining of an already trained encoder)."""
    if not 0 < min_crop_scale <= 1 or jitter < 0:
        raise ValueError("min_crop_scale must be in (0, 1] and jitter >= 0")
    base = AugmentConfig()
    return dataclasses.replace(
        base,
        crop_px=crop_px,
        crop_scale=(min_crop_scale, 1.0),
        colour_p=base.colour_p if jitter > 0 else 0.0,
        brightness=base.brightness * jitter,
        contrast=base.contrast * jitter,
        saturation=base.saturation * jitter,
        hue=min(0.5, base.hue * jitter),
        hed_p=base.hed_p if jitter > 0 else 0.0,
        hed_sigma=base.hed_sigma * jitter,
    )


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _chance(g: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=g)) < p


def random_crop_box(
    height: int, width: int, scale: tuple[float, float], g: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering `scale` of the area, aspect 3/4-4/3."""
    area = height * width
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * _uniform(g, *scale)
        ratio = math.exp(_uniform(g, *log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    side = min(height, width)  # fallback: central square
    return (height - side) // 2, (width - side) // 2, side, side


def hed_jitter(img: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Stain jitter of a uint8 3 x H x W RGB image: HED densities * alpha + beta (3 each)."""
    rgb = img.float().div(255).clamp_min(_MIN_INTENSITY)  # 3 x H x W
    log_adjust = math.log(_MIN_INTENSITY)
    od = torch.log(rgb).permute(1, 2, 0) / log_adjust  # H x W x 3, scaled optical density
    hed = (od @ _HED_FROM_RGB).clamp_min(0)  # H x W x 3
    hed = hed * alpha + beta
    out = torch.exp((hed @ _RGB_FROM_HED) * log_adjust).permute(2, 0, 1)  # 3 x H x W
    return out.clamp(0, 1).mul(255).round().to(torch.uint8)


def augment_view(img: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """One random view (uint8 3 x crop_px x crop_px) of a uint8 3 x H x W RGB tile."""
    _, height, width = img.shape
    top, left, h, w = random_crop_box(height, width, cfg.crop_scale, g)
    x = TF.resized_crop(img, top, left, h, w, [cfg.crop_px, cfg.crop_px], antialias=True)  # 3 x P x P
    if _chance(g, 0.5):
        x = TF.horizontal_flip(x)
    if _chance(g, 0.5):
        x = TF.vertical_flip(x)
    x = torch.rot90(x, int(torch.randint(0, 4, (), generator=g)), dims=(1, 2))
    if _chance(g, cfg.colour_p):
        x = TF.adjust_brightness(x, _uniform(g, 1 - cfg.brightness, 1 + cfg.brightness))
        x = TF.adjust_contrast(x, _uniform(g, 1 - cfg.contrast, 1 + cfg.contrast))
        x = TF.adjust_saturation(x, _uniform(g, 1 - cfg.saturation, 1 + cfg.saturation))
        x = TF.adjust_hue(x, _uniform(g, -cfg.hue, cfg.hue))
    if _chance(g, cfg.hed_p):
        alpha = 1 + (torch.rand(3, generator=g) * 2 - 1) * cfg.hed_sigma
        beta = (torch.rand(3, generator=g) * 2 - 1) * cfg.hed_sigma
        x = hed_jitter(x, alpha, beta)
    if _chance(g, cfg.blur_p):
        sigma = _uniform(g, *cfg.blur_sigma) * cfg.crop_px / 224
        kernel = max(3, 2 * math.ceil(3 * sigma) + 1)
        x = TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    return x.contiguous()


def two_views(img: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent random views of one uint8 3 x H x W tile."""
    return augment_view(img, cfg, g), augment_view(img, cfg, g)
