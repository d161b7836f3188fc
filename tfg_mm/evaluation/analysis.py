"""Error analysis of a run's detections: PR / F1 curves, operating points, confusion matrix, TIDE errors.

Input: COCO ground truth (json path, dict or COCO object, :func:`tfg_mm.evaluation.coco.load_coco_gt`) and
COCO detections (the list ``{run_dir}/detections_val.json`` holds for the selected checkpoint).
:func:`analyse` returns one JSON-ready dict; :func:`analyse_run` also writes it to
``{run_dir}/analysis.json`` (:data:`tfg_mm.paths.ANALYSIS_FILE`) and returns the two entries the run
contract carries (``final.operating_points``, ``final.errors``).

Definitions (all "all areas", at most 100 detections per image and class, as COCOeval):

* **Matching at IoU t** (:func:`match_class`): COCOeval's greedy rule. Per image and class, the
  detections in decreasing score order each take the unmatched ground-truth box of the same class
  with the highest IoU >= t; crowd boxes are ignored (a detection on one is neither TP nor FP).
  AP is COCO's 101-point interpolated precision; this module's AP50 equals COCOeval's
  (``tests/test_analysis.py`` checks it on random cases).
* **PR curves**: COCOeval's ``eval['precision']`` at the 101 recall points, per class, at IoU 0.5
  and the mean over the ten IoUs 0.50:0.95 (a recall point no detection reaches has precision 0).
* **F1 against score threshold** (IoU 0.5): keeping the detections with score >= s gives
  precision P(s) = TP / (TP + FP), recall R(s) = TP / N_gt and F1 = 2PR / (P + R). The curve is
  sampled at thresholds 0, 0.01, ..., 1.
* **Operating point** of a class: the score threshold s* (a detection score, so the cut is exact)
  that maximises F1, with P(s*), R(s*), F1(s*); ties go to the higher threshold. A class with ground
  truth but no true positive gets threshold None and P = R = F1 = 0; one without ground truth None.
* **Confusion matrix** (IoU 0.5, each class's detections kept at its own operating threshold): per
  image, detections are first matched to boxes of their own class (greedy, as above: the diagonal);
  the remaining detections, in score order, take the unmatched box of *another* class with the
  highest IoU >= 0.5 (an off-diagonal cell: ground-truth row, predicted column); what is left of the
  detections is the ``background`` row (no box at IoU >= 0.5: background or a duplicate), what is
  left of the boxes the ``missed`` column.
* **TIDE error breakdown** (Bolya et al., *TIDE: A General Toolbox for Identifying Object
  Detection Errors*, ECCV 2020), foreground IoU t_f = 0.5, background IoU t_b = 0.1. Every
  detection that is not a true positive at t_f gets the first type that applies (TIDE's order):
  *localisation* — its best IoU with a box of its own class is in [t_b, t_f); *classification* —
  IoU >= t_f with a box of another class; *duplicate* — IoU >= t_f with a box of its own class that
  a higher-scoring detection already matched; *background* — IoU <= t_b with every box;
  *both* — otherwise (IoU in (t_b, t_f) with a box of another class only). A box that no detection
  matched and that is not the target of a classification or localisation error is *missed*.
  Each type's oracle fix, applied to all errors of that type at once while everything else stays:
  classification — the detection takes the box's class and becomes its true positive;
  localisation — the detection takes the box's coordinates and becomes its true positive; both
  only when the box is not matched already and the detection is the highest-scoring of the
  classification / localisation errors that target the box (one fix per box, TIDE's
  ``BestGTMatch``), else the detection is removed; both, duplicate,
  background — the detection is removed; missed — the missed boxes leave the ground truth count
  (N_gt) of their class (a class whose every box was missed then has nothing left to find: its AP
  after the fix is 1 by convention). **ΔAP** of a type and class = AP50 of the class after the fix − AP50 before
  (>= 0; a classification fix moves a detection from its predicted class to the box's class, so it
  can raise both classes' AP). As in TIDE, the ΔAP of the types do not add up to 1 − AP.

  Checked against ``tidecv`` 1.0.1 (TIDE's code; not a dependency: it needs OpenCV) on 2 x 40
  random cases of 5 images and 2 classes (960 per-class ΔAP values): every base AP50 is equal and
  every ΔAP but 10: 6 are the convention above for a class whose every box was missed (tidecv: AP
  0 with no box left, ΔAP 0), 4 differ by <= 0.008 where a recall value falls exactly on one of the
  101 recall points, which tidecv computes as x / 100 and COCOeval (and this module) with
  ``np.linspace``. tidecv evaluates only images that hold ground truth; here, as in COCOeval,
  every image of the ground truth counts.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tfg_mm.evaluation import ERROR_TYPES
from tfg_mm.evaluation.coco import check_detections, load_coco_gt, load_results, resolve_classes, run_cocoeval
from tfg_mm.io import atomic_write_json, json_safe
from tfg_mm.paths import RunPaths

IOU_FG = 0.5
IOU_BG = 0.1
MAX_DETS = 100
#: the thresholds at which the F1 curve is sampled
F1_THRESHOLDS = np.round(np.linspace(0.0, 1.0, 101), 2)
BACKGROUND = "background"
MISSED = "missed"


# --------------------------------------------------------------------------------------------
# Boxes and matching
# --------------------------------------------------------------------------------------------
def box_iou(dets: np.ndarray, gts: np.ndarray, crowd: np.ndarray | None = None) -> np.ndarray:
    """IoU ``[N, M]`` of xywh boxes as COCO computes it (a crowd box: intersection / detection area)."""
    dets = np.asarray(dets, dtype=float).reshape(-1, 4)
    gts = np.asarray(gts, dtype=float).reshape(-1, 4)
    if not len(dets) or not len(gts):
        return np.zeros((len(dets), len(gts)))
    dx2, dy2 = dets[:, 0] + dets[:, 2], dets[:, 1] + dets[:, 3]
    gx2, gy2 = gts[:, 0] + gts[:, 2], gts[:, 1] + gts[:, 3]
    iw = np.clip(np.minimum(dx2[:, None], gx2[None]) - np.maximum(dets[:, None, 0], gts[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(dy2[:, None], gy2[None]) - np.maximum(dets[:, None, 1], gts[None, :, 1]), 0, None)
    inter = iw * ih
    d_area = (dets[:, 2] * dets[:, 3])[:, None]
    union = d_area + (gts[:, 2] * gts[:, 3])[None] - inter
    if crowd is not None:
        union = np.where(np.asarray(crowd, bool)[None], np.broadcast_to(d_area, union.shape), union)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


@dataclass
class _Image:
    """One image's boxes: ground truth (xywh, class index, crowd) and detections (sorted by score, kept)."""

    gt_boxes: np.ndarray
    gt_cls: np.ndarray
    gt_crowd: np.ndarray
    det_boxes: np.ndarray
    det_cls: np.ndarray
    det_scores: np.ndarray
    iou: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.iou = box_iou(self.det_boxes, self.gt_boxes, self.gt_crowd)


def _images(gt: Any, detections: list[dict], cat_ids: list[int]) -> list[_Image]:
    """Per image (sorted ids, as COCOeval): its boxes, and per class its top-100 detections in score order."""
    index = {cat: k for k, cat in enumerate(cat_ids)}
    by_image: dict[int, list[dict]] = {}
    for det in detections:
        if det["category_id"] in index:
            by_image.setdefault(int(det["image_id"]), []).append(det)
    out = []
    for image_id in sorted(gt.imgs):
        anns = [a for a in gt.imgToAnns.get(image_id, []) if a["category_id"] in index]
        dets = by_image.get(image_id, [])
        kept = []
        for k in range(len(cat_ids)):
            mine = [d for d in dets if index[d["category_id"]] == k]
            order = np.argsort([-d["score"] for d in mine], kind="mergesort")[:MAX_DETS]
            kept.extend(mine[i] for i in order)
        order = np.argsort([-d["score"] for d in kept], kind="mergesort")
        kept = [kept[i] for i in order]
        out.append(
            _Image(
                gt_boxes=np.array([a["bbox"] for a in anns], dtype=float).reshape(-1, 4),
                gt_cls=np.array([index[a["category_id"]] for a in anns], dtype=int),
                gt_crowd=np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
                det_boxes=np.array([d["bbox"] for d in kept], dtype=float).reshape(-1, 4),
                det_cls=np.array([index[d["category_id"]] for d in kept], dtype=int),
                det_scores=np.array([float(d["score"]) for d in kept], dtype=float),
            )
        )
    return out


def match_class(image: _Image, cls: int, iou_thr: float = IOU_FG) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval's greedy matching of one image and class; returns (detection -> box index or -1,
    detection ignored) over the image's detections of ``cls`` in score order (box index into the image's boxes)."""
    det_idx = np.flatnonzero(image.det_cls == cls)
    gt_idx = np.flatnonzero(image.gt_cls == cls)
    # COCOeval sorts the ignored (crowd) boxes last and prefers a non-ignored match
    gt_idx = gt_idx[np.argsort(image.gt_crowd[gt_idx], kind="mergesort")]
    matched = np.full(len(det_idx), -1)
    ignored = np.zeros(len(det_idx), dtype=bool)
    used = np.zeros(len(gt_idx), dtype=bool)
    thr = min(iou_thr, 1 - 1e-10)
    for d, det in enumerate(det_idx):
        best, best_iou = -1, thr
        for g, box in enumerate(gt_idx):
            crowd = image.gt_crowd[box]
            if used[g] and not crowd:
                continue
            if best > -1 and not image.gt_crowd[gt_idx[best]] and crowd:
                break
            if image.iou[det, box] < best_iou:
                continue
            best, best_iou = g, image.iou[det, box]
        if best > -1:
            used[best] = True
            matched[d] = gt_idx[best]
            ignored[d] = image.gt_crowd[gt_idx[best]]
    return matched, ignored


def coco_ap(scores: np.ndarray, tp: np.ndarray, n_gt: int) -> float:
    """COCO's 101-point interpolated AP of detections (``scores``, ``tp`` flags, ignored ones left out)."""
    if n_gt <= 0:
        return math.nan
    if not len(scores):
        return 0.0
    order = np.argsort(-np.asarray(scores, dtype=float), kind="mergesort")
    tp = np.asarray(tp, dtype=bool)[order]
    tps = np.cumsum(tp)
    fps = np.cumsum(~tp)
    recall = tps / n_gt
    precision = tps / np.maximum(tps + fps, np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, np.linspace(0.0, 1.0, 101), side="left")
    values = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
    return float(values.mean())


# --------------------------------------------------------------------------------------------
# Matching every detection once: TP / FP / ignored, and its TIDE error type
# --------------------------------------------------------------------------------------------
@dataclass
class _Matches:
    """Flat arrays over all kept detections (image order, then score order) and over all boxes."""

    det_image: np.ndarray
    det_cls: np.ndarray
    det_score: np.ndarray
    det_tp: np.ndarray
    det_ignored: np.ndarray
    det_error: np.ndarray  # index into ERROR_TYPES, -1 for a TP / ignored detection
    det_target: np.ndarray  # global box index of a classification / localisation error, else -1
    gt_cls: np.ndarray
    gt_ignored: np.ndarray
    gt_used: np.ndarray
    gt_missed: np.ndarray
    n_classes: int


def _match_all(images: list[_Image], n_classes: int) -> _Matches:
    cols: dict[str, list] = {k: [] for k in ("image", "cls", "score", "tp", "ign", "err", "target")}
    gt_cls, gt_ign, gt_used, targeted = [], [], [], []
    offset = 0
    for i, image in enumerate(images):
        n_det = len(image.det_cls)
        tp = np.zeros(n_det, bool)
        ign = np.zeros(n_det, bool)
        used = np.zeros(len(image.gt_cls), bool)
        for cls in range(n_classes):
            det_idx = np.flatnonzero(image.det_cls == cls)
            matched, ignored = match_class(image, cls)
            ign[det_idx] = ignored
            tp[det_idx] = (matched > -1) & ~ignored
            used[matched[(matched > -1) & ~ignored]] = True
        err = np.full(n_det, -1)
        target = np.full(n_det, -1)
        todo = ~tp & ~ign
        if len(image.gt_cls):
            iou = np.where(~image.gt_crowd[None], image.iou, 0.0)  # [N, M]
            same = image.gt_cls[None] == image.det_cls[:, None]
            cls_iou, other_iou = np.where(same, iou, 0.0), np.where(~same, iou, 0.0)
            used_max = np.where(same & used[None], iou, 0.0).max(axis=1)
            loc = todo & (cls_iou.max(axis=1) >= IOU_BG) & (cls_iou.max(axis=1) <= IOU_FG)
            cls = todo & ~loc & (other_iou.max(axis=1) >= IOU_FG)
            dup = todo & ~loc & ~cls & (used_max >= IOU_FG)
            bkg = todo & ~loc & ~cls & ~dup & (iou.max(axis=1) <= IOU_BG)
            both = todo & ~(loc | cls | dup | bkg)
            for name, mask in (("localisation", loc), ("classification", cls), ("duplicate", dup)):
                err[mask] = ERROR_TYPES.index(name)
            err[bkg], err[both] = ERROR_TYPES.index("background"), ERROR_TYPES.index("both")
            target[loc] = offset + cls_iou.argmax(axis=1)[loc]
            target[cls] = offset + other_iou.argmax(axis=1)[cls]
        else:
            err[todo] = ERROR_TYPES.index("background")
        cols["image"].append(np.full(n_det, i))
        cols["cls"].append(image.det_cls)
        cols["score"].append(image.det_scores)
        cols["tp"].append(tp)
        cols["ign"].append(ign)
        cols["err"].append(err)
        cols["target"].append(target)
        gt_cls.append(image.gt_cls)
        gt_ign.append(image.gt_crowd)
        gt_used.append(used)
        offset += len(image.gt_cls)
        targeted.extend(target[target > -1].tolist())
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    gt_cls_a = np.concatenate(gt_cls).astype(int) if gt_cls else np.zeros(0, int)
    gt_ign_a = np.concatenate(gt_ign).astype(bool) if gt_ign else np.zeros(0, bool)
    gt_used_a = np.concatenate(gt_used).astype(bool) if gt_used else np.zeros(0, bool)
    is_target = np.zeros(len(gt_cls_a), bool)
    is_target[np.asarray(targeted, dtype=int)] = True
    return _Matches(
        det_image=cat["image"].astype(int),
        det_cls=cat["cls"].astype(int),
        det_score=cat["score"].astype(float),
        det_tp=cat["tp"].astype(bool),
        det_ignored=cat["ign"].astype(bool),
        det_error=cat["err"].astype(int),
        det_target=cat["target"].astype(int),
        gt_cls=gt_cls_a,
        gt_ignored=gt_ign_a,
        gt_used=gt_used_a,
        gt_missed=~gt_used_a & ~gt_ign_a & ~is_target,
        n_classes=n_classes,
    )


def _class_aps(m: _Matches, cls_of: np.ndarray, tp: np.ndarray, keep: np.ndarray, n_gt: np.ndarray) -> np.ndarray:
    return np.array(
        [coco_ap(m.det_score[keep & (cls_of == k)], tp[keep & (cls_of == k)], int(n_gt[k])) for k in range(m.n_classes)]
    )


def _n_gt(m: _Matches, drop: np.ndarray | None = None) -> np.ndarray:
    real = ~m.gt_ignored if drop is None else ~m.gt_ignored & ~drop
    return np.bincount(m.gt_cls[real], minlength=m.n_classes)


def tide_errors(m: _Matches) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """AP50 per class, and per error type the AP50 per class after that type's oracle fix (module docstring)."""
    keep = ~m.det_ignored
    base = _class_aps(m, m.det_cls, m.det_tp, keep, _n_gt(m))
    # one fix per box: its highest-scoring classification / localisation error (TIDE's BestGTMatch)
    best = np.full(len(m.gt_cls), -1)
    for d in np.flatnonzero(m.det_target > -1):
        box = m.det_target[d]
        if best[box] < 0 or m.det_score[d] > m.det_score[best[box]]:
            best[box] = d
    fixed: dict[str, np.ndarray] = {}
    for e, name in enumerate(ERROR_TYPES):
        cls_of, tp, kept = m.det_cls.copy(), m.det_tp.copy(), keep.copy()
        drop_gt = None
        if name == "missed":
            drop_gt = m.gt_missed
        elif name in ("classification", "localisation"):
            for d in np.flatnonzero(m.det_error == e):
                box = m.det_target[d]
                if m.gt_used[box] or best[box] != d:
                    kept[d] = False
                else:
                    tp[d] = True
                    cls_of[d] = m.gt_cls[box]
        else:
            kept &= m.det_error != e
        aps = _class_aps(m, cls_of, tp, kept, _n_gt(m, drop_gt))
        if name == "missed":  # a class whose every box was missed has nothing left to find: AP 1 by convention
            aps = np.where(np.isnan(aps) & np.isfinite(base), 1.0, aps)
        fixed[name] = aps
    return base, fixed


# --------------------------------------------------------------------------------------------
# F1, operating points, confusion matrix
# --------------------------------------------------------------------------------------------
def _pr_at_cuts(scores: np.ndarray, tp: np.ndarray, n_gt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(threshold, precision, recall) at every distinct score, highest first (cut: score >= threshold)."""
    order = np.argsort(-scores, kind="mergesort")
    scores, tp = scores[order], tp[order]
    tps, fps = np.cumsum(tp), np.cumsum(~tp)
    last = np.r_[scores[1:] != scores[:-1], True] if len(scores) else np.zeros(0, bool)
    tps, fps, thr = tps[last], fps[last], scores[last]
    precision = tps / np.maximum(tps + fps, 1)
    recall = tps / n_gt if n_gt else np.zeros_like(precision, dtype=float)
    return thr, precision, recall


def _f1(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)


def operating_points(m: _Matches, class_names: list[str]) -> tuple[dict, dict]:
    """Per class the F1-maximising threshold (module docstring), and the sampled F1 / P / R curves."""
    points, curves = {}, {}
    keep = ~m.det_ignored
    n_gt = _n_gt(m)
    for k, name in enumerate(class_names):
        sel = keep & (m.det_cls == k)
        scores, tp = m.det_score[sel], m.det_tp[sel]
        thr, precision, recall = _pr_at_cuts(scores, tp, int(n_gt[k]))
        f1 = _f1(precision, recall)
        # sampled curve: at threshold s, keep score >= s
        counts_tp = np.array([tp[scores >= s].sum() for s in F1_THRESHOLDS])
        counts_all = np.array([(scores >= s).sum() for s in F1_THRESHOLDS])
        p_s = np.where(counts_all > 0, counts_tp / np.maximum(counts_all, 1), 0.0)
        r_s = counts_tp / n_gt[k] if n_gt[k] else np.zeros(len(F1_THRESHOLDS))
        curves[name] = {"precision": p_s.tolist(), "recall": r_s.tolist(), "f1": _f1(p_s, r_s).tolist()}
        if n_gt[k] == 0:
            points[name] = {"threshold": None, "precision": None, "recall": None, "f1": None}
        elif not len(f1) or f1.max() <= 0:
            points[name] = {"threshold": None, "precision": 0.0, "recall": 0.0, "f1": 0.0}
        else:
            best = int(np.flatnonzero(f1 == f1.max())[0])  # highest threshold among ties
            points[name] = {
                "threshold": float(thr[best]),
                "precision": float(precision[best]),
                "recall": float(recall[best]),
                "f1": float(f1[best]),
            }
    return points, curves


def at_thresholds(
    coco_gt: str | Path | dict | Any,
    detections: list[dict],
    thresholds: Mapping[str, float | None],
    class_names: list[str] | None = None,
    cat_ids: list[int] | None = None,
    backend: str = "faster_coco_eval",
) -> dict:
    """Per class: precision, recall and F1 at IoU 0.5 of the detections at or above a threshold chosen elsewhere
    (the validation operating points), with the counts behind them: what a deployment at those thresholds gets.

    ``{class: {"threshold", "precision", "recall", "f1", "tp", "fp", "instances"}}``. A class without a threshold
    (the validation set could not choose one) or without instances here has None where nothing can be measured.
    """
    gt = load_coco_gt(coco_gt, backend)
    class_names, cat_ids = resolve_classes(gt, class_names, cat_ids)
    check_detections(gt, detections)
    m = _match_all(_images(gt, detections, cat_ids), len(cat_ids))
    keep = ~m.det_ignored
    n_gt = _n_gt(m)
    out = {}
    for k, name in enumerate(class_names):
        threshold = thresholds.get(name)
        entry: dict[str, Any] = {"threshold": threshold, "instances": int(n_gt[k])}
        if threshold is None:
            out[name] = {**entry, "precision": None, "recall": None, "f1": None, "tp": None, "fp": None}
            continue
        sel = keep & (m.det_cls == k) & (m.det_score >= threshold)
        tp, fp = int(m.det_tp[sel].sum()), int((~m.det_tp[sel]).sum())
        precision = tp / (tp + fp) if tp + fp else None
        recall = tp / int(n_gt[k]) if n_gt[k] else None
        f1 = 2 * precision * recall / (precision + recall) if precision and recall else (0.0 if n_gt[k] else None)
        out[name] = {**entry, "precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp}
    return out


def confusion_matrix(images: list[_Image], thresholds: list[float | None]) -> np.ndarray:
    """Counts ``[K + 1, K + 1]``: rows ground-truth class + background, columns predicted class + missed
    (module docstring); class k's detections are kept at score >= ``thresholds[k]`` (None: none kept)."""
    n = len(thresholds)
    cut = np.array([math.inf if t is None else t for t in thresholds])
    matrix = np.zeros((n + 1, n + 1), dtype=int)
    for image in images:
        keep = image.det_scores >= cut[image.det_cls] if len(image.det_cls) else np.zeros(0, bool)
        sub = _Image(
            image.gt_boxes,
            image.gt_cls,
            image.gt_crowd,
            image.det_boxes[keep],
            image.det_cls[keep],
            image.det_scores[keep],
        )
        real = ~sub.gt_crowd
        gt_used = np.zeros(len(sub.gt_cls), bool)
        det_done = np.zeros(len(sub.det_cls), bool)
        for cls in range(n):
            det_idx = np.flatnonzero(sub.det_cls == cls)
            matched, ignored = match_class(sub, cls)
            for d, g, ig in zip(det_idx, matched, ignored):
                if g > -1:
                    det_done[d] = True
                    if not ig:
                        gt_used[g] = True
                        matrix[cls, cls] += 1
        for d in np.flatnonzero(~det_done):  # score order
            iou = np.where(real & ~gt_used & (sub.gt_cls != sub.det_cls[d]), sub.iou[d], 0.0)
            if len(iou) and iou.max() >= IOU_FG:
                g = int(iou.argmax())
                gt_used[g] = True
                matrix[sub.gt_cls[g], sub.det_cls[d]] += 1
            else:
                matrix[n, sub.det_cls[d]] += 1
        for g in np.flatnonzero(real & ~gt_used):
            matrix[sub.gt_cls[g], n] += 1
    return matrix


def confusion(
    coco_gt: str | Path | dict | Any,
    detections: list[dict],
    thresholds: list[float | None],
    class_names: list[str] | None = None,
    cat_ids: list[int] | None = None,
) -> np.ndarray:
    """:func:`confusion_matrix` of COCO ground truth and detections at per-class ``thresholds``."""
    gt = load_coco_gt(coco_gt)
    class_names, cat_ids = resolve_classes(gt, class_names, cat_ids)
    check_detections(gt, detections)
    return confusion_matrix(_images(gt, detections, cat_ids), thresholds)


# --------------------------------------------------------------------------------------------
# PR curves from COCOeval
# --------------------------------------------------------------------------------------------
def pr_curves(gt: Any, detections: list[dict], class_names: list[str], cat_ids: list[int], backend: str) -> dict:
    """COCOeval's precision at the 101 recall points per class: ``{"recall", "iou50": {class: [...]},
    "iou50_95": {class: [...]}}`` (None for a class without ground truth)."""
    evaluator = run_cocoeval(gt, load_results(gt, detections, backend), cat_ids, backend)
    p = evaluator.params
    precision = np.asarray(evaluator.eval["precision"])  # [T, R, K, A, M]
    m = list(p.maxDets).index(100)
    t50 = int(np.flatnonzero(np.isclose(p.iouThrs, 0.5))[0])
    eval_cats = [int(c) for c in p.catIds]
    out: dict[str, Any] = {"recall": np.asarray(p.recThrs).tolist(), "iou50": {}, "iou50_95": {}}
    for name, cat in zip(class_names, cat_ids):
        curve = precision[:, :, eval_cats.index(cat), 0, m]  # [T, R]
        if (curve < 0).all():
            out["iou50"][name] = out["iou50_95"][name] = None
            continue
        out["iou50"][name] = np.clip(curve[t50], 0, None).tolist()
        out["iou50_95"][name] = np.clip(curve, 0, None).mean(axis=0).tolist()
    return out


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def _none_if_nan(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def analyse(
    coco_gt: str | Path | dict | Any,
    detections: list[dict],
    class_names: list[str] | None = None,
    cat_ids: list[int] | None = None,
    backend: str = "faster_coco_eval",
) -> dict:
    """The whole error analysis (module docstring) as one JSON-ready dict.

    Keys: ``classes``; ``operating_points`` {class: {threshold, precision, recall, f1}}; ``errors``
    {class: {error type: ΔAP50}}; ``ap50`` {class: AP50 of this module's matching}; ``error_counts``
    {class: {error type: number of detections (boxes for ``missed``)}}; ``pr_curves`` (COCOeval);
    ``f1_curves`` {"thresholds", class: {precision, recall, f1}}; ``confusion`` {"labels" (rows: the
    classes + background), "columns" (the classes + missed), "thresholds", "counts"}; ``seconds``.
    """
    start = time.perf_counter()
    gt = load_coco_gt(coco_gt, backend)
    class_names, cat_ids = resolve_classes(gt, class_names, cat_ids)
    check_detections(gt, detections)
    images = _images(gt, detections, cat_ids)
    matches = _match_all(images, len(cat_ids))
    base, fixed = tide_errors(matches)
    points, f1_curves = operating_points(matches, class_names)
    thresholds = [points[name]["threshold"] for name in class_names]
    counts = confusion_matrix(images, thresholds)
    errors, error_counts = {}, {}
    for k, name in enumerate(class_names):
        errors[name] = {
            e: _none_if_nan(max(0.0, fixed[e][k] - base[k])) if math.isfinite(base[k]) else None for e in ERROR_TYPES
        }
        error_counts[name] = {
            e: int(((matches.det_error == i) & (matches.det_cls == k)).sum()) for i, e in enumerate(ERROR_TYPES)
        }
        error_counts[name]["missed"] = int((matches.gt_missed & (matches.gt_cls == k)).sum())
    return {
        "classes": class_names,
        "iou_foreground": IOU_FG,
        "iou_background": IOU_BG,
        "operating_points": points,
        "errors": errors,
        "ap50": {name: _none_if_nan(base[k]) for k, name in enumerate(class_names)},
        "error_counts": error_counts,
        "pr_curves": pr_curves(gt, detections, class_names, cat_ids, backend),
        "f1_curves": {"thresholds": F1_THRESHOLDS.tolist(), **f1_curves},
        "confusion": {
            "labels": [*class_names, BACKGROUND],
            "columns": [*class_names, MISSED],
            "thresholds": thresholds,
            "counts": counts.tolist(),
        },
        "seconds": round(time.perf_counter() - start, 3),
    }


def analyse_run(
    run_dir: str | Path,
    coco_gt: str | Path | dict | Any,
    detections: list[dict] | None = None,
    class_names: list[str] | None = None,
    cat_ids: list[int] | None = None,
) -> dict:
    """Analyse a run's selected-checkpoint detections (default: ``{run_dir}/detections_val.json``),
    write ``{run_dir}/analysis.json`` and return ``{"operating_points", "errors"}`` for ``final``."""
    files = RunPaths.at(run_dir)
    if detections is None:
        detections = json.loads(files.detections.read_text(encoding="utf-8"))
    result = analyse(coco_gt, detections, class_names, cat_ids)
    atomic_write_json(files.analysis, json_safe(result))
    return {"operating_points": result["operating_points"], "errors": result["errors"]}


def read_analysis(run_dir: str | Path) -> dict | None:
    """``{run_dir}/analysis.json``, or None when the run has none."""
    path = RunPaths.at(run_dir).analysis
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, Mapping) else None
