"""COCO evaluation of DEIMv2 outputs: post-processing, COCO detections and COCOeval metrics.

The pipeline mirrors the official DEIMv2 post-processor so that the numbers are comparable with
the paper and with the thesis baseline (mAP 0.785):

1. ``postprocess``: sigmoid scores, flatten queries x classes, keep the ``top_k`` (300, the official
   ``num_top_queries``) highest (query, class) pairs. A query may therefore appear several times
   with different labels, exactly as in the official code; label = index % C, query = index // C.
   Boxes go from normalised cxcywh to xyxy in original-image pixels.
2. ``to_coco_detections``: xyxy -> COCO xywh, contiguous labels -> dataset category ids.
3. ``coco_evaluate``: ``pycocotools`` COCOeval (or ``faster_coco_eval``, same algorithm in C++)
   and the metrics read from ``eval['precision']`` (T x R x K x A x M), including per-class AP.

A metric that has nothing to measure (a class with no ground truth in the split, an area range
with no boxes) is NaN, never 0: a 0 would read as "the model fails on this class".
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_convert
from tqdm import tqdm  # plain bars: tqdm.auto warns in kernels without ipywidgets

from tfg_mm.errors import DataError

BACKENDS = ("pycocotools", "faster_coco_eval")

# Summary metrics as (key, IoU threshold or None for 0.50:0.95, area range label), the same
# selections as the first six entries of COCOeval.summarize() (all with maxDets=100).
_SUMMARY = (
    ("map", None, "all"),
    ("map50", 0.5, "all"),
    ("map75", 0.75, "all"),
    ("map_small", None, "small"),
    ("map_medium", None, "medium"),
    ("map_large", None, "large"),
)


# --------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------
def postprocess(logits: Tensor, pred_boxes: Tensor, orig_sizes: Tensor, top_k: int = 300) -> list[dict]:
    """Turn raw detector outputs into per-image detections, as DEIMv2's post-processor does.

    Args:
        logits: ``[B, Q, C]`` class logits (focal / sigmoid head, no background class).
        pred_boxes: ``[B, Q, 4]`` boxes, normalised ``(cx, cy, w, h)``.
        orig_sizes: ``[B, 2]`` original image sizes as ``(height, width)``.
        top_k: number of (query, class) pairs kept per image. The official value is 300; it is
            capped at ``Q * C`` so tiny test models with fewer pairs still work.

    Returns:
        One dict per image with ``scores`` ``[k]``, ``labels`` ``[k]`` (contiguous 0..C-1) and
        ``boxes`` ``[k, 4]`` xyxy in original-image pixels, sorted by decreasing score.
    """
    if logits.ndim != 3 or pred_boxes.ndim != 3 or pred_boxes.shape[-1] != 4:
        raise ValueError(
            f"postprocess expects logits [B, Q, C] and pred_boxes [B, Q, 4]; got {tuple(logits.shape)} "
            f"and {tuple(pred_boxes.shape)}"
        )
    batch, num_queries, num_classes = logits.shape
    orig_sizes = torch.as_tensor(orig_sizes, device=logits.device)
    if tuple(orig_sizes.shape) != (batch, 2):
        raise ValueError(f"orig_sizes must be [B, 2] = [{batch}, 2] as (height, width); got {tuple(orig_sizes.shape)}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1; got {top_k}")

    boxes, scores, labels = top_detections(logits, pred_boxes, orig_sizes, top_k)
    return [{"scores": s, "labels": c, "boxes": b} for s, c, b in zip(scores, labels, boxes)]


def top_detections(logits: Tensor, pred_boxes: Tensor, orig_sizes: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`postprocess` for a whole batch, without its argument checks (so that it traces into an ONNX graph:
    :class:`tfg_mm.deploy.export.DeployModel`): ``boxes [B, K, 4]`` xyxy pixels, ``scores [B, K]``, ``labels [B, K]``
    with ``K = min(top_k, Q * C)``."""
    _, num_queries, num_classes = logits.shape
    k = min(top_k, num_queries * num_classes)
    scores, index = torch.topk(logits.sigmoid().flatten(1), k, dim=-1)
    labels = index % num_classes
    query = index // num_classes

    height, width = orig_sizes.to(pred_boxes.dtype).unbind(-1)
    scale = torch.stack([width, height, width, height], dim=-1)  # [B, 4]
    boxes = box_convert(pred_boxes, in_fmt="cxcywh", out_fmt="xyxy") * scale[:, None, :]
    boxes = boxes.gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
    return boxes, scores, labels


def to_coco_detections(results: list[dict], image_ids: list[int], label_to_cat_id: list[int]) -> list[dict]:
    """Convert ``postprocess`` results into COCO detection dicts.

    Each detection is ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` with plain
    Python numbers, so the list can be written to JSON as the standard COCO results file.
    ``label_to_cat_id[label]`` is the dataset category id of contiguous label ``label``.
    """
    if len(results) != len(image_ids):
        raise ValueError(f"to_coco_detections got {len(results)} results but {len(image_ids)} image ids")
    cat_lookup = torch.as_tensor(list(label_to_cat_id), dtype=torch.long)
    detections: list[dict] = []
    for result, image_id in zip(results, image_ids):
        labels = result["labels"].detach().cpu().long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= len(cat_lookup)):
            raise DataError(
                f"to_coco_detections: label {int(labels.max())} has no category id; label_to_cat_id has "
                f"{len(cat_lookup)} entries. Pass one category id per class of the model."
            )
        boxes = result["boxes"].detach().cpu().double()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = result["scores"].detach().cpu().double().tolist()
        cats = cat_lookup[labels].tolist()
        image_id = int(image_id)
        detections.extend(
            {"image_id": image_id, "category_id": c, "bbox": b, "score": s} for c, b, s in zip(cats, xywh, scores)
        )
    return detections


# --------------------------------------------------------------------------------------------
# COCO objects
# --------------------------------------------------------------------------------------------
def _backend(backend: str) -> tuple[type, type]:
    """Return the (COCO, COCOeval) classes of ``backend``; both share the pycocotools API."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    raise ValueError(f"unknown COCO evaluation backend {backend!r}; use one of {BACKENDS}")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence pycocotools, which prints progress to stdout on every call."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def coco_from_dict(dataset: dict, backend: str = "pycocotools") -> Any:
    """Index a COCO dataset dict with ``backend``'s COCO class without copying it.

    pycocotools' constructor only reads files, so the dict is attached and indexed directly (the
    constructor does the same after ``json.load``). The caller hands over ownership: COCOeval adds
    keys such as ``ignore`` to the annotations.
    """
    coco_cls, _ = _backend(backend)
    coco = coco_cls()
    coco.dataset = dataset
    with _quiet():
        coco.createIndex()
    return coco


def load_coco_gt(coco_gt: str | Path | dict | Any, backend: str = "pycocotools") -> Any:
    """Load ground truth from a json path, a COCO dict or an existing COCO object.

    Box-only datasets often omit ``area`` and ``iscrowd``; COCOeval needs both, so they get the
    standard defaults (``w * h`` and 0). A dict is deep-copied first so the caller's data is not
    modified by that or by COCOeval.
    """
    coco_cls, _ = _backend(backend)
    if isinstance(coco_gt, coco_cls):
        return coco_gt
    if hasattr(coco_gt, "dataset") and hasattr(coco_gt, "createIndex"):  # the other backend's COCO
        coco_gt = coco_gt.dataset
    source = "<dict>"
    if isinstance(coco_gt, (str, Path)):
        source = str(coco_gt)
        try:
            dataset = json.loads(Path(coco_gt).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DataError(f"{source}: COCO ground-truth file not found; check the dataset folder") from exc
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}: not valid JSON ({exc}); regenerate the annotation file") from exc
    elif isinstance(coco_gt, Mapping):
        dataset = copy.deepcopy(dict(coco_gt))
    else:
        raise TypeError(f"coco_gt must be a path, a COCO dict or a COCO object; got {type(coco_gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise DataError(f"{source}: COCO ground truth has no '{key}' list; a COCO instances file needs it")
    image_ids = {image["id"] for image in dataset["images"]}
    for ann in dataset["annotations"]:
        if ann.get("image_id") not in image_ids:
            raise DataError(
                f"{source}: annotation id {ann.get('id')} refers to image_id {ann.get('image_id')!r}, "
                "which is not in 'images'; fix or drop the annotation"
            )
        if "bbox" not in ann or len(ann["bbox"]) != 4:
            raise DataError(f"{source}: annotation id {ann.get('id')} has no 4-number 'bbox' [x, y, w, h]")
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
    return coco_from_dict(dataset, backend)


def check_detections(coco_gt: Any, detections: list[dict]) -> None:
    """Fail with a clear message where COCOeval would assert or silently ignore detections.

    A category id unknown to the ground truth almost always means a wrong label -> category
    mapping (e.g. 0-based labels against 1-based ids); COCOeval would just skip those boxes.
    """
    required = ("image_id", "category_id", "bbox", "score")
    for det in detections:
        missing = [key for key in required if key not in det]
        if missing:
            raise DataError(f"detection {det!r} lacks {missing}; produce detections with to_coco_detections")
    unknown = {det["image_id"] for det in detections} - set(coco_gt.imgs)
    if unknown:
        raise DataError(
            f"detections refer to image ids {sorted(unknown)[:5]} that are not in the ground truth's 'images'; "
            "evaluate on the split the detections were made on"
        )
    unknown_cats = {det["category_id"] for det in detections} - {cat["id"] for cat in coco_gt.dataset["categories"]}
    if unknown_cats:
        raise DataError(
            f"detections use category ids {sorted(unknown_cats)[:5]} that are not in the ground truth's "
            "'categories'; map model labels with label_to_cat_id = the dataset's category ids"
        )


def load_results(coco_gt: Any, detections: list[dict], backend: str = "pycocotools") -> Any:
    """Build the detections' COCO object; works for an empty list, unlike pycocotools' loadRes.

    ``loadRes`` adds ``id``, ``area``, ``iscrowd`` and a polygon to each dict in place, so it gets
    shallow copies: the caller's detections stay as they were (the bootstrap reuses them).
    """
    if detections:
        with _quiet():
            return coco_gt.loadRes([dict(det) for det in detections])
    empty = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    return coco_from_dict(empty, backend)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
def resolve_classes(
    coco_gt: Any, class_names: list[str] | None, cat_ids: list[int] | None
) -> tuple[list[str], list[int]]:
    """Pair class names with category ids (defaults: the ground truth's categories by id)."""
    gt_cats = {int(cat["id"]): cat for cat in coco_gt.dataset["categories"]}
    if cat_ids is None:
        if class_names is not None and len(class_names) != len(gt_cats):
            raise DataError(
                f"class_names has {len(class_names)} entries but the ground truth has {len(gt_cats)} categories; "
                "pass cat_ids too, one per class name"
            )
        cat_ids = sorted(gt_cats)
    cat_ids = [int(cat_id) for cat_id in cat_ids]
    unknown = [cat_id for cat_id in cat_ids if cat_id not in gt_cats]
    if unknown:
        raise DataError(f"cat_ids {unknown} are not among the ground truth's category ids {sorted(gt_cats)}")
    if len(set(cat_ids)) != len(cat_ids):
        raise DataError(f"cat_ids {cat_ids} contains duplicates; each class needs its own category id")
    if class_names is None:
        class_names = [str(gt_cats[cat_id].get("name", cat_id)) for cat_id in cat_ids]
    if len(class_names) != len(cat_ids):
        raise DataError(
            f"class_names has {len(class_names)} entries but cat_ids has {len(cat_ids)}; give one name per category id"
        )
    return list(class_names), cat_ids


def _mean_valid(values: np.ndarray) -> float:
    """Mean over the entries COCOeval marks as defined (-1 means 'no ground truth here')."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else math.nan


def metrics_from_precision(
    precision: np.ndarray,
    iou_thrs: np.ndarray,
    area_labels: list[str],
    max_dets: list[int],
    eval_cat_ids: list[int],
    class_names: list[str],
    cat_ids: list[int],
) -> dict:
    """Summary and per-class AP from COCOeval's ``eval['precision']`` ``[T, R, K, A, M]``.

    The summary follows COCOeval.summarize() (maxDets=100, mean over entries > -1) except that
    an undefined value is NaN instead of -1. ``eval_cat_ids`` is the order of the K axis.
    """
    m = max_dets.index(100)
    t50 = int(np.flatnonzero(np.isclose(iou_thrs, 0.5))[0])
    metrics: dict[str, Any] = {}
    for key, iou, area in _SUMMARY:
        p = precision[:, :, :, area_labels.index(area), m]
        if iou is not None:
            p = p[np.flatnonzero(np.isclose(iou_thrs, iou))]
        metrics[key] = _mean_valid(p)
    per_class = {}
    for name, cat_id in zip(class_names, cat_ids):
        k = eval_cat_ids.index(cat_id)
        p = precision[:, :, k, 0, m]
        per_class[name] = {"ap": _mean_valid(p), "ap50": _mean_valid(p[t50])}
    metrics["per_class"] = per_class
    return metrics


def coco_evaluate(
    coco_gt: str | Path | dict | Any,
    detections: list[dict],
    class_names: list[str] | None = None,
    cat_ids: list[int] | None = None,
    backend: str = "pycocotools",
) -> dict:
    """Evaluate COCO detections against ground truth with COCOeval (bbox).

    Args:
        coco_gt: ground-truth json path, COCO dict, or COCO object of either backend.
        detections: COCO detection dicts (``image_id``, ``category_id``, ``bbox`` xywh, ``score``).
        class_names: names for the per-class entries, aligned with ``cat_ids``; default: the
            ground truth's category names.
        cat_ids: category ids to evaluate (mAP averages over these); default: all of the
            ground truth's categories.
        backend: ``"pycocotools"`` (reference) or ``"faster_coco_eval"`` (same numbers, faster).

    Returns:
        ``{"map", "map50", "map75", "map_small", "map_medium", "map_large", "per_class":
        {name: {"ap", "ap50"}}, "num_detections"}``; NaN where there is no ground truth to measure.
    """
    gt = load_coco_gt(coco_gt, backend)
    class_names, cat_ids = resolve_classes(gt, class_names, cat_ids)
    check_detections(gt, detections)
    metrics = cocoeval_metrics(gt, load_results(gt, detections, backend), class_names, cat_ids, backend)
    metrics["num_detections"] = len(detections)
    return metrics


def cocoeval_metrics(gt: Any, dt: Any, class_names: list[str], cat_ids: list[int], backend: str) -> dict:
    """Run COCOeval (bbox) on indexed ground truth / detection COCO objects of ``backend``.

    The one place where COCOeval runs, shared by ``coco_evaluate`` and the bootstrap in
    ``tfg_mm.evaluation.stats`` so that a full-set number and its resampled replicas are computed alike.
    """
    evaluator = run_cocoeval(gt, dt, cat_ids, backend)
    p = evaluator.params
    return metrics_from_precision(
        precision=np.asarray(evaluator.eval["precision"]),
        iou_thrs=np.asarray(p.iouThrs),
        area_labels=list(p.areaRngLbl),
        max_dets=list(p.maxDets),
        eval_cat_ids=[int(c) for c in p.catIds],
        class_names=class_names,
        cat_ids=cat_ids,
    )


def run_cocoeval(gt: Any, dt: Any, cat_ids: list[int], backend: str) -> Any:
    """COCOeval (bbox) evaluated and accumulated on ``cat_ids``, quietly; its ``eval['precision']`` is
    ``[T, R, K, A, M]`` (K in sorted ``cat_ids`` order). :mod:`tfg_mm.evaluation.analysis` reads the PR curves from it."""
    _, cocoeval_cls = _backend(backend)
    with _quiet():
        if backend == "faster_coco_eval":
            evaluator = cocoeval_cls(gt, dt, iouType="bbox", print_function=lambda *args: None)
        else:
            evaluator = cocoeval_cls(gt, dt, iouType="bbox")
        evaluator.params.catIds = sorted(cat_ids)
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


# --------------------------------------------------------------------------------------------
# Model loops
# --------------------------------------------------------------------------------------------
def _as_int(value: Any) -> int:
    return int(torch.as_tensor(value).reshape(-1)[0].item())


@torch.no_grad()
def predict(
    model_fn: Callable[[Tensor], tuple[Tensor, Tensor]],
    loader: Iterable[dict],
    top_k: int = 300,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[list[dict], list[int]]:
    """Run ``model_fn`` over ``loader`` and post-process every image.

    ``loader`` yields ``{"pixel_values": [B, 3, H, W], "labels": [{"image_id", "orig_size" (h, w),
    ...}]}``; ``model_fn(pixel_values)`` returns ``(logits, pred_boxes)``. Results are moved to the
    CPU so a long validation run does not hold GPU memory.
    """
    batches: Iterable[dict] = loader
    if progress:
        batches = tqdm(loader, desc="predict", leave=False)
    results: list[dict] = []
    image_ids: list[int] = []
    for batch in batches:
        targets = batch["labels"]
        logits, pred_boxes = model_fn(batch["pixel_values"].to(device))
        orig_sizes = torch.stack([torch.as_tensor(t["orig_size"]).reshape(2) for t in targets]).to(logits.device)
        for result in postprocess(logits, pred_boxes, orig_sizes, top_k=top_k):
            results.append({key: value.cpu() for key, value in result.items()})
        image_ids.extend(_as_int(t["image_id"]) for t in targets)
    return results, image_ids


def evaluate(
    model_fn: Callable[[Tensor], tuple[Tensor, Tensor]],
    loader: Iterable[dict],
    coco_gt: str | Path | dict | Any,
    class_names: list[str] | None,
    cat_ids: list[int] | None,
    top_k: int = 300,
    device: str | torch.device = "cpu",
    progress: bool = False,
    backend: str = "pycocotools",
) -> tuple[dict, list[dict]]:
    """Predict on ``loader`` and evaluate; returns ``(metrics, coco_detections)``.

    Contiguous label ``i`` of the model is category ``cat_ids[i]`` named ``class_names[i]``
    (default: the ground truth's categories sorted by id).
    """
    gt = load_coco_gt(coco_gt, backend)
    class_names, cat_ids = resolve_classes(gt, class_names, cat_ids)
    results, image_ids = predict(model_fn, loader, top_k=top_k, device=device, progress=progress)
    detections = to_coco_detections(results, image_ids, cat_ids)
    return coco_evaluate(gt, detections, class_names, cat_ids, backend=backend), detections
