"""Statistics of ablations: mean ± sd over seeds and paired bootstrap intervals of ΔAP.

An ablation table compares each variant with the baseline. Two sources of noise hide a real
difference: the training seed and the finite validation set. ``paired_bootstrap`` resamples
validation *images* with replacement (the same draw for both models; a duplicate counts as
another image) and takes COCOeval's metric on every draw; ``hierarchical_bootstrap`` first draws
training seeds with replacement, then the images, and averages Δ over the drawn seeds, so that
its interval holds training noise too. A replica is exactly COCOeval's number on the resampled
dataset: each model's detections are matched to the ground truth once per image
(:class:`ImageMatches`) and only COCOeval's accumulation is redone per draw (about a hundred times
faster than rebuilding the COCO dicts and rerunning COCOeval, which ``method="cocoeval"`` still
does as the reference; ``scripts/benchmark.py --only bootstrap`` measures both).

A difference whose interval contains 0 is reported as "within noise", never as a trend.
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.cocoeval import COCOeval  # the reference matching: its evalImgs are readable
from tqdm import tqdm  # plain bars: tqdm.auto warns in kernels without ipywidgets

from tfg_mm.errors import ConfigError, DataError
from tfg_mm.evaluation.coco import (
    check_detections,
    coco_from_dict,
    cocoeval_metrics,
    load_coco_gt,
    load_results,
    metrics_from_precision,
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


# --------------------------------------------------------------------------------------------
# Matches once, accumulation per resample
# --------------------------------------------------------------------------------------------
def _gather(start: np.ndarray, count: np.ndarray, draw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the drawn images in draw order, and the draw slot of each row."""
    counts = count[draw]
    ends = np.cumsum(counts)
    rows = np.repeat(start[draw] - (ends - counts), counts) + np.arange(int(ends[-1]) if len(ends) else 0)
    return rows, np.repeat(np.arange(len(draw)), counts)


def _segment_cumsum(values: np.ndarray, segment_start: np.ndarray) -> np.ndarray:
    """Inclusive cumulative sum of ``values`` restarting where ``segment_start`` is True."""
    total = np.cumsum(values)
    before = np.where(segment_start, total - values, 0)
    return total - np.maximum.accumulate(before) if len(values) else total


def _least_count(thresholds: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``[len(n), R]``: the least integer ``v`` with ``v / n >= threshold`` in float arithmetic.

    The same division COCOeval's recall ``tp / npig`` uses; ``ceil(threshold * n)`` is off by at
    most one, corrected both ways. ``n`` must be >= 1.
    """
    n = n.astype(float)[:, None]
    v = np.ceil(thresholds[None, :] * n)
    v = np.where((v >= 1) & ((v - 1) / n >= thresholds), v - 1, v)
    v = np.where(v / n < thresholds, v + 1, v)
    return v.astype(np.int64)


@dataclass(frozen=True)
class ImageMatches:
    """COCOeval's per-image matches of one model, re-accumulated on any draw of images.

    COCOeval (bbox) works in two steps: ``evaluateImg`` matches the detections of one (image,
    category, area range) to its ground truth at every IoU threshold, independently of every other
    image; ``accumulate`` concatenates those per-image results over the images, sorts them by score
    (stable mergesort), and reads the interpolated 101-point precision. An image drawn twice in a
    bootstrap resample is two images with the same per-image result, so the matching is done once
    (pycocotools' ``evaluateImg``, top 100 detections per image and category) and every resample only
    re-accumulates the drawn images' results in draw order (:meth:`precision`), which gives exactly
    pycocotools' numbers on the rebuilt resample (``tests/test_stats.py`` checks it on random cases).

    Rows (detections) of image ``i``: ``start[i]:start[i] + count[i]``, by category then decreasing
    score as COCOeval sorts them; ``key`` sorts them like COCOeval (category, then score rank, ties
    equal), ``category`` is the K index and ``inrange`` ``[A, rows]`` says whether the detection's
    area lies in each area range (an unmatched detection outside it is ignored). Matches (sparse) of
    image ``i``: ``m_start[i]:m_start[i] + m_count[i]`` of ``m_row`` (``(k * A + a) * T + t``),
    ``m_det`` (the detection's row within its image), ``m_tp`` (matched to non-ignored ground
    truth: a true positive) and ``m_inrange``. ``npig[i, k, a]``: non-ignored ground truth.
    """

    start: np.ndarray
    count: np.ndarray
    key: np.ndarray
    category: np.ndarray
    inrange: np.ndarray
    m_start: np.ndarray
    m_count: np.ndarray
    m_row: np.ndarray
    m_det: np.ndarray
    m_tp: np.ndarray
    m_inrange: np.ndarray
    npig: np.ndarray
    iou_thrs: np.ndarray
    rec_thrs: np.ndarray
    area_labels: tuple[str, ...]
    eval_cat_ids: tuple[int, ...]

    @classmethod
    def build(cls, coco_gt: Any, detections: list[dict], cat_ids: Sequence[int]) -> ImageMatches:
        """Match ``detections`` to ``coco_gt`` (a COCO object of either backend, or a dict) once per image."""
        gt = load_coco_gt(coco_gt.dataset if hasattr(coco_gt, "dataset") else coco_gt, "pycocotools")
        dt = load_results(gt, detections, "pycocotools")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            evaluator = COCOeval(gt, dt, iouType="bbox")
            evaluator.params.catIds = sorted(int(c) for c in cat_ids)
            evaluator.evaluate()
        p = evaluator.params
        n_cat, n_area, n_iou, n_eval = len(p.catIds), len(p.areaRng), len(p.iouThrs), len(p.imgIds)
        images = gt.dataset["images"]
        eval_index = {int(image_id): i for i, image_id in enumerate(p.imgIds)}
        det_area = {ann["id"]: ann["area"] for ann in dt.dataset["annotations"]}
        start, count = np.zeros(len(images), np.int64), np.zeros(len(images), np.int64)
        m_start, m_count = np.zeros(len(images), np.int64), np.zeros(len(images), np.int64)
        npig = np.zeros((len(images), n_cat, n_area), np.int64)
        scores, category, inrange, m_row, m_det, m_tp, m_inrange = [], [], [], [], [], [], []
        n_rows = n_matches = 0
        for pos, image in enumerate(images):
            start[pos], m_start[pos] = n_rows, n_matches
            i = eval_index[int(image["id"])]
            offset = 0
            for k in range(n_cat):
                results = [evaluator.evalImgs[(k * n_area + a) * n_eval + i] for a in range(n_area)]
                if results[0] is None:  # no ground truth and no detection of this category here
                    continue
                n_det = len(results[0]["dtScores"])
                scores.append(np.asarray(results[0]["dtScores"], dtype=np.float64).reshape(n_det))
                category.append(np.full(n_det, k))
                areas = np.array([det_area[d] for d in results[0]["dtIds"]], dtype=np.float64)
                det_inrange = np.array([(areas >= lo) & (areas <= hi) for lo, hi in p.areaRng]).reshape(n_area, n_det)
                inrange.append(det_inrange)
                for a, r in enumerate(results):
                    npig[pos, k, a] = np.count_nonzero(np.asarray(r["gtIgnore"]) == 0)
                    matched = np.asarray(r["dtMatches"]).reshape(n_iou, n_det) != 0
                    ignored = np.asarray(r["dtIgnore"]).reshape(n_iou, n_det) != 0
                    t, d = np.nonzero(matched)
                    m_row.append((k * n_area + a) * n_iou + t)
                    m_det.append(offset + d)
                    m_tp.append(~ignored[t, d])
                    m_inrange.append(det_inrange[a, d])
                    n_matches += len(t)
                offset += n_det
            count[pos], m_count[pos] = offset, n_matches - m_start[pos]
            n_rows += offset

        def cat(parts: list, dtype: Any, shape: tuple = (0,)) -> np.ndarray:
            return np.concatenate(parts, axis=-1).astype(dtype) if parts else np.zeros(shape, dtype)

        scores_all, category_all = cat(scores, np.float64), cat(category, np.int64)
        m_det_all = cat(m_det, np.int64)
        # A detection scored below every matched detection of its category sorts after all of that
        # category's true positives in any resample: it changes no number, so it is dropped here.
        image_of_row = np.repeat(np.arange(len(images)), count)
        m_global = np.repeat(start, m_count) + m_det_all
        lowest = np.full(n_cat, np.inf)
        np.minimum.at(lowest, category_all[m_global], scores_all[m_global])
        keep = scores_all >= lowest[category_all]
        kept_before = np.cumsum(keep) - keep  # new row of each kept row
        new_count = np.bincount(image_of_row[keep], minlength=len(images))
        new_start = np.cumsum(new_count) - new_count
        m_det_all = kept_before[m_global] - np.repeat(new_start, m_count)
        scores_all, category_all = scores_all[keep], category_all[keep]
        unique_scores, score_rank = np.unique(-scores_all, return_inverse=True)  # rank 0: the highest score
        return cls(
            start=new_start,
            count=new_count,
            key=category_all * max(len(unique_scores), 1) + score_rank.reshape(-1),
            category=category_all,
            inrange=cat(inrange, bool, (n_area, 0))[:, keep],
            m_start=m_start,
            m_count=m_count,
            m_row=cat(m_row, np.int64),
            m_det=m_det_all,
            m_tp=cat(m_tp, bool),
            m_inrange=cat(m_inrange, bool),
            npig=npig,
            iou_thrs=np.asarray(p.iouThrs, dtype=np.float64),
            rec_thrs=np.asarray(p.recThrs, dtype=np.float64),
            area_labels=tuple(p.areaRngLbl),
            eval_cat_ids=tuple(int(c) for c in p.catIds),
        )

    @property
    def n_images(self) -> int:
        return len(self.start)

    def precision(self, draw: np.ndarray) -> np.ndarray:
        """COCOeval's ``eval['precision']`` ``[T, R, K, A, 1]`` (maxDets 100) on the drawn images.

        What pycocotools' ``accumulate`` computes, from fewer numbers: per category it concatenates
        the drawn images' results in draw order, sorts them by -score (stable), takes cumulative
        true positives ``tp`` and false positives ``fp`` (unmatched, not ignored), precision ``tp /
        (fp + tp + eps)`` made non-increasing from the right, and at each recall threshold the
        precision at the first detection whose recall ``tp / npig`` reaches it (0 past the last
        one; -1 without non-ignored ground truth). That detection is the ``v``-th true positive,
        ``v`` the least count with ``v / npig >= threshold`` (the same float division); and the
        running maximum from the right, read at a true positive, is a maximum over true positives
        only (a later detection has the same ``tp`` and no fewer ``fp`` than the last true positive
        before it). So only the true positives' ``fp`` counts are needed: detections in the area
        range sorted before them (one cumulative sum per area range) minus the matched ones.
        All categories are handled at once (one stable sort on category, then score rank).
        """
        n_iou, n_rec, n_area = len(self.iou_thrs), len(self.rec_thrs), len(self.area_labels)
        n_cat = len(self.eval_cat_ids)
        n_rows = n_cat * n_area * n_iou
        draw = np.asarray(draw, dtype=np.int64)
        npig = self.npig[draw].sum(axis=0).reshape(-1)  # [K * A]
        rows, _ = _gather(self.start, self.count, draw)
        order = np.argsort(self.key[rows], kind="stable")
        position = np.empty(len(rows), np.int64)
        position[order] = np.arange(len(rows))  # sorted position of each concatenated row
        inrange_cum = np.zeros((n_area, len(rows) + 1), np.int64)
        np.cumsum(self.inrange[:, rows[order]], axis=1, out=inrange_cum[:, 1:])
        per_category = np.bincount(self.category[rows], minlength=n_cat)
        category_start = np.cumsum(per_category) - per_category  # first sorted position of each category

        m, m_slot = _gather(self.m_start, self.m_count, draw)
        slot_base = np.cumsum(self.count[draw]) - self.count[draw]
        m_row, m_tp, m_inrange = self.m_row[m], self.m_tp[m], self.m_inrange[m]
        m_pos = position[slot_base[m_slot] + self.m_det[m]]
        o = np.argsort(m_row * (len(rows) + 1) + m_pos)
        m_row, m_pos, m_tp, m_inrange = m_row[o], m_pos[o], m_tp[o], m_inrange[o]
        first = np.ones(len(m_row), dtype=bool)
        first[1:] = m_row[1:] != m_row[:-1]
        tp = _segment_cumsum(m_tp.astype(np.int64), first)[m_tp]
        matched_inrange = _segment_cumsum(m_inrange.astype(np.int64), first)[m_tp]
        row, pos = m_row[m_tp], m_pos[m_tp]
        k, a = row // (n_area * n_iou), (row // n_iou) % n_area
        fp = inrange_cum[a, pos + 1] - inrange_cum[a, category_start[k]] - matched_inrange
        tp, fp = tp.astype(float), fp.astype(float)
        pr = tp / (fp + tp + np.spacing(1))

        # running maximum from the right within each row: rows padded to the longest one
        n_tp = np.bincount(row, minlength=n_rows)
        row_first = np.cumsum(n_tp) - n_tp
        width = int(n_tp.max()) if n_rows else 0
        padded = np.full((n_rows, width + 1), 0.0)
        padded[row, np.arange(len(row)) - row_first[row]] = pr
        envelope = np.maximum.accumulate(padded[:, ::-1], axis=1)[:, ::-1]

        need = np.repeat(np.maximum(_least_count(self.rec_thrs, np.maximum(npig, 1)), 1), n_iou, axis=0)
        reached = need <= n_tp[:, None]  # [K * A * T, R]; recall 0 reads the first true positive
        q = np.where(reached, envelope[np.arange(n_rows)[:, None], np.where(reached, need - 1, 0)], 0.0)
        q = q.reshape(n_cat, n_area, n_iou, n_rec)
        q[npig.reshape(n_cat, n_area) == 0] = -1.0
        return q.transpose(2, 3, 0, 1)[..., None]

    def metrics(self, draw: np.ndarray, class_names: list[str], cat_ids: list[int]) -> dict:
        """:func:`tfg_mm.evaluation.coco.metrics_from_precision` of :meth:`precision`: ``cocoeval_metrics``'s keys."""
        return metrics_from_precision(
            self.precision(draw),
            self.iou_thrs,
            list(self.area_labels),
            [_MAX_DETS],
            list(self.eval_cat_ids),
            class_names,
            cat_ids,
        )


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


def _check_settings(name: str, metric: str, confidence: float, n_resamples: int) -> None:
    if metric not in SUMMARY_METRICS:
        raise ConfigError(f"{name}: metric {metric!r} is unknown; use one of {SUMMARY_METRICS}")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"{name}: confidence must be in (0, 1), e.g. 0.95; got {confidence}")
    if n_resamples < 1:
        raise ConfigError(f"{name}: n_resamples must be >= 1 (1000 is usual); got {n_resamples}")


def _cocoeval_replicas(
    gt: Any,
    pair: tuple[list[dict], list[dict]],
    draws: list[np.ndarray],
    class_names: list[str],
    cat_ids: list[int],
    backend: str,
) -> Iterator[list[dict]]:
    """The reference path: rebuild ground truth and both detection sets per draw and rerun COCOeval."""
    images = list(gt.dataset["images"])
    categories = list(gt.dataset["categories"])
    image_pos = {int(image["id"]): pos for pos, image in enumerate(images)}
    gt_arrays = _ground_truth_arrays(gt.dataset, image_pos)
    det_arrays = [_detection_arrays(dets, image_pos) for dets in pair]
    for draw in draws:
        with _gc_paused():
            new_images = _resampled_images(images, draw)
            gt_r = coco_from_dict(_resampled_ground_truth(gt_arrays, new_images, categories, draw), backend)
            yield [
                cocoeval_metrics(
                    gt_r,
                    coco_from_dict(_resampled_detections(dets, new_images, categories, draw), backend),
                    class_names,
                    cat_ids,
                    backend,
                )
                for dets in det_arrays
            ]


def hierarchical_draws(n_seeds: int, n_images: int, n_resamples: int, seed: int = 0) -> tuple[np.ndarray, list]:
    """The draws of a hierarchical bootstrap: ``(seed_counts [n_resamples, n_seeds], image draws)``.

    Resample ``r`` draws ``n_seeds`` training seeds with replacement (``seed_counts[r, s]``: how
    often seed ``s`` was drawn) and ``n_images`` validation images with replacement (one draw,
    shared by every drawn seed and both models). The image draws come from
    ``numpy.random.default_rng(seed)`` alone, so they are the plain paired bootstrap's draws; with
    one seed nothing else is drawn.
    """
    image_rng = np.random.default_rng(seed)
    seed_rng = np.random.default_rng([seed, 1])
    draws = [image_rng.integers(0, n_images, size=n_images) for _ in range(n_resamples)]
    if n_seeds == 1:
        return np.ones((n_resamples, 1), dtype=np.int64), draws
    seed_counts = np.stack(
        [np.bincount(seed_rng.integers(0, n_seeds, size=n_seeds), minlength=n_seeds) for _ in range(n_resamples)]
    )
    return seed_counts, draws


def hierarchical_replicas(
    delta: Callable[[int, np.ndarray], float], n_seeds: int, n_images: int, n_resamples: int, seed: int = 0
) -> np.ndarray:
    """Replicas of a hierarchical (seeds, then images) bootstrap of any per-seed statistic.

    ``delta(s, draw)`` is the statistic of training seed ``s`` on the image draw ``draw`` (indices
    with replacement, duplicates count twice); a replica is its mean over the drawn seeds
    (:func:`hierarchical_draws`). :func:`hierarchical_bootstrap` is this with Δ of a COCO metric.
    """
    seed_counts, draws = hierarchical_draws(n_seeds, n_images, n_resamples, seed)
    return np.array(
        [
            sum(counts[s] * delta(int(s), draw) for s in np.flatnonzero(counts)) / n_seeds
            for counts, draw in zip(seed_counts, draws)
        ]
    )


def hierarchical_bootstrap(
    coco_gt: str | Path | dict | Any,
    pairs: Sequence[tuple[list[dict], list[dict]]],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    metric: str = "map",
    class_names: list[str] | None = None,
    cat_ids: list[int] | None = None,
    classes: Sequence[str] = (),
    backend: str = "faster_coco_eval",
    progress: bool = False,
    method: str = "matches",
    name: str = "hierarchical_bootstrap",
) -> dict:
    """Hierarchical (training seeds, then validation images) paired bootstrap of ``metric(b) - metric(a)``.

    ``pairs[s] = (dets_a, dets_b)``: the baseline's and the variant's detections of training seed
    ``s`` (the same baseline list in every pair when the baseline has one seed). Each resample draws
    ``len(pairs)`` seeds with replacement, then the validation images with replacement (one image
    draw for every drawn seed and both models: the validation set is shared), and its replica is the
    mean over the drawn seeds of Δ on that image draw. The interval therefore holds both training
    noise (the spread of Δ between seeds) and validation-set noise. With one pair no seed is drawn,
    and it is the plain paired bootstrap, draw for draw (:func:`paired_bootstrap`).

    ``method="matches"`` matches each detection set to the ground truth once per image and
    re-accumulates per resample (:class:`ImageMatches`, pycocotools' numbers exactly); ``"cocoeval"``
    rebuilds the resampled COCO datasets and reruns COCOeval (``backend``) per draw, the slow
    reference (one pair only). ``backend`` computes the full-set values either way.

    Returns :func:`paired_bootstrap`'s dict, with ``a`` / ``b`` / ``delta`` the means over seeds,
    plus ``n_seeds`` and ``per_seed`` (``a``, ``b``, ``delta`` of each pair on the full set).
    """
    _check_settings(name, metric, confidence, n_resamples)
    if not pairs:
        raise ConfigError(f"{name}: no (baseline, variant) detection pairs; give one per training seed")
    if method not in ("matches", "cocoeval") or (method == "cocoeval" and len(pairs) > 1):
        raise ConfigError(f"{name}: method {method!r} is unknown; use 'matches' ('cocoeval' needs a single pair)")

    gt = load_coco_gt(coco_gt, backend)
    class_names, cat_ids = resolve_classes(gt, class_names, cat_ids)
    unknown = [c for c in classes if c not in class_names]
    if unknown:
        raise ConfigError(f"{name}: classes {unknown} are not among the class names {class_names}")
    unique: dict[int, list[dict]] = {}
    for pair in pairs:
        for dets in pair:
            if id(dets) not in unique:
                check_detections(gt, dets)
                unique[id(dets)] = dets
    full = {
        key: cocoeval_metrics(gt, load_results(gt, dets, backend), class_names, cat_ids, backend)
        for key, dets in unique.items()
    }
    first_a = full[id(pairs[0][0])]
    if math.isnan(first_a[metric]):
        raise DataError(f"{name}: {metric} is undefined on this ground truth (no boxes it measures)")
    for cls in classes:
        if math.isnan(first_a["per_class"][cls]["ap"]):
            raise DataError(f"{name}: class {cls!r} has no ground truth in this split; drop it from classes")

    n_images, n_seeds = len(gt.dataset["images"]), len(pairs)
    seed_counts, draws = hierarchical_draws(n_seeds, n_images, n_resamples, seed)
    replicas = np.full(n_resamples, np.nan)
    class_replicas = {cls: np.full(n_resamples, np.nan) for cls in classes}

    def delta(side_a: dict, side_b: dict) -> tuple[float, dict]:
        return side_b[metric] - side_a[metric], {
            cls: side_b["per_class"][cls]["ap"] - side_a["per_class"][cls]["ap"] for cls in classes
        }

    indices: Iterator[int] | range = range(n_resamples)
    if progress:
        indices = tqdm(indices, desc="bootstrap", leave=False)
    if method == "cocoeval":
        evaluations = _cocoeval_replicas(gt, pairs[0], draws, class_names, cat_ids, backend)
        for r in indices:
            replicas[r], per_class = delta(*next(evaluations))
            for cls in classes:
                class_replicas[cls][r] = per_class[cls]
    else:
        matches = {key: ImageMatches.build(gt, dets, cat_ids) for key, dets in unique.items()}
        for r in indices:
            drawn = seed_counts[r]
            metrics = {
                key: matches[key].metrics(draws[r], class_names, cat_ids)
                for s in np.flatnonzero(drawn)
                for key in (id(pairs[s][0]), id(pairs[s][1]))
            }
            values = [
                (drawn[s], *delta(metrics[id(pairs[s][0])], metrics[id(pairs[s][1])])) for s in np.flatnonzero(drawn)
            ]
            replicas[r] = sum(w * d for w, d, _ in values) / n_seeds
            for cls in classes:
                class_replicas[cls][r] = sum(w * pc[cls] for w, _, pc in values) / n_seeds

    per_seed = [
        {
            "a": full[id(a)][metric],
            "b": full[id(b)][metric],
            "delta": full[id(b)][metric] - full[id(a)][metric],
        }
        for a, b in pairs
    ]
    mean_a = sum(p["a"] for p in per_seed) / n_seeds
    mean_b = sum(p["b"] for p in per_seed) / n_seeds
    mean_delta = sum(p["delta"] for p in per_seed) / n_seeds
    result = {"metric": metric}
    result.update(_interval(mean_delta, mean_a, mean_b, replicas, confidence, n_resamples))
    result.update({"seed": seed, "n_images": n_images, "backend": backend, "method": method, "n_seeds": n_seeds})
    result["per_seed"] = per_seed
    result["per_class"] = {}
    for cls in classes:
        ap_a = [full[id(a)]["per_class"][cls]["ap"] for a, _ in pairs]
        ap_b = [full[id(b)]["per_class"][cls]["ap"] for _, b in pairs]
        d = sum(y - x for x, y in zip(ap_a, ap_b)) / n_seeds
        result["per_class"][cls] = _interval(
            d, sum(ap_a) / n_seeds, sum(ap_b) / n_seeds, class_replicas[cls], confidence, n_resamples
        )
    return result


def paired_bootstrap(coco_gt: str | Path | dict | Any, dets_a: list[dict], dets_b: list[dict], **options: Any) -> dict:
    """Paired bootstrap confidence interval of ``metric(b) - metric(a)`` over validation images.

    Each resample draws ``n`` image indices with replacement from a seeded
    ``numpy.random.Generator`` and uses the *same* draw for both models; a duplicated image counts
    as another image, not as a merge. A replica is exactly COCOeval's metric on the resampled
    dataset (rebuilt with new image and annotation ids): with ``method="matches"`` (default) from
    the matches of every image computed once (:class:`ImageMatches`), with ``"cocoeval"`` by
    rebuilding the COCO dicts and rerunning COCOeval per draw (the slow reference). The interval is
    the percentile interval of the replicas at level ``confidence``.

    Args:
        coco_gt: ground truth (json path, COCO dict or COCO object).
        dets_a: baseline COCO detections; dets_b: the variant's.
        options: :func:`hierarchical_bootstrap`'s (``n_resamples``, ``confidence``, ``seed``, ``metric``,
            ``class_names``, ``cat_ids``, ``classes``, ``backend``, ``progress``, ``method``); among them
        metric: one of ``SUMMARY_METRICS``.
        class_names / cat_ids: as in ``tfg_mm.evaluation.coco.coco_evaluate``.
        classes: class names whose AP50:95 difference also gets an interval (e.g. the hard
            classes); a draw in which a class has no ground truth is skipped for that class and
            ``n_valid`` counts the draws used.
        backend: COCOeval implementation of the full-set values (and of ``method="cocoeval"``).

    Returns:
        ``{"metric", "a", "b", "delta", "lo", "hi", "confidence", "n_resamples", "n_valid",
        "verdict", "seed", "n_images", "backend", "method", "n_seeds": 1, "per_seed",
        "per_class": {name: {same keys but metric}}}``.
    """
    return hierarchical_bootstrap(coco_gt, [(dets_a, dets_b)], name="paired_bootstrap", **options)
