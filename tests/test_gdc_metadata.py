"""Archive metadata as the GDC delivers it: sample sheet + clinical TSV recognised by their
headers, TCGA barcodes in file names, several files merged by slide then by patient."""

from __future__ import annotations

from indexer.discovery import match_archive_metadata, parse_tcga_barcode

DX = "TCGA-A1-A0SB-01Z-00-DX1.B34C267B-CAAA-4AB6-AD5C-276C26F997A1.svs"
TS = "TCGA-A1-A0SB-11A-01-TS1.0D7D1E5B-2B6F-4E1B-8E2F-0123456789AB.svs"
OTHER = "TCGA-BH-A0B3-01Z-00-DX1.1234ABCD-0000-0000-0000-000000000000.svs"
PLAIN = "local/case7.svs"
RELPATHS = [f"f1/{DX}", f"f2/{TS}", f"f3/{OTHER}", PLAIN]


def write_sample_sheet(path):
    head = ["File ID", "File Name", "Data Category", "Data Type", "Project ID", "Case ID", "Sample ID", "Sample Type"]
    rows = [
        ["f1", DX, "Biospecimen", "Slide Image", "TCGA-BRCA", "TCGA-A1-A0SB", "TCGA-A1-A0SB-01Z", "Primary Tumor"],
        [
            "f2",
            TS,
            "Biospecimen",
            "Slide Image",
            "TCGA-BRCA",
            "TCGA-A1-A0SB",
            "TCGA-A1-A0SB-11A",
            "Solid Tissue Normal",
        ],
        [
            "f9",
            "TCGA-ZZ-ZZZZ-01Z-00-DX1.svs",
            "Biospecimen",
            "Slide Image",
            "TCGA-BRCA",
            "TCGA-ZZ-ZZZZ",
            "x",
            "Primary Tumor",
        ],
    ]
    path.write_text("\n".join("\t".join(r) for r in [head, *rows]) + "\n")
    return path


def write_clinical(path):
    head = [
        "case_id",
        "case_submitter_id",
        "project_id",
        "age_at_index",
        "primary_diagnosis",
        "tissue_or_organ_of_origin",
        "treatment_type",
    ]
    rows = [
        [
            "u1",
            "TCGA-A1-A0SB",
            "TCGA-BRCA",
            "70",
            "Infiltrating duct carcinoma, NOS",
            "Breast, NOS",
            "Radiation Therapy, NOS",
        ],
        [
            "u1",
            "TCGA-A1-A0SB",
            "TCGA-BRCA",
            "70",
            "Infiltrating duct carcinoma, NOS",
            "Breast, NOS",
            "Pharmaceutical Therapy, NOS",
        ],
        ["u2", "TCGA-BH-A0B3", "TCGA-BRCA", "'--", "Lobular carcinoma, NOS", "'--", "'--"],
        ["u3", "TCGA-QQ-QQQQ", "TCGA-BRCA", "50", "Infiltrating duct carcinoma, NOS", "Breast, NOS", "'--"],
    ]
    path.write_text("\n".join("\t".join(r) for r in [head, *rows]) + "\n")
    return path


def test_barcode_gives_patient_sample_type_and_slide_kind():
    dx = parse_tcga_barcode(DX)
    assert dx["patient"] == "TCGA-A1-A0SB"
    assert dx["extra"]["sample_type"] == "Primary Solid Tumor" and dx["extra"]["slide_type"] == "diagnostic"
    ts = parse_tcga_barcode("some/dir/" + TS)
    assert ts["extra"]["sample_type"] == "Solid Tissue Normal" and ts["extra"]["slide_type"] == "frozen"
    assert parse_tcga_barcode("TCGA-02-0001.svs")["patient"] == "TCGA-02-0001"
    # the shared real TCGA slide, named in lower case
    real = parse_tcga_barcode("tcga-cr-7395-01a-01-ts1.svs")
    assert (
        real["patient"] == "TCGA-CR-7395"
        and real["extra"]["slide_type"] == "frozen"
        and real["extra"]["sample_type"] == "Primary Solid Tumor"
    )
    assert parse_tcga_barcode("slide_12.svs") is None


def test_barcodes_alone_give_the_patient():
    meta = match_archive_metadata(None, RELPATHS)
    assert meta.by_relpath[f"f1/{DX}"]["patient"] == "TCGA-A1-A0SB"
    assert meta.by_relpath[f"f3/{OTHER}"]["patient"] == "TCGA-BH-A0B3"
    assert PLAIN not in meta.by_relpath
    assert meta.report_lines() == []  # no metadata files: nothing to report


def test_sample_sheet_and_clinical_fill_patient_collection_diagnosis_site(tmp_path):
    sheet = write_sample_sheet(tmp_path / "gdc_sample_sheet.2024-01-01.tsv")
    clinical = write_clinical(tmp_path / "clinical.tsv")
    meta = match_archive_metadata([sheet, clinical], RELPATHS)
    dx = meta.by_relpath[f"f1/{DX}"]
    assert dx["patient"] == "TCGA-A1-A0SB" and dx["collection"] == "TCGA-BRCA"
    assert dx["diagnosis"] == "Infiltrating duct carcinoma, NOS" and dx["site"] == "Breast, NOS"
    assert dx["extra"]["Sample Type"] == "Primary Tumor" and dx["extra"]["File ID"] == "f1"
    assert dx["extra"]["age_at_index"] == "70" and dx["extra"]["treatment_type"] == "Radiation Therapy, NOS"
    assert "case_id" in dx["extra"] and dx["extra"]["slide_type"] == "diagnostic"
    ts = meta.by_relpath[f"f2/{TS}"]
    assert ts["diagnosis"] == dx["diagnosis"] and ts["extra"]["slide_type"] == "frozen"
    # not in the sample sheet: barcode gives the patient, the clinical TSV the rest; "'--" empty
    other = meta.by_relpath[f"f3/{OTHER}"]
    assert (
        other["patient"] == "TCGA-BH-A0B3"
        and other["diagnosis"] == "Lobular carcinoma, NOS"
        and other["collection"] == "TCGA-BRCA"
    )
    assert "site" not in other and "age_at_index" not in other["extra"]
    lines = "\n".join(meta.report_lines())
    assert "1 metadata rows match no slide file: TCGA-ZZ-ZZZZ-01Z-00-DX1.svs" in lines
    assert "1 cases of clinical.tsv match no slide's patient: TCGA-QQ-QQQQ" in lines
    assert f"1 slides have no metadata row: {PLAIN}" in lines


def test_order_of_files_does_not_matter_and_histoseek_csv_merges_by_slide(tmp_path):
    sheet = write_sample_sheet(tmp_path / "sheet.tsv")
    clinical = write_clinical(tmp_path / "clinical.tsv")
    plain = tmp_path / "extra.csv"
    plain.write_text(f"slide,label,patient\ncase7.svs,tumour,P7\n{DX},,\n")
    a = match_archive_metadata([clinical, sheet, plain], RELPATHS)
    b = match_archive_metadata([plain, sheet, clinical], RELPATHS)
    assert a.by_relpath == b.by_relpath
    assert a.by_relpath[PLAIN]["label"] == "tumour" and a.by_relpath[PLAIN]["patient"] == "P7"
    assert a.by_relpath[f"f1/{DX}"]["diagnosis"] == "Infiltrating duct carcinoma, NOS"
    assert not any("slides have no metadata row" in line for line in a.report_lines())


def test_disagreeing_files_keep_the_first_and_say_so(tmp_path):
    sheet = write_sample_sheet(tmp_path / "sheet.tsv")
    plain = tmp_path / "meta.csv"
    plain.write_text(f"slide,collection\n{DX},my-cohort\n")
    meta = match_archive_metadata([plain, sheet], RELPATHS)
    assert meta.by_relpath[f"f1/{DX}"]["collection"] == "my-cohort"
    assert any("1 metadata values disagree" in line for line in meta.report_lines())
