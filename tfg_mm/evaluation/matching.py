"""Detection galleries: what a run gets right and wrong on each validation image, and what phase 2 changed.

Everything here reads files a run already wrote (no model is loaded): the ground truth of the
run's validation split (``metrics["dataset"]["val_json"]``, images under the dataset's
``images_dir`` as :class:`tfg_mm.data.coco.CocoDetection` finds them) and the selected
checkpoint's detections (``{run_dir}/detections_val.json``, written by the trainer; or the cache
``detections_val.cache.json`` of :func:`tfg_mm.ablations.run_detections`).

**Matching** (:func:`match_image`), per image at IoU 0.5, of the detections at or above their
class's score threshold, as COCOeval matches: per class, detections in decreasing score order each
take the unmatched ground-truth box of that class with the highest IoU (>= 0.5). Then

* a matched detection is a **true positive**; an unmatched ground-truth box is a **miss**;
* an unmatched detection is a **false positive** of the first kind that applies, in TIDE's sense:
  ``duplicate`` (IoU >= 0.5 with a box of its class that a higher-scored detection took),
  ``wrong class`` (IoU >= 0.5 with a box of another class), ``mislocalised`` (0.1 <= IoU < 0.5
  with a box of its class), ``background`` (anything else);
* crowd boxes (``iscrowd: 1``) are neither matched nor missed, and a detection of their class
  lying >= 50 % inside one is ignored (COCOeval's rule), not counted as a false positive.

**Thresholds** (:func:`run_thresholds`): ``metrics["final"]["operating_points"][class]["threshold"]``
when the run records its operating points; otherwise the per-class score that maximises F1 at IoU
0.5 on these very detections (:func:`f1_thresholds`), said in :attr:`Thresholds.source`.

**Flips** (:func:`flips`): ground-truth boxes of a class that model A (the baseline) missed and
model B (phase 2) found, each at its own thresholds ("miss → hit"), and the reverse ("hit → miss").
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tfg_mm.data.validate import open_rgb
from tfg_mm.errors import DataError
from tfg_mm.paths import DETECTIONS_CACHE, RunPaths, resolve_path

IOU_MATCH = 0.5
#: TIDE's background threshold: below it a detection touches no box at all
IOU_BACKGROUND = 0.1
FP_KINDS = ("duplicate", "wrong class", "mislocalised", "background")


# --------------------------------------------------------------------------------------------
# Matching one image
# --------------------------------------------------------------------------------------------
def iou_matrix(a: np.ndarray, b: np.ndarray, crowd: np.ndarray | None = None) -> np.ndarray:
    """IoU of COCO ``xywh`` boxes ``a`` [n, 4] against ``b`` [m, 4]; for a crowd column of ``b``,
    intersection over the area of ``a`` (COCOeval's rule)."""
    a = np.asarray(a, dtype=float).reshape(-1, 4)
    b = np.asarray(b, dtype=float).reshape(-1, 4)
    ax1, ay1, aw, ah = (a[:, i : i + 1] for i in range(4))
    bx1, by1, bw, bh = (b[:, i][None, :] for i in range(4))
    iw = np.clip(np.minimum(ax1 + aw, bx1 + bw) - np.maximum(ax1, bx1), 0, None)
    ih = np.clip(np.minimum(ay1 + ah, by1 + bh) - np.maximum(ay1, by1), 0, None)
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    if crowd is not None and len(crowd):
        union = np.where(np.asarray(crowd, dtype=bool)[None, :], aw * ah, union)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


@dataclass
class ImageMatch:
    """The outcome of one image at the thresholds.

    ``tp``: ``(detection, ground-truth annotation, IoU)``; ``fp``: ``(detection, kind)`` with kind in
    :data:`FP_KINDS`; ``missed``: ground-truth annotations no detection found. Detections are the
    COCO dicts given (``bbox`` xywh, ``category_id``, ``score``).
    """

    image_id: int
    tp: list[tuple[dict, dict, float]] = field(default_factory=list)
    fp: list[tuple[dict, str]] = field(default_factory=list)
    missed: list[dict] = field(default_factory=list)

    def found_ids(self, category_id: int | None = None) -> set[int]:
        """Annotation ids of the ground-truth boxes found (of ``category_id``, or all)."""
        return {g["id"] for _, g, _ in self.tp if category_id is None or g["category_id"] == category_id}

    def missed_ids(self, category_id: int | None = None) -> set[int]:
        return {g["id"] for g in self.missed if category_id is None or g["category_id"] == category_id}

    def errors(self, category_id: int | None = None) -> int:
        """Misses of ``category_id`` plus false positives predicted as it or lying on one of its boxes."""
        if category_id is None:
            return len(self.missed) + len(self.fp)
        fp = sum(1 for d, _ in self.fp if d["category_id"] == category_id)
        return len(self.missed_ids(category_id)) + fp

    def counts(self) -> dict[str, int]:
        out = {"tp": len(self.tp), "fp": len(self.fp), "missed": len(self.missed)}
        out.update({f"fp {kind}": sum(1 for _, k in self.fp if k == kind) for kind in FP_KINDS})
        return out


def match_image(
    ground_truth: Sequence[Mapping[str, Any]],
    detections: Sequence[Mapping[str, Any]],
    thresholds: Mapping[int, float],
    image_id: int = 0,
    iou_threshold: float = IOU_MATCH,
) -> ImageMatch:
    """Match one image's detections (those with ``score >= thresholds[category_id]``) to its ground truth.

    ``thresholds`` maps category id -> score threshold; a category missing from it keeps no detection.
    See the module docstring for the rules.
    """
    gts = [dict(g) for g in ground_truth]
    dets = [dict(d) for d in detections if d["score"] >= thresholds.get(d["category_id"], np.inf)]
    # decreasing score; ties keep the given order (a stable sort, as COCOeval)
    dets = [dets[i] for i in np.argsort([-d["score"] for d in dets], kind="stable")]
    out = ImageMatch(int(image_id))
    crowd = np.array([bool(g.get("iscrowd", 0)) for g in gts], dtype=bool)
    iou = iou_matrix([d["bbox"] for d in dets], [g["bbox"] for g in gts], crowd)
    gt_cat = np.array([g["category_id"] for g in gts])
    taken = np.zeros(len(gts), dtype=bool)
    for i, det in enumerate(dets):
        same = (gt_cat == det["category_id"]) if len(gts) else np.zeros(0, dtype=bool)
        candidates = np.where(same & ~crowd & ~taken & (iou[i] >= iou_threshold))[0] if len(gts) else []
        if len(candidates):
            j = int(candidates[np.argmax(iou[i, candidates])])  # first of the best on ties
            taken[j] = True
            out.tp.append((det, gts[j], float(iou[i, j])))
            continue
        if len(gts) and np.any(same & crowd & (iou[i] >= iou_threshold)):
            continue  # on a crowd region of its class: ignored
        if not len(gts):
            out.fp.append((det, "background"))
        elif np.any(same & ~crowd & (iou[i] >= iou_threshold)):
            out.fp.append((det, "duplicate"))
        elif np.any(~same & ~crowd & (iou[i] >= iou_threshold)):
            out.fp.append((det, "wrong class"))
        elif np.any(same & ~crowd & (iou[i] >= IOU_BACKGROUND)):
            out.fp.append((det, "mislocalised"))
        else:
            out.fp.append((det, "background"))
    out.missed = [g for j, g in enumerate(gts) if not taken[j] and not crowd[j]]
    return out


# --------------------------------------------------------------------------------------------
# A whole split
# --------------------------------------------------------------------------------------------
def _by_image(items: Iterable[Mapping[str, Any]]) -> dict[int, list[Mapping[str, Any]]]:
    out: dict[int, list[Mapping[str, Any]]] = {}
    for item in items:
        out.setdefault(int(item["image_id"]), []).append(item)
    return out


def match_split(
    gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]], thresholds: Mapping[int, float]
) -> dict[int, ImageMatch]:
    """:func:`match_image` on every image of the COCO ground truth ``gt`` (a dict), keyed by image id."""
    gts, dets = _by_image(gt["annotations"]), _by_image(detections)
    unknown = sorted(set(dets) - {int(im["id"]) for im in gt["images"]})
    if unknown:
        raise DataError(
            f"detections refer to image ids {unknown[:5]} that the ground truth's 'images' lacks; "
            "use the detections of this split (the run's detections_val.json against its val_json)"
        )
    return {
        int(im["id"]): match_image(gts.get(int(im["id"]), []), dets.get(int(im["id"]), []), thresholds, int(im["id"]))
        for im in sorted(gt["images"], key=lambda im: im["id"])
    }


def f1_thresholds(
    gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]], iou_threshold: float = IOU_MATCH
) -> dict[int, dict[str, float]]:
    """Per category id: the score threshold that maximises F1 at ``iou_threshold`` (ties: the highest
    threshold), with its precision, recall and F1 (a class without ground truth or detections: NaN).

    Greedy matching in decreasing score order makes a detection's outcome independent of the
    detections below it, so one matching with every detection kept gives the curve at every threshold.
    """
    cat_ids = sorted(int(c["id"]) for c in gt["categories"])
    matches = match_split(gt, detections, dict.fromkeys(cat_ids, -np.inf))
    n_gt = {c: 0 for c in cat_ids}
    for ann in gt["annotations"]:
        if not ann.get("iscrowd", 0):
            n_gt[int(ann["category_id"])] += 1
    scored: dict[int, list[tuple[float, int]]] = {c: [] for c in cat_ids}
    for match in matches.values():
        scored_tp = [(d["score"], 1, d["category_id"]) for d, _, _ in match.tp]
        scored_fp = [(d["score"], 0, d["category_id"]) for d, _ in match.fp]
        for score, hit, cat in scored_tp + scored_fp:
            scored[int(cat)].append((float(score), hit))
    out = {}
    for cat in cat_ids:
        rows = sorted(scored[cat], key=lambda r: -r[0])
        if not rows or not n_gt[cat]:
            out[cat] = {
                "threshold": float("nan"),
                "precision": float("nan"),
                "recall": float("nan"),
                "f1": float("nan"),
            }
            continue
        scores = np.array([s for s, _ in rows])
        tp = np.cumsum([h for _, h in rows])
        k = np.arange(1, len(rows) + 1)
        last = np.r_[scores[1:] != scores[:-1], True]  # a threshold keeps all detections of equal score
        f1 = np.where(last, 2 * tp / (k + n_gt[cat]), -1.0)
        best = int(np.argmax(f1))  # first maximum: the highest threshold
        out[cat] = {
            "threshold": float(scores[best]),
            "precision": float(tp[best] / k[best]),
            "recall": float(tp[best] / n_gt[cat]),
            "f1": float(f1[best]),
        }
    return out


@dataclass(frozen=True)
class Thresholds:
    """Score threshold per class name and the words that say where they came from."""

    by_class: dict[str, float]
    source: str

    def by_category(self, cat_of: Mapping[str, int]) -> dict[int, float]:
        return {cat_of[name]: value for name, value in self.by_class.items() if name in cat_of}


def run_thresholds(
    metrics: Mapping[str, Any], gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]]
) -> Thresholds:
    """The run's operating thresholds (``final.operating_points``), else the F1-maximising ones computed here."""
    names = {int(c["id"]): str(c["name"]) for c in gt["categories"]}
    points = (metrics.get("final") or {}).get("operating_points") or {}
    recorded = {
        name: float(points[name]["threshold"])
        for name in names.values()
        if isinstance(points.get(name), Mapping) and isinstance(points[name].get("threshold"), (int, float))
    }
    if recorded and len(recorded) == len(names):
        return Thresholds(recorded, "the run's operating points (score maximising F1 at IoU 0.5)")
    computed = f1_thresholds(gt, detections)
    by_class = {}
    for cat, name in names.items():
        value = recorded.get(name, computed[cat]["threshold"])
        by_class[name] = 1.0 if not np.isfinite(value) else float(value)  # no GT / no detection: keep none
    source = "per class, the score maximising F1 at IoU 0.5 on these detections (computed here: the run records no operating points)"
    if recorded:
        source = (
            f"the run's operating points for {', '.join(sorted(recorded))}; for the others, " + source.split(" (")[0]
        )
    return Thresholds(by_class, source)


# --------------------------------------------------------------------------------------------
# A run's files
# --------------------------------------------------------------------------------------------
@dataclass
class RunView:
    """A run's validation ground truth, detections, thresholds and per-image matches."""

    name: str
    gt: dict
    detections: list[dict]
    thresholds: Thresholds
    matches: dict[int, ImageMatch]
    images_dir: Path

    @property
    def cat_of(self) -> dict[str, int]:
        return {str(c["name"]): int(c["id"]) for c in self.gt["categories"]}

    @property
    def class_of(self) -> dict[int, str]:
        return {int(c["id"]): str(c["name"]) for c in self.gt["categories"]}

    def image(self, image_id: int) -> Image.Image:
        entry = next(im for im in self.gt["images"] if int(im["id"]) == image_id)
        return open_rgb(self.images_dir / entry["file_name"])


def _read_json(path: Path, what: str, fix: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found. Fix: {fix}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: {what} is not valid JSON ({exc}). Fix: {fix}") from None


def run_files(metrics: Mapping[str, Any]) -> tuple[Path, Path, Path]:
    """``(val_json, images_dir, detections file)`` of a run contract.

    The images folder is the run's ``images_dir`` parameter under the dataset root (what the loader
    reads); the detections are ``{run_dir}/detections_val.json``, else the re-prediction cache.
    """
    params = metrics.get("params") or {}
    dataset = metrics.get("dataset") or {}
    if not dataset.get("val_json") or not params.get("run_dir"):
        raise DataError(
            "metrics.json: the run contract has no `dataset.val_json` or `params.run_dir`. Fix: pass the "
            "contract a finished run wrote (contract.read_metrics(run_dir))."
        )
    root = Path(dataset.get("root") or resolve_path(params.get("dataset", ".")))
    images_dir = Path(params.get("images_dir", "images"))
    images_dir = images_dir if images_dir.is_absolute() else root / images_dir
    run = RunPaths.at(params["run_dir"])
    detections = run.detections
    if not detections.exists() and run.detections_cache.exists():
        detections = run.detections_cache
    return resolve_path(dataset["val_json"]), images_dir, detections


def load_run(metrics: Mapping[str, Any], name: str = "") -> RunView:
    """Read a run's ground truth and detections and match them at its thresholds (:func:`run_thresholds`)."""
    val_json, images_dir, det_path = run_files(metrics)
    gt = _read_json(val_json, "validation ground truth (`dataset.val_json` of the run)", "restore the dataset folder")
    dets = _read_json(
        det_path,
        "the selected checkpoint's validation detections",
        "rerun the run (the trainer writes detections_val.json), or re-predict them into "
        f"{DETECTIONS_CACHE} with tfg_mm.ablations.run_detections(run_dir, metrics)",
    )
    if isinstance(dets, Mapping):  # the re-prediction cache: {"key", "value": {"detections", "note"}}
        dets = (dets.get("value") or {}).get("detections", [])
    thresholds = run_thresholds(metrics, gt, dets)
    matches = match_split(gt, dets, thresholds.by_category({str(c["name"]): int(c["id"]) for c in gt["categories"]}))
    return RunView(name or str(metrics.get("phase", "run")), gt, dets, thresholds, matches, images_dir)


# --------------------------------------------------------------------------------------------
# Choosing images
# --------------------------------------------------------------------------------------------
def images_with(gt: Mapping[str, Any], category_id: int) -> list[int]:
    """Ids of the images holding a (non-crowd) box of ``category_id``, in increasing order."""
    return sorted(
        {
            int(a["image_id"])
            for a in gt["annotations"]
            if int(a["category_id"]) == category_id and not a.get("iscrowd", 0)
        }
    )


def gallery_images(views: Sequence[RunView], category_id: int, n: int) -> list[int]:
    """Up to ``n`` images holding ``category_id``: the most errors on that class (summed over ``views``)
    first, then the most errors of any class, then increasing image id (deterministic)."""
    ids = images_with(views[0].gt, category_id)

    def key(image_id: int) -> tuple[int, int, int]:
        return (
            -sum(v.matches[image_id].errors(category_id) for v in views),
            -sum(v.matches[image_id].errors() for v in views),
            image_id,
        )

    return sorted(ids, key=key)[:n]


def flips(a: Mapping[int, ImageMatch], b: Mapping[int, ImageMatch], category_id: int) -> dict[str, Any]:
    """Ground-truth boxes of ``category_id`` that ``a`` missed and ``b`` found (``miss_to_hit``) and the
    reverse (``hit_to_miss``): box counts, and the images as ``(image_id, boxes flipped)`` with the
    largest changes first (ties: increasing image id)."""
    fixed, broken = [], []
    for image_id in sorted(set(a) & set(b)):
        ma, mb = a[image_id], b[image_id]
        n_fixed = len(ma.missed_ids(category_id) & mb.found_ids(category_id))
        n_broken = len(ma.found_ids(category_id) & mb.missed_ids(category_id))
        if n_fixed:
            fixed.append((image_id, n_fixed))
        if n_broken:
            broken.append((image_id, n_broken))
    order = lambda rows: sorted(rows, key=lambda r: (-r[1], r[0]))  # noqa: E731
    return {
        "miss_to_hit": sum(n for _, n in fixed),
        "hit_to_miss": sum(n for _, n in broken),
        "images_miss_to_hit": order(fixed),
        "images_hit_to_miss": order(broken),
    }
