"""The low-data grid of notebook 04: does a text prior help when the hard classes have few examples?

A low-data grid file is an ablation grid (``base``, ``seeds``, ``variants``, ``hard_classes``) with a ``shots``
block::

    shots:
      k: [5, 10, 20]                       # training images kept of each starved class
      classes: [perforation, break]        # the starved classes (default: hard_classes)
      seed: 0                              # seed of the subset: every run of a k trains on the same images
      baseline_params: params/baseline.yaml  # the recipe of each k's baseline
      baseline: {}                         # flat overrides of that recipe

For each ``k``, :func:`run_lowshot` trains the baseline on the starved training set (notebook 01 into
``<run_dir>/k<k>/baseline``; ``train_shots`` / ``shots_classes`` / ``shots_seed``), then runs the grid's variants ×
seeds on top of it with the same subset (notebook 02 via :func:`tfg_mm.ablations.grid.run_grid`, into
``<run_dir>/k<k>/``): the baseline and its fine-tunings never see an image the other did not. Validation and test
are untouched, so every k is judged on the same test images. :func:`summarize_lowshot` gathers each k's
statistics (:func:`tfg_mm.ablations.summary.summarize`: Δ against that k's baseline with paired-bootstrap
intervals on test) into ``<run_dir>/lowshot.json``, which notebook 04 and the index draw.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tfg_mm.ablations.grid import (
    SCHEMA_DEFAULTS,
    RunVariant,
    _dataset_hash,
    _execute_all,
    _progress_line,
    _reuse_or_restart,
    load_ablation_grid,
    run_grid,
    run_notebook01,
    run_notebook02,
)
from tfg_mm.ablations.summary import summarize
from tfg_mm.config import load_params
from tfg_mm.errors import ConfigError
from tfg_mm.io import atomic_write_json
from tfg_mm.paths import resolve_path
from tfg_mm.training import identity
from tfg_mm.training.contract import read_metrics
from tfg_mm.training.progress import append_progress

#: What :func:`run_lowshot` writes (the plan and each k's baseline) and :func:`summarize_lowshot` (the statistics).
LOWSHOT_RECORD = "lowshot_grid.json"
LOWSHOT_SUMMARY = "lowshot.json"


def level_dir(run_dir: str | Path, k: int) -> Path:
    """Where the runs of one k go: ``<run_dir>/k<k>`` (its baseline in ``baseline/``, the variants beside it)."""
    return resolve_path(run_dir) / f"k{k}"


def plan_shot_baseline(shots: Mapping[str, Any], k: int, run_dir: str | Path, reuse: bool = True) -> dict:
    """The baseline of one k: its params (the recipe with ``train_shots: k``), run_dir and whether it is reusable."""
    folder = level_dir(run_dir, k) / "baseline"
    recipe = shots["baseline_params"]
    if not Path(recipe).is_absolute() and not Path(recipe).exists():
        recipe = resolve_path(recipe)
    params = load_params(
        recipe,
        shots["baseline"],
        {
            "train_shots": k,
            "shots_classes": list(shots["classes"]),
            "shots_seed": shots["seed"],
            "run_dir": str(folder),
            "checkpoint": "",
        },
        source_names=[str(shots["baseline_params"]), "shots.baseline", "low-data grid runner"],
    )
    dataset_hash = _dataset_hash(params, {})
    expected = identity.run_id(params, dataset_hash, identity.code_version()) if dataset_hash else None
    reusable, params = _reuse_or_restart(params, folder, expected, reuse)
    return {
        "variant": "baseline",
        "seed": k,
        "run_dir": str(folder),
        "run_id": expected,
        "reuse": reusable,
        "params": params,
    }


def run_lowshot(
    grid: Mapping[str, Any] | str | Path,
    run_dir: str | Path,
    *,
    params_file: str | Path | None = "params/phase2.yaml",
    explicit: Mapping[str, Any] | None = None,
    seeds: Sequence[int] | None = None,
    reuse: bool = SCHEMA_DEFAULTS.reuse,
    bootstrap_resamples: int = SCHEMA_DEFAULTS.bootstrap_resamples,
    confidence: float = SCHEMA_DEFAULTS.confidence,
    run_variant: RunVariant = run_notebook02,
    run_baseline: RunVariant = run_notebook01,
    progress: bool = True,
) -> dict:
    """Every k: its baseline, then the variants × seeds on it (see the module docstring). Writes and returns
    ``<run_dir>/lowshot_grid.json``; a k whose baseline fails is recorded and the next k goes on."""
    if not isinstance(grid, Mapping):
        grid = load_ablation_grid(grid)
    shots = grid.get("shots")
    if not shots:
        raise ConfigError(
            f"{grid.get('path', 'grid')}: no `shots` block, so this is not a low-data grid. Fix: add "
            "`shots: {k: [5, 10, 20], classes: [perforation, break]}` or run the grid with notebook 03."
        )
    run_dir = resolve_path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"grid": grid.get("path"), "shots": shots, "levels": []}

    def report(line: str) -> None:
        append_progress(run_dir, {"run": "lowshot", "event": line})
        if progress:
            print(f"[lowshot] {line}", flush=True)

    for k in shots["k"]:
        entry = plan_shot_baseline(shots, k, run_dir, reuse)
        (result,) = list(_execute_all([entry], run_baseline, {"executor": "local"}, 1, report))
        report(_progress_line(f"k={k} baseline", result))
        level = {"k": k, "baseline": result, "dir": str(level_dir(run_dir, k))}
        record["levels"].append(level)
        atomic_write_json(run_dir / LOWSHOT_RECORD, record)
        if result["status"] not in ("finished", "reused"):
            continue
        starved = {"train_shots": k, "shots_classes": list(shots["classes"]), "shots_seed": shots["seed"]}
        sub = {
            **grid,
            "path": f"{grid.get('path')} (k={k})",
            "base": {**grid["base"], **starved},
            "baseline_seeds": [],
            "wise": None,
            "shots": None,
        }
        level["grid"] = run_grid(
            sub,
            level_dir(run_dir, k),
            params_file=params_file,
            explicit={**(explicit or {}), "baseline": result["run_dir"]},
            seeds=seeds,
            reuse=reuse,
            bootstrap_resamples=bootstrap_resamples,
            confidence=confidence,
            run_variant=run_variant,
            progress=progress,
        )["runs"]
        atomic_write_json(run_dir / LOWSHOT_RECORD, record)
    return record


def _delta(variant: Mapping[str, Any], split: str, key: str | None = None) -> dict | None:
    delta = ((variant.get("deltas") or {}).get(split) or {}).get("delta") or {}
    entry = delta.get("map") if key is None else (delta.get("per_class") or {}).get(key)
    if not entry:
        return None
    return {k: entry.get(k) for k in ("delta", "lo", "hi", "verdict")}


def summarize_lowshot(run_dir: str | Path, progress: bool = False) -> dict:
    """Each k's statistics (the baseline's test AP of the starved classes, each variant's Δ on test with its
    interval) in ``<run_dir>/lowshot.json``; returns it."""
    run_dir = resolve_path(run_dir)
    path = run_dir / LOWSHOT_RECORD
    if not path.is_file():
        raise ConfigError(f"{path}: no low-data grid record; run notebook 04 (`make lowshot`) first.")
    record = json.loads(path.read_text(encoding="utf-8"))
    shots = record["shots"]
    out: dict[str, Any] = {"grid": record["grid"], "shots": shots, "levels": [], "notes": []}
    for level in record["levels"]:
        k = level["k"]
        entry: dict[str, Any] = {"k": k, "baseline_status": level["baseline"]["status"], "variants": {}}
        if level["baseline"]["status"] not in ("finished", "reused"):
            out["notes"].append(f"k={k}: the baseline did not finish ({level['baseline'].get('error', '?')})")
            out["levels"].append(entry)
            continue
        metrics = read_metrics(level["baseline"]["run_dir"])
        test = ((metrics.get("final") or {}).get("test") or {}).get("selected") or {}
        entry["baseline"] = {
            "run_dir": level["baseline"]["run_dir"],
            "kept": (metrics.get("training") or {}).get("train_shots"),
            "test_map": test.get("map"),
            "test_ap": {c: (test.get("per_class") or {}).get(c, {}).get("ap") for c in shots["classes"]},
            "convergence": ((metrics.get("final") or {}).get("convergence") or {}).get("verdict"),
        }
        summary = summarize(level["dir"], progress=progress)
        entry["confidence"] = summary.get("confidence")
        for variant in summary["variants"]:
            entry["variants"][variant["name"]] = {
                "status": variant["status"],
                "seeds": variant["seeds_finished"],
                "test": {
                    "map": _delta(variant, "test"),
                    **{c: _delta(variant, "test", c) for c in summary["hard_classes"]},
                },
            }
        out["notes"] += [f"k={k}: {note}" for note in summary["notes"]]
        out["levels"].append(entry)
    atomic_write_json(run_dir / LOWSHOT_SUMMARY, out)
    return out
