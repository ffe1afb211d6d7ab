"""Finding the slides of an archive and their content fingerprints.

Candidates are files with a whole-slide extension, found recursively; anything else
(CSV, PNG thumbnails, the .dat files of a MIRAX folder) is left alone. The files of one
DICOM-WSI series (one file per pyramid level) are one slide: only the first file of a
series is a candidate. Fingerprints are cached by (path, size, mtime) in the index dir, so
re-scanning an archive of tens of thousands of slides reads only new or changed files.

`match_archive_metadata` reads the slides' metadata from any number of files (GDC sample
sheets and clinical TSVs recognised by their headers, histoseek metadata CSVs) and from TCGA
barcodes in the file names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import openslide

from engine.files import atomic_write_text
from engine.slides import fingerprint

LOG = logging.getLogger(__name__)

# Extensions of the formats OpenSlide reads (and of the ones people expect it to read, so
# that an unsupported file gets a failed row that says so instead of being ignored).
SLIDE_EXTENSIONS = frozenset(
    ".svs .tif .tiff .ndpi .vms .vmu .scn .mrxs .svslide .bif .dcm .qptiff .czi .isyntax".split()
)
FINGERPRINT_CACHE = "fingerprints.json"


@dataclasses.dataclass(frozen=True)
class SlideFile:
    """A candidate slide: its path (absolute), its path relative to the archive, and its
    content fingerprint ("unreadable:..." when the file cannot even be read)."""

    path: Path
    relpath: str
    fingerprint: str
    size_bytes: int
    read_error: str | None = None


def find_slide_files(archive_dir: str | Path) -> list[Path]:
    """Candidate slide files under archive_dir, recursively, in sorted relative-path order,
    one file per DICOM series."""
    root = Path(archive_dir)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in SLIDE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return _one_file_per_dicom_series(found)


def _dicom_series(path: Path) -> str | None:
    try:
        slide = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError):
        return None
    try:
        return slide.properties.get("dicom.SeriesInstanceUID")
    finally:
        slide.close()


def _one_file_per_dicom_series(paths: list[Path]) -> list[Path]:
    seen: set[str] = set()
    kept = []
    for path in paths:
        if path.suffix.lower() == ".dcm":
            series = _dicom_series(path)
            if series is not None:
                if series in seen:
                    LOG.debug("%s: another file of a DICOM series already listed", path)
                    continue
                seen.add(series)
        kept.append(path)
    return kept


class FingerprintCache:
    """path -> (size, mtime_ns, fingerprint), kept as JSON in the index dir."""

    def __init__(self, file: Path):
        self.file = Path(file)
        try:
            self.entries: dict[str, list] = json.loads(self.file.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.new: dict[str, list] = {}  # entries computed in this process

    def get(self, path: Path) -> tuple[str, int]:
        stat = path.stat()
        key = str(path)
        entry = self.entries.get(key)
        if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            return entry[2], stat.st_size
        value = fingerprint(path)
        self.entries[key] = self.new[key] = [stat.st_size, stat.st_mtime_ns, value]
        return value, stat.st_size

    def update(self, entries: dict[str, list]) -> None:
        self.entries.update(entries)
        self.new.update(entries)

    def save(self) -> None:
        if not self.new:
            return
        atomic_write_text(self.file, json.dumps(self.entries))
        self.new = {}


def describe_files(root: Path, paths: Iterable[Path], cache: FingerprintCache) -> list[SlideFile]:
    """Fingerprint each path (through the cache). A file that cannot be read gets a
    path-based identity and its error, so it can still get a failed row."""
    out = []
    for path in paths:
        rel = path.relative_to(root).as_posix()
        try:
            fp, size = cache.get(path)
            out.append(SlideFile(path.absolute(), rel, fp, size))
        except OSError as exc:
            fake = "unreadable:" + hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:52]
            out.append(
                SlideFile(
                    path.absolute(), rel, fake, 0, read_error=f"{path.name}: cannot be read ({exc.strerror or exc})"
                )
            )
    return out


# ---- slide metadata: TCGA barcodes, GDC sample sheets and clinical TSVs, plain CSVs -------

TCGA_BARCODE = re.compile(
    r"(?P<patient>TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})(?:-(?P<sample>\d{2})(?P<vial>[A-Z])?(?:-(?P<portion>\d{2})[A-Z0-9]?(?:-(?P<slide>(?P<kind>DX|TS|BS|MS)[A-Z0-9]*))?)?)?",
    re.IGNORECASE,
)
TCGA_SAMPLE_TYPES = {
    "01": "Primary Solid Tumor",
    "02": "Recurrent Solid Tumor",
    "03": "Primary Blood Derived Cancer - Peripheral Blood",
    "04": "Recurrent Blood Derived Cancer - Bone Marrow",
    "05": "Additional - New Primary",
    "06": "Metastatic",
    "07": "Additional Metastatic",
    "08": "Human Tumor Original Cells",
    "09": "Primary Blood Derived Cancer - Bone Marrow",
    "10": "Blood Derived Normal",
    "11": "Solid Tissue Normal",
    "12": "Buccal Cell Normal",
    "13": "EBV Immortalized Normal",
    "14": "Bone Marrow Normal",
    "20": "Control Analyte",
    "40": "Recurrent Blood Derived Cancer - Peripheral Blood",
    "50": "Cell Lines",
    "60": "Primary Xenograft Tissue",
    "61": "Cell Line Derived Xenograft Tissue",
}  # the GDC "Sample Type Codes" table
SLIDE_KINDS = {"DX": "diagnostic", "TS": "frozen", "BS": "frozen", "MS": "frozen"}
GDC_SAMPLE_SHEET = {"File Name": None, "Case ID": "patient", "Project ID": "collection"}  # header -> catalog column
GDC_CLINICAL = {
    "case_submitter_id": "patient",
    "project_id": "collection",
    "primary_diagnosis": "diagnosis",
    "tissue_or_organ_of_origin": "site",
}
GDC_EMPTY = {"", "'--", "--", "not reported", "Not Reported"}


def parse_tcga_barcode(name: str) -> dict | None:
    """Fields a TCGA barcode in a file name gives: patient (TCGA-XX-XXXX), and when present
    the sample type (code -> GDC name) and the slide kind (DX: diagnostic; TS/BS/MS: frozen).
    None when the name holds no barcode."""
    m = TCGA_BARCODE.search(Path(name).name)
    if not m:
        return None
    extra = {"tcga_barcode": m.group(0).upper()}
    if m["sample"]:
        extra["sample_type_code"] = m["sample"]
        extra["sample_type"] = TCGA_SAMPLE_TYPES.get(m["sample"], f"unknown ({m['sample']})")
    if m["kind"]:
        extra["slide_type"] = SLIDE_KINDS[m["kind"].upper()]
        extra["slide_section"] = m["slide"].upper()
    return {"patient": m["patient"].upper(), "extra": extra}


def _read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            sample = fh.read(65536)
            fh.seek(0)
            try:
                dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
            except csv.Error:
                dialect = csv.excel_tab if sample.count("\t") > sample.count(",") else csv.excel
            reader = csv.DictReader(fh, dialect=dialect)
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
            return [f.strip() for f in reader.fieldnames or []], rows
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read metadata file {path}: {exc}") from None


def _gdc_fields(row: dict[str, str], mapping: dict[str, str | None]) -> dict:
    out: dict = {"extra": {}}
    for key, value in row.items():
        if not key or value in GDC_EMPTY:
            continue
        if key in mapping:
            if mapping[key]:
                # a sample sheet row of several cases lists them comma-separated: the first
                out[mapping[key]] = value.split(",")[0].strip() if key == "Case ID" else value
        else:
            out["extra"][key] = value
    return out


def _fill(into: dict, fields: dict) -> int:
    """Fill the empty fields of `into` from `fields`; returns how many values disagreed (the
    value already there is kept)."""
    conflicts = 0
    for key, value in fields.items():
        if key == "extra":
            for k, v in value.items():
                into.setdefault("extra", {}).setdefault(k, v)
        elif value:
            if into.get(key) and into[key] != value:
                conflicts += 1
            elif not into.get(key):
                into[key] = value
    return conflicts


@dataclasses.dataclass
class ArchiveMetadata:
    """Per-slide metadata (keyed by relative path) and the notes of what did not match; the
    shape of indexer.metadata.MetadataMatch plus notes."""

    by_relpath: dict[str, dict]
    unknown_rows: list[str]
    ambiguous_rows: list[str]
    slides_without_row: list[str]
    notes: list[str] = dataclasses.field(default_factory=list)

    def report_lines(self) -> list[str]:
        from indexer.metadata import MetadataMatch

        return (
            MetadataMatch(
                self.by_relpath, self.unknown_rows, self.ambiguous_rows, self.slides_without_row
            ).report_lines()
            + self.notes
        )


def _slide_keyed(
    path: Path,
    fields: list[str],
    rows: list[dict[str, str]],
    relpaths: Sequence[str],
    out: ArchiveMetadata,
    rowed: set[str],
) -> int:
    """A GDC sample sheet, else a histoseek metadata CSV: rows -> slides; returns conflicts."""
    from indexer.metadata import match_metadata

    if not {"File Name", "Case ID"} <= set(fields):
        match = match_metadata(path, relpaths)
        out.unknown_rows += match.unknown_rows
        out.ambiguous_rows += match.ambiguous_rows
        conflicts = 0
        for rel, values in match.by_relpath.items():
            rowed.add(rel)
            conflicts += _fill(out.by_relpath.setdefault(rel, {"extra": {}}), values)
        return conflicts
    names = Counter(Path(r).name for r in relpaths)
    by_name = {Path(r).name: r for r in relpaths}
    rel_set = set(relpaths)
    conflicts = 0
    for row in rows:
        name = row.get("File Name", "")
        if not name:
            continue
        nested = f"{row.get('File ID', '')}/{name}"  # the gdc-client layout: <File ID>/<File Name>
        rel = nested if nested in rel_set else by_name.get(name) if names.get(name) == 1 else None
        if rel is None:
            (out.ambiguous_rows if names.get(name, 0) > 1 else out.unknown_rows).append(name)
            continue
        rowed.add(rel)
        conflicts += _fill(out.by_relpath.setdefault(rel, {"extra": {}}), _gdc_fields(row, GDC_SAMPLE_SHEET))
    return conflicts


def match_archive_metadata(
    metadata: str | Path | Sequence[str | Path] | None, relpaths: Sequence[str]
) -> ArchiveMetadata:
    """Metadata of the archive's slides (relative paths) from any number of files, recognised
    by their headers: a GDC sample sheet (File ID, File Name, ..., Case ID, Sample ID, Sample
    Type: by file name), a GDC clinical TSV (case_submitter_id, project_id, primary_diagnosis,
    tissue_or_organ_of_origin, ...: by patient, "'--" is empty) or a histoseek metadata CSV
    (indexer.metadata: by slide). Files keyed by slide merge first (the first file given wins a
    disagreement, which is noted), then a TCGA barcode in the file name fills the patient,
    sample type and slide kind, then clinical files fill by patient. Unmatched rows are notes."""
    paths = [] if metadata is None else [metadata] if isinstance(metadata, (str, Path)) else list(metadata)
    out = ArchiveMetadata({}, [], [], [])
    rowed: set[str] = set()
    clinical: list[tuple[Path, list[dict[str, str]]]] = []
    conflicts = 0
    for path in map(Path, paths):
        fields, rows = _read_table(path)
        if "case_submitter_id" in fields:
            clinical.append((path, rows))
        else:
            conflicts += _slide_keyed(path, fields, rows, relpaths, out, rowed)
    for rel in relpaths:
        found = parse_tcga_barcode(rel)
        if found:
            conflicts += _fill(out.by_relpath.setdefault(rel, {"extra": {}}), found)
    patients: dict[str, list[str]] = {}
    for rel, fields in out.by_relpath.items():
        if fields.get("patient"):
            patients.setdefault(fields["patient"], []).append(rel)
    for path, rows in clinical:
        unmatched = []
        for row in rows:
            case = row.get("case_submitter_id", "")
            if case in GDC_EMPTY:
                continue
            if case not in patients:
                unmatched.append(case)
                continue
            for rel in patients[case]:
                rowed.add(rel)
                conflicts += _fill(out.by_relpath[rel], _gdc_fields(row, GDC_CLINICAL))
        if unmatched:
            cases = sorted(set(unmatched))
            out.notes.append(
                f"{len(cases)} cases of {path.name} match no slide's patient: {', '.join(cases[:5])}"
                + (f", ... ({len(cases) - 5} more)" if len(cases) > 5 else "")
            )
    if conflicts:
        out.notes.append(
            f"{conflicts} metadata values disagree between files; the first file given (or the file name's TCGA barcode, after slide-keyed files) was kept"
        )
    if paths:
        out.slides_without_row = [r for r in relpaths if r not in rowed]
    return out
