"""Finding the slides of an archive and their content fingerprints.

Candidates are files with a whole-slide extension, found recursively; anything else
(CSV, PNG thumbnails, the .dat files of a MIRAX folder) is left alone. The files of one
DICOM-WSI series (one file per pyramid level) are one slide: only the first file of a
series is a candidate. Fingerprints are cached by (path, size, mtime) in the index dir, so
re-scanning an archive of tens of thousands of slides reads only new or changed files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable

import openslide

from engine.slides import fingerprint
from engine.files import atomic_write_text

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
            out.append(SlideFile(path.absolute(), rel, fake, 0, read_error=f"{path.name}: cannot be read ({exc.strerror or exc})"))
    return out
