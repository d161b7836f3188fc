"""Thesis-ready figures and tables from run contracts, and the reports index (``reports/index.html``).

Everything here only draws what it is given: run contracts (``metrics.json``, see :mod:`tfg_mm.runs`)
and the ablation summary that :func:`tfg_mm.ablations.summarize` computes from the run folders. It
never loads a checkpoint or runs a model, so a report can always be rebuilt from the run folders
(``python -m tfg_mm report`` summarizes the grid, then calls :func:`build_index`).

* Notebook helpers (notebooks 01 / 02): :func:`show_provenance`, :func:`plot_trajectory`,
  :func:`plot_per_class`, :func:`plot_per_class_delta`, :func:`plot_gate`, :func:`plot_losses`,
  :func:`final_table`. Each plot returns its figure and, given ``save="stem"``, also writes
  ``reports/figures/<stem>.png`` and ``.svg`` (PNG for the HTML, SVG for the thesis).
* Error analysis of a run (notebooks 01 / 02 / 03): :func:`show_error_analysis` (one cell: PR
  curves, F1 against threshold with the operating points, confusion matrix, TIDE error breakdown,
  operating-points table), built from :func:`plot_pr_curves`, :func:`plot_f1_curves`,
  :func:`plot_confusion`, :func:`plot_error_breakdown`, :func:`operating_points_table`; for a grid,
  :func:`error_table` (per-class error ΔAP of the baseline and every variant); for a phase-2 run
  against its baseline, :func:`error_comparison`.
* Detection galleries (read by :mod:`tfg_mm.galleries` from a run's ground truth, images and saved
  detections; no model): :func:`show_galleries` (notebook 01), :func:`show_side_by_side` (notebook 02:
  baseline vs phase 2 on the same images, and the miss → hit / hit → miss flips), :func:`flips_summary`
  and :func:`phase2_flips` (the flips counts alone, for the index: ``build_index(summary, flips=...)``).
* Ablation figures (notebook 03 and the index): :func:`plot_ablation_trajectories`,
  :func:`plot_delta_heatmap`, :func:`plot_ablation_gates`, :func:`plot_wise_curve`,
  :func:`ablation_table`.
* :func:`build_index`: ``reports/index.html``, a standalone page (images embedded) that links every
  report and shows the ablation table and figures; the table is also written as CSV and LaTeX.

Figures are written by :func:`tfg_mm.figures.save_figure`; its module says how ``TFG_MM_FIGURES_DIR``
and ``TFG_MM_REPORTS_DIR`` redirect the output folders.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import Image as DisplayImage
from IPython.display import Markdown, display
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from tfg_mm import galleries
from tfg_mm.config import Params, portable_text, resolve_path
from tfg_mm.data.synthetic import HARD_CLASSES
from tfg_mm.errors import DataError
from tfg_mm.figures import default_reports_dir, save_figure
from tfg_mm.io import atomic_write_text
from tfg_mm.runs import ANALYSIS_FILE, ERROR_TYPES, is_finished, read_metrics

#: The notebook reports the pipeline renders, in reading order (linked from the index).
NOTEBOOK_REPORTS: tuple[tuple[str, str], ...] = (
    ("00_data", "Data: the dataset, its classes and boxes"),
    ("01_baseline", "Phase 1: the DEIMv2 baseline"),
    ("02_phase2", "Phase 2: text branch, residual fusion, progressive fine-tuning"),
    ("03_ablations", "Ablations: every hypothesis with seeds and bootstrap intervals"),
)
_HARD_COLOR = "#c0392b"
_SUMMARY_ROWS = (
    ("map", "mAP"),
    ("map50", "mAP50"),
    ("map75", "mAP75"),
    ("map_small", "mAP small"),
    ("map_medium", "mAP medium"),
    ("map_large", "mAP large"),
)
#: What a size row says when the validation set has no objects of that size (COCOeval's -1).
_NO_OBJECTS = {f"mAP {size}": f"no {size} objects" for size in ("small", "medium", "large")}


# --------------------------------------------------------------------------------------------
# Saving figures
# --------------------------------------------------------------------------------------------
def _finish(fig: plt.Figure, save: str | None) -> plt.Figure:
    fig.tight_layout()
    if save:
        save_figure(fig, save)
    return fig


# --------------------------------------------------------------------------------------------
# Reading run contracts
# --------------------------------------------------------------------------------------------
def contract_field(metrics: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """A phase's extra entry (``phase``, ``baseline``, ``text_encoder``, ...): ``tfg_mm.runs.write_metrics``
    writes a phase's extras as top-level keys of the contract."""
    return metrics.get(key, default)


def baseline_final_of(metrics: Mapping[str, Any]) -> dict | None:
    """The baseline's final metrics recorded in a phase-2 contract (None for a baseline run)."""
    baseline = contract_field(metrics, "baseline") or {}
    return baseline.get("final") if isinstance(baseline, Mapping) else None


def _as_final(baseline: Mapping[str, Any] | None) -> dict | None:
    """Accept a whole contract (with ``final``) or a ``final`` dict."""
    if baseline is None:
        return None
    return dict(baseline["final"]) if isinstance(baseline.get("final"), Mapping) else dict(baseline)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _history_frame(metrics: Mapping[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(
        [{k: v for k, v in h.items() if not isinstance(v, (dict, list))} for h in metrics.get("history", [])]
    )


def _class_names(metrics: Mapping[str, Any]) -> list[str]:
    final = metrics.get("final") or (metrics.get("history") or [{}])[-1]
    return list((final or {}).get("per_class", {}))


# --------------------------------------------------------------------------------------------
# Notebook helpers
# --------------------------------------------------------------------------------------------
def environment_summary(env: Mapping[str, Any]) -> str:
    """One line of a run's ``environment`` record (:func:`tfg_mm.runs.environment`)."""
    packages = env.get("packages") or {}
    versions = ", ".join(f"{k} {v}" for k, v in packages.items() if v)
    device = f"GPU {env['gpu']} (CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')})" if env.get("gpu") else "no GPU"
    return (
        f"CPU {env.get('cpu', '?')} (torch kernels {env.get('cpu_capability', '?')}, {env.get('torch_threads', '?')} "
        f"threads, deterministic algorithms {env.get('deterministic_algorithms', '?')}), {device}; "
        f"python {env.get('python', '?')}, {versions}"
    )


def provenance_markdown(metrics: Mapping[str, Any]) -> str:
    """ "Where this number came from" as a markdown table: phase, changed params, data, code, text, mode."""
    params = metrics.get("params", {})
    defaults = Params().model_dump(mode="json")
    changed = metrics.get("params_changed")
    if changed is None:
        changed = {k: v for k, v in params.items() if k in defaults and defaults[k] != v}
    dataset = metrics.get("dataset", {})
    code = metrics.get("code_version", {})
    text = contract_field(metrics, "text_encoder") or {}
    model = contract_field(metrics, "model") or {}
    baseline = contract_field(metrics, "baseline") or {}

    def cell(value: Any) -> str:
        return portable_text(str(value)).replace("|", "\\|").replace("\n", " ")

    rows = [
        ("phase", contract_field(metrics, "phase", "?")),
        ("status", _status_text(metrics)),
        ("run id", metrics.get("run_id", "?")),
        ("run_dir", params.get("run_dir", "?")),
        ("seed", params.get("seed", "?")),
        ("params that differ from the defaults", ", ".join(f"`{k}: {v}`" for k, v in changed.items()) or "none"),
        (
            "dataset",
            f"{dataset.get('root', '?')} (hash `{str(dataset.get('hash', '?'))[:16]}`, "
            f"{dataset.get('hash_method', '')})",
        ),
        (
            "code version",
            f"tfg_mm {code.get('package', '?')}, commit `{code.get('git_commit') or 'none'}`"
            f"{' (dirty)' if code.get('git_dirty') else ''}, sources "
            f"`{str(code.get('source_sha256', '?'))[:16]}`",
        ),
    ]
    env = metrics.get("environment")
    if isinstance(env, Mapping):
        rows.append(("environment", environment_summary(env)))
    if model:
        skip = ("corrections", "pretrained")
        rows.append(("detector", ", ".join(f"{k}: {v}" for k, v in model.items() if k not in skip)))
    loaded = model.get("pretrained") if isinstance(model, Mapping) else None
    if isinstance(loaded, Mapping):
        rows.append(("initial weights", _pretrained_summary(loaded)))
    if text:
        rows.append(("text encoder", ", ".join(f"{k}: {v}" for k, v in text.items() if k != "prompts")))
    mode = contract_field(metrics, "detector_mode") or (params.get("detector_mode") if text else None)
    if mode:
        rows.append(("detector mode", mode))
    if isinstance(baseline, Mapping) and baseline.get("checkpoint"):
        rows.append(("baseline checkpoint", baseline["checkpoint"]))
    final = metrics.get("final") or {}
    if final:
        rows.append(
            (
                "selected checkpoint",
                f"epoch {final.get('epoch', '?')} by {final.get('selected_by', '?')} ({final.get('checkpoint', '?')})",
            )
        )
    lines = ["| | |", "|---|---|"] + [f"| **{cell(k)}** | {cell(v)} |" for k, v in rows]
    return "\n".join(lines)


def _pretrained_summary(table: Mapping[str, Any]) -> str:
    """One line of ``model.pretrained`` (:func:`tfg_mm.pretrained.load_pretrained`'s table) for the run card."""
    reinit = len(table.get("reinitialised") or [])
    return (
        f"{table.get('source', '?')} ({table.get('kind', '?')}, {table.get('source_classes', '?')} classes -> "
        f"{table.get('classes', '?')}): {table.get('loaded', '?')} tensors loaded, {reinit} re-initialised"
        f"{' (the class heads)' if reinit else ''}, {len(table.get('dropped') or [])} dropped"
    )


def _status_text(metrics: Mapping[str, Any]) -> str:
    """``finished``; otherwise a visible marker: a failed run names its error, epoch, step and traceback."""
    status = str(metrics.get("status", "?"))
    if status == "finished":
        return status
    failure = metrics.get("failure")
    if status == "failed" and isinstance(failure, Mapping):
        where = ", ".join(f"{k} {failure[k]}" for k in ("stage", "epoch", "step") if failure.get(k) is not None)
        message = str(failure.get("message", "")).splitlines()[0][:300] if failure.get("message") else ""
        return (
            f"**FAILED** ({where}): {failure.get('type', '?')}: {message} "
            f"(traceback: {failure.get('traceback', '?')} in the run folder); its numbers are not a result"
        )
    return f"**{status.upper()}**: not finished; its numbers are not a result"


def show_provenance(metrics: Mapping[str, Any]) -> None:
    """Display :func:`provenance_markdown` in the notebook (every number says where it came from)."""
    display(Markdown(provenance_markdown(metrics)))


def _shade_stages(ax: plt.Axes, history: pd.DataFrame) -> None:
    """Shade contiguous runs of the same ``stage`` (phase 2: A = fusion only, B = detector unfrozen)."""
    if "stage" not in history or history["stage"].isna().all():
        return
    colors = {"A": "#dfe9f5", "B": "#f5e9df"}
    epochs, stages = history["epoch"].tolist(), history["stage"].tolist()
    start = 0
    for i in range(1, len(epochs) + 1):
        if i == len(epochs) or stages[i] != stages[start]:
            lo = epochs[start] - 0.5
            hi = epochs[i - 1] + 0.5
            ax.axvspan(lo, hi, color=colors.get(stages[start], "#eeeeee"), alpha=0.6, lw=0, zorder=0)
            ax.text(
                (lo + hi) / 2,
                1.0,
                f"stage {stages[start]}",
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=8,
                color="#555555",
            )
            start = i


def plot_trajectory(
    metrics: Mapping[str, Any], baseline: Mapping[str, Any] | None = None, save: str | None = None
) -> plt.Figure:
    """mAP and mAP50 per evaluated epoch; the baseline's final values as dashed lines; stage shading.

    ``baseline`` is a baseline contract or its ``final`` dict; by default the baseline recorded in
    a phase-2 contract.
    """
    history = _history_frame(metrics)
    base = _as_final(baseline) if baseline is not None else baseline_final_of(metrics)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
    for ax, key, label in zip(axes, ("map", "map50"), ("mAP@[.50:.95]", "mAP@.50")):
        if not history.empty:
            _shade_stages(ax, history)
            ax.plot(history["epoch"], history[key], marker="o", color="#1f77b4", label="this run")
        if base and base.get(key) is not None:
            ax.axhline(base[key], ls="--", color="#444444", label=f"baseline {base[key]:.3f}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    return _finish(fig, save)


def _per_class_frame(final: Mapping[str, Any]) -> pd.DataFrame:
    rows = []
    for name, values in (final.get("per_class") or {}).items():
        rows.append({"class": name, "metric": "AP50", "value": _number(values.get("ap50"))})
        rows.append({"class": name, "metric": "AP50:95", "value": _number(values.get("ap"))})
    return pd.DataFrame(rows, columns=["class", "metric", "value"])


def _legend_outside(ax: plt.Axes) -> None:
    """The legend right of the axes, where it cannot cover a bar."""
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), title=None, frameon=False, fontsize=8)


def _highlight_hard(ax: plt.Axes, hard_classes: Sequence[str]) -> None:
    for label in ax.get_xticklabels():
        if label.get_text() in hard_classes:
            label.set_color(_HARD_COLOR)
            label.set_fontweight("bold")


def plot_per_class(
    metrics: Mapping[str, Any], hard_classes: Sequence[str] = HARD_CLASSES, save: str | None = None
) -> plt.Figure:
    """AP50 and AP50:95 per class of the selected checkpoint; hard classes in bold red."""
    frame = _per_class_frame(metrics.get("final") or {})
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * frame["class"].nunique() + 2), 3.6))
    if not frame.empty:
        sns.barplot(frame, x="class", y="value", hue="metric", ax=ax, palette=["#9ecae1", "#3182bd"])
        _legend_outside(ax)
    _highlight_hard(ax, hard_classes)
    ax.set_ylabel("AP")
    ax.set_xlabel("")
    ax.set_ylim(0, 1)
    ax.set_title("Per-class AP (hard classes in red)")
    ax.grid(axis="y", alpha=0.3)
    return _finish(fig, save)


def plot_per_class_delta(
    metrics: Mapping[str, Any],
    baseline_final: Mapping[str, Any] | None,
    hard_classes: Sequence[str] = HARD_CLASSES,
    save: str | None = None,
) -> plt.Figure:
    """Δ AP50 and Δ AP50:95 per class against the baseline (positive = better than the baseline)."""
    base = _as_final(baseline_final) if baseline_final is not None else baseline_final_of(metrics)
    run = _per_class_frame(metrics.get("final") or {})
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * run["class"].nunique() + 2), 3.6))
    if base and not run.empty:
        ref = _per_class_frame(base).set_index(["class", "metric"])["value"]
        run["value"] = [
            v - ref.get((c, m), math.nan) for c, m, v in run[["class", "metric", "value"]].itertuples(index=False)
        ]
        sns.barplot(run, x="class", y="value", hue="metric", ax=ax, palette=["#fdae6b", "#e6550d"])
        _legend_outside(ax)
    else:
        ax.text(0.5, 0.5, "no baseline to compare with", ha="center", va="center", transform=ax.transAxes)
    ax.axhline(0, color="black", lw=0.8)
    _highlight_hard(ax, hard_classes)
    ax.set_ylabel("Δ AP vs baseline")
    ax.set_xlabel("")
    ax.set_title("Per-class change against the baseline (hard classes in red)")
    ax.grid(axis="y", alpha=0.3)
    return _finish(fig, save)


def plot_gate(metrics: Mapping[str, Any], save: str | None = None) -> plt.Figure:
    """α (mean, and each class for a per-class gate), logit scale and bias per epoch.

    Reads the keys of ``ResidualTextFusion.state_summary()`` (``alpha_mean``, ``alpha``,
    ``scale``, ``bias``) from the history; a run without fusion (``text_encoder: none``, a
    baseline) gets a figure that says so.
    """
    history = metrics.get("history", [])
    keys = [k for k in ("alpha_mean", "scale", "bias") if any(h.get(k) is not None for h in history)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3.3), squeeze=False)
    axes = axes[0]
    if not keys:
        axes[0].text(0.5, 0.5, "no fusion gate in this run", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
        return _finish(fig, save)
    epochs = [h["epoch"] for h in history]
    frame = _history_frame(metrics)
    for ax, key in zip(axes, keys):
        _shade_stages(ax, frame)
        values = [_number(h.get(key)) for h in history]
        ax.plot(epochs, values, marker="o", color="black", label="mean" if key == "alpha_mean" else key)
        if key == "alpha_mean" and any(isinstance(h.get("alpha"), list) for h in history):
            per_class = np.array(
                [h["alpha"] if isinstance(h.get("alpha"), list) else [math.nan] for h in history], dtype=object
            )
            names = contract_field(metrics, "classes") or _class_names(metrics)
            width = max(len(row) for row in per_class)
            for c in range(width):
                series = [_number(row[c]) if len(row) > c else math.nan for row in per_class]
                ax.plot(epochs, series, lw=1, alpha=0.7, label=names[c] if c < len(names) else f"class {c}")
            ax.legend(fontsize=7)
        ax.set_title(
            {"alpha_mean": "gate α", "scale": "logit scale", "bias": "bias"}[key], pad=14
        )  # above the stage labels
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return _finish(fig, save)


def _stage_title(stage: str, metrics: Mapping[str, Any]) -> str:
    cached = contract_field(metrics, "cached_warmup_mode")
    if stage == "A":
        return "stage A: fusion only" + (", cached detector outputs (no denoising terms)" if cached else "")
    if stage == "B":
        return "stage B: detector unfrozen (with denoising terms)"
    return f"stage {stage}"


def plot_losses(metrics: Mapping[str, Any], save: str | None = None) -> plt.Figure:
    """Training loss terms per epoch (the ``losses`` dict of each history entry, grouped by kind).

    A phase-2 run gets one panel per stage, each on its own scale: stage A's terms are not those of
    stage B (with ``cache_warmup`` the cached stage has no denoising queries, so its sums hold fewer
    terms), and a line across the stages would show that as a jump in the loss.
    """
    rows = [
        {"epoch": h["epoch"], "stage": h.get("stage") or "", "term": k, "value": _number(v)}
        for h in metrics.get("history", [])
        for k, v in (h.get("losses") or {}).items()
    ]
    frame = pd.DataFrame(rows, columns=["epoch", "stage", "term", "value"])
    stages = list(dict.fromkeys(frame["stage"]))
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(7 if len(stages) <= 1 else 5.5 * len(stages), 3.6))
    axes = np.atleast_1d(axes)
    if frame.empty:
        axes[0].text(
            0.5, 0.5, "no training epochs (evaluation only)", ha="center", va="center", transform=axes[0].transAxes
        )
    palette = dict(zip(sorted(set(frame["term"])), sns.color_palette("tab10", max(1, frame["term"].nunique()))))
    for ax, stage in zip(axes, stages):
        sns.lineplot(
            frame[frame["stage"] == stage], x="epoch", y="value", hue="term", palette=palette, marker="o", ax=ax
        )
        epochs = sorted(set(frame.loc[frame["stage"] == stage, "epoch"]))
        if len(epochs) <= 12:
            ax.set_xticks(epochs)
            ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if stage:
            ax.set_title(_stage_title(stage, metrics), fontsize=9)
        ax.get_legend().remove()
    for ax in axes:
        ax.set_ylabel("training loss (mean per step)")
        ax.grid(alpha=0.3)
    if not frame.empty:
        handles = [plt.Line2D([], [], color=color, marker="o", label=term) for term, color in palette.items()]
        axes[-1].legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if len(stages) > 1:
        why = (
            "the cached stage A has no denoising terms"
            if contract_field(metrics, "cached_warmup_mode")
            else "stage A trains the fusion alone, stage B the detector too"
        )
        fig.text(
            0.5,
            -0.02,
            f"One panel per stage, each on its own scale: {why}, so the values are not comparable across panels.",
            ha="center",
            va="top",
            fontsize=8,
            color="#555555",
            wrap=True,
        )
    return _finish(fig, save)


def final_table(metrics: Mapping[str, Any], baseline_final: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The selected checkpoint's metrics, one row per metric (summary, then AP of each class).

    With ``baseline_final``: columns ``run``, ``baseline`` and ``Δ``. A size row of a validation set
    without objects of that size (COCO's -1, NaN in the contract) says so ("no large objects")
    instead of ``NaN``.
    """

    def rows(final: Mapping[str, Any]) -> dict[str, float]:
        out = {label: _number(final.get(key)) for key, label in _SUMMARY_ROWS}
        for name, values in (final.get("per_class") or {}).items():
            out[f"AP {name}"] = _number(values.get("ap"))
            out[f"AP50 {name}"] = _number(values.get("ap50"))
        return out

    run = rows(metrics.get("final") or {})
    table = pd.DataFrame({"run": run})
    base = _as_final(baseline_final)
    if base:
        table["baseline"] = pd.Series(rows(base))
        table["Δ"] = table["run"] - table["baseline"]
    table.index.name = "metric"
    table = table.round(4).astype(object)
    for label, text in _NO_OBJECTS.items():
        if label in table.index:
            table.loc[label] = [text if pd.isna(v) else v for v in table.loc[label]]
    return table


# --------------------------------------------------------------------------------------------
# Error analysis (tfg_mm.analysis: final.operating_points / final.errors and {run_dir}/analysis.json)
# --------------------------------------------------------------------------------------------
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
    analysis: Mapping[str, Any], hard_classes: Sequence[str] = HARD_CLASSES, save: str | None = None
) -> plt.Figure:
    """Precision against recall per class (COCOeval, 101 recall points): one panel at IoU 0.5, one for the
    mean over IoU 0.50:0.95; legend with each class's AP (the area under its curve); hard classes thick."""
    curves = analysis.get("pr_curves") or {}
    classes = list(analysis.get("classes", []))
    styles = _class_styles(classes, hard_classes)
    recall = curves.get("recall") or []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title, metric in zip(
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
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("precision")
    return _finish(fig, save)


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
    return _finish(fig, save)


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
                label.set_color(_HARD_COLOR)
                label.set_fontweight("bold")
    fig.suptitle("Confusion at each class's operating threshold (IoU 0.5; background: no box, missed: no detection)")
    return _finish(fig, save)


def _errors_frame(errors: Mapping[str, Any]) -> pd.DataFrame:
    rows = [
        {"class": name, "error": _ERROR_LABELS.get(kind, kind), "ΔAP50": _number(value)}
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
        return _finish(fig, save)
    sns.barplot(frame, x="class", y="ΔAP50", hue="error", ax=ax, palette="Set2")
    _highlight_hard(ax, hard_classes)
    ax.set_xlabel("")
    ax.set_ylabel("ΔAP50 when fixed")
    ax.set_title("What each error type costs (TIDE oracle fixes, IoU 0.5 / background 0.1)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _finish(fig, save)


def operating_points_table(metrics: Mapping[str, Any], hard_classes: Sequence[str] = HARD_CLASSES) -> pd.DataFrame:
    """Per class: the F1-maximising score threshold with its precision, recall and F1, and the
    largest error type (``final.operating_points`` / ``final.errors``)."""
    final = metrics.get("final") or {}
    points = final.get("operating_points") or {}
    errors = final.get("errors") or {}
    rows = []
    for name, point in points.items():
        kinds = {k: _number(v) for k, v in (errors.get(name) or {}).items()}
        finite = {k: v for k, v in kinds.items() if math.isfinite(v)}
        top = max(finite, key=finite.get) if finite and max(finite.values()) > 0 else None
        rows.append(
            {
                "class": f"{name} (hard)" if name in hard_classes else name,
                "threshold": _number(point.get("threshold")),
                "precision": _number(point.get("precision")),
                "recall": _number(point.get("recall")),
                "F1": _number(point.get("f1")),
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
    base = _as_final(baseline_final) if baseline_final is not None else baseline_final_of(metrics)
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
        name: [_number((errors.get(c) or {}).get(k)) for c in classes for k in ERROR_TYPES] for name, errors in entries
    }
    table = pd.DataFrame.from_dict(rows, orient="index")
    if table.empty:
        return pd.DataFrame(columns=columns)
    table.columns = columns
    table.index.name = "variant"
    return table.round(3)


# --------------------------------------------------------------------------------------------
# Detection galleries (tfg_mm.galleries: ground truth, detections and matches read from the run's files)
# --------------------------------------------------------------------------------------------
_TP_COLOR, _FP_COLOR, _MISS_COLOR = "#1a9850", "#d73027", "#fd8d3c"
_FP_SHORT = {"duplicate": "dup", "wrong class": "cls", "mislocalised": "loc", "background": "bkg"}


def _legend_handles() -> list:
    return [
        Line2D([], [], color=_TP_COLOR, lw=2, label="true positive (IoU ≥ 0.5 with a box of its class)"),
        Line2D(
            [],
            [],
            color=_FP_COLOR,
            lw=2,
            label="false positive (dup duplicate, cls wrong class, loc mislocalised, bkg background)",
        ),
        Line2D([], [], color=_MISS_COLOR, lw=2, ls="--", label="missed ground-truth box"),
    ]


def _draw_match(ax: plt.Axes, image: Any, match: galleries.ImageMatch, class_of: Mapping[int, str], focus: int) -> None:
    """One image with its outcome: TP green (prediction), FP red, misses orange dashed (ground truth).
    Boxes of the focus class are drawn thicker; labels are class (4 letters), score, FP kind."""
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])

    def box(bbox, color, label, category, ls="-"):
        x, y, w, h = bbox
        thick = category == focus
        ax.add_patch(
            Rectangle((x, y), w, h, fill=False, ec=color, lw=1.6 if thick else 0.8, ls=ls, alpha=1.0 if thick else 0.7)
        )
        ax.text(
            x,
            y - 0.5,
            label,
            color=color,
            fontsize=5,
            va="bottom",
            ha="left",
            clip_on=True,
            bbox={"facecolor": "white", "alpha": 0.6, "pad": 0.2, "lw": 0},
        )

    for gt in match.missed:
        box(gt["bbox"], _MISS_COLOR, class_of[gt["category_id"]][:4], gt["category_id"], ls="--")
    for det, kind in match.fp:
        cat = det["category_id"]
        box(det["bbox"], _FP_COLOR, f"{class_of[cat][:4]} {det['score']:.2f} {_FP_SHORT[kind]}", cat)
    for det, _, _ in match.tp:
        cat = det["category_id"]
        box(det["bbox"], _TP_COLOR, f"{class_of[cat][:4]} {det['score']:.2f}", cat)


def _class_counts(match: galleries.ImageMatch, category_id: int) -> str:
    tp = len(match.found_ids(category_id))
    fp = sum(1 for d, _ in match.fp if d["category_id"] == category_id)
    return f"TP {tp} · FP {fp} · missed {len(match.missed_ids(category_id))}"


def _thresholds_text(view: galleries.RunView, classes: Sequence[str]) -> str:
    values = ", ".join(f"{c} {view.thresholds.by_class[c]:.3f}" for c in classes if c in view.thresholds.by_class)
    return f"score thresholds ({values}): {view.thresholds.source}"


def _pair_thresholds_text(base: galleries.RunView, phase2: galleries.RunView, name: str) -> str:
    """Both runs' thresholds of ``name``, their source said once when it is the same."""
    values = f"baseline {base.thresholds.by_class[name]:.3f}, phase 2 {phase2.thresholds.by_class[name]:.3f}"
    if base.thresholds.source == phase2.thresholds.source:
        return f"score thresholds of {name}: {values} ({base.thresholds.source})"
    return (
        f"score thresholds of {name}: {values} (baseline: {base.thresholds.source}; phase 2: "
        f"{phase2.thresholds.source})"
    )


def _hard_present(view: galleries.RunView, hard_classes: Sequence[str]) -> tuple[list[str], list[str]]:
    present = [c for c in hard_classes if c in view.cat_of and galleries.images_with(view.gt, view.cat_of[c])]
    return present, [c for c in hard_classes if c not in present]


def _images(views: Sequence[galleries.RunView]):
    cache: dict[int, Any] = {}

    def get(image_id: int):
        if image_id not in cache:
            cache[image_id] = views[0].image(image_id)
        return cache[image_id]

    return get


def _panel_grid(
    rows: int, cols: int, top_in: float, legend_rows: int, pair_gap_after: Sequence[int] = (), panel: float = 2.3
) -> tuple[plt.Figure, np.ndarray]:
    """A figure of ``rows`` x ``cols`` square image panels placed in inches (room for each panel's title,
    a left label, the figure title ``top_in`` and the legend), so no layout engine squeezes the images."""
    left, gap, pair_gap, title, vgap = 0.35, 0.15, 0.55, 0.3, 0.1
    bottom = 0.25 + 0.17 * legend_rows
    xs = [left + c * (panel + gap) + pair_gap * sum(1 for a in pair_gap_after if c > a) for c in range(cols)]
    width = xs[-1] + panel + 0.1
    height = top_in + rows * (title + panel) + (rows - 1) * vgap + bottom
    fig = plt.figure(figsize=(width, height))
    axes = np.empty((rows, cols), dtype=object)
    for r in range(rows):
        y = height - (top_in + r * (title + panel + vgap) + title + panel)
        for c in range(cols):
            axes[r, c] = fig.add_axes((xs[c] / width, y / height, panel / width, panel / height))
    return fig, axes


def _frame(fig: plt.Figure, title: str, legend_rows: int) -> None:
    """Title on top, the colour legend at the bottom (``legend_rows`` lines)."""
    height = fig.get_figheight()
    fig.suptitle(title, fontsize=10, y=1 - 0.08 / height, va="top")
    fig.legend(
        handles=_legend_handles(),
        loc="lower center",
        bbox_to_anchor=(0.5, 0.02 / height),
        ncol=3 if legend_rows == 1 else 1,
        fontsize=7,
        frameon=False,
    )


def _show(fig: plt.Figure, save: str | None, caption: str, written: list[str]) -> None:
    """Save (PNG + SVG), then show the saved PNG itself (no second rendering), and the caption."""
    if save:
        paths = save_figure(fig, save)
        written.extend(str(p) for p in paths)
        display(DisplayImage(data=paths[0].read_bytes(), format="png", width=round(fig.get_figwidth() * 100)))
    else:
        display(fig)
    plt.close(fig)
    display(Markdown(caption))


def show_galleries(
    metrics: Mapping[str, Any],
    hard_classes: Sequence[str] = HARD_CLASSES,
    n_images: int = 6,
    save: str | None = "01_baseline_gallery",
) -> dict:
    """Notebook 01: for each hard class, ``n_images`` validation images holding it (most errors on that
    class first), with the run's true positives, false positives and misses at its score thresholds.

    Reads the run's ``val_json``, images and ``detections_val.json`` (:func:`tfg_mm.galleries.load_run`).
    Displays the figure (PNG + SVG as ``<save>``) and its caption; returns ``{"thresholds",
    "threshold_source", "classes": {class: {"images", "tp", "fp", "missed"}}, "missing_classes", "figures"}``
    (counts over the whole split, at the thresholds).
    """
    view = galleries.load_run(metrics, "run")
    classes, missing = _hard_present(view, hard_classes)
    image = _images([view])
    out: dict[str, Any] = {
        "thresholds": dict(view.thresholds.by_class),
        "threshold_source": view.thresholds.source,
        "classes": {},
        "missing_classes": missing,
        "figures": [],
    }
    chosen = {name: galleries.gallery_images([view], view.cat_of[name], n_images) for name in classes}
    cols = max([1, *(len(ids) for ids in chosen.values())])
    fig, axes = _panel_grid(max(1, len(classes)), cols, top_in=0.45, legend_rows=1)
    for r, name in enumerate(classes):
        cat = view.cat_of[name]
        ids = chosen[name]
        matches = view.matches.values()
        out["classes"][name] = {
            "images": ids,
            "tp": sum(len(m.found_ids(cat)) for m in matches),
            "fp": sum(1 for m in matches for d, _ in m.fp if d["category_id"] == cat),
            "missed": sum(len(m.missed_ids(cat)) for m in matches),
        }
        for c in range(cols):
            ax = axes[r, c]
            if c >= len(ids):
                ax.set_axis_off()
                continue
            _draw_match(ax, image(ids[c]), view.matches[ids[c]], view.class_of, cat)
            ax.set_title(f"#{ids[c]}: {_class_counts(view.matches[ids[c]], cat)}", fontsize=7)
        axes[r, 0].set_ylabel(name, fontsize=10, color=_HARD_COLOR, fontweight="bold")
    if not classes:
        axes[0, 0].text(0, 0.5, f"no validation image holds {', '.join(hard_classes)}", transform=axes[0, 0].transAxes)
        for ax in axes.ravel():
            ax.set_axis_off()
    _frame(fig, "Validation images with the hard classes, most errors on the class first", legend_rows=1)
    caption = (
        f"*Green: true positive; red: false positive; orange dashed: missed ground truth; boxes of the row's "
        f"class thicker. Matching at IoU 0.5; {_thresholds_text(view, classes)}.*"
        + (f" Not in this validation split: {', '.join(missing)}." if missing else "")
    )
    _show(fig, save, caption, out["figures"])
    return out


def _pair_axes(ax_a, ax_b, image, views, image_id, cat) -> None:
    for ax, view in zip((ax_a, ax_b), views):
        _draw_match(ax, image, view.matches[image_id], view.class_of, cat)
        ax.set_title(f"{view.name} #{image_id}: {_class_counts(view.matches[image_id], cat)}", fontsize=7)


def _views_of(phase2_metrics: Mapping[str, Any], baseline_metrics: Mapping[str, Any] | None):
    if baseline_metrics is None:
        baseline_dir = (phase2_metrics.get("params") or {}).get("baseline")
        baseline_metrics = read_metrics(baseline_dir)  # a checkpoint folder: ConfigError naming it
    base = galleries.load_run(baseline_metrics, "baseline")
    phase2 = galleries.load_run(phase2_metrics, "phase 2")
    if [im["id"] for im in base.gt["images"]] != [im["id"] for im in phase2.gt["images"]]:
        raise DataError(
            "show_side_by_side: the baseline and the phase-2 run were evaluated on different validation "
            "images (their `dataset.val_json` differ). Fix: compare runs of the same dataset."
        )
    return base, phase2


def flips_summary(
    phase2_metrics: Mapping[str, Any],
    baseline_metrics: Mapping[str, Any] | None = None,
    hard_classes: Sequence[str] = HARD_CLASSES,
) -> dict:
    """What phase 2 changed on each hard class, without drawing (for the index): ground-truth boxes the
    baseline missed and phase 2 found (``miss_to_hit``) and the reverse, at each run's thresholds.

    ``baseline_metrics`` defaults to the contract in the phase-2 run's ``baseline`` folder. Returns
    ``{"classes": {class: galleries.flips(...)}, "thresholds": {"baseline", "phase 2"}, "threshold_source":
    {...}, "missing_classes"}``.
    """
    base, phase2 = _views_of(phase2_metrics, baseline_metrics)
    return _flips_of(base, phase2, hard_classes)


def phase2_flips(run_dir: str | Path = "runs/phase2", hard_classes: Sequence[str] = HARD_CLASSES) -> dict | None:
    """:func:`flips_summary` of the finished phase-2 run in ``run_dir`` (against the baseline its contract
    names), or None when that folder holds no finished run (the index then leaves the table out)."""
    if not is_finished(run_dir):
        return None
    return flips_summary(read_metrics(run_dir), hard_classes=hard_classes)


def _flips_of(base, phase2, hard_classes) -> dict:
    classes, missing = _hard_present(base, hard_classes)
    return {
        "classes": {c: galleries.flips(base.matches, phase2.matches, base.cat_of[c]) for c in classes},
        "thresholds": {v.name: dict(v.thresholds.by_class) for v in (base, phase2)},
        "threshold_source": {v.name: v.thresholds.source for v in (base, phase2)},
        "missing_classes": missing,
    }


def _flips_figure(name: str, flip: Mapping[str, Any], views, image, cat: int, n_flips: int) -> plt.Figure | None:
    """Miss → hit pairs (left) and hit → miss pairs (right), ``n_flips`` each, the largest changes first
    (None when no box flipped)."""
    title = (
        f"{name}: boxes phase 2 found and the baseline missed ({flip['miss_to_hit']}), and the reverse "
        f"({flip['hit_to_miss']}); largest changes first"
    )
    fixed, broken = flip["images_miss_to_hit"][:n_flips], flip["images_hit_to_miss"][:n_flips]
    if not fixed and not broken:
        return None
    rows = max(len(fixed), len(broken))
    fig, axes = _panel_grid(rows, 4, top_in=0.8, legend_rows=1, pair_gap_after=(1,))
    headers = []
    for col, shown, total, images_total, label in (
        (0, fixed, flip["miss_to_hit"], len(flip["images_miss_to_hit"]), "miss → hit"),
        (2, broken, flip["hit_to_miss"], len(flip["images_hit_to_miss"]), "hit → miss"),
    ):
        for r in range(rows):
            if r < len(shown):
                image_id, n = shown[r]
                _pair_axes(axes[r, col], axes[r, col + 1], image(image_id), views, image_id, cat)
                axes[r, col].set_ylabel(f"{n} box{'es' if n > 1 else ''} {label}", fontsize=8)
            else:
                axes[r, col].set_axis_off()
                axes[r, col + 1].set_axis_off()
        if not shown:
            axes[0, col].text(1.1, 0.5, f"no box {label}", ha="center", va="center", transform=axes[0, col].transAxes)
        plural = ("es" if total != 1 else "", "s" if images_total != 1 else "")
        headers.append((col, f"{label}: {total} box{plural[0]} in {images_total} image{plural[1]}"))
    _frame(fig, title, legend_rows=1)
    for col, text in headers:
        left, right = axes[0, col].get_position(), axes[0, col + 1].get_position()
        y = max(left.y1, right.y1) + 0.32 / fig.get_figheight()
        fig.text((left.x0 + right.x1) / 2, y, text, ha="center", va="bottom", fontsize=9, fontweight="bold")
    return fig


def show_side_by_side(
    phase2_metrics: Mapping[str, Any],
    baseline_metrics: Mapping[str, Any] | None = None,
    hard_classes: Sequence[str] = HARD_CLASSES,
    n_images: int = 4,
    n_flips: int = 3,
    save: str | None = "02_phase2",
) -> dict:
    """Notebook 02: per hard class, the baseline and phase 2 on the same validation images (most errors
    of the two first), then the flips: images where phase 2 found a box of the class the baseline missed
    (miss → hit) and the reverse, the largest changes first, both counted in the title.

    ``baseline_metrics`` defaults to the contract in the phase-2 run's ``baseline`` folder. Figures
    (PNG + SVG): ``<save>_side_by_side_<class>`` and ``<save>_flips_<class>`` (when a box flipped). Returns
    :func:`flips_summary`'s dict plus ``"images"`` (class -> side-by-side image ids) and ``"figures"``.
    """
    base, phase2 = _views_of(phase2_metrics, baseline_metrics)
    views = (base, phase2)
    out = _flips_of(base, phase2, hard_classes)
    out.update({"images": {}, "figures": []})
    image = _images(views)
    legend = (
        "Green: true positive; red: false positive; orange dashed: missed ground truth; boxes of the class "
        "thicker. Matching at IoU 0.5; each model at its own "
    )
    for name in out["classes"]:
        cat = base.cat_of[name]
        ids = galleries.gallery_images(views, cat, n_images)
        out["images"][name] = ids
        fig, axes = _panel_grid(max(1, len(ids)), 2, top_in=0.45, legend_rows=3)
        for r, image_id in enumerate(ids):
            _pair_axes(axes[r, 0], axes[r, 1], image(image_id), views, image_id, cat)
        _frame(fig, f"{name}: baseline (left) and phase 2 (right) on the same images", legend_rows=3)
        caption = f"*{legend}{_pair_thresholds_text(base, phase2, name)}.*"
        _show(fig, f"{save}_side_by_side_{name}" if save else None, caption, out["figures"])

        fig = _flips_figure(name, out["classes"][name], views, image, cat, n_flips)
        if fig is None:
            display(
                Markdown(f"**{name}**: no box flipped between the baseline and phase 2 (0 miss → hit, 0 hit → miss).")
            )
            continue
        caption = f"*Each pair: baseline (left), phase 2 (right). {legend}{_pair_thresholds_text(base, phase2, name)}.*"
        _show(fig, f"{save}_flips_{name}" if save else None, caption, out["figures"])
    if out["missing_classes"]:
        display(Markdown(f"*Not in this validation split: {', '.join(out['missing_classes'])}.*"))
    return out


# --------------------------------------------------------------------------------------------
# Ablation figures and table (from tfg_mm.ablations.summarize)
# --------------------------------------------------------------------------------------------
def _fmt_interval(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("delta") is None:
        return ""
    return f"{entry['delta']:+.4f} [{entry['lo']:+.4f}, {entry['hi']:+.4f}]"


def _fmt_mean_sd(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("mean") is None:
        return ""
    return f"{entry['mean']:.4f} ± {entry['sd']:.4f}" if entry.get("n", 1) > 1 else f"{entry['mean']:.4f}"


def ablation_table(summary: Mapping[str, Any]) -> pd.DataFrame:
    """The thesis table: one row per variant (baseline first).

    Columns: status, seeds, mAP / mAP50 / hard-class AP as mean ± sd over seeds, ΔmAP and Δ of each
    hard class's AP with the (hierarchical, with several seeds) paired-bootstrap interval, the
    verdict (improves / worse / within noise: an interval that contains 0), and what the interval
    covers in words (with one seed: validation images only, training noise not included).
    """
    hard = list(summary.get("hard_classes", []))
    level = summary.get("confidence", 0.95)
    ci = f"{round(100 * level)}% CI"
    rows = []
    base = summary.get("baseline") or {}
    if base.get("final"):
        row = {
            "variant": "baseline",
            "status": "reference",
            "seeds": "",
            "mAP": f"{base['final']['map']:.4f}",
            "mAP50": f"{base['final']['map50']:.4f}",
        }
        for name in hard:
            row[f"AP {name}"] = f"{_number(base['final']['per_class'].get(name, {}).get('ap')):.4f}"
        spread = summary.get("baseline_seeds") or {}
        stats = spread.get("stats") or {}
        if stats.get("map", {}).get("n", 1) > 1:  # several baseline seeds: mean ± sd like the variants
            row["seeds"] = ", ".join(str(r["seed"]) for r in spread["runs"] if r.get("status") == "finished")
            row["mAP"], row["mAP50"] = _fmt_mean_sd(stats.get("map")), _fmt_mean_sd(stats.get("map50"))
            for name in hard:
                row[f"AP {name}"] = _fmt_mean_sd(stats.get(f"ap:{name}"))
        rows.append(row)
    for variant in summary.get("variants", []):
        row = {
            "variant": variant["name"],
            "status": variant["status"],
            "seeds": ", ".join(str(s) for s in variant.get("seeds_finished", [])),
        }
        stats = variant.get("stats", {})
        row["mAP"] = _fmt_mean_sd(stats.get("map"))
        row["mAP50"] = _fmt_mean_sd(stats.get("map50"))
        for name in hard:
            row[f"AP {name}"] = _fmt_mean_sd(stats.get(f"ap:{name}"))
        delta = variant.get("delta") or {}
        row[f"ΔmAP [{ci}]"] = _fmt_interval(delta.get("map"))
        row["verdict"] = (delta.get("map") or {}).get("verdict", "")
        row["interval covers"] = (delta.get("map") or {}).get("covers", "")
        for name in hard:
            entry = (delta.get("per_class") or {}).get(name)
            row[f"ΔAP {name} [{ci}]"] = _fmt_interval(entry)
            row[f"verdict {name}"] = (entry or {}).get("verdict", "")
        if variant.get("errors"):
            first = variant["errors"][0]
            row["verdict"] = row["verdict"] or portable_text(f"failed: {first.get('error', '')}")[:160]
        rows.append(row)
    return pd.DataFrame(rows).fillna("")


def baseline_spread_table(summary: Mapping[str, Any]) -> pd.DataFrame:
    """The baseline's seed spread: one row per metric (mAP, mAP50, AP of each class), its mean ± sd
    over the baseline's training seeds and the value of each seed (``summary["baseline_seeds"]``)."""
    spread = summary.get("baseline_seeds") or {}
    finished = [r for r in spread.get("runs", []) if r.get("status") == "finished"]
    rows = []
    for key, stats in (spread.get("stats") or {}).items():
        label = {"map": "mAP", "map50": "mAP50"}.get(key, f"AP {key.removeprefix('ap:')}")
        row = {"metric": label, "mean ± sd": f"{stats['mean']:.4f} ± {stats['sd']:.4f}", "seeds": stats["n"]}
        for run in finished:
            value = run["per_class"].get(key.removeprefix("ap:")) if key.startswith("ap:") else run.get(key)
            row[f"seed {run['seed']}"] = "" if value is None else f"{_number(value):.4f}"
        rows.append(row)
    return pd.DataFrame(rows)


def _variant_runs(summary: Mapping[str, Any]):
    for variant in summary.get("variants", []):
        for run in variant.get("runs", []):
            if run.get("history"):
                yield variant["name"], run


def plot_ablation_trajectories(summary: Mapping[str, Any], save: str | None = None) -> plt.Figure:
    """mAP per epoch of every variant (one line per seed) overlaid on the baseline's final mAP."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    palette = dict(
        zip(
            [v["name"] for v in summary.get("variants", [])],
            sns.color_palette("tab20", max(1, len(summary.get("variants", [])))),
        )
    )
    labelled = set()
    for name, run in _variant_runs(summary):
        epochs = [h["epoch"] for h in run["history"]]
        values = [_number(h.get("map")) for h in run["history"]]
        ax.plot(epochs, values, marker=".", color=palette[name], alpha=0.85, label=None if name in labelled else name)
        labelled.add(name)
    base = (summary.get("baseline") or {}).get("final")
    if base:
        ax.axhline(base["map"], ls="--", color="black", lw=1.5, label=f"baseline {base['map']:.3f}")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation mAP@[.50:.95]")
    ax.set_title("Trajectories of every variant against the baseline")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _finish(fig, save)


def plot_delta_heatmap(summary: Mapping[str, Any], save: str | None = None) -> plt.Figure:
    """Per-class Δ AP50:95 (mean over seeds, selected checkpoint vs baseline): variants × classes."""
    rows = {v["name"]: v["per_class_delta"] for v in summary.get("variants", []) if v.get("per_class_delta")}
    frame = pd.DataFrame(rows).T
    fig, ax = plt.subplots(figsize=(1.2 * max(3, frame.shape[1]) + 3, 0.45 * max(2, frame.shape[0]) + 1.5))
    if frame.empty:
        ax.text(0.5, 0.5, "no finished variant", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _finish(fig, save)
    frame = frame.astype(float)
    bound = float(np.nanmax(np.abs(frame.to_numpy()))) if np.isfinite(frame.to_numpy()).any() else 1.0
    sns.heatmap(
        frame,
        annot=True,
        fmt="+.3f",
        cmap="RdBu",
        center=0.0,
        vmin=-bound or -1,
        vmax=bound or 1,
        ax=ax,
        cbar_kws={"label": "Δ AP50:95 vs baseline"},
    )
    for label in ax.get_xticklabels():
        if label.get_text() in summary.get("hard_classes", []):
            label.set_color(_HARD_COLOR)
            label.set_fontweight("bold")
    ax.set_title("Per-class change against the baseline (mean over seeds)")
    return _finish(fig, save)


def plot_ablation_gates(summary: Mapping[str, Any], save: str | None = None) -> plt.Figure:
    """Mean gate α per epoch of every variant with a fusion (one line per seed)."""
    fig, ax = plt.subplots(figsize=(9, 4))
    any_gate = False
    labelled = set()
    for name, run in _variant_runs(summary):
        points = [(h["epoch"], h["alpha_mean"]) for h in run["history"] if h.get("alpha_mean") is not None]
        if points:
            any_gate = True
            ax.plot(*zip(*points), marker=".", label=None if name in labelled else name)
            labelled.add(name)
    if any_gate:
        ax.axhline(0, color="black", lw=0.8)
        ax.legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.text(0.5, 0.5, "no variant with a fusion gate", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("gate α (mean over classes)")
    ax.set_title("α trajectories")
    ax.grid(alpha=0.3)
    return _finish(fig, save)


def _wise_band(points: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]] | None:
    """The interval of every point (``{key}_lo`` / ``{key}_hi``, or ``{key}_interval: {lo, hi}``), else None."""
    lo, hi = [], []
    for point in points:
        interval = point.get(f"{key}_interval") if isinstance(point.get(f"{key}_interval"), Mapping) else {}
        low = _number(point.get(f"{key}_lo", interval.get("lo")))
        high = _number(point.get(f"{key}_hi", interval.get("hi")))
        if not (math.isfinite(low) and math.isfinite(high)):
            return None
        lo.append(low)
        hi.append(high)
    return lo, hi


def plot_wise_curve(summary: Mapping[str, Any], save: str | None = None) -> plt.Figure:
    """WiSE-FT: mAP and mAP50 of θ = (1−λ)·θ_baseline + λ·θ_finetuned against λ (one line per seed).

    One panel per metric, each scaled to its own data (a curve that moves by 0.003 is not flattened
    by the other metric's range). A point with a bootstrap interval (``map_lo`` / ``map_hi``, or
    ``map_interval: {lo, hi}``; the same for ``map50``) gets it as a band; without one the figure
    says that the points are single evaluations.
    """
    wise = summary.get("wise") or {}
    curves = wise.get("curves", [])
    metrics_shown = (("map", "mAP@[.50:.95]", "o"), ("map50", "mAP@.50", "s"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    if not curves:
        for ax in axes[1:]:
            ax.remove()
        axes[0].text(
            0.5,
            0.5,
            wise.get("note", "no WiSE-FT curve in this grid"),
            ha="center",
            va="center",
            transform=axes[0].transAxes,
            wrap=True,
        )
        axes[0].set_axis_off()
        return _finish(fig, save)
    colors = sns.color_palette("tab10", max(1, len(curves)))
    any_band = False
    for ax, (key, label, marker) in zip(axes, metrics_shown):
        for color, curve in zip(colors, curves):
            points = sorted(curve["points"], key=lambda p: p["lambda"])
            lambdas = [p["lambda"] for p in points]
            ax.plot(
                lambdas,
                [_number(p.get(key)) for p in points],
                marker=marker,
                color=color,
                label=f"seed {curve['seed']}",
            )
            band = _wise_band(points, key)
            if band is not None:
                any_band = True
                ax.fill_between(lambdas, *band, color=color, alpha=0.2, lw=0)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel("λ (0 = baseline, 1 = fine-tuned)")
        ax.set_ylabel(f"validation {label}")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    level = summary.get("confidence", 0.95)
    fig.suptitle(f"WiSE-FT interpolation: {wise.get('variant', '')}", fontsize=11)
    fig.text(
        0.5,
        -0.02,
        f"Bands: paired-bootstrap {round(100 * level)}% interval over validation images."
        if any_band
        else "No bootstrap interval for these points: each is one evaluation of the interpolated weights "
        "on the validation set. Each panel is scaled to its own data.",
        ha="center",
        va="top",
        fontsize=8,
        color="#555555",
    )
    return _finish(fig, save)


# --------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.5rem 0; } figcaption { font-size: 0.9rem; color: #555; }
img { max-width: 100%; }
.note { color: #555; font-size: 0.9rem; }
"""


def _embedded_png(fig: plt.Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _report_links(reports_dir: Path, summary: Mapping[str, Any] | None) -> str:
    items = []
    for stem, title in NOTEBOOK_REPORTS:
        path = reports_dir / f"{stem}.html"
        if path.exists() or stem == "03_ablations":  # notebook 03 renders itself right after building the index
            items.append(f'<li><a href="{stem}.html">{html.escape(stem)}</a>: {html.escape(title)}</li>')
        else:
            items.append(f"<li>{html.escape(stem)}: {html.escape(title)} <em>(not rendered yet)</em></li>")
    known = {f"{stem}.html" for stem, _ in NOTEBOOK_REPORTS} | {"index.html"}
    for path in sorted(reports_dir.glob("*.html")):
        if path.name not in known:
            items.append(f'<li><a href="{path.name}">{html.escape(path.stem)}</a></li>')
    runs = []
    for variant in (summary or {}).get("variants", []):
        for run in variant.get("runs", []):
            report = run.get("report")
            if report and Path(report).exists():
                rel = os.path.relpath(report, reports_dir)
                runs.append(
                    f'<li><a href="{html.escape(rel)}">{html.escape(variant["name"])} · seed {run["seed"]}'
                    f"</a> ({html.escape(run['status'])})</li>"
                )
    out = "<h2>Reports</h2><ul>" + "".join(items) + "</ul>"
    if runs:
        out += "<h3>Every ablation run (executed notebook 02)</h3><ul>" + "".join(runs) + "</ul>"
    return out


def _error_table_section(summary: Mapping[str, Any], reports_dir: Path) -> str:
    """The index's per-class error table (:func:`error_table`, hard classes), also written as CSV."""
    table = error_table(summary)
    if table.empty:
        return (
            "<h3>Errors per class</h3><p class='note'>No error analysis recorded in these runs "
            "(run contracts before schema version 3).</p>"
        )
    atomic_write_text(reports_dir / "ablations_errors.csv", table.to_csv())
    return (
        "<h3>Errors per class (hard classes)</h3><p class='note'>TIDE error breakdown of the selected "
        "checkpoint: ΔAP50 of each class when all errors of one type are fixed by an oracle (foreground IoU 0.5, "
        "background IoU 0.1; Bolya et al. 2020); variants: mean over finished seeds. cls + loc: wrong class "
        "and poorly localised; missed: boxes no detection came near.</p>"
        + table.to_html(escape=True, border=0, classes="errors", na_rep="")
    )


def _flips_html(flips: Mapping[str, Any]) -> str:
    """The index's flips table (:func:`flips_summary` / :func:`show_side_by_side` of the phase-2 run)."""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{f['miss_to_hit']} ({len(f['images_miss_to_hit'])} images)</td>"
        f"<td>{f['hit_to_miss']} ({len(f['images_hit_to_miss'])} images)</td>"
        f"<td>{f['miss_to_hit'] - f['hit_to_miss']:+d}</td></tr>"
        for name, f in (flips.get("classes") or {}).items()
    )
    by_run = flips.get("threshold_source") or {}
    distinct = set(by_run.values())
    sources = next(iter(distinct)) if len(distinct) == 1 else "; ".join(f"{k}: {v}" for k, v in by_run.items())
    return (
        "<h2>What the text branch changed on the hard classes</h2>"
        "<p class='note'>Validation ground-truth boxes of each hard class that the baseline missed and phase 2 "
        "found (miss → hit), and the reverse, matching at IoU 0.5 with each model at its own score thresholds "
        f"({html.escape(sources)}). The images are in the phase-2 report.</p>"
        "<table><tr><th>class</th><th>boxes miss → hit</th><th>boxes hit → miss</th><th>net</th></tr>"
        f"{rows}</table>"
    )


def build_index(
    summary: Mapping[str, Any] | None = None,
    reports_dir: str | Path | None = None,
    flips: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``reports/index.html`` (standalone: CSS inline, figures embedded) and return its path.

    ``summary`` is the ablation summary of :func:`tfg_mm.ablations.summarize` (None when no grid has
    run: the index then only links the reports). ``flips``: :func:`flips_summary` of the pipeline's
    phase-2 run, shown as a small table (left out when None). Its figures are also saved as PNG + SVG under
    ``reports/figures/ablations_*``, and the table as ``reports/ablations_table.csv`` and ``.tex``.
    """
    if isinstance(summary, (str, Path)):
        raise TypeError(
            f"build_index draws an ablation summary, not a folder ({summary}); compute it first: "
            "`reports.build_index(ablations.summarize_if_run(ablations_dir))`"
        )
    reports_dir = Path(reports_dir) if reports_dir is not None else default_reports_dir()
    source = (summary or {}).get("ablations_dir")
    parts = [
        f"<h1>tfg-mm reports</h1><p class='note'>Built {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
        + (f" from <code>{html.escape(portable_text(str(source)))}</code>" if source else "")
        + ".</p>"
    ]
    parts.append(_report_links(reports_dir, summary))
    if flips:
        parts.append(_flips_html(flips))
    if summary:
        table = ablation_table(summary)
        atomic_write_text(reports_dir / "ablations_table.csv", table.to_csv(index=False))
        atomic_write_text(
            reports_dir / "ablations_table.tex",
            table.to_latex(
                index=False,
                escape=True,
                caption="Ablations against the DEIMv2 baseline "
                f"(mean ± sd over seeds; paired bootstrap {summary.get('confidence')} "
                "intervals over validation images, and over training seeds where there are several; "
                "the column `interval covers` says which).",
                label="tab:ablations",
            ),
        )
        parts.append("<h2>Ablations</h2>")
        parts.append(
            f"<p class='note'>Grid <code>{html.escape(portable_text(str(summary.get('grid', ''))))}</code>; "
            f"{html.escape(summary.get('description', ''))}. Values are mean ± sd over seeds; "
            f"Δ is the seed mean of (variant − baseline) with a paired bootstrap "
            f"{round(100 * summary.get('confidence', 0.95))}% interval "
            f"({summary.get('bootstrap_resamples')} resamples); an interval that contains 0 is "
            f"<em>within noise</em>. Baseline: <code>{html.escape(portable_text(str(summary.get('baseline_run', ''))))}"
            f"</code>. {html.escape(summary.get('interval_note', ''))}</p>"
        )
        parts.append(table.to_html(index=False, escape=True, border=0, classes="ablations"))
        parts.append(_error_table_section(summary, reports_dir))
        spread = summary.get("baseline_seeds") or {}
        if spread.get("stats"):
            parts.append("<h3>Baseline seed spread</h3>")
            parts.append(f"<p class='note'>{html.escape(spread.get('note', ''))}</p>")
            parts.append(baseline_spread_table(summary).to_html(index=False, escape=True, border=0))
        figures = (
            (
                "ablations_trajectories",
                plot_ablation_trajectories,
                "mAP trajectories of all variants; dashed: the baseline's final mAP.",
            ),
            ("ablations_per_class_delta", plot_delta_heatmap, "Per-class Δ AP50:95 against the baseline."),
            ("ablations_alpha", plot_ablation_gates, "Gate α trajectories."),
            (
                "ablations_wise",
                plot_wise_curve,
                (summary.get("wise") or {}).get(
                    "note", "WiSE-FT weight interpolation between the baseline and a fine-tuned variant."
                ),
            ),
        )
        for stem, plot, caption in figures:
            fig = plot(summary)
            save_figure(fig, stem, reports_dir / "figures")
            parts.append(
                f'<figure><img alt="{stem}" src="data:image/png;base64,{_embedded_png(fig)}">'
                f"<figcaption>{html.escape(portable_text(caption))}</figcaption></figure>"
            )
            plt.close(fig)
        failed = [(v["name"], e) for v in summary.get("variants", []) for e in v.get("errors", [])]
        if failed:
            rows = "".join(
                f"<tr><td>{html.escape(name)}</td><td>{e.get('seed')}</td><td>{html.escape(str(e.get('cell')))}"
                f"</td><td>{html.escape(portable_text(str(e.get('error'))))}</td></tr>"
                for name, e in failed
            )
            parts.append(
                "<h3>Failed runs</h3><table><tr><th>variant</th><th>seed</th><th>failing cell</th>"
                f"<th>error</th></tr>{rows}</table>"
            )
    else:
        parts.append("<p class='note'>No ablation grid has run yet (notebook 03 / <code>make all</code>).</p>")
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>tfg-mm reports</title>"
        f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    return atomic_write_text(reports_dir / "index.html", page)
