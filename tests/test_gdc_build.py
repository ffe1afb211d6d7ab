"""`indexer build` over an archive as the GDC delivers it: slides named by TCGA barcodes with
the sample sheet and clinical TSV beside them; `indexer status --json` shows what they gave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from indexer.cli import main as indexer_main
from tests.indexed_archive import archive_settings

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "real"
DX = "TCGA-A1-A0SB-01Z-00-DX1.B34C267B-CAAA-4AB6-AD5C-276C26F997A1.svs"
OTHER = "TCGA-BH-A0B3-01Z-00-DX1.1234ABCD-0000-0000-0000-000000000000.svs"
ALONE = "TCGA-CR-7395-01A-01-TS1.0D7D1E5B-2B6F-4E1B-8E2F-0123456789AB.svs"


def gdc_archive(tmp_path: Path) -> Path:
    """Three real slides under GDC names, one folder per file id as the GDC client writes them."""
    archive = tmp_path / "archive"
    sources = {
        DX: "CMU-1-Small-Region.svs",
        OTHER: "CMU-1-Small-Region.generic-pyramid.tiff",
        ALONE: "tcga-cr-7395-01a-01-ts1.svs",
    }
    for i, (name, source) in enumerate(sources.items()):
        (archive / f"file-{i}").mkdir(parents=True)
        (archive / f"file-{i}" / name).symlink_to(REAL / source)
    return archive


def write_tsv(path: Path, head: list[str], rows: list[list[str]]) -> Path:
    path.write_text("\n".join("\t".join(r) for r in [head, *rows]) + "\n")
    return path


@pytest.mark.slow
def test_gdc_sample_sheet_and_clinical_fill_the_catalog_and_barcodes_alone_give_the_patient(tmp_path):
    if not REAL.is_dir():
        pytest.skip("needs ../shared/data/slides/real")
    archive = gdc_archive(tmp_path)
    sheet = write_tsv(
        tmp_path / "gdc_sample_sheet.tsv",
        ["File ID", "File Name", "Data Category", "Data Type", "Project ID", "Case ID", "Sample ID", "Sample Type"],
        [
            [
                "file-0",
                DX,
                "Biospecimen",
                "Slide Image",
                "TCGA-BRCA",
                "TCGA-A1-A0SB",
                "TCGA-A1-A0SB-01Z",
                "Primary Tumor",
            ],
            [
                "file-1",
                OTHER,
                "Biospecimen",
                "Slide Image",
                "TCGA-BRCA",
                "TCGA-BH-A0B3",
                "TCGA-BH-A0B3-01Z",
                "Primary Tumor",
            ],
        ],
    )
    clinical = write_tsv(
        tmp_path / "clinical.tsv",
        ["case_id", "case_submitter_id", "project_id", "primary_diagnosis", "tissue_or_organ_of_origin"],
        [
            ["u1", "TCGA-A1-A0SB", "TCGA-BRCA", "Infiltrating duct carcinoma, NOS", "Breast, NOS"],
            ["u2", "TCGA-BH-A0B3", "TCGA-BRCA", "Lobular carcinoma, NOS", "'--"],
        ],
    )
    settings = archive_settings(tmp_path, "random:resnet18")
    common = ["--catalog", settings.catalog_url, "--index-dir", str(settings.index_dir), "--encoder", "random:resnet18"]
    common += ["--device", "cpu", "--data-dir", str(settings.data_dir)]
    build = ["build", str(archive), "--metadata", str(sheet), "--metadata", str(clinical), "--workers", "0"]
    result = CliRunner().invoke(indexer_main, [*build, "--no-progress", *common], catch_exceptions=False)
    assert result.exit_code in (0, 1), result.output  # 1: a slide failed, reported below
    status = CliRunner().invoke(indexer_main, ["status", "--json", *common], catch_exceptions=False)
    rows = {Path(r["path"]).name: r for r in json.loads(status.output)["slides"]}
    assert set(rows) == {DX, OTHER, ALONE}
    dx, other, alone = rows[DX], rows[OTHER], rows[ALONE]
    assert (dx["patient"], dx["collection"], dx["diagnosis"], dx["site"]) == (
        "TCGA-A1-A0SB",
        "TCGA-BRCA",
        "Infiltrating duct carcinoma, NOS",
        "Breast, NOS",
    )
    assert (other["patient"], other["diagnosis"], other["site"]) == ("TCGA-BH-A0B3", "Lobular carcinoma, NOS", None)
    # in neither file: the barcode alone gives the patient and says it is a frozen section
    assert alone["patient"] == "TCGA-CR-7395" and alone["diagnosis"] is None
    assert alone["extra"].get("slide_type") == "frozen"
