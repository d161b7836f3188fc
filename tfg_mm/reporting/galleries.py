"""Detection galleries, read by :mod:`tfg_mm.evaluation.matching` from a run's ground truth, images and saved
detections (no model): :func:`show_galleries` (notebook 01), :func:`show_side_by_side` (notebook 02: baseline vs
phase 2 on the same images, and the miss → hit / hit → miss flips), :func:`flips_summary` and :func:`phase2_flips`
(the flips counts alone, for the index)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image as DisplayImage
from IPython.display import Markdown, display
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from tfg_mm.data.synthetic import HARD_CLASSES
from tfg_mm.errors import DataError
from tfg_mm.evaluation import matching
from tfg_mm.reporting.figures import HARD_COLOR, save_figure
from tfg_mm.training.contract import is_finished, read_metrics

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


def _draw_match(ax: plt.Axes, image: Any, match: matching.ImageMatch, class_of: Mapping[int, str], focus: int) -> None:
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


def _class_counts(match: matching.ImageMatch, category_id: int) -> str:
    tp = len(match.found_ids(category_id))
    fp = sum(1 for d, _ in match.fp if d["category_id"] == category_id)
    return f"TP {tp} · FP {fp} · missed {len(match.missed_ids(category_id))}"


def _thresholds_text(view: matching.RunView, classes: Sequence[str]) -> str:
    values = ", ".join(f"{c} {view.thresholds.by_class[c]:.3f}" for c in classes if c in view.thresholds.by_class)
    return f"score thresholds ({values}): {view.thresholds.source}"


def _pair_thresholds_text(base: matching.RunView, phase2: matching.RunView, name: str) -> str:
    """Both runs' thresholds of ``name``, their source said once when it is the same."""
    values = f"baseline {base.thresholds.by_class[name]:.3f}, phase 2 {phase2.thresholds.by_class[name]:.3f}"
    if base.thresholds.source == phase2.thresholds.source:
        return f"score thresholds of {name}: {values} ({base.thresholds.source})"
    return (
        f"score thresholds of {name}: {values} (baseline: {base.thresholds.source}; phase 2: "
        f"{phase2.thresholds.source})"
    )


def _hard_present(view: matching.RunView, hard_classes: Sequence[str]) -> tuple[list[str], list[str]]:
    present = [c for c in hard_classes if c in view.cat_of and matching.images_with(view.gt, view.cat_of[c])]
    return present, [c for c in hard_classes if c not in present]


def _images(views: Sequence[matching.RunView]):
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

    Reads the run's ``val_json``, images and ``detections_val.json`` (:func:`tfg_mm.evaluation.matching.load_run`).
    Displays the figure (PNG + SVG as ``<save>``) and its caption; returns ``{"thresholds",
    "threshold_source", "classes": {class: {"images", "tp", "fp", "missed"}}, "missing_classes", "figures"}``
    (counts over the whole split, at the thresholds).
    """
    view = matching.load_run(metrics, "run")
    classes, missing = _hard_present(view, hard_classes)
    image = _images([view])
    out: dict[str, Any] = {
        "thresholds": dict(view.thresholds.by_class),
        "threshold_source": view.thresholds.source,
        "classes": {},
        "missing_classes": missing,
        "figures": [],
    }
    chosen = {name: matching.gallery_images([view], view.cat_of[name], n_images) for name in classes}
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
        axes[r, 0].set_ylabel(name, fontsize=10, color=HARD_COLOR, fontweight="bold")
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
    base = matching.load_run(baseline_metrics, "baseline")
    phase2 = matching.load_run(phase2_metrics, "phase 2")
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
    ``{"classes": {class: matching.flips(...)}, "thresholds": {"baseline", "phase 2"}, "threshold_source":
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
        "classes": {c: matching.flips(base.matches, phase2.matches, base.cat_of[c]) for c in classes},
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
        ids = matching.gallery_images(views, cat, n_images)
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
