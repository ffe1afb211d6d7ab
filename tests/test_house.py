"""The house rules, checked on the code as it stands: sizes, the direction of imports, and the
module map in docs/ARCHITECTURE.md against the tree. A rule broken here is a design change to
make on purpose (and write down), not a test to loosen."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "indexer", "pretrain", "webapp", "migrations", "bench")
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 150


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "node_modules" not in p.parts)


def imported(path: Path) -> set[str]:
    """Every module name a file imports (absolute imports; relative ones are not used here)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def dotted(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def test_no_module_is_over_the_limit():
    over = {str(p.relative_to(ROOT)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines: {over}"


def test_no_class_is_over_the_limit():
    over = {}
    for p in modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                over[f"{p.relative_to(ROOT)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert not over, f"classes over {MAX_CLASS_LINES} lines: {over}"


# who may import whom: a module of the key's room must not import any of the listed rooms
FORBIDDEN = {
    "engine": ("indexer", "pretrain", "webapp", "bench"),
    "indexer": ("webapp", "pretrain", "bench", "engine.cli"),
    "pretrain": ("webapp", "indexer", "bench", "engine.cli"),
    "webapp": ("pretrain", "indexer", "bench", "engine.cli"),
    "migrations": ("indexer", "pretrain", "webapp", "bench", "engine.search", "engine.evaluation", "engine.cli"),
}
# inside engine: the core imports none of the rooms, the rooms not the commands
ENGINE_ROOMS = ("engine.search", "engine.evaluation", "engine.mil", "engine.cli")


def is_command(module: str) -> bool:
    return module.split(".")[-1] in ("cli", "__main__", "demo") or ".cli." in module


def room_rules(module: str) -> tuple[str, ...]:
    top = module.split(".")[0]
    rules = FORBIDDEN.get(top, ())
    if top == "engine":
        room = next((r for r in ENGINE_ROOMS if module == r or module.startswith(r + ".")), None)
        if room is None:  # the core
            rules += ENGINE_ROOMS
        elif room != "engine.cli":
            # evaluation may use search (slide-level benchmark); nothing below uses the commands
            rules += ("engine.cli",) + tuple(r for r in ENGINE_ROOMS if r not in (room, "engine.cli", "engine.search"))
            if room == "engine.search":
                rules += ("engine.evaluation",)
    return rules


def test_imports_flow_one_way():
    wrong = []
    for p in modules():
        module = dotted(p)
        if module == "engine.__main__":  # `python -m engine`: the command line's own door
            continue
        for name in imported(p):
            if is_command(module) and name.startswith("engine.cli.common"):
                continue  # every package's command line shares the engine's common options
            for banned in room_rules(module):
                if name == banned or name.startswith(banned + "."):
                    wrong.append(f"{module} imports {name}")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_the_module_map_matches_the_tree():
    """docs/ARCHITECTURE.md names every module of engine/ (as a path relative to engine/ in
    its tables) and names none that is gone."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:[a-z_]+/)*[a-z_]+\.py)`", text))
    engine = ROOT / "engine"
    tree = {str(p.relative_to(engine)) for p in engine.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    missing = sorted(tree - named)
    assert not missing, f"modules of engine/ the map does not name: {missing}"
    # a name is a path under engine/ (or the repository), or the bare file name of one
    names = {p.name for p in engine.rglob("*.py")}
    gone = sorted(
        n for n in named if not ((engine / n).exists() or (ROOT / n).exists() or ("/" not in n and n in names))
    )
    assert not gone, f"the map names modules that do not exist: {gone}"


@pytest.mark.parametrize("doc", sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"], ids=lambda p: p.name)
def test_docs_name_no_missing_module(doc):
    """Paths like engine/search/engine.py quoted in the docs exist."""
    paths = set(
        re.findall(r"\b((?:engine|indexer|pretrain|webapp|bench|migrations|tests)/[\w/]+\.py)\b", doc.read_text())
    )
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"{doc.name} names files that do not exist: {missing}"
