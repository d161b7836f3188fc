"""Thesis-ready figures and tables from run contracts, and the reports index (``reports/index.html``).

Everything here only draws what it is given: run contracts (``metrics.json``, see :mod:`tfg_mm.runs`)
and the ablation summary that :func:`tfg_mm.ablations.summarize` computes from the run folders. It
never loads a checkpoint or runs a model, so a report can always be rebuilt from the run folders
(``python -m tfg_mm report`` summarizes the grid, then calls :func:`build_index`).

* Notebook helpers (notebooks 01 / 02): :func:`show_provenance`, :func:`plot_trajectory`,
  :func:`plot_per_class`, :func:`plot_per_class_delta`, :func:`plot_gate`, :func:`plot_losses`,
  :func:`final_table`. Each plot returns its figure and, given ``save="stem"``, also writes
  ``reports/figures/<stem>.png`` and ``.svg`` (PNG for the HTML, SVG for the thesis).
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
from IPython.display import Markdown, display
from matplotlib.ticker import MaxNLocator

from tfg_mm.config import Params, portable_text
from tfg_mm.data.synthetic import HARD_CLASSES
from tfg_mm.figures import default_reports_dir, save_figure
from tfg_mm.io import atomic_write_text

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
        rows.append(("detector", ", ".join(f"{k}: {v}" for k, v in model.items() if k != "corrections")))
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
        ax.set_title({"alpha_mean": "gate α", "scale": "logit scale", "bias": "bias"}[key])
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return _finish(fig, save)


def plot_losses(metrics: Mapping[str, Any], save: str | None = None) -> plt.Figure:
    """Training loss terms per epoch (the ``losses`` dict of each history entry, grouped by kind)."""
    rows = [
        {"epoch": h["epoch"], "term": k, "value": _number(v)}
        for h in metrics.get("history", [])
        for k, v in (h.get("losses") or {}).items()
    ]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if rows:
        sns.lineplot(pd.DataFrame(rows), x="epoch", y="value", hue="term", marker="o", ax=ax)
        ax.legend(fontsize=8, ncol=2)
    else:
        ax.text(0.5, 0.5, "no training epochs (evaluation only)", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("training loss (mean per step)")
    ax.grid(alpha=0.3)
    return _finish(fig, save)


def final_table(metrics: Mapping[str, Any], baseline_final: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The selected checkpoint's metrics, one row per metric (summary, then AP of each class).

    With ``baseline_final``: columns ``run``, ``baseline`` and ``Δ``.
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
    return table.round(4)


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
            row["verdict"] = row["verdict"] or f"failed: {first.get('error', '')}"[:160]
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


def plot_wise_curve(summary: Mapping[str, Any], save: str | None = None) -> plt.Figure:
    """WiSE-FT: mAP / mAP50 of θ = (1−λ)·θ_baseline + λ·θ_finetuned against λ (one line per seed)."""
    wise = summary.get("wise") or {}
    fig, ax = plt.subplots(figsize=(6, 3.8))
    curves = wise.get("curves", [])
    for curve in curves:
        lambdas = [p["lambda"] for p in curve["points"]]
        ax.plot(lambdas, [p["map"] for p in curve["points"]], marker="o", label=f"mAP (seed {curve['seed']})")
        ax.plot(
            lambdas, [p["map50"] for p in curve["points"]], marker="s", ls=":", label=f"mAP50 (seed {curve['seed']})"
        )
    if not curves:
        ax.text(
            0.5,
            0.5,
            wise.get("note", "no WiSE-FT curve in this grid"),
            ha="center",
            va="center",
            transform=ax.transAxes,
            wrap=True,
        )
    ax.set_xlabel("λ (0 = baseline, 1 = fine-tuned)")
    ax.set_ylabel("validation AP")
    ax.set_title(f"WiSE-FT interpolation: {wise.get('variant', '')}")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
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


def build_index(summary: Mapping[str, Any] | None = None, reports_dir: str | Path | None = None) -> Path:
    """Write ``reports/index.html`` (standalone: CSS inline, figures embedded) and return its path.

    ``summary`` is the ablation summary of :func:`tfg_mm.ablations.summarize` (None when no grid has
    run: the index then only links the reports). Its figures are also saved as PNG + SVG under
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
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
            plt.close(fig)
        failed = [(v["name"], e) for v in summary.get("variants", []) for e in v.get("errors", [])]
        if failed:
            rows = "".join(
                f"<tr><td>{html.escape(name)}</td><td>{e.get('seed')}</td><td>{html.escape(str(e.get('cell')))}"
                f"</td><td>{html.escape(str(e.get('error')))}</td></tr>"
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
