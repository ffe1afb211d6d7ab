"""The metadata CSV of an archive: one row per slide file.

A column names the slide file (`slide`, `path`, `file`, `filename`, `slide_path`, `image`
or `slide_id`, the first one present), as a path relative to the archive or a bare file
name. The columns patient, site, diagnosis, label and collection fill the catalog's
columns of the same name; any other column is kept in the slide's `extra` JSON. Rows that
match no slide, and slides without a row, are reported, never fatal.
"""

from __future__ import annotations

import csv
import dataclasses
from collections import Counter
from pathlib import Path
from typing import Sequence

SLIDE_COLUMNS = ("slide", "path", "file", "filename", "slide_path", "image", "slide_id")
CATALOG_COLUMNS = ("patient", "site", "diagnosis", "label", "collection")


@dataclasses.dataclass
class MetadataMatch:
    """Per-slide metadata (keyed by relative path) and what did not match."""

    by_relpath: dict[str, dict]
    unknown_rows: list[str]  # CSV slide names that match no slide file
    ambiguous_rows: list[str]  # bare file names shared by several slide files
    slides_without_row: list[str]

    def report_lines(self) -> list[str]:
        lines = []
        if self.unknown_rows:
            lines.append(f"{len(self.unknown_rows)} metadata rows match no slide file: {_first(self.unknown_rows)}")
        if self.ambiguous_rows:
            lines.append(
                f"{len(self.ambiguous_rows)} metadata rows name a file that exists in several folders (give the relative path): {_first(self.ambiguous_rows)}"
            )
        if self.slides_without_row:
            lines.append(
                f"{len(self.slides_without_row)} slides have no metadata row: {_first(self.slides_without_row)}"
            )
        return lines


def _first(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def read_metadata_rows(csv_path: str | Path) -> tuple[str, list[dict[str, str]]]:
    """(name of the slide column, rows) of a metadata CSV; ValueError saying what is wrong
    when the file is not a CSV with a slide column."""
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            sample = fh.read(65536)
            fh.seek(0)
            try:
                dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
            except csv.Error:
                dialect = csv.excel
            reader = csv.DictReader(fh, dialect=dialect)
            rows = list(reader)
            fields = [f.strip() for f in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read metadata CSV {csv_path}: {exc}") from None
    lowered = {f.lower(): f for f in fields}
    column = next((lowered[c] for c in SLIDE_COLUMNS if c in lowered), None)
    if column is None:
        raise ValueError(
            f"metadata CSV {csv_path} has no column naming the slide file; name one of them {', '.join(SLIDE_COLUMNS)} (columns found: {', '.join(fields) or 'none'})"
        )
    clean = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in rows]
    return column, clean


def _row_to_fields(row: dict[str, str], slide_column: str) -> dict:
    out: dict = {"extra": {}}
    for key, value in row.items():
        if key == slide_column or not key:
            continue
        lk = key.lower()
        if lk in CATALOG_COLUMNS:
            out[lk] = value or None
        elif value != "":
            out["extra"][key] = value
    return out


def match_metadata(csv_path: str | Path, relpaths: Sequence[str]) -> MetadataMatch:
    """Match the CSV's rows to slide files (relative paths of the archive)."""
    column, rows = read_metadata_rows(csv_path)
    rel_set = set(relpaths)
    names = Counter(Path(r).name for r in relpaths)
    by_name = {Path(r).name: r for r in relpaths}
    matched: dict[str, dict] = {}
    unknown, ambiguous = [], []
    for row in rows:
        key = row.get(column, "").replace("\\", "/")
        key = key[2:] if key.startswith("./") else key
        if not key:
            continue
        if key in rel_set:
            rel = key
        elif names.get(Path(key).name, 0) == 1 and "/" not in key:
            rel = by_name[Path(key).name]
        elif names.get(Path(key).name, 0) > 1 and "/" not in key:
            ambiguous.append(key)
            continue
        else:
            unknown.append(key)
            continue
        matched[rel] = _row_to_fields(row, column)
    without = [r for r in relpaths if r not in matched]
    return MetadataMatch(matched, unknown, ambiguous, without)
