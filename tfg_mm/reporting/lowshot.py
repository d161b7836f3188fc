"""The low-data regime (notebook 04 and the index): Δ against each k's baseline on the test images, by k.

Drawn from the summary :func:`tfg_mm.ablations.lowshot.summarize_lowshot` writes (``runs/lowshot/lowshot.json``);
:func:`read_lowshot` reads it without importing the grid runner.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from tfg_mm.paths import resolve_path
from tfg_mm.reporting.figures import finish

#: The file notebook 04 writes in its run_dir (:data:`tfg_mm.ablations.lowshot.LOWSHOT_SUMMARY`).
SUMMARY_NAME = "lowshot.json"


def read_lowshot(run_dir: str | Path = "runs/lowshot") -> dict | None:
    """The low-data summary in ``run_dir`` (None when notebook 04 has not run there)."""
    try:
        return json.loads((resolve_path(run_dir) / SUMMARY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _interval(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("delta") is None:
        return ""
    return f"{entry['delta']:+.4f} [{entry['lo']:+.4f}, {entry['hi']:+.4f}]"


def _value(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _targets(summary: Mapping[str, Any]) -> list[str]:
    """``map`` and the starved classes, in the order the table and figure show them."""
    return ["map", *summary["shots"]["classes"]]


def lowshot_table(summary: Mapping[str, Any]) -> pd.DataFrame:
    """One row per k × variant: the k's baseline on test (mAP, AP of each starved class) and each variant's Δ
    [interval] on test."""
    rows = []
    for level in summary.get("levels", []):
        base = level.get("baseline") or {}
        kept = base.get("kept") or {}
        for name, variant in (level.get("variants") or {}).items():
            row = {
                "k": level["k"],
                "training images": f"{kept.get('kept_images', '?')} of {kept.get('of_images', '?')}",
                "variant": name,
                "seeds": len(variant.get("seeds") or []),
                "baseline test mAP": _value(base.get("test_map")),
                **{f"baseline AP {c}": _value((base.get("test_ap") or {}).get(c)) for c in summary["shots"]["classes"]},
            }
            for target in _targets(summary):
                label = "ΔmAP" if target == "map" else f"ΔAP {target}"
                row[label] = _interval((variant.get("test") or {}).get(target))
            rows.append(row)
        if not level.get("variants"):
            rows.append({"k": level["k"], "variant": f"(baseline {level.get('baseline_status', '?')})"})
    return pd.DataFrame(rows)


def plot_lowshot(summary: Mapping[str, Any], save: str | None = None) -> plt.Figure:
    """Δ on test against k, one panel per target (mAP, each starved class), one line per variant with its
    bootstrap interval as error bars (points dodged sideways so the bars do not hide each other)."""
    targets = _targets(summary)
    levels = [lv for lv in summary.get("levels", []) if lv.get("variants")]
    names = list(dict.fromkeys(n for lv in levels for n in lv["variants"]))
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.8), squeeze=False)
    colors = dict(zip(names, sns.color_palette("tab10", max(1, len(names)))))
    ks = sorted({lv["k"] for lv in levels})
    position = {k: i for i, k in enumerate(ks)}
    for ax, target in zip(axes[0], targets):
        for j, name in enumerate(names):
            xs, ys, lo, hi = [], [], [], []
            for lv in levels:
                entry = ((lv["variants"].get(name) or {}).get("test") or {}).get(target)
                if not entry or entry.get("delta") is None:
                    continue
                xs.append(position[lv["k"]] + (j - (len(names) - 1) / 2) * 0.08)
                ys.append(entry["delta"])
                lo.append(entry["delta"] - entry["lo"])
                hi.append(entry["hi"] - entry["delta"])
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=colors[name], label=name)
        ax.axhline(0.0, color="#444444", lw=1, ls="--")
        ax.set_xticks(np.arange(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("training images per starved class (k)")
        ax.set_ylabel("Δ on test (variant − its k's baseline)")
        ax.set_title("mAP@[.50:.95]" if target == "map" else f"AP {target}")
        ax.grid(alpha=0.3)
    if names:
        axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    level = round(100 * next((lv.get("confidence") or 0.95 for lv in levels), 0.95))
    fig.suptitle(
        f"Low-data regime: Δ against each k's baseline, test images, {level}% bootstrap intervals", fontsize=10
    )
    return finish(fig, save)


def _beats(ours: Mapping[str, Any] | None, theirs: Mapping[str, Any] | None) -> bool:
    """A gain outside noise and above the control's interval (no control: above 0 is enough)."""
    if not ours or ours.get("lo") is None or ours["lo"] <= 0:
        return False
    return not theirs or theirs.get("hi") is None or ours["lo"] > theirs["hi"]


def lowshot_verdict(summary: Mapping[str, Any], text: str = "minilm", control: str = "random") -> str:
    """The result in words, whatever it is: per k, the text variant's Δ (mAP, each starved class's AP) with its
    interval, whether it is outside noise, and the random-prototype control's Δ beside it; first, the k at which
    the text beats both 0 and the control."""
    lines, helps = [], []
    for level in summary.get("levels", []):
        variants = level.get("variants") or {}
        ours_all = (variants.get(text) or {}).get("test") or {}
        theirs_all = (variants.get(control) or {}).get("test") or {}
        parts = []
        for target in _targets(summary):
            ours, theirs = ours_all.get(target), theirs_all.get(target)
            if not ours or ours.get("delta") is None:
                continue
            where = "above 0" if ours["lo"] > 0 else "below 0" if ours["hi"] < 0 else "within noise"
            versus = f"; {control} {_interval(theirs)}" if theirs and theirs.get("delta") is not None else ""
            parts.append(f"{'mAP' if target == 'map' else 'AP ' + target} {_interval(ours)} ({where}{versus})")
            if _beats(ours, theirs) and level["k"] not in helps:
                helps.append(level["k"])
        if parts:
            lines.append(f"k = {level['k']}: text ({text}) " + ", ".join(parts) + ".")
        else:
            lines.append(f"k = {level['k']}: no {text} result (baseline: {level.get('baseline_status', '?')}).")
    head = (
        f"The text prior gives a gain outside noise and above the {control}-prototype control at "
        f"k = {', '.join(map(str, helps))}."
        if helps
        else f"At no k does the text prior give a gain that is both outside noise and above the {control}-prototype "
        "control: on these runs the text adds nothing that class prototypes without meaning do not."
    )
    return "\n".join([head, *lines])
