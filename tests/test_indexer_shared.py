"""`indexer build` over every file of ../shared/data/slides (real slides, OpenSlide's fixtures,
broken and unsupported files): the readable slides are indexed, each bad one gets its own
message, the exit status says so, and status/verify agree with the files on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.shards import shard_arrays
from indexer.cli import main as indexer_cli
from tests.indexed_archive import link_into

# What each file must end as: (status, words its message must contain).
EXPECTED = {
    "CMU-1-Small-Region.svs": ("indexed", None),
    "CMU-1-Small-Region.generic-pyramid.tiff": ("indexed", None),
    "tcga-cr-7395-01a-01-ts1.svs": ("failed", "default resolution"),
    "small.svs": ("failed", "smaller than one"),
    "boxes_0.dcm": ("failed", "smaller than one"),
    "unreadable.svs": ("failed", "cannot read the slide's pixels"),
    "boxes.tiff": ("failed", "default resolution"),
    "small_HE_levels.tiff": ("failed", "default resolution"),
    "broken.svs": ("failed", "not a whole-slide format"),
    "unopenable.tiff": ("failed", "Unsupported TIFF compression"),
    "tcga-frozen-section.dicom-wsi.dcm": ("failed", "OpenSlide cannot open it"),
    "fluorescence-uint16.tif": ("failed", "not a brightfield RGB slide"),
    "multiplex.qptiff": ("failed", "not a brightfield RGB slide"),
}


def test_build_over_all_shared_slides(tmp_path, shared_data):
    files = sorted(p for p in (shared_data / "slides").rglob("*") if p.is_file())
    archive = tmp_path / "archive"
    link_into(archive, files)
    common = [
        "--catalog",
        f"sqlite:///{tmp_path / 'cat.sqlite'}",
        "--index-dir",
        str(tmp_path / "index"),
        "--encoder",
        "random:resnet18",
        "--device",
        "cpu",
    ]
    runner = CliRunner()
    result = runner.invoke(indexer_cli, ["build", str(archive), "--workers", "1", "--json", *common])
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)

    status = runner.invoke(indexer_cli, ["status", "--json", *common])
    assert status.exit_code == 0
    doc = json.loads(status.stdout)
    got = {Path(r["path"]).name: r for r in doc["slides"]}
    # boxes_1.dcm is the second file of the boxes_0.dcm DICOM series; boxes.png is no slide.
    assert set(got) == set(EXPECTED)
    for name, (state, words) in EXPECTED.items():
        assert got[name]["status"] == state, (name, got[name])
        if words:
            assert words in got[name]["error"], (name, got[name]["error"])
    messages = [r["error"] for r in doc["slides"] if r["error"]]
    assert summary["failed"] == len(messages) == 11
    assert doc["counts"]["tiles"] == summary["tiles"] > 0
    on_disk = sum(len(shard_arrays(p)[0]) for p in (tmp_path / "index").rglob("*.faiss"))
    assert on_disk == summary["tiles"]
    verify = runner.invoke(indexer_cli, ["verify", "--json", *common])
    assert verify.exit_code == 0 and json.loads(verify.stdout)["vectors"] == on_disk

    # The frozen section has no mpp; given one, it is indexed on the rerun, and nothing else
    # is embedded again.
    rerun = runner.invoke(
        indexer_cli, ["build", str(archive), "--default-mpp", "0.5", "--min-tissue", "0.5", "--json", *common]
    )
    again = json.loads(rerun.stdout)
    assert again["skipped"] == 2 and again["indexed"] >= 1
    assert "tcga-cr-7395-01a-01-ts1.svs" not in {Path(f["path"]).name for f in again["failures"]}
    assert runner.invoke(indexer_cli, ["verify", *common]).exit_code == 0


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs"])
def test_make_indexed_archive_on_a_real_slide(tmp_path, shared_data, name):
    from engine.catalog.db import Catalog
    from engine.catalog.models import Slide
    from tests.indexed_archive import make_indexed_archive, settings_summary

    settings = make_indexed_archive(
        tmp_path,
        [shared_data / "slides" / "real" / name],
        metadata_rows=[{"slide": name, "label": "colon", "patient": "CMU-1"}],
    )
    assert settings_summary(settings).indexed == 1
    cat = Catalog(settings.catalog_url)
    with cat.session() as s:
        slide = s.query(Slide).one()
        assert (slide.label, slide.patient, slide.status) == ("colon", "CMU-1", "indexed")
    cat.dispose()
