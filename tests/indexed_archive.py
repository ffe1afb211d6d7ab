"""A real, small indexed archive for tests of search, benchmark and web app: the given slide
files linked into an archive folder, an optional metadata CSV, and `indexer build` run
through its library function (SQLite catalog + shard files under tmp_path)."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from typing import Sequence

from engine.config import Settings
from indexer.build import BuildSummary, build_archive


def write_metadata_csv(path: Path, rows: Sequence[dict]) -> Path:
    """Rows of dicts (a `slide` key naming the file, plus any columns) as a CSV."""
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def link_into(archive: Path, slides: Sequence[Path]) -> list[Path]:
    """Symlink (copy where links are not allowed) each slide into `archive` by file name."""
    archive.mkdir(parents=True, exist_ok=True)
    out = []
    for slide in slides:
        target = archive / Path(slide).name
        if not target.exists():
            try:
                os.symlink(Path(slide).resolve(), target)
            except OSError:
                shutil.copy2(slide, target)
        out.append(target)
    return out


def archive_settings(tmp_path: Path, encoder: str, **extra) -> Settings:
    """Settings of a test archive under tmp_path: SQLite catalog, index and data dir there, CPU."""
    return Settings.load(
        env={},
        data_dir=str(tmp_path / "data"),
        catalog_url=f"sqlite:///{tmp_path / 'catalog.sqlite'}",
        index_dir=str(tmp_path / "index"),
        encoder=encoder,
        device="cpu",
        **extra,
    )


def make_indexed_archive(
    tmp_path: Path,
    slides: Sequence[Path],
    encoder: str = "random:resnet18",
    metadata_rows: Sequence[dict] | None = None,
    *,
    min_tissue: float = 0.5,
    default_mpp: float | None = None,
    collection: str | None = None,
) -> Settings:
    """Index `slides` into tmp_path/catalog.sqlite and tmp_path/index; returns the Settings
    that search and the web app use to open it. Raises AssertionError when no slide got
    indexed (a test fixture that indexes nothing would only hide the real problem);
    the build's summary is at `settings_summary(settings)`."""
    tmp_path = Path(tmp_path)
    archive = tmp_path / "archive"
    link_into(archive, slides)
    metadata = write_metadata_csv(tmp_path / "metadata.csv", metadata_rows) if metadata_rows else None
    settings = archive_settings(tmp_path, encoder)
    summary = build_archive(
        settings,
        archive,
        metadata=metadata,
        collection=collection,
        min_tissue=min_tissue,
        default_mpp=default_mpp,
        workers=0,
        batch_size=32,
        progress=False,
    )
    _SUMMARIES[str(settings.catalog_url)] = summary
    assert summary.indexed + summary.skipped > 0, f"no slide was indexed: {summary.failures}"
    return settings


_SUMMARIES: dict[str, BuildSummary] = {}


def settings_summary(settings: Settings) -> BuildSummary:
    """The BuildSummary of the make_indexed_archive call that returned `settings`."""
    return _SUMMARIES[str(settings.catalog_url)]
