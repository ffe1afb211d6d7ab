"""MIL runs (`engine mil train`, catalog benchmark runs of kind "mil") for the pages and the
viewer's attention layer: which runs fit a slide (same encoder features), and the per-tile
attention of a slide under a run, computed from the stored features (engine.mil.predict)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from engine.catalog import Catalog, models
from engine.errors import NotFound

MIL_KIND = "mil"


def is_mil(run: dict | models.BenchmarkRun) -> bool:
    kind = run["dataset_kind"] if isinstance(run, dict) else run.dataset_kind
    return kind == MIL_KIND


def runs_for_slide(catalog: Catalog, slide_id: int) -> list[dict]:
    """MIL runs trained on the features of an encoder this slide is indexed with (newest
    first): only those can say anything about it (a slide may be indexed with several)."""
    with catalog.session() as s:
        shas = (
            sa.select(models.EncoderRecord.checkpoint_sha256)
            .join(models.SlideEncoding, models.SlideEncoding.encoder_id == models.EncoderRecord.id)
            .join(models.Slide, models.Slide.id == models.SlideEncoding.slide_id)
            .where(
                models.Slide.id == slide_id,
                models.Slide.status == models.INDEXED,  # not a missing file's kept vectors
                models.SlideEncoding.status == models.INDEXED,
            )
        )
        rows = s.scalars(
            sa.select(models.BenchmarkRun)
            .where(models.BenchmarkRun.dataset_kind == MIL_KIND, models.BenchmarkRun.encoder_sha256.in_(shas))
            .order_by(models.BenchmarkRun.id.desc())
        ).all()
    return [
        {
            "id": r.id,
            "label_column": (r.parameters or {}).get("label_column", "?"),
            "auc": (r.metrics or {}).get("overall", {}).get("auc"),
        }
        for r in rows
    ]


def attention(catalog: Catalog, index_dir: str | Path, run_id: int, slide_id: int) -> dict:
    """Probabilities and per-tile attention (level-0 boxes) of a slide under MIL run `run_id`."""
    from engine.mil.predict import cached_run, predict_indexed

    with catalog.session() as s:
        run = s.get(models.BenchmarkRun, run_id)
    if run is None or not is_mil(run):
        raise NotFound(f"no MIL run with id {run_id} (`engine mil train` records them)")
    run_dir = Path(run.dataset_path)
    if not run_dir.is_dir():
        raise NotFound(
            f"the folder of MIL run {run_id} ({run_dir.name}) is gone; train it again with `engine mil train`"
        )
    answer = predict_indexed(catalog, index_dir, cached_run(run_dir), slide_id)
    answer["run"] = run_id  # never the server's path
    answer["label_column"] = (run.parameters or {}).get("label_column")
    return answer


def summary_rows(runs: list[dict]) -> list[dict]:
    """One row per MIL run for the Benchmarks page."""
    out = []
    for run in runs:
        m, p = run["metrics"], run["parameters"]
        o = m.get("overall", {})
        out.append(
            {
                **run,
                "label_column": p.get("label_column"),
                "classes": p.get("classes") or m.get("classes") or [],
                "folds": p.get("folds"),
                "slides": (p.get("counts") or {}).get("slides"),
                "auc": o.get("auc"),
                "auc_sd": o.get("auc_sd"),
                "bacc": o.get("balanced_accuracy"),
                "bacc_sd": o.get("balanced_accuracy_sd"),
            }
        )
    return out
