"""The demo's example regions (webapp.examples): what a pathologist would drop into the search
-- a photographed, turned piece of an archived slide, and fields whose magnification nobody
wrote down."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from engine.slides import flatten_rgba, open_slide, slide_mpp
from webapp.examples import Example, write_index


def _crop(path: Path, x: int, y: int, size: int) -> Image.Image:
    slide = open_slide(path)
    try:
        return flatten_rgba(slide.read_region((x, y), 0, (size, size)))
    finally:
        slide.close()


def write_examples(archive: Path, folder: Path, shared: Path | None, estimate_mpp: bool) -> list[Example]:
    """Write the example images and examples.json into `folder` (kept when already there).
    `estimate_mpp`: leave the resolution of fields with no known scale unset, for the engine
    to estimate (else they carry the scale they were cut at)."""
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    cmu = archive / "CMU-1-Small-Region.svs"
    if cmu.is_file():
        target = folder / "cmu1-photo.jpg"
        if not target.exists():
            image = _crop(cmu, 900, 1300, 640)
            # turned a quarter and mirrored, as a phone photo of the screen may come
            image.transpose(Image.Transpose.ROTATE_90).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
                target, quality=70
            )
        slide = open_slide(cmu)
        try:
            mpp, _ = slide_mpp(slide)
        finally:
            slide.close()
        examples.append(
            Example(
                "cmu1-photo",
                target.name,
                "A piece of CMU-1, turned and mirrored (JPEG)",
                "the source slide and its two copies come first, with the exact box",
                round(mpp, 3),
            )
        )
    tcga = archive / "TCGA-AD-6964-01Z-00-DX1.tiff"
    if tcga.is_file():
        target = folder / "colorectal-field.jpg"
        if not target.exists():
            image = _crop(tcga, 0, 0, 480)
            image.save(target, quality=85)
        examples.append(
            Example(
                "colorectal-field",
                target.name,
                "Colorectal adenocarcinoma field, magnification not given",
                "cut from a TCGA case of the archive; the scale is left to the engine",
                None if estimate_mpp else 0.5,
            )
        )
    template = shared / "images" / "histoqc" / "templates" / "template4.png" if shared else None
    if template is not None and template.is_file():
        target = folder / "pale-stroma.png"
        if not target.exists():
            Image.open(template).convert("RGB").save(target)
        examples.append(
            Example(
                "pale-stroma",
                target.name,
                "Tumour nests in pale stroma (not in the archive)",
                "a HistoQC template field: the nearest tissues, and their vote",
                None if estimate_mpp else 0.5,
            )
        )
    write_index(folder, examples)
    return examples
