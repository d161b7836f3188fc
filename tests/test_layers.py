"""The library's layering (docs/architecture.md): no module imports a module above it.

Read from the source with ``ast``, so a function-level import counts as much as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tfg_mm"

#: module (dotted, without ``tfg_mm.``; a package stands for all its modules) -> layer
LAYERS = {
    "errors": 0,
    "io": 0,
    "config": 1,
    "figures": 1,
    "devices": 1,
    "distributed": 1,
    "data": 2,
    "detector": 2,
    "loss": 3,
    "convert": 3,
    "evaluate": 3,
    "text": 3,
    "fusion": 3,
    "shim": 3,
    "pretrained": 3,
    "model": 4,
    "stats": 4,
    "analysis": 4,
    "galleries": 4,
    "runs": 4,
    "tracking": 4,
    "notebooks": 4,
    "train": 5,
    "experiment": 6,
    "baseline": 6,
    "phase2": 6,
    "ablations": 7,
    "reports": 8,
    "pipeline": 9,
    "cli": 9,
    "__main__": 9,
}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return None


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        if parts:
            out.append((".".join(parts), path))
    return out


def _imports(path: Path, module: str) -> set[str]:
    """Every ``tfg_mm`` module ``path`` imports (``from tfg_mm import x`` counts as ``x``)."""
    found = set()
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name[len("tfg_mm.") :] for a in node.names if a.name.startswith("tfg_mm.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            elif node.module == "tfg_mm":
                found |= {a.name for a in node.names}
                continue
            elif node.module and node.module.startswith("tfg_mm."):
                target = node.module[len("tfg_mm.") :]
            else:
                continue
            found.add(target)
    return found


def test_every_module_has_a_layer():
    assert [m for m, _ in _modules() if _layer(m) is None] == []


@pytest.mark.parametrize("module, path", _modules(), ids=[m for m, _ in _modules()])
def test_no_module_imports_a_module_above_it(module, path):
    mine = _layer(module)
    upward = sorted(
        f"{target} (layer {_layer(target)})"
        for target in _imports(path, module)
        if _layer(target) is not None and _layer(target) > mine
    )
    assert upward == [], f"tfg_mm.{module} (layer {mine}) imports modules above it: {upward}"


def test_reports_only_draw():
    """reports never loads a checkpoint or runs a model: it imports no model-, data- or training-level module
    (``galleries`` only reads a run's files: ground truth, images, saved detections)."""
    imported = _imports(PACKAGE / "reports.py", "reports")
    assert not {m for m in imported if _layer(m) not in (0, 1)} - {"runs", "data.synthetic", "galleries"}, imported
