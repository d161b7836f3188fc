"""Tests of tfg_mm.evaluation.coco: DEIMv2 post-processing, COCO detections and COCOeval metrics.

The expected APs are computed by hand from COCOeval's definition: 101 recall thresholds
0.00, 0.01, ..., 1.00; at each, the interpolated precision (the best precision at any recall >= the
threshold, 0 if that recall is never reached); AP = mean over the 101 thresholds, mAP50:95 = mean
over the 10 IoU thresholds 0.50, 0.55, ..., 0.95. A detection matches a ground-truth box at
threshold t when IoU >= t. Recalls are chosen off the 0.01 grid so that no floating-point tie
decides a threshold.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tfg_mm.errors import DataError
from tfg_mm.evaluation.coco import coco_evaluate, evaluate, postprocess, to_coco_detections

BOX = [50.0, 50.0, 100.0, 100.0]  # xywh, area 10000 > 96**2: a "large" COCO box


def _gt(num_images: int, categories=((1, "hole"),), boxes_per_image=None) -> dict:
    """One BOX of category 1 per image (or the given ``{image_id: [(cat, xywh), ...]}``)."""
    images = [{"id": i, "height": 480, "width": 640, "file_name": f"{i}.jpg"} for i in range(1, num_images + 1)]
    if boxes_per_image is None:
        boxes_per_image = {i: [(1, BOX)] for i in range(1, num_images + 1)}
    annotations = []
    for image_id, boxes in boxes_per_image.items():
        for cat, box in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": list(box),
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cat_id, "name": name} for cat_id, name in categories],
    }


def _det(image_id: int, box, score: float, cat: int = 1) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": list(box), "score": score}


def _shift(box, dx: float) -> list[float]:
    return [box[0] + dx, box[1], box[2], box[3]]


# --------------------------------------------------------------------------------------------
# postprocess / to_coco_detections
# --------------------------------------------------------------------------------------------
def test_postprocess_top_k_over_queries_and_classes_with_pixel_boxes():
    # Q=3 queries, C=2 classes. Sigmoid is monotonic, so the order of the logits is the order
    # of the scores: flattened (query, class) = q0c0 -1, q0c1 3, q1c0 2, q1c1 -3, q2c0 0, q2c1 1.
    logits = torch.tensor([[[-1.0, 3.0], [2.0, -3.0], [0.0, 1.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5], [0.1, 0.1, 0.2, 0.2]]])
    orig_sizes = torch.tensor([[200, 400]])  # (h, w): non-square to catch a swapped scale
    (result,) = postprocess(logits, boxes, orig_sizes, top_k=4)

    torch.testing.assert_close(result["scores"], torch.sigmoid(torch.tensor([3.0, 2.0, 1.0, 0.0])))
    assert result["labels"].tolist() == [1, 0, 1, 0]  # index % C
    # query 0: cx=0.5*400, cy=0.5*200, w=0.2*400, h=0.4*200 -> x 160..240, y 60..140
    # query 1: cx=100, cy=150, w=200, h=100 -> x 0..200, y 100..200
    # query 2: cx=40, cy=20, w=80, h=40 -> x 0..80, y 0..40
    q0, q1, q2 = [160.0, 60.0, 240.0, 140.0], [0.0, 100.0, 200.0, 200.0], [0.0, 0.0, 80.0, 40.0]
    torch.testing.assert_close(result["boxes"], torch.tensor([q0, q1, q2, q2]))


def test_postprocess_caps_top_k_and_matches_transformers_rt_detr_post_processor():
    from transformers import RTDetrImageProcessor

    torch.manual_seed(0)
    logits, boxes = torch.randn(2, 7, 3), torch.rand(2, 7, 4) * 0.5 + 0.25
    sizes = torch.tensor([[480, 640], [300, 200]])
    ours = postprocess(logits, boxes, sizes)  # top_k=300 > Q*C=21: capped at 21
    assert [len(r["scores"]) for r in ours] == [21, 21]
    # transformers' RT-DETR post-processor (the DEIMv2 family's) keeps the top Q pairs.
    theirs = RTDetrImageProcessor().post_process_object_detection(
        SimpleNamespace(logits=logits, pred_boxes=boxes), threshold=-1.0, target_sizes=sizes
    )
    for mine, ref in zip(postprocess(logits, boxes, sizes, top_k=7), theirs):
        for key in ("scores", "labels", "boxes"):
            torch.testing.assert_close(mine[key], ref[key])


def test_to_coco_detections_xywh_and_category_ids():
    results = [
        {
            "scores": torch.tensor([0.9, 0.2]),
            "labels": torch.tensor([1, 0]),
            "boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 5.0, 5.0]]),
        },
        {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]
    dets = to_coco_detections(results, [7, 8], label_to_cat_id=[3, 5])
    assert dets == [
        {"image_id": 7, "category_id": 5, "bbox": [10.0, 20.0, 30.0, 40.0], "score": pytest.approx(0.9)},
        {"image_id": 7, "category_id": 3, "bbox": [0.0, 0.0, 5.0, 5.0], "score": pytest.approx(0.2)},
    ]
    with pytest.raises(DataError, match="label_to_cat_id"):
        to_coco_detections(results, [7, 8], label_to_cat_id=[3])


# --------------------------------------------------------------------------------------------
# coco_evaluate
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_ground_truth_as_predictions_gives_ap_one(backend):
    small, medium = [10.0, 10.0, 20.0, 20.0], [200.0, 200.0, 50.0, 50.0]
    gt = _gt(
        3,
        categories=((1, "hole"), (2, "crack"), (4, "stain")),
        boxes_per_image={
            1: [(1, BOX), (2, small)],
            2: [(2, medium)],
            3: [(1, small), (1, medium)],
        },
    )
    dets = [_det(a["image_id"], a["bbox"], 0.9, a["category_id"]) for a in gt["annotations"]]
    metrics = coco_evaluate(gt, dets, backend=backend)
    for key in ("map", "map50", "map75", "map_small", "map_medium", "map_large"):
        assert metrics[key] == pytest.approx(1.0), key
    assert metrics["num_detections"] == 5
    assert set(metrics["per_class"]) == {"hole", "crack", "stain"}
    assert metrics["per_class"]["hole"] == {"ap": pytest.approx(1.0), "ap50": pytest.approx(1.0)}
    assert metrics["per_class"]["crack"] == {"ap": pytest.approx(1.0), "ap50": pytest.approx(1.0)}
    # "stain" has no ground truth in this split: undefined, not 0.
    assert math.isnan(metrics["per_class"]["stain"]["ap"]) and math.isnan(metrics["per_class"]["stain"]["ap50"])


def test_known_perturbation_matches_hand_computed_ap():
    # 7 images, one 100x100 GT box each (area 10000: "large").
    # images 1-4: exact box, scores .9 .8 .7 .6
    # images 5-6: box shifted by dx=20 -> IoU = 80*100 / (2*100*100 - 80*100) = 80/120 = 0.667,
    #             scores .5 .4: a match for t in {.50,.55,.60,.65}, a false positive for t >= .70
    # image 7: no detection.
    # t <= .65: 6 TPs in a row, recall 6/7 = 0.857 -> thresholds 0.00..0.85 = 86 reached, precision 1
    #           -> AP_t = 86/101
    # t >= .70: 4 TPs then 2 FPs, recall 4/7 = 0.571 -> 0.00..0.57 = 58 thresholds, precision 1
    #           -> AP_t = 58/101
    # mAP50:95 = (4 * 86 + 6 * 58) / (10 * 101) = 692 / 1010
    gt = _gt(7)
    scores = [0.9, 0.8, 0.7, 0.6]
    dets = [_det(i, BOX, s) for i, s in zip(range(1, 5), scores)]
    dets += [_det(5, _shift(BOX, 20), 0.5), _det(6, _shift(BOX, 20), 0.4)]
    metrics = coco_evaluate(gt, dets, class_names=["hole"], cat_ids=[1])
    assert metrics["map50"] == pytest.approx(86 / 101)
    assert metrics["map75"] == pytest.approx(58 / 101)
    assert metrics["map"] == pytest.approx(692 / 1010)
    assert metrics["map_large"] == pytest.approx(692 / 1010)
    assert math.isnan(metrics["map_small"]) and math.isnan(metrics["map_medium"])  # no such GT boxes
    assert metrics["per_class"]["hole"] == {"ap": pytest.approx(692 / 1010), "ap50": pytest.approx(86 / 101)}

    # A false positive ranked first (score .95, far away on image 7) lowers the precision curve:
    # t <= .65: FP, then TP k at precision k/(k+1); interpolated precision at every reached
    #           recall threshold = best later precision = 6/7 -> AP_t = 86 * (6/7) / 101
    # t >= .70: FP, 4 TPs, 2 FPs: best precision at recall <= 4/7 is 4/5 -> AP_t = 58 * 0.8 / 101
    dets_fp = dets + [_det(7, [400.0, 300.0, 100.0, 100.0], 0.95)]
    metrics = coco_evaluate(gt, dets_fp, class_names=["hole"], cat_ids=[1])
    assert metrics["map50"] == pytest.approx(86 * 6 / 7 / 101)
    assert metrics["map75"] == pytest.approx(58 * 0.8 / 101)
    assert metrics["map"] == pytest.approx((4 * 86 * 6 / 7 + 6 * 58 * 0.8) / 1010)


def test_empty_predictions_give_zero_and_undefined_classes_stay_nan():
    gt = _gt(2, categories=((1, "hole"), (2, "crack")))
    for backend in ("pycocotools", "faster_coco_eval"):
        metrics = coco_evaluate(gt, [], backend=backend)
        assert metrics["map"] == 0.0 and metrics["map50"] == 0.0 and metrics["map_large"] == 0.0
        assert metrics["num_detections"] == 0
        assert metrics["per_class"]["hole"] == {"ap": 0.0, "ap50": 0.0}
        assert math.isnan(metrics["per_class"]["crack"]["ap"])


def test_summary_equals_pycocotools_summarize_and_backends_agree(tmp_path):
    """Our metrics read from eval['precision'] must be COCOeval.summarize()'s stats[0:6]."""
    import contextlib
    import io
    import json

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    boxes = {
        i: [
            (int(rng.integers(1, 4)), [*rng.uniform(0, 300, 2), *rng.uniform(5, 150, 2)])
            for _ in range(int(rng.integers(1, 5)))
        ]
        for i in range(1, 21)
    }
    gt = _gt(20, categories=((1, "a"), (2, "b"), (3, "c")), boxes_per_image=boxes)
    dets = [
        _det(a["image_id"], [v + rng.normal(0, 4) for v in a["bbox"]], float(rng.uniform()), a["category_id"])
        for a in gt["annotations"]
        if rng.uniform() < 0.8
    ]
    dets += [
        _det(
            int(rng.integers(1, 21)),
            [*rng.uniform(0, 300, 2), *rng.uniform(5, 150, 2)],
            float(rng.uniform(0, 0.5)),
            int(rng.integers(1, 4)),
        )
        for _ in range(60)
    ]
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(gt))
    dets_before = copy.deepcopy(dets)

    ours = coco_evaluate(path, dets)
    fast = coco_evaluate(gt, dets, backend="faster_coco_eval")
    assert dets == dets_before  # loadRes' in-place additions did not leak into the caller's list

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
        reference = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), "bbox")
        reference.evaluate(), reference.accumulate(), reference.summarize()
    keys = ("map", "map50", "map75", "map_small", "map_medium", "map_large")
    for key, stat in zip(keys, reference.stats[:6]):
        expected = math.nan if stat == -1 else stat
        assert ours[key] == pytest.approx(expected, nan_ok=True), key
        assert fast[key] == pytest.approx(expected, nan_ok=True), key
    for name in ("a", "b", "c"):
        assert fast["per_class"][name] == pytest.approx(ours["per_class"][name])
    # mAP is the mean of the per-class APs (all classes have ground truth here).
    assert ours["map"] == pytest.approx(np.mean([v["ap"] for v in ours["per_class"].values()]))


def test_bad_input_gets_clear_errors(tmp_path):
    gt = _gt(2)
    with pytest.raises(DataError, match=r"image ids \[99\]"):
        coco_evaluate(gt, [_det(99, BOX, 0.5)])
    with pytest.raises(DataError, match=r"category ids \[0\]"):  # 0-based label used as category id
        coco_evaluate(gt, [_det(1, BOX, 0.5, cat=0)])
    with pytest.raises(DataError, match="not found"):
        coco_evaluate(tmp_path / "missing.json", [])
    with pytest.raises(DataError, match="cat_ids"):
        coco_evaluate(gt, [], class_names=["hole"], cat_ids=[5])
    # Box-only ground truth without 'area' / 'iscrowd' gets the standard defaults instead.
    bare = _gt(2)
    for ann in bare["annotations"]:
        del ann["area"], ann["iscrowd"]
    assert coco_evaluate(bare, [_det(1, BOX, 0.9), _det(2, BOX, 0.8)])["map_large"] == pytest.approx(1.0)
    assert "area" not in bare["annotations"][0]  # the caller's dict is not modified


# --------------------------------------------------------------------------------------------
# predict / evaluate with a detector double
# --------------------------------------------------------------------------------------------
def test_evaluate_runs_model_over_loader_and_scores_perfect_outputs():
    # Two images of different sizes (h, w); "pixel_values" carries the image's index so that the
    # stand-in detector can return logits / boxes that encode the ground truth exactly.
    sizes = {10: (480, 640), 11: (300, 200)}
    gt = {
        "images": [{"id": i, "height": h, "width": w} for i, (h, w) in sizes.items()],
        "annotations": [
            {
                "id": 1,
                "image_id": 10,
                "category_id": 7,
                "bbox": [64.0, 48.0, 128.0, 96.0],
                "area": 12288.0,
                "iscrowd": 0,
            },
            {"id": 2, "image_id": 11, "category_id": 9, "bbox": [20.0, 30.0, 40.0, 60.0], "area": 2400.0, "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "hole"}, {"id": 9, "name": "crack"}],
    }
    num_queries = 5
    outputs = {}
    for index, ann in enumerate(gt["annotations"]):
        h, w = sizes[ann["image_id"]]
        x, y, bw, bh = ann["bbox"]
        logits = torch.full((num_queries, 2), -6.0)
        logits[2, [7, 9].index(ann["category_id"])] = 4.0  # query 2 finds the object
        boxes = torch.rand(num_queries, 4) * 0.1 + 0.45
        boxes[2] = torch.tensor([(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h])
        outputs[index] = (logits, boxes)

    def model_fn(pixel_values):
        indices = pixel_values[:, 0, 0, 0].long().tolist()
        return torch.stack([outputs[i][0] for i in indices]), torch.stack([outputs[i][1] for i in indices])

    loader = [
        {
            "pixel_values": torch.arange(2, dtype=torch.float32).view(2, 1, 1, 1).expand(2, 3, 8, 8),
            "labels": [
                {"image_id": torch.tensor([10]), "orig_size": torch.tensor([480, 640])},
                {"image_id": torch.tensor([11]), "orig_size": torch.tensor([300, 200])},
            ],
        }
    ]
    metrics, dets = evaluate(model_fn, loader, gt, class_names=["hole", "crack"], cat_ids=[7, 9], top_k=4)
    assert len(dets) == 8 and {d["image_id"] for d in dets} == {10, 11}
    best = max((d for d in dets if d["image_id"] == 11), key=lambda d: d["score"])
    assert best["category_id"] == 9 and best["bbox"] == pytest.approx([20.0, 30.0, 40.0, 60.0], abs=1e-3)
    assert metrics["map"] == pytest.approx(1.0)
    assert metrics["per_class"]["hole"]["ap"] == pytest.approx(1.0)
    assert metrics["per_class"]["crack"]["ap50"] == pytest.approx(1.0)
