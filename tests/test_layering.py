"""The data path reads top to bottom: no module imports one from a layer above it (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "diffusers_moc"

# Lower number = lower layer. Pipelines and training share a layer and must not import each other.
LAYERS = {
    "config": 0,
    "layout": 0,
    "context": 0,
    "parallel": 0,
    "video_io": 0,
    "tiny": 0,
    "model_families": 0,
    "routing": 1,
    "kernels": 2,
    "attention": 3,
    "recording": 3,
    "attention_processors": 4,
    "apply": 5,
    "hub": 6,
    "captions": 6,
    "pipelines": 7,
    "training": 7,
    "commands": 8,
    "cli": 9,
}


def _top(module: str) -> str:
    return module.split(".")[0]


def _imports(path: Path) -> set[str]:
    """Top-level package modules that `path` imports (relative imports resolved)."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts[:-1])  # the package the file is in
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
            target = [*base, *(node.module.split(".") if node.module else [])]
            if target:
                found.add(target[0])
            else:  # `from . import x` inside a subpackage: x is a sibling of the subpackage's modules
                found.update(alias.name for alias in node.names)
    return found


def test_no_import_goes_up_a_layer_and_pipelines_and_training_are_apart():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        own = _top(".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        if own == "__init__":
            continue  # the lazy package root names everything
        for imported in _imports(path):
            if imported == own or imported not in LAYERS:
                continue
            across = {own, imported} == {"pipelines", "training"}
            if LAYERS[imported] > LAYERS[own] or across:
                offenders.append(f"{path.relative_to(PACKAGE)} imports {imported}")
    assert not offenders, offenders
