"""Training curves of one run (notebooks 01 / 02): the mAP trajectory (phase-2 stages shaded), per-class AP
and its change against the baseline, the fusion's gate / scale / bias, and the loss terms. Each plot returns its
figure and, given ``save="stem"``, also writes ``<figures>/<stem>.png`` and ``.svg``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from tfg_mm.data.synthetic import HARD_CLASSES
from tfg_mm.reporting.figures import finish, highlight_hard, legend_outside
from tfg_mm.reporting.provenance import (
    as_final,
    baseline_final_of,
    contract_field,
    history_frame,
    number,
    run_class_names,
)


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
    """Validation mAP and mAP50 per evaluated epoch, a star on the selected epoch (the rule that chose it in the
    title), the baseline's final values as dashed lines, stage shading.

    ``baseline`` is a baseline contract or its ``final`` dict; by default the baseline recorded in
    a phase-2 contract.
    """
    history = history_frame(metrics)
    base = as_final(baseline) if baseline is not None else baseline_final_of(metrics)
    final = metrics.get("final") or {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.9), sharex=True)
    for ax, key, label in zip(axes, ("map", "map50"), ("validation mAP@[.50:.95]", "validation mAP@.50")):
        if not history.empty:
            _shade_stages(ax, history)
            ax.plot(history["epoch"], history[key], marker="o", color="#1f77b4", label="this run")
            chosen = history[history["epoch"] == final.get("epoch")]
            if not chosen.empty:
                ax.plot(
                    chosen["epoch"],
                    chosen[key],
                    marker="*",
                    ms=15,
                    ls="none",
                    color="#d62728",
                    zorder=5,
                    label=f"selected: epoch {final['epoch']}",
                )
        if base and base.get(key) is not None:
            ax.axhline(base[key], ls="--", color="#444444", label=f"baseline {base[key]:.3f}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    if final.get("selected_by"):
        convergence = final.get("convergence") or {}
        ending = {"still rising": "still rising at the end", "converged": "converged", "falling": "falling at the end"}
        fig.suptitle(
            f"Selected by {final['selected_by']}"
            + (" (fell back to the start)" if final.get("fell_back") else "")
            + (
                f"; validation {convergence.get('metric', 'map').replace('map', 'mAP')} {ending[convergence['verdict']]}"
                f" ({convergence['gain']:+.4f} over epochs {convergence['epochs'][0]}-{convergence['epochs'][1]})"
                if convergence.get("verdict") in ending
                else ""
            ),
            fontsize=9,
        )
    return finish(fig, save)


def _per_class_frame(final: Mapping[str, Any]) -> pd.DataFrame:
    rows = []
    for name, values in (final.get("per_class") or {}).items():
        rows.append({"class": name, "metric": "AP50", "value": number(values.get("ap50"))})
        rows.append({"class": name, "metric": "AP50:95", "value": number(values.get("ap"))})
    return pd.DataFrame(rows, columns=["class", "metric", "value"])


def plot_per_class(
    metrics: Mapping[str, Any], hard_classes: Sequence[str] = HARD_CLASSES, save: str | None = None
) -> plt.Figure:
    """AP50 and AP50:95 per class of the selected checkpoint; hard classes in bold red."""
    frame = _per_class_frame(metrics.get("final") or {})
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * frame["class"].nunique() + 2), 3.6))
    if not frame.empty:
        sns.barplot(frame, x="class", y="value", hue="metric", ax=ax, palette=["#9ecae1", "#3182bd"])
        legend_outside(ax)
    highlight_hard(ax, hard_classes)
    ax.set_ylabel("AP")
    ax.set_xlabel("")
    ax.set_ylim(0, 1)
    ax.set_title("Per-class AP (hard classes in red)")
    ax.grid(axis="y", alpha=0.3)
    return finish(fig, save)


def plot_per_class_delta(
    metrics: Mapping[str, Any],
    baseline_final: Mapping[str, Any] | None,
    hard_classes: Sequence[str] = HARD_CLASSES,
    save: str | None = None,
) -> plt.Figure:
    """Δ AP50 and Δ AP50:95 per class against the baseline (positive = better than the baseline)."""
    base = as_final(baseline_final) if baseline_final is not None else baseline_final_of(metrics)
    run = _per_class_frame(metrics.get("final") or {})
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * run["class"].nunique() + 2), 3.6))
    if base and not run.empty:
        ref = _per_class_frame(base).set_index(["class", "metric"])["value"]
        run["value"] = [
            v - ref.get((c, m), math.nan) for c, m, v in run[["class", "metric", "value"]].itertuples(index=False)
        ]
        sns.barplot(run, x="class", y="value", hue="metric", ax=ax, palette=["#fdae6b", "#e6550d"])
        legend_outside(ax)
    else:
        ax.text(0.5, 0.5, "no baseline to compare with", ha="center", va="center", transform=ax.transAxes)
    ax.axhline(0, color="black", lw=0.8)
    highlight_hard(ax, hard_classes)
    ax.set_ylabel("Δ AP vs baseline")
    ax.set_xlabel("")
    ax.set_title("Per-class change against the baseline (hard classes in red)")
    ax.grid(axis="y", alpha=0.3)
    return finish(fig, save)


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
        return finish(fig, save)
    epochs = [h["epoch"] for h in history]
    frame = history_frame(metrics)
    for ax, key in zip(axes, keys):
        _shade_stages(ax, frame)
        values = [number(h.get(key)) for h in history]
        ax.plot(epochs, values, marker="o", color="black", label="mean" if key == "alpha_mean" else key)
        if key == "alpha_mean" and any(isinstance(h.get("alpha"), list) for h in history):
            per_class = np.array(
                [h["alpha"] if isinstance(h.get("alpha"), list) else [math.nan] for h in history], dtype=object
            )
            names = contract_field(metrics, "classes") or run_class_names(metrics)
            width = max(len(row) for row in per_class)
            for c in range(width):
                series = [number(row[c]) if len(row) > c else math.nan for row in per_class]
                ax.plot(epochs, series, lw=1, alpha=0.7, label=names[c] if c < len(names) else f"class {c}")
            ax.legend(fontsize=7)
        ax.set_title(
            {"alpha_mean": "gate α", "scale": "logit scale", "bias": "bias"}[key], pad=14
        )  # above the stage labels
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return finish(fig, save)


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
        {"epoch": h["epoch"], "stage": h.get("stage") or "", "term": k, "value": number(v)}
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
    return finish(fig, save)
