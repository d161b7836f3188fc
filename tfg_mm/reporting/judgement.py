"""A run judged on its held-out test split (``final.test``, :mod:`tfg_mm.training.judge`), next to its validation
numbers (notebooks 01 / 02): the metrics table (validation = the selection set; test = the selected and the last
checkpoint), the validation operating points applied to the test images, and the PR curves on test.

A run without a test split (or a contract written before there was one) says so, with the command that judges it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from tfg_mm.data.synthetic import HARD_CLASSES
from tfg_mm.paths import RunPaths
from tfg_mm.reporting.errors import plot_pr_curves
from tfg_mm.reporting.provenance import number

_ROWS = (("map", "mAP"), ("map50", "mAP50"), ("map75", "mAP75"))


def no_test_note(metrics: Mapping[str, Any]) -> str:
    run_dir = (metrics.get("params") or {}).get("run_dir", "RUN")
    return (
        "*No test evaluation: this run has no held-out test split (`test_json` empty, or a contract written before "
        f"there was one). Every number here is on the validation images that selected it. Judge it with "
        f"`python -m tfg_mm evaluate {run_dir} --split test` (its params' `test_json`, or `--split path/to.json`).*"
    )


def _cells(block: Mapping[str, Any] | None) -> dict[str, Any]:
    """One column of the table: the summary rows and each class's AP (a class without instances says so)."""
    if not block:
        return {}
    out: dict[str, Any] = {label: round(number(block.get(key)), 4) for key, label in _ROWS}
    for name, entry in (block.get("per_class") or {}).items():
        out[f"AP {name}"] = entry.get("note") or round(number(entry.get("ap")), 4)
    return out


def test_table(metrics: Mapping[str, Any], baseline_final: Mapping[str, Any] | None = None) -> pd.DataFrame | None:
    """Rows: mAP, mAP50, mAP75, AP of each class. Columns: validation (selected; the selection set), test
    (selected), test (last epoch), and with ``baseline_final`` (a baseline judged on the same test split) the
    baseline's test value and Δ (test, selected − baseline). None without ``final.test``."""
    final = metrics.get("final") or {}
    test = final.get("test")
    if not isinstance(test, Mapping):
        return None
    columns = {
        f"validation, epoch {final.get('epoch')} (selection set)": _cells(final),
        f"test, selected (epoch {test['selected'].get('epoch')})": _cells(test["selected"]),
    }
    if test.get("last"):
        columns[f"test, last epoch ({test['last'].get('epoch')})"] = _cells(test["last"])
    base = ((baseline_final or {}).get("test") or {}).get("selected")
    table = pd.DataFrame(columns)
    if base:
        table["baseline, test"] = pd.Series(_cells(base))
        selected = pd.to_numeric(table.iloc[:, 1], errors="coerce")
        table["Δ test (selected − baseline)"] = (
            selected - pd.to_numeric(table["baseline, test"], errors="coerce")
        ).round(4)
    table.index.name = "metric"
    return table.astype(object).where(table.notna(), "")


def test_operating_points_table(metrics: Mapping[str, Any], hard_classes: Sequence[str] = HARD_CLASSES) -> pd.DataFrame:
    """Per class: the threshold chosen on validation, its precision / recall / F1 there, and what the same threshold
    gives on the test images (with the test boxes, true and false positives): what a factory would get."""
    final = metrics.get("final") or {}
    val_points = final.get("operating_points") or {}
    test_points = ((final.get("test") or {}).get("selected") or {}).get("operating_points") or {}
    rows = []
    for name, point in test_points.items():
        chosen = val_points.get(name) or {}
        rows.append(
            {
                "class": f"{name} (hard)" if name in hard_classes else name,
                "threshold (validation)": point.get("threshold"),
                "precision val": chosen.get("precision"),
                "recall val": chosen.get("recall"),
                "F1 val": chosen.get("f1"),
                "precision test": point.get("precision"),
                "recall test": point.get("recall"),
                "F1 test": point.get("f1"),
                "test boxes": point.get("instances"),
                "TP / FP test": f"{point.get('tp')} / {point.get('fp')}" if point.get("tp") is not None else "",
            }
        )
    frame = pd.DataFrame(rows)
    numeric = [c for c in frame.columns if c not in ("class", "test boxes", "TP / FP test")]
    frame[numeric] = frame[numeric].apply(pd.to_numeric, errors="coerce").round(3)
    frame = frame.astype(object).where(frame.notna(), "-")
    return frame.set_index("class") if "class" in frame.columns else frame


def read_test_analysis(metrics: Mapping[str, Any]) -> dict | None:
    """``{run_dir}/analysis_test.json`` (the selected checkpoint's PR curves on test), None when absent."""
    run_dir = (metrics.get("params") or {}).get("run_dir")
    if not run_dir:
        return None
    path = RunPaths.at(run_dir).split_analysis("test")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    classes = list((metrics.get("final") or {}).get("per_class") or {})
    return {**data, "classes": classes}


def show_test_results(
    metrics: Mapping[str, Any],
    baseline_final: Mapping[str, Any] | None = None,
    save_prefix: str | None = None,
    hard_classes: Sequence[str] = HARD_CLASSES,
) -> pd.DataFrame | None:
    """Notebook 01 / 02: the run on its held-out test split next to validation (:func:`test_table`), the validation
    operating points on test (:func:`test_operating_points_table`) and the PR curves on test (saved as
    ``<save_prefix>_test_pr``). A run without a test evaluation gets a note naming the command that judges it."""
    table = test_table(metrics, baseline_final)
    if table is None:
        display(Markdown(no_test_note(metrics)))
        return None
    display(table)  # the notebook's text above it says what chose what (01 and 02 say it differently)
    display(
        Markdown(
            "**The validation operating points on the test images** (IoU 0.5; what a deployment at those thresholds gets):"
        )
    )
    display(test_operating_points_table(metrics, hard_classes))
    analysis = read_test_analysis(metrics)
    if analysis and analysis.get("pr_curves"):
        title = "Precision-recall on the held-out test images (selected checkpoint)"
        fig = plot_pr_curves(
            analysis, hard_classes, save=f"{save_prefix}_test_pr" if save_prefix else None, title=title
        )
        display(fig)
        plt.close(fig)
    return table
