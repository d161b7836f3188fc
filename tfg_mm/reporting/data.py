"""Helpers for notebook 00 (data): class statistics as DataFrames and images drawn with their boxes.

The notebook should only call these and plot: ``class_statistics`` gives one row per box (for
seaborn histograms of box sizes per class), ``class_counts`` the per-class counts (``class_table`` as a report shows them), and
``show_samples`` a grid of images with their annotations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.patches import Rectangle

from tfg_mm.data.coco import load_coco
from tfg_mm.data.validate import open_rgb, resolve_images_dir
from tfg_mm.reporting.figures import legend_outside, save_figure

_BOX_COLUMNS = [
    "split",
    "image_id",
    "file_name",
    "category_id",
    "category",
    "x",
    "y",
    "w",
    "h",
    "area",
    "rel_size",
    "image_width",
    "image_height",
]


def class_statistics(ann_files: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """One row per box: split (the file's stem without ``instances_``), category, box geometry.

    ``rel_size`` is ``sqrt(box area / image area)``: the box's side relative to the image, which
    is what decides whether an object survives the detector's stride (the hard classes are small).
    """
    files = [ann_files] if isinstance(ann_files, (str, Path)) else list(ann_files)
    rows = []
    for file in files:
        data = load_coco(file, check_images=False)
        split = Path(file).stem.removeprefix("instances_")
        names = {c["id"]: c["name"] for c in data["categories"]}
        images = {im["id"]: im for im in data["images"]}
        for a in data["annotations"]:
            im = images[a["image_id"]]
            x, y, w, h = a["bbox"]
            rows.append(
                [
                    split,
                    im["id"],
                    im["file_name"],
                    a["category_id"],
                    names[a["category_id"]],
                    x,
                    y,
                    w,
                    h,
                    w * h,
                    math.sqrt(w * h / (im["width"] * im["height"])),
                    im["width"],
                    im["height"],
                ]
            )
    return pd.DataFrame(rows, columns=_BOX_COLUMNS)


def class_counts(ann_files: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """Per split and class: number of boxes, of images containing the class, and median box side (px)."""
    stats = class_statistics(ann_files)
    stats["side"] = np.sqrt(stats["area"])
    stats["split"] = pd.Categorical(stats["split"], categories=list(dict.fromkeys(stats["split"])))  # file order
    counts = (
        stats.groupby(["split", "category"], sort=True, observed=True)
        .agg(boxes=("image_id", "size"), images=("image_id", "nunique"), median_side_px=("side", "median"))
        .reset_index()
    )
    return counts.assign(split=counts["split"].astype(str))


def class_table(counts: pd.DataFrame) -> pd.DataFrame:
    """:func:`class_counts` as a report shows it: one row a class; for each split (in the order of the files) its
    boxes, the images holding the class and the median box side in pixels (one decimal); a class absent from a
    split has 0 boxes and no median."""
    splits = list(dict.fromkeys(counts["split"]))
    wide = counts.pivot(index="category", columns="split", values=["boxes", "images", "median_side_px"])
    wide = wide.swaplevel(axis=1).reindex(
        columns=[(split, value) for split in splits for value in ("boxes", "images", "median_side_px")]
    )
    for split in splits:
        for value in ("boxes", "images"):
            wide[(split, value)] = wide[(split, value)].fillna(0).astype(int)
        wide[(split, "median_side_px")] = wide[(split, "median_side_px")].astype(float).round(1)
    wide.columns = wide.columns.set_names(["split", ""])
    return wide.rename(columns={"median_side_px": "median side (px)"}, level=1)


def show_samples(
    ann_file: str | Path,
    images_dir: str | Path | None = None,
    n: int = 8,
    seed: int = 0,
    ncols: int = 4,
    image_ids: Sequence[int] | None = None,
):
    """Draw ``n`` images (random but reproducible with ``seed``, or the given ``image_ids``) with
    their boxes and class names; returns the matplotlib Figure."""
    ann_file = Path(ann_file)
    data = load_coco(ann_file, images_dir=images_dir, check_images=False)
    folder = resolve_images_dir(ann_file, images_dir)
    names = {c["id"]: c["name"] for c in data["categories"]}
    palette = plt.get_cmap("tab10")
    color = {cid: palette(i % 10) for i, cid in enumerate(sorted(names))}
    images = sorted(data["images"], key=lambda im: im["id"])
    if image_ids is None:
        picks = np.random.default_rng(seed).choice(len(images), size=min(n, len(images)), replace=False)
        chosen = [images[int(i)] for i in sorted(picks)]
    else:
        by_id = {im["id"]: im for im in images}
        chosen = [by_id[i] for i in image_ids]
    nrows = max(1, math.ceil(len(chosen) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3 * ncols, 3 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, im in zip(axes.flat, chosen):
        ax.imshow(open_rgb(folder / im["file_name"]))
        ax.set_title(im["file_name"], fontsize=8)
        for a in data["annotations"]:
            if a["image_id"] != im["id"]:
                continue
            x, y, w, h = a["bbox"]
            ax.add_patch(Rectangle((x, y), w, h, fill=False, linewidth=1.2, edgecolor=color[a["category_id"]]))
            ax.text(x, y - 1, names[a["category_id"]], fontsize=6, color=color[a["category_id"]], va="bottom")
    fig.tight_layout()
    return fig


def plot_counts(stats: pd.DataFrame, save: str | None = None):
    """Bar chart of boxes per class and split (``stats`` from :func:`class_statistics`)."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    sns.countplot(data=stats, x="category", hue="split", ax=ax)
    ax.set_xlabel("")
    ax.set_ylabel("boxes")
    ax.set_title("Boxes per class")
    legend_outside(ax)  # never over a bar
    fig.tight_layout()
    _maybe_save(fig, save)
    return fig


def plot_box_sizes(stats: pd.DataFrame, save: str | None = None):
    """Box side (sqrt of area, px, log scale) per class: the hard classes are the small / thin ones."""
    df = stats.assign(
        side=np.sqrt(stats["area"]),
        aspect=np.maximum(stats["w"], stats["h"]) / np.maximum(1e-6, np.minimum(stats["w"], stats["h"])),
    )
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    sns.boxplot(data=df, x="category", y="side", ax=axes[0])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("box side √(w·h) [px]")
    sns.boxplot(data=df, x="category", y="aspect", ax=axes[1])
    axes[1].set_yscale("log")
    axes[1].set_ylabel("aspect ratio (long / short side)")
    for ax in axes:
        ax.set_xlabel("")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    _maybe_save(fig, save)
    return fig


def samples_per_class(
    ann_file: str | Path, images_dir: str | Path | None = None, per_class: int = 2, seed: int = 0, ncols: int = 4
):
    """Images that contain each class (``per_class`` of them, reproducible), with all their boxes."""
    data = load_coco(ann_file, check_images=False)
    rng = np.random.default_rng(seed)
    names = {c["id"]: c["name"] for c in data["categories"]}
    chosen: list[int] = []
    for cid in sorted(names):
        ids = sorted({a["image_id"] for a in data["annotations"] if a["category_id"] == cid} - set(chosen))
        if ids:
            chosen += [int(i) for i in rng.choice(ids, size=min(per_class, len(ids)), replace=False)]
    return show_samples(ann_file, images_dir=images_dir, n=len(chosen), ncols=ncols, image_ids=chosen)


def _maybe_save(fig, stem: str | None) -> None:
    if stem:
        save_figure(fig, stem)
