"""Ablation figures and tables (notebook 03 and the index), drawn from the summary that
:func:`tfg_mm.ablations.summarize` computes from the run folders: the Δ table with its intervals, the baseline's seed
spread, trajectories, the Δ heat map, gates and the WiSE-FT curve."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display
from matplotlib.ticker import MaxNLocator

from tfg_mm.paths import portable_text
from tfg_mm.reporting.figures import HARD_COLOR, finish
from tfg_mm.reporting.provenance import number


def _fmt_interval(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("delta") is None:
        return ""
    return f"{entry['delta']:+.4f} [{entry['lo']:+.4f}, {entry['hi']:+.4f}]"


def _fmt_mean_sd(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("mean") is None:
        return ""
    return f"{entry['mean']:.4f} ± {entry['sd']:.4f}" if entry.get("n", 1) > 1 else f"{entry['mean']:.4f}"


#: The tables of a grid, in the order the reports show them: the test images first (the thesis's numbers), the
#: validation images (the selection set) last. ``summary["variants"][i]["deltas"]`` holds each comparison.
COMPARISONS: dict[str, str] = {
    "test": "Test images (held out: nothing was selected on them)",
    "val": "Validation images (the selection set: they chose each run's epoch and thresholds)",
}


def has_comparison(summary: Mapping[str, Any], key: str) -> bool:
    """Whether any variant of the grid has a Δ on this comparison (``test``: the runs have a test split)."""
    return any((v.get("deltas") or {}).get(key, {}).get("delta") for v in summary.get("variants", []))


def _baseline_block(summary: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    final = (summary.get("baseline") or {}).get("final") or {}
    if key == "val":
        return final or None
    return ((final.get("test") or {}).get("selected")) or None


def ablation_table(summary: Mapping[str, Any], key: str = "test") -> pd.DataFrame:
    """The thesis table of one comparison: one row per variant (baseline first).

    ``key="test"`` (default: what a thesis quotes): mAP / mAP50 / hard-class AP on the held-out test images as
    mean ± sd over seeds, ΔmAP of the selected checkpoint with its (hierarchical, with several seeds) paired
    bootstrap interval and verdict, the same Δ for the last epoch (no selection: it cannot flatter), and the Δ of
    each hard class's AP. ``key="val"``: the same on the validation images, the selection set. An interval that
    contains 0 is "within noise"; "interval covers" says which noise it holds (with one seed: the images only).
    """
    hard = list(summary.get("hard_classes", []))
    level = summary.get("confidence", 0.95)
    ci = f"{round(100 * level)}% CI"
    rows = []
    base = _baseline_block(summary, key)
    if base:
        row = {"variant": "baseline", "status": "reference", "seeds": "", "mAP": f"{number(base['map']):.4f}"}
        row["mAP50"] = f"{number(base['map50']):.4f}"
        for name in hard:
            row[f"AP {name}"] = f"{number((base['per_class'].get(name) or {}).get('ap')):.4f}"
        spread = summary.get("baseline_seeds") or {}
        stats = spread.get("stats") or {}
        if key == "val" and stats.get("map", {}).get("n", 1) > 1:  # several baseline seeds: mean ± sd
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
        comparison = (variant.get("deltas") or {}).get(key) or {}
        stats = comparison.get("stats") or {}
        row["mAP"] = _fmt_mean_sd(stats.get("map"))
        row["mAP50"] = _fmt_mean_sd(stats.get("map50"))
        for name in hard:
            row[f"AP {name}"] = _fmt_mean_sd(stats.get(f"ap:{name}"))
        delta = comparison.get("delta") or {}
        row[f"ΔmAP [{ci}]"] = _fmt_interval(delta.get("map"))
        row["verdict"] = (delta.get("map") or {}).get("verdict", "")
        if key == "test":
            last = ((variant.get("deltas") or {}).get("test_last") or {}).get("delta") or {}
            row[f"ΔmAP last epoch [{ci}]"] = _fmt_interval(last.get("map"))
            row["verdict last epoch"] = (last.get("map") or {}).get("verdict", "")
        for name in hard:
            entry = (delta.get("per_class") or {}).get(name)
            row[f"ΔAP {name} [{ci}]"] = _fmt_interval(entry)
            row[f"verdict {name}"] = (entry or {}).get("verdict", "")
        row["interval covers"] = (delta.get("map") or {}).get("covers", "")
        fell_back = [r["seed"] for r in variant.get("runs", []) if (r.get("final") or {}).get("fell_back")]
        if fell_back:
            row["status"] += f" (seeds {', '.join(map(str, fell_back))} fell back to the baseline)"
        if variant.get("errors"):
            first = variant["errors"][0]
            row["verdict"] = row["verdict"] or portable_text(f"failed: {first.get('error', '')}")[:160]
        elif comparison.get("missing") and not delta:
            row["verdict"] = "no test evaluation (python -m tfg_mm evaluate RUN --split test)" if key == "test" else ""
        rows.append(row)
    return pd.DataFrame(rows).fillna("")


def covers_once(table: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The table without its ``interval covers`` column when every variant's interval covers the same noise
    (the usual case), and that text to say once above or under it; else the table unchanged and ``""``."""
    if "interval covers" not in table.columns:
        return table, ""
    values = {v for v in table["interval covers"] if v}
    if len(values) != 1:
        return table, ""
    return table.drop(columns="interval covers"), f"Every Δ interval covers: {values.pop()}."


def show_ablation_tables(summary: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """Notebook 03: the ablation table on the test images first (selected checkpoint and last epoch), then on the
    validation images (the selection set), each under a heading that says which; without a test split, a note
    and the validation table. Returns the tables by comparison."""
    keys = [k for k in COMPARISONS if has_comparison(summary, k)] or ["val"]
    if "test" not in keys:
        display(
            Markdown(
                "*No test split: the runs were judged on no held-out images; the table below is on the "
                "validation images that selected their checkpoints.*"
            )
        )
    tables = {}
    for key in keys:
        display(Markdown(f"**{COMPARISONS[key]}**"))
        tables[key] = ablation_table(summary, key)
        shown, covers = covers_once(tables[key])
        display(shown)
        if covers:
            display(Markdown(f"*{covers}*"))
    if summary.get("interval_note"):
        display(Markdown(summary["interval_note"]))
    return tables


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
            row[f"seed {run['seed']}"] = "" if value is None else f"{number(value):.4f}"
        rows.append(row)
    return pd.DataFrame(rows)


def _variant_runs(summary: Mapping[str, Any]):
    for variant in summary.get("variants", []):
        for run in variant.get("runs", []):
            if run.get("history"):
                yield variant["name"], run


SEED_LINESTYLES = ("-", "--", ":", "-.")


def _styled_runs(summary: Mapping[str, Any]):
    """Every run with its line style: one colour a variant (the legend's entry), one dash pattern a seed."""
    names = [v["name"] for v in summary.get("variants", [])]
    palette = dict(zip(names, sns.color_palette("tab10", max(1, len(names)))))
    seeds: dict[str, int] = {}
    for name, run in _variant_runs(summary):
        index = seeds[name] = seeds.get(name, -1) + 1
        yield name, run, {"color": palette[name], "linestyle": SEED_LINESTYLES[index % len(SEED_LINESTYLES)]}


def plot_ablation_trajectories(summary: Mapping[str, Any], save: str | None = None) -> plt.Figure:
    """mAP per epoch of every variant (a colour a variant, a dash pattern a seed) over the baseline's final mAP."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labelled = set()
    for name, run, style in _styled_runs(summary):
        epochs = [h["epoch"] for h in run["history"]]
        values = [number(h.get("map")) for h in run["history"]]
        ax.plot(epochs, values, marker=".", alpha=0.85, label=None if name in labelled else name, **style)
        labelled.add(name)
    base = (summary.get("baseline") or {}).get("final")
    if base:
        ax.axhline(base["map"], color="black", lw=2.5, alpha=0.6, label=f"baseline {base['map']:.3f}")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation mAP@[.50:.95]")
    ax.set_title("Trajectories of every variant against the baseline")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return finish(fig, save)


def plot_delta_heatmap(summary: Mapping[str, Any], save: str | None = None) -> plt.Figure:
    """Per-class Δ AP50:95 (mean over seeds, selected checkpoint vs baseline): variants × classes, on the test images
    when every run has them, else on validation (the title says which)."""
    deltas = {v["name"]: v["per_class_delta"] for v in summary.get("variants", []) if v.get("per_class_delta")}
    splits = {d.get("split", "val") for d in deltas.values()}
    frame = pd.DataFrame({name: d.get("values", d) for name, d in deltas.items()}).T
    fig, ax = plt.subplots(figsize=(1.2 * max(3, frame.shape[1]) + 3, 0.45 * max(2, frame.shape[0]) + 1.5))
    if frame.empty:
        ax.text(0.5, 0.5, "no finished variant", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return finish(fig, save)
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
            label.set_color(HARD_COLOR)
            label.set_fontweight("bold")
    where = "test images" if splits == {"test"} else "validation images (the selection set)"
    ax.set_title(f"Per-class change against the baseline (mean over seeds; {where})")
    return finish(fig, save)


def plot_ablation_gates(summary: Mapping[str, Any], save: str | None = None) -> plt.Figure:
    """Mean gate α per epoch of every variant with a fusion (a colour a variant, a dash pattern a seed)."""
    fig, ax = plt.subplots(figsize=(9, 4))
    any_gate = False
    labelled = set()
    for name, run, style in _styled_runs(summary):
        points = [(h["epoch"], h["alpha_mean"]) for h in run["history"] if h.get("alpha_mean") is not None]
        if points:
            any_gate = True
            ax.plot(*zip(*points), marker=".", label=None if name in labelled else name, **style)
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
    return finish(fig, save)


def _wise_band(points: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]] | None:
    """The interval of every point (``{key}_lo`` / ``{key}_hi``, or ``{key}_interval: {lo, hi}``), else None."""
    lo, hi = [], []
    for point in points:
        interval = point.get(f"{key}_interval") if isinstance(point.get(f"{key}_interval"), Mapping) else {}
        low = number(point.get(f"{key}_lo", interval.get("lo")))
        high = number(point.get(f"{key}_hi", interval.get("hi")))
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
        return finish(fig, save)
    colors = sns.color_palette("tab10", max(1, len(curves)))
    any_band = False
    for ax, (key, label, marker) in zip(axes, metrics_shown):
        for color, curve in zip(colors, curves):
            points = sorted(curve["points"], key=lambda p: p["lambda"])
            lambdas = [p["lambda"] for p in points]
            ax.plot(
                lambdas,
                [number(p.get(key)) for p in points],
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
    return finish(fig, save)
