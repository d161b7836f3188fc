"""The library's layering (docs/architecture.md): no module imports a module above it.

Read from the source with ``ast``, so a function-level import counts as much as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tfg_mm"

#: module (dotted, without ``tfg_mm.``; a package stands for all its modules unless a module is listed) -> layer.
#: docs/architecture.md draws the same table by folder.
LAYERS = {
    # the bottom: exceptions, atomic writes, where things are
    "errors": 0,
    "io": 0,
    "paths": 0,
    # what a run can be configured with: the parameter schema and the DEIMv2 size table (data)
    "config": 1,
    # where and on how many processes a run executes
    "runtime": 2,
    # datasets; the detector's architecture, checkpoints and schedules
    "data": 3,
    "detector": 3,
    # the detector's criterion, conversion, initial weights and shim; COCO evaluation
    "detector.loss": 4,
    "detector.convert": 4,
    "detector.pretrained": 4,
    "detector.shim": 4,
    "evaluation": 4,
    # the text branch; analysis, statistics and matching of detections
    "multimodal": 5,
    "evaluation.analysis": 5,
    "evaluation.stats": 5,
    "evaluation.matching": 5,
    "multimodal.model": 6,
    # running an experiment
    "training": 6,
    "training.loop": 7,
    "training.judge": 7,
    "training.experiment": 8,
    "training.baseline": 8,
    "training.phase2": 8,
    # a trained run deployed: predict, ONNX export, benchmark
    "deploy": 8,
    # notebooks as steps, the grid, the reports, the command line
    "workflow": 9,
    "ablations": 10,
    "reporting": 11,
    "cli": 12,
    "__main__": 12,
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
    """Every ``tfg_mm`` module ``path`` imports (``from tfg_mm.pkg import x`` counts as ``pkg.x`` when ``x`` is a
    module of ``pkg``, else as ``pkg``)."""
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
                target = ""
            elif node.module and node.module.startswith("tfg_mm."):
                target = node.module[len("tfg_mm.") :]
            else:
                continue
            submodules = {f"{target}.{a.name}" if target else a.name for a in node.names}
            found |= {m for m in submodules if _is_module(m)} or {target}
    return found


def _is_module(dotted: str) -> bool:
    path = PACKAGE.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


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


@pytest.mark.parametrize("path", sorted((PACKAGE / "reporting").glob("*.py")), ids=lambda p: p.stem)
def test_reporting_only_draws(path):
    """The reports never load a checkpoint or run a model: they import nothing of the model, training or grid
    layers but the run contract, and of the data and evaluation layers only what reads files (the synthetic set's
    hard classes, the dataset readers of the data report, the matching of a run's saved detections)."""
    allowed = {"training.contract", "data.synthetic", "data.coco", "data.validate", "evaluation", "evaluation.matching"}
    imported = _imports(path, f"reporting.{path.stem}")
    assert {m for m in imported if _layer(m) > 2 and not m.startswith("reporting")} <= allowed, imported


def test_top_level_holds_only_packages_and_the_bottom():
    """The top of the package: packages, plus the entry points and the bottom layer (one job each)."""
    modules = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert modules == ["__init__", "__main__", "cli", "errors", "io", "paths"]


def test_no_module_is_longer_than_700_lines():
    long = {
        str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 700
    }
    assert long == {}
