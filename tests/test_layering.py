"""The data path reads top to bottom: no module imports one from a layer above it (function-level imports included),
and the MoC core (`diffusers_moc.core`) never imports the application beside it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "diffusers_moc"

# Lower number = lower layer. Inside the core:
CORE_LAYERS = {
    "backends": 0,
    "config": 0,
    "layout": 0,
    "context": 0,
    "parallel": 0,
    "atomic": 0,
    "model_hooks": 0,
    "routing": 1,
    "joint_stream": 1,
    "kernels": 2,
    "attention": 3,
    "recording": 3,
    "attention_processors": 4,
    "streams": 5,
    "apply": 6,
}
# The application, all above the core. Pipelines and training share a layer and must not import each other.
APP_LAYERS = {
    "core": 0,
    "errors": 1,
    "video_io": 1,
    "tiny": 1,
    "tiny_hunyuan_video15": 1,
    "model_families": 1,
    "textfiles": 2,
    "hub": 2,
    "captions": 2,
    "hunyuan_video15_text": 2,
    "models_table": 2,
    "shot_plan": 2,
    "distributed": 2,
    "pipelines": 3,
    "training": 3,
    "commands": 4,
    "cli": 5,
}


def _imports(path: Path, root: Path, text: str | None = None) -> set[str]:
    """Modules at `root`'s level that `path` imports (relative imports resolved; absolute ones of the package too)."""
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts[:-1])  # the package the file is in, below root
    depth = len(path.relative_to(PACKAGE).parts) - len(rel.parts)  # folders between PACKAGE and root
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8") if text is None else text)):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            up = node.level - 1
            if up > len(parts):  # above root: into the application, seen from the core
                found.add("<above>")
                continue
            base = parts[: len(parts) - up]
            target = [*base, *(node.module.split(".") if node.module else [])]
            if target:
                found.add(target[0])
            else:  # `from . import x` inside a subpackage: x is a sibling of the subpackage's modules
                found.update(alias.name for alias in node.names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and depth:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n.startswith("diffusers_moc") and not n.startswith("diffusers_moc.core") for n in names):
                found.add("<above>")
    return found


def _offenders(root: Path, layers: dict[str, int], apart: set[str]) -> list[str]:
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        own = rel.with_suffix("").parts[0]
        if own == "__init__" or (root == PACKAGE and own == "core"):
            continue  # the lazy package roots name everything; the core is checked on its own
        for imported in _imports(path, root):
            if imported == "<above>":
                out.append(f"{path.relative_to(PACKAGE)} imports the application")
            elif (
                imported != own and imported in layers and (layers[imported] > layers[own] or {own, imported} == apart)
            ):
                out.append(f"{path.relative_to(PACKAGE)} imports {imported}")
    return out


def test_every_module_has_a_layer():
    core = {p.with_suffix("").name for p in (PACKAGE / "core").iterdir() if p.name != "__init__.py"}
    app = {p.with_suffix("").name for p in PACKAGE.iterdir() if p.name not in ("__init__.py", "__main__.py")}
    core.discard("__pycache__"), app.discard("__pycache__")
    assert core == set(CORE_LAYERS), core ^ set(CORE_LAYERS)
    assert app == set(APP_LAYERS), app ^ set(APP_LAYERS)


def test_the_core_never_imports_the_application_and_its_layers_go_down():
    assert not _offenders(PACKAGE / "core", CORE_LAYERS, set())


def test_the_application_layers_go_down_and_pipelines_and_training_are_apart():
    assert not _offenders(PACKAGE, APP_LAYERS, {"pipelines", "training"})


def test_the_check_sees_an_upward_import():
    # A core module importing the application, or a lower layer importing a higher one, is found: the tests above
    # can fail.
    core = PACKAGE / "core"
    assert "<above>" in _imports(core / "config.py", core, "from ..hub import push_to_hub\n")
    assert "<above>" in _imports(core / "config.py", core, "import diffusers_moc.pipelines\n")
    assert "routing" in _imports(core / "layout.py", core, "from .routing import route\n")
    assert "training" in _imports(PACKAGE / "pipelines" / "long_video.py", PACKAGE, "from ..training import x\n")
