"""Example regions the search page offers to try with one click (the demo writes a few; any
deployment may put its own in EXAMPLES_DIR): images beside an `examples.json` that lists,
for each, its file, a title, a note, and its resolution in um/px (null: unknown, so the
engine estimates it)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import NotFound

INDEX_FILE = "examples.json"
NAME = re.compile(r"^[a-z0-9-]{1,64}$")


@dataclass(frozen=True)
class Example:
    name: str
    file: str
    title: str
    note: str
    mpp: float | None

    def form_values(self) -> dict:
        """What the search form would send for this region."""
        return {} if self.mpp is None else {"mpp": str(self.mpp)}


def list_examples(folder: str | Path | None) -> list[Example]:
    """The examples of `folder` (none when it is unset or holds no examples.json); entries
    whose name is not a plain slug or whose image is missing are left out."""
    if not folder or not (Path(folder) / INDEX_FILE).is_file():
        return []
    out = []
    for entry in json.loads((Path(folder) / INDEX_FILE).read_text()):
        example = Example(
            str(entry["name"]),
            str(entry["file"]),
            str(entry.get("title", entry["name"])),
            str(entry.get("note", "")),
            None if entry.get("mpp") is None else float(entry["mpp"]),
        )
        if NAME.match(example.name) and (Path(folder) / Path(example.file).name).is_file():
            out.append(example)
    return out


def find_example(folder: str | Path | None, name: str) -> tuple[Example, Path]:
    """The example called `name` and its image file; NotFound when there is none."""
    for example in list_examples(folder):
        if example.name == name:
            return example, Path(folder) / Path(example.file).name
    raise NotFound(f"no example region called {name!r}")


def write_index(folder: Path, examples: list[Example]) -> None:
    entries = [{"name": e.name, "file": e.file, "title": e.title, "note": e.note, "mpp": e.mpp} for e in examples]
    (folder / INDEX_FILE).write_text(json.dumps(entries, indent=1))
