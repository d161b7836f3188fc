"""Error analysis of a run (notebooks 01 / 02 / 03), drawn from ``final.operating_points`` / ``final.errors`` and
``{run_dir}/analysis.json`` (:mod:`tfg_mm.evaluation.analysis`): PR curves, F1 against the score threshold with the
operating points, the confusion matrix, the TIDE error breakdown, and for a grid the per-class error table."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display

from tfg_mm.data.synthetic import HARD_CLASSES
from tfg_mm.evaluation import ERROR_TYPES
from tfg_mm.paths import ANALYSIS_FILE, resolve_path
from tfg_mm.reporting.figures import HARD_COLOR, finish, highlight_hard
from tfg_mm.reporting.provenance import as_final, baseline_final_of, number

_ERROR_LABELS = {
    "classification": "classification",
    "localisation": "localisation",
    "both": "cls + loc",
    "duplicate": "duplicate",
    "background": "background",
    "missed": "missed",
}


def read_analysis(run_dir: str | Path) -> dict | None:
    """The run's error-analysis side file (``{run_dir}/analysis.json``), or None when it has none."""
    path = resolve_path(run_dir) / ANALYSIS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _class_styles(classes: Sequence[str], hard_classes: Sequence[str]) -> dict[str, dict]:
    """One colour per class; hard classes drawn thick and opaque, the others thin and faded."""
    colors = dict(zip(classes, sns.color_palette("tab10", max(1, len(classes)))))
    return {
        c: {"color": colors[c], "lw": 2.6 if c in hard_classes else 1.2, "alpha": 1.0 if c in hard_classes else 0.6}
        for c in classes
    }


def _legend_label(name: str, hard_classes: Sequence[str], extra: str = "") -> str:
    return f"{name}{' (hard)' if name in hard_classes else ''}{extra}"


def plot_pr_curves(
    analysis: Mapping[str, Any],
    hard_classes: Sequence[str] = HARD_CLASSES,
    save: str | None = None,
    title: str | None = None,
) -> plt.Figure:
    """Precision against recall per class (COCOeval, 101 recall points): one panel at IoU 0.5, one for the
    mean over IoU 0.50:0.95; legend with each class's AP (the area under its curve); hard classes thick;
    ``title`` above both panels (laid out with them)."""
    curves = analysis.get("pr_curves") or {}
    classes = list(analysis.get("classes", []))
    styles = _class_styles(classes, hard_classes)
    recall = curves.get("recall") or []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, panel, metric in zip(
        axes, ("iou50", "iou50_95"), ("IoU 0.5", "IoU 0.50:0.95 (mean of 10)"), ("AP50", "AP")
    ):
        for name in classes:
            precision = (curves.get(key) or {}).get(name)
            if precision is None:
                continue
            ap = float(np.mean(precision))
            ax.plot(recall, precision, label=_legend_label(name, hard_classes, f" {metric} {ap:.3f}"), **styles[name])
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("precision")
    if title:
        fig.suptitle(title, fontsize=10)
    return finish(fig, save)


def plot_f1_curves(
    analysis: Mapping[str, Any],
    operating_points: Mapping[str, Any] | None = None,
    hard_classes: Sequence[str] = HARD_CLASSES,
    save: str | None = None,
) -> plt.Figure:
    """F1 against score threshold per class (IoU 0.5); a marker at each class's operating point (max F1)."""
    curves = analysis.get("f1_curves") or {}
    points = operating_points if operating_points is not None else analysis.get("operating_points") or {}
    classes = list(analysis.get("classes", []))
    styles = _class_styles(classes, hard_classes)
    thresholds = curves.get("thresholds") or []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in classes:
        if name not in curves:
            continue
        ax.plot(thresholds, curves[name]["f1"], label=_legend_label(name, hard_classes), **styles[name])
        point = points.get(name) or {}
        if point.get("threshold") is not None:
            ax.plot(
                point["threshold"],
                point["f1"],
                marker="o",
                ms=8 if name in hard_classes else 6,
                color=styles[name]["color"],
                mec="black",
                ls="",
            )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("score threshold (detections kept: score ≥ threshold)")
    ax.set_ylabel("F1 at IoU 0.5")
    ax.set_title("F1 against score threshold; dots: operating points (max F1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return finish(fig, save)


def plot_confusion(
    analysis: Mapping[str, Any], hard_classes: Sequence[str] = HARD_CLASSES, save: str | None = None
) -> plt.Figure:
    """The confusion matrix at the operating points (IoU 0.5): counts, and normalised per ground-truth row."""
    confusion = analysis.get("confusion") or {}
    counts = np.asarray(confusion.get("counts") or [[0]], dtype=float)
    rows = list(confusion.get("labels") or ["?"])
    cols = list(confusion.get("columns") or ["?"])
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(totals > 0, counts / totals, np.nan)
    size = 0.55 * len(cols) + 2.2
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 0.5, size))
    for ax, data, fmt, title in (
        (axes[0], counts, ".0f", "counts"),
        (axes[1], share, ".2f", "share of each row (ground truth)"),
    ):
        frame = pd.DataFrame(data, index=rows, columns=cols)
        sns.heatmap(frame, annot=True, fmt=fmt, cmap="Blues", cbar=False, ax=ax, annot_kws={"fontsize": 8})
        ax.set_xlabel("predicted class")
        ax.set_ylabel("ground truth")
        ax.set_title(title)
        for label in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
            if label.get_text() in hard_classes:
                label.set_color(HARD_COLOR)
                label.set_fontweight("bold")
    fig.suptitle("Confusion at each class's operating threshold (IoU 0.5; background: no box, missed: no detection)")
    return finish(fig, save)


def _errors_frame(errors: Mapping[str, Any]) -> pd.DataFrame:
    rows = [
        {"class": name, "error": _ERROR_LABELS.get(kind, kind), "ΔAP50": number(value)}
        for name, values in (errors or {}).items()
        for kind, value in (values or {}).items()
    ]
    return pd.DataFrame(rows, columns=["class", "error", "ΔAP50"])


def plot_error_breakdown(
    errors: Mapping[str, Any], hard_classes: Sequence[str] = HARD_CLASSES, save: str | None = None
) -> plt.Figure:
    """TIDE error breakdown per class: ΔAP50 when all errors of one type are fixed (``final.errors``)."""
    frame = _errors_frame(errors)
    n_classes = max(1, frame["class"].nunique())
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * n_classes + 2.5), 3.8))
    if frame.empty or frame["ΔAP50"].isna().all():
        ax.text(0.5, 0.5, "no error analysis in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return finish(fig, save)
    sns.barplot(frame, x="class", y="ΔAP50", hue="error", ax=ax, palette="Set2")
    highlight_hard(ax, hard_classes)
    ax.set_xlabel("")
    ax.set_ylabel("ΔAP50 when fixed")
    ax.set_title("What each error type costs (TIDE oracle fixes, IoU 0.5 / background 0.1)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return finish(fig, save)


def operating_points_table(metrics: Mapping[str, Any], hard_classes: Sequence[str] = HARD_CLASSES) -> pd.DataFrame:
    """Per class: the F1-maximising score threshold with its precision, recall and F1, and the
    largest error type (``final.operating_points`` / ``final.errors``)."""
    final = metrics.get("final") or {}
    points = final.get("operating_points") or {}
    errors = final.get("errors") or {}
    rows = []
    for name, point in points.items():
        kinds = {k: number(v) for k, v in (errors.get(name) or {}).items()}
        finite = {k: v for k, v in kinds.items() if math.isfinite(v)}
        top = max(finite, key=finite.get) if finite and max(finite.values()) > 0 else None
        rows.append(
            {
                "class": f"{name} (hard)" if name in hard_classes else name,
                "threshold": number(point.get("threshold")),
                "precision": number(point.get("precision")),
                "recall": number(point.get("recall")),
                "F1": number(point.get("f1")),
                "largest error (ΔAP50)": f"{_ERROR_LABELS.get(top, top)} ({finite[top]:.3f})" if top else "",
            }
        )
    return pd.DataFrame(rows).set_index("class").round(3) if rows else pd.DataFrame()


def show_error_analysis(
    metrics: Mapping[str, Any],
    run_dir: str | Path | None = None,
    save_prefix: str | None = None,
    hard_classes: Sequence[str] = HARD_CLASSES,
) -> dict[str, plt.Figure]:
    """The error analysis of a run for a notebook cell: PR curves, F1 against threshold with the
    operating points, the confusion matrix, the error breakdown, and the operating-points table.

    Reads ``final.operating_points`` / ``final.errors`` from the contract and the curves from
    ``{run_dir}/analysis.json`` (default ``run_dir``: the contract's). With ``save_prefix`` the figures
    are written as ``<prefix>_pr``, ``_f1``, ``_confusion``, ``_errors`` (PNG + SVG). Returns the figures.
    """
    run_dir = run_dir if run_dir is not None else (metrics.get("params") or {}).get("run_dir")
    data = read_analysis(run_dir) if run_dir is not None else None
    final = metrics.get("final") or {}
    if data is None or not final.get("errors"):
        display(
            Markdown(
                "*No error analysis for this run: it was written before the run contract carried one "
                "(schema version < 3) or kept no detections. Rerun it with `overwrite: true` to add it.*"
            )
        )
        return {}
    stem = (lambda suffix: f"{save_prefix}_{suffix}") if save_prefix else (lambda suffix: None)
    figures = {
        "pr": plot_pr_curves(data, hard_classes, save=stem("pr")),
        "f1": plot_f1_curves(data, final.get("operating_points"), hard_classes, save=stem("f1")),
        "confusion": plot_confusion(data, hard_classes, save=stem("confusion")),
        "errors": plot_error_breakdown(final["errors"], hard_classes, save=stem("errors")),
    }
    for fig in figures.values():
        display(fig)
        plt.close(fig)
    display(
        Markdown(
            "**Operating points** (per class, the score threshold that maximises F1 at IoU 0.5; what a "
            "deployment would use) and the error type that costs the most AP50:"
        )
    )
    display(operating_points_table(metrics, hard_classes))
    return figures


def error_comparison(
    metrics: Mapping[str, Any],
    baseline_final: Mapping[str, Any] | None = None,
    classes: Sequence[str] | None = None,
) -> pd.DataFrame:
    """:func:`error_table` of one run against its baseline (notebook 02): rows ``baseline`` and ``this run``.

    ``baseline_final`` is a baseline contract or its ``final`` (default: the one a phase-2 contract
    records); default classes: the hard classes this run has."""
    base = as_final(baseline_final) if baseline_final is not None else baseline_final_of(metrics)
    errors = (metrics.get("final") or {}).get("errors") or {}
    if classes is None:
        classes = [c for c in HARD_CLASSES if c in errors] or list(errors)
    summary = {
        "baseline": {"final": base or {}},
        "variants": [{"name": "this run", "error_analysis": {"errors": errors}}],
    }
    return error_table(summary, classes)


def error_table(summary: Mapping[str, Any], classes: Sequence[str] | None = None) -> pd.DataFrame:
    """Per-class TIDE error table of the grid: rows baseline and every variant, columns (class, error
    type), values ΔAP50 (variants: mean over finished seeds). Default classes: the grid's hard classes."""
    classes = list(classes if classes is not None else summary.get("hard_classes", []))
    entries = []
    base = (summary.get("baseline") or {}).get("final") or {}
    if base.get("errors"):
        entries.append(("baseline", base["errors"]))
    for variant in summary.get("variants", []):
        errors = (variant.get("error_analysis") or {}).get("errors")
        if errors:
            entries.append((variant["name"], errors))
    columns = pd.MultiIndex.from_tuples(
        [(c, _ERROR_LABELS[k]) for c in classes for k in ERROR_TYPES], names=["class", "error (ΔAP50)"]
    )
    rows = {
        name: [number((errors.get(c) or {}).get(k)) for c in classes for k in ERROR_TYPES] for name, errors in entries
    }
    table = pd.DataFrame.from_dict(rows, orient="index")
    if table.empty:
        return pd.DataFrame(columns=columns)
    table.columns = columns
    table.index.name = "variant"
    return table.round(3)
