"""Statistics of ablations: mean ± sd over seeds and paired bootstrap intervals of ΔAP.

An ablation table compares each variant with the baseline. Two sources of noise hide a real
difference: the training seed (handled by running every variant for each seed and reporting
``summarize_seeds``) and the finite validation set (handled by ``paired_bootstrap``). The
bootstrap resamples validation *images* with replacement, rebuilds ground truth and both
models' detections on the same draw, and recomputes COCOeval on it, so the interval reflects how
much ΔmAP would move on another validation set of the same size from the same distribution.

A difference whose interval contains 0 is reported as "within noise", never as a trend.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm  # plain bars: tqdm.auto warns in kernels without ipywidgets

from tfg_mm.errors import ConfigError, DataError
from tfg_mm.evaluate import (
    check_detections,
    coco_from_dict,
    cocoeval_metrics,
    load_coco_gt,
    load_results,
    resolve_classes,
)

SUMMARY_METRICS = ("map", "map50", "map75", "map_small", "map_medium", "map_large")

# COCOeval only looks at the top 100 detections per (image, category) (maxDets=[1, 10, 100]);
# the rest cannot change any metric, so the bootstrap drops them once instead of on every draw.
_MAX_DETS = 100


def summarize_seeds(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (ddof=1; 0 for a single seed) and count of per-seed values."""
    array = np.asarray(list(values), dtype=float)
    if array.ndim != 1 or array.size == 0:
        raise ValueError("summarize_seeds needs a non-empty list of per-seed values")
    sd = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), "sd": sd, "n": int(array.size)}


def verdict(lo: float, hi: float) -> str:
    """Label a confidence interval of a difference (b - a): improves, worse, or within noise.

    An interval that contains 0 (including touching it) cannot tell the variant from the
    baseline, so it is "within noise".
    """
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"verdict needs a finite interval with lo <= hi; got [{lo}, {hi}]")
    if lo > 0:
        return "improves"
    if hi < 0:
        return "worse"
    return "within noise"


@dataclass(frozen=True)
class _ByImage:
    """Boxes (ground truth or detections) grouped by source image, for fast resampling.

    ``start[i]:start[i] + count[i]`` are the rows of source image ``i``. ``columns`` hold one
    Python list per COCO field, built once: a resample only picks list items (C-speed ``map``)
    instead of converting arrays again. The picked ``bbox`` lists are shared between resamples,
    which is safe because COCOeval only reads them.
    """

    start: np.ndarray
    count: np.ndarray
    columns: dict[str, list]

    @classmethod
    def build(cls, image_pos: np.ndarray, n_images: int, columns: dict[str, np.ndarray]) -> _ByImage:
        order = np.argsort(image_pos, kind="stable")  # stable: keeps the original order within an image
        count = np.bincount(image_pos, minlength=n_images)
        start = np.cumsum(count) - count
        return cls(start, count, {key: value[order].tolist() for key, value in columns.items()})

    def gather(self, draw: np.ndarray) -> tuple[dict[str, list], list[int]]:
        """Fields of the rows of the drawn images, in draw order, and each row's new image id."""
        counts = self.count[draw]
        offset_in_image = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        rows = (np.repeat(self.start[draw], counts) + offset_in_image).tolist()
        new_image_id = np.repeat(np.arange(1, len(draw) + 1), counts).tolist()
        return {key: list(map(column.__getitem__, rows)) for key, column in self.columns.items()}, new_image_id


def _ground_truth_arrays(dataset: dict, image_pos: dict[int, int]) -> _ByImage:
    anns = dataset["annotations"]
    return _ByImage.build(
        np.array([image_pos[ann["image_id"]] for ann in anns], dtype=np.int64),
        len(image_pos),
        {
            "category_id": np.array([ann["category_id"] for ann in anns], dtype=np.int64),
            "bbox": np.array([ann["bbox"] for ann in anns], dtype=np.float64).reshape(-1, 4),
            "area": np.array([ann["area"] for ann in anns], dtype=np.float64),
            "iscrowd": np.array([ann["iscrowd"] for ann in anns], dtype=np.int64),
        },
    )


def _detection_arrays(detections: list[dict], image_pos: dict[int, int]) -> _ByImage:
    """Detections grouped by image, keeping only the top ``_MAX_DETS`` per (image, category).

    Ranking uses a stable sort on -score like COCOeval, so ties are broken the same way. The
    ``area`` is ``w * h`` as ``COCO.loadRes`` sets it.
    """
    image = np.array([image_pos[det["image_id"]] for det in detections], dtype=np.int64)
    category = np.array([det["category_id"] for det in detections], dtype=np.int64)
    score = np.array([det["score"] for det in detections], dtype=np.float64)
    bbox = np.array([det["bbox"] for det in detections], dtype=np.float64).reshape(-1, 4)
    order = np.lexsort((-score, category, image))  # by image, then category, then decreasing score
    group_start = np.ones(len(order), dtype=bool)
    group_start[1:] = (np.diff(image[order]) != 0) | (np.diff(category[order]) != 0)
    group_first = np.maximum.accumulate(np.where(group_start, np.arange(len(order)), 0))
    keep = np.zeros(len(order), dtype=bool)
    keep[order[np.arange(len(order)) - group_first < _MAX_DETS]] = True
    return _ByImage.build(
        image[keep],
        len(image_pos),
        {
            "category_id": category[keep],
            "bbox": bbox[keep],
            "score": score[keep],
            "area": bbox[keep, 2] * bbox[keep, 3],
        },
    )


def _resampled_images(images: list[dict], draw: np.ndarray) -> list[dict]:
    """Image entries of a draw, with new unique ids 1..n so that duplicates are separate images."""
    return [{**images[source], "id": new_id} for new_id, source in enumerate(draw.tolist(), start=1)]


def _resampled_ground_truth(gt: _ByImage, images: list[dict], categories: list[dict], draw: np.ndarray) -> dict:
    c, image_ids = gt.gather(draw)
    annotations = [
        {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": box, "area": area, "iscrowd": crowd}
        for ann_id, image_id, cat, box, area, crowd in zip(
            range(1, len(image_ids) + 1), image_ids, c["category_id"], c["bbox"], c["area"], c["iscrowd"]
        )
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def _resampled_detections(dets: _ByImage, images: list[dict], categories: list[dict], draw: np.ndarray) -> dict:
    """The detections' COCO dataset, with the fields ``COCO.loadRes`` would add (id, area, iscrowd)."""
    c, image_ids = dets.gather(draw)
    annotations = [
        {
            "id": det_id,
            "image_id": image_id,
            "category_id": cat,
            "bbox": box,
            "score": score,
            "area": area,
            "iscrowd": 0,
        }
        for det_id, image_id, cat, box, score, area in zip(
            range(1, len(image_ids) + 1), image_ids, c["category_id"], c["bbox"], c["score"], c["area"]
        )
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a resample builds and evaluates its dicts.

    Each resample creates tens of thousands of acyclic dicts; with the collector on, they trigger
    full collections that rescan every object of the process (a notebook holds a whole model and
    transformers), which can cost more than the evaluation. Reference counting still frees them.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _interval(
    delta: float, values_a: float, values_b: float, replicas: np.ndarray, confidence: float, n_resamples: int
) -> dict:
    """Percentile interval of the replicas that are defined (a class may be absent from a draw)."""
    valid = replicas[np.isfinite(replicas)]
    if valid.size == 0:
        raise DataError("no bootstrap resample contained ground truth for this metric; it cannot be compared")
    tail = (1.0 - confidence) / 2.0
    lo, hi = (float(q) for q in np.quantile(valid, [tail, 1.0 - tail]))
    return {
        "a": values_a,
        "b": values_b,
        "delta": delta,
        "lo": lo,
        "hi": hi,
        "confidence": confidence,
        "n_resamples": n_resamples,
        "n_valid": int(valid.size),
        "verdict": verdict(lo, hi),
    }


def paired_bootstrap(
    coco_gt: str | Path | dict | Any,
    dets_a: list[dict],
    dets_b: list[dict],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    metric: str = "map",
    class_names: list[str] | None = None,
    cat_ids: list[int] | None = None,
    classes: Sequence[str] = (),
    backend: str = "faster_coco_eval",
    progress: bool = False,
) -> dict:
    """Paired bootstrap confidence interval of ``metric(b) - metric(a)`` over validation images.

    Each resample draws ``n`` image indices with replacement from a seeded
    ``numpy.random.Generator``, uses the *same* draw for both models, gives every drawn image a
    new unique id (so a duplicate counts as another image, not as a merge), rebuilds ground truth
    and detections with new annotation ids, and recomputes COCOeval. The interval is the
    percentile interval of the replicas at level ``confidence``.

    Args:
        coco_gt: ground truth (json path, COCO dict or COCO object).
        dets_a: baseline COCO detections; dets_b: the variant's.
        metric: one of ``SUMMARY_METRICS``.
        class_names / cat_ids: as in ``tfg_mm.evaluate.coco_evaluate``.
        classes: class names whose AP50:95 difference also gets an interval (e.g. the hard
            classes); a draw in which a class has no ground truth is skipped for that class and
            ``n_valid`` counts the draws used.
        backend: COCOeval implementation; ``faster_coco_eval`` gives pycocotools' numbers faster.

    Returns:
        ``{"metric", "a", "b", "delta", "lo", "hi", "confidence", "n_resamples", "n_valid",
        "verdict", "seed", "n_images", "backend", "per_class": {name: {same keys but metric}}}``.
    """
    if metric not in SUMMARY_METRICS:
        raise ConfigError(f"paired_bootstrap: metric {metric!r} is unknown; use one of {SUMMARY_METRICS}")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"paired_bootstrap: confidence must be in (0, 1), e.g. 0.95; got {confidence}")
    if n_resamples < 1:
        raise ConfigError(f"paired_bootstrap: n_resamples must be >= 1 (1000 is usual); got {n_resamples}")

    gt = load_coco_gt(coco_gt, backend)
    class_names, cat_ids = resolve_classes(gt, class_names, cat_ids)
    unknown = [name for name in classes if name not in class_names]
    if unknown:
        raise ConfigError(f"paired_bootstrap: classes {unknown} are not among the class names {class_names}")
    check_detections(gt, dets_a)
    check_detections(gt, dets_b)

    full_a = cocoeval_metrics(gt, load_results(gt, dets_a, backend), class_names, cat_ids, backend)
    full_b = cocoeval_metrics(gt, load_results(gt, dets_b, backend), class_names, cat_ids, backend)
    if math.isnan(full_a[metric]):
        raise DataError(f"paired_bootstrap: {metric} is undefined on this ground truth (no boxes it measures)")
    for name in classes:
        if math.isnan(full_a["per_class"][name]["ap"]):
            raise DataError(f"paired_bootstrap: class {name!r} has no ground truth in this split; drop it from classes")

    images = list(gt.dataset["images"])
    categories = list(gt.dataset["categories"])
    image_pos = {int(image["id"]): pos for pos, image in enumerate(images)}
    gt_arrays = _ground_truth_arrays(gt.dataset, image_pos)
    det_arrays = (_detection_arrays(dets_a, image_pos), _detection_arrays(dets_b, image_pos))

    rng = np.random.default_rng(seed)
    replicas = np.full(n_resamples, np.nan)
    class_replicas = {name: np.full(n_resamples, np.nan) for name in classes}
    draws = range(n_resamples)
    if progress:
        draws = tqdm(draws, desc="bootstrap", leave=False)
    for r in draws:
        draw = rng.integers(0, len(images), size=len(images))
        with _gc_paused():
            new_images = _resampled_images(images, draw)
            gt_r = coco_from_dict(_resampled_ground_truth(gt_arrays, new_images, categories, draw), backend)
            side = [
                cocoeval_metrics(
                    gt_r,
                    coco_from_dict(_resampled_detections(dets, new_images, categories, draw), backend),
                    class_names,
                    cat_ids,
                    backend,
                )
                for dets in det_arrays
            ]
        replicas[r] = side[1][metric] - side[0][metric]
        for name in classes:
            class_replicas[name][r] = side[1]["per_class"][name]["ap"] - side[0]["per_class"][name]["ap"]

    result = {"metric": metric}
    result.update(
        _interval(full_b[metric] - full_a[metric], full_a[metric], full_b[metric], replicas, confidence, n_resamples)
    )
    result.update({"seed": seed, "n_images": len(images), "backend": backend})
    result["per_class"] = {}
    for name in classes:
        ap_a, ap_b = full_a["per_class"][name]["ap"], full_b["per_class"][name]["ap"]
        result["per_class"][name] = _interval(ap_b - ap_a, ap_a, ap_b, class_replicas[name], confidence, n_resamples)
    return result
