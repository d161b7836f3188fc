"""Detection galleries: matching with known TP / FP / miss outcomes, F1 thresholds, flips, and the figures."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib
import pytest

from tfg_mm import reporting
from tfg_mm.errors import ConfigError, DataError
from tfg_mm.evaluation import matching as galleries

matplotlib.use("Agg")


def _gt(ann_id, cat, bbox, image_id=1, crowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": crowd}


def _det(cat, bbox, score, image_id=1):
    return {"image_id": image_id, "category_id": cat, "bbox": bbox, "score": score}


# --------------------------------------------------------------------------------------------
# Matching one image
# --------------------------------------------------------------------------------------------
GTS = [_gt(1, 1, [0, 0, 10, 10]), _gt(2, 2, [50, 50, 10, 10]), _gt(3, 1, [100, 100, 10, 10])]
DETS = [
    _det(1, [1, 0, 10, 10], 0.8),  # IoU 0.82 with box 1, which the 0.9 detection takes: duplicate
    _det(1, [0, 0, 10, 10], 0.9),  # true positive on box 1 (listed second: score order decides)
    _det(1, [50, 50, 10, 10], 0.7),  # on box 2, of class 2: wrong class
    _det(1, [104, 100, 10, 10], 0.65),  # IoU 60 / 140 = 0.43 with box 3 (class 1): mislocalised
    _det(2, [200, 200, 10, 10], 0.6),  # touches nothing: background
    _det(2, [50, 50, 10, 10], 0.3),  # on box 2 but under class 2's threshold 0.5: dropped
]


def test_match_image_every_outcome():
    match = galleries.match_image(GTS, DETS, {1: 0.5, 2: 0.5}, image_id=1)
    assert [(d["score"], g["id"]) for d, g, _ in match.tp] == [(0.9, 1)]
    assert [(d["score"], kind) for d, kind in match.fp] == [
        (0.8, "duplicate"),
        (0.7, "wrong class"),
        (0.65, "mislocalised"),
        (0.6, "background"),
    ]
    assert [g["id"] for g in match.missed] == [2, 3]
    assert match.counts() == {
        "tp": 1,
        "fp": 4,
        "missed": 2,
        "fp duplicate": 1,
        "fp wrong class": 1,
        "fp mislocalised": 1,
        "fp background": 1,
    }
    # class 1: missed box 3, four false positives predicted as class 1
    assert match.errors(1) == 1 + 3 and match.errors(2) == 1 + 1


def test_match_image_per_class_thresholds():
    """Class 2 at 0.2 keeps its 0.3 detection, which then finds box 2; class 1 at 0.95 keeps nothing."""
    match = galleries.match_image(GTS, DETS, {1: 0.95, 2: 0.2})
    assert [(d["score"], g["id"]) for d, g, _ in match.tp] == [(0.3, 2)]
    assert [(d["score"], kind) for d, kind in match.fp] == [(0.6, "background")]
    assert [g["id"] for g in match.missed] == [1, 3]
    # a class without a threshold keeps no detection
    assert galleries.match_image(GTS, DETS, {}).tp == []


def test_match_image_takes_the_best_iou_and_ignores_crowd():
    gts = [_gt(1, 1, [0, 0, 10, 10]), _gt(2, 1, [2, 0, 10, 10]), _gt(3, 1, [100, 100, 40, 40], crowd=1)]
    dets = [_det(1, [2, 0, 10, 10], 0.9), _det(1, [110, 110, 10, 10], 0.8)]
    match = galleries.match_image(gts, dets, {1: 0.5})
    assert [g["id"] for _, g, _ in match.tp] == [2]  # IoU 1.0 with box 2 beats 0.67 with box 1
    assert match.fp == []  # the second detection lies inside the crowd region: ignored
    assert [g["id"] for g in match.missed] == [1]  # the crowd box is never a miss


def test_f1_thresholds_known_curve():
    """Two boxes; scores 0.9 hit, 0.8 background, 0.7 hit, 0.6 background: F1 0.67, 0.5, 0.8, 0.67."""
    gt = {
        "images": [{"id": 1}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [_gt(1, 1, [0, 0, 10, 10]), _gt(2, 1, [50, 0, 10, 10])],
    }
    dets = [
        _det(1, [0, 0, 10, 10], 0.9),
        _det(1, [200, 200, 10, 10], 0.8),
        _det(1, [50, 0, 10, 10], 0.7),
        _det(1, [300, 300, 10, 10], 0.6),
    ]
    points = galleries.f1_thresholds(gt, dets)
    assert points[1] == pytest.approx({"threshold": 0.7, "precision": 2 / 3, "recall": 1.0, "f1": 0.8})
    assert math.isnan(points[2]["threshold"])  # no ground truth, no detection
    recorded = {"final": {"operating_points": {"a": {"threshold": 0.85}, "b": {"threshold": 0.5}}}}
    assert galleries.run_thresholds(recorded, gt, dets).by_class == {"a": 0.85, "b": 0.5}
    computed = galleries.run_thresholds({"final": {}}, gt, dets)
    assert computed.by_class == {"a": 0.7, "b": 1.0} and "computed here" in computed.source


# --------------------------------------------------------------------------------------------
# Flips
# --------------------------------------------------------------------------------------------
def test_flips_known_answer():
    gt = {
        "images": [{"id": 1}, {"id": 2}, {"id": 3}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            _gt(1, 1, [0, 0, 10, 10], 1),
            _gt(2, 1, [50, 0, 10, 10], 1),
            _gt(3, 1, [0, 0, 10, 10], 2),
            _gt(4, 2, [50, 50, 10, 10], 2),
            _gt(5, 1, [0, 0, 10, 10], 3),
            _gt(6, 1, [50, 0, 10, 10], 3),
        ],
    }
    found = lambda ids, score=0.9: [  # noqa: E731
        _det(a["category_id"], a["bbox"], score, a["image_id"]) for a in gt["annotations"] if a["id"] in ids
    ]
    base = found({1, 3, 4}) + [_det(1, [50, 0, 10, 10], 0.2, 1)]  # box 2 found only under the threshold
    phase2 = found({1, 2, 4, 5, 6})
    thresholds = {1: 0.5, 2: 0.5}
    a, b = galleries.match_split(gt, base, thresholds), galleries.match_split(gt, phase2, thresholds)
    assert galleries.flips(a, b, 1) == {
        "miss_to_hit": 3,
        "hit_to_miss": 1,
        "images_miss_to_hit": [(3, 2), (1, 1)],  # the largest change first
        "images_hit_to_miss": [(2, 1)],
    }
    assert galleries.flips(a, b, 2) == {
        "miss_to_hit": 0,
        "hit_to_miss": 0,
        "images_miss_to_hit": [],
        "images_hit_to_miss": [],
    }
    # the baseline's 0.2 detection counts once its threshold lets it in: box 2 is no flip then
    a_low = galleries.match_split(gt, base, {1: 0.1, 2: 0.5})
    assert galleries.flips(a_low, b, 1)["images_miss_to_hit"] == [(3, 2)]
    with pytest.raises(DataError, match="image ids"):
        galleries.match_split(gt, [_det(1, [0, 0, 1, 1], 0.9, 99)], thresholds)


# --------------------------------------------------------------------------------------------
# The figures, on the tiny synthetic set
# --------------------------------------------------------------------------------------------
def _run(tmp_path: Path, dataset: Path, name: str, detections: list[dict], final: dict) -> dict:
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "detections_val.json").write_text(json.dumps(detections))
    return {
        "phase": name,
        "params": {"run_dir": str(run_dir), "images_dir": "images", "dataset": str(dataset)},
        "dataset": {"root": str(dataset), "val_json": str(dataset / "instances_val.json")},
        "final": final,
    }


def test_galleries_and_side_by_side_on_the_tiny_set(tiny_dataset, tmp_path):
    gt = json.loads((tiny_dataset / "instances_val.json").read_text())
    cat = {c["name"]: c["id"] for c in gt["categories"]}
    anns = gt["annotations"]
    n_perf = sum(a["category_id"] == cat["perforation"] for a in anns)
    n_break = sum(a["category_id"] == cat["break"] for a in anns)
    assert n_perf and n_break

    def dets_without(name):
        return [_det(a["category_id"], a["bbox"], 0.9, a["image_id"]) for a in anns if a["category_id"] != cat[name]]

    # baseline misses every perforation; phase 2 misses every break instead; one false positive each
    noise = _det(cat["scratch"], [0, 0, 20, 20], 0.8, gt["images"][0]["id"])
    points = {c: {"threshold": 0.5, "precision": 1.0, "recall": 1.0, "f1": 1.0} for c in cat}
    base = _run(tmp_path, tiny_dataset, "baseline", dets_without("perforation") + [noise], {"operating_points": points})
    phase2 = _run(tmp_path, tiny_dataset, "phase2", dets_without("break"), {})

    figures = Path(os.environ["TFG_MM_FIGURES_DIR"])
    single = reporting.show_galleries(base, save="test_gallery")
    assert single["classes"]["perforation"]["tp"] == 0 and single["classes"]["perforation"]["missed"] == n_perf
    assert single["classes"]["break"]["tp"] == n_break and single["classes"]["break"]["missed"] == 0
    assert single["threshold_source"].startswith("the run's operating points")
    assert all((figures / f"test_gallery.{ext}").stat().st_size > 1000 for ext in ("png", "svg"))

    out = reporting.show_side_by_side(phase2, base, n_images=2, n_flips=2, save="test_p2")
    assert out["classes"]["perforation"]["miss_to_hit"] == n_perf
    assert out["classes"]["perforation"]["hit_to_miss"] == 0
    assert out["classes"]["break"]["miss_to_hit"] == 0
    assert out["classes"]["break"]["hit_to_miss"] == n_break
    assert "computed here" in out["threshold_source"]["phase 2"]
    for stem in ("side_by_side_perforation", "flips_perforation", "side_by_side_break", "flips_break"):
        for ext in ("png", "svg"):
            assert (figures / f"test_p2_{stem}.{ext}").stat().st_size > 1000
    assert len(out["images"]["perforation"]) == 2
    # the same numbers without drawing (the index's summary), and deterministic
    summary = reporting.flips_summary(phase2, base)
    assert summary["classes"] == out["classes"]
    index = reporting.build_index(None, reports_dir=tmp_path / "reports", flips=summary).read_text()
    assert f"<td>perforation</td><td>{n_perf} (" in index and f"<td>+{n_perf}</td>" in index
    assert f"<td>-{n_break}</td>" in index
    assert reporting.phase2_flips(tmp_path / "no_run") is None  # no finished phase-2 run: no table
    # a run without saved detections: the error names the file and the fix
    (tmp_path / "phase2" / "detections_val.json").unlink()
    with pytest.raises(
        DataError, match="detections_val.json: the selected checkpoint's validation detections not found"
    ):
        galleries.load_run(phase2)
    # without baseline_metrics the phase-2 contract's `baseline` folder is read: here not a run folder
    with pytest.raises(ConfigError, match="not a run folder"):
        reporting.flips_summary({**phase2, "params": {**phase2["params"], "baseline": str(tmp_path / "none")}})


def test_matching_equals_cocoeval_at_iou_50():
    """With every detection kept, each detection's hit / no hit equals COCOeval's match at IoU 0.5
    (area "all", maxDets 100) on random images with crowd boxes, so the F1 thresholds are COCO's."""
    import contextlib
    import io

    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(7)
    gt = {"images": [{"id": i, "width": 100, "height": 100} for i in range(1, 31)], "annotations": []}
    gt["categories"] = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]
    dets = []
    for image_id in range(1, 31):
        boxes = []
        for _ in range(int(rng.integers(0, 5))):
            x, y, w, h = (*rng.uniform(0, 70, 2), *rng.uniform(5, 30, 2))
            boxes.append([x, y, w, h])
            gt["annotations"].append(
                _gt(
                    len(gt["annotations"]) + 1, int(rng.integers(1, 4)), [x, y, w, h], image_id, int(rng.random() < 0.1)
                )
            )
        for _ in range(int(rng.integers(0, 12))):
            if boxes and rng.random() < 0.7:  # near a box: hits, duplicates, mislocalised
                x, y, w, h = boxes[int(rng.integers(len(boxes)))]
                box = [x + rng.normal(0, 3), y + rng.normal(0, 3), w * rng.uniform(0.7, 1.3), h * rng.uniform(0.7, 1.3)]
            else:
                box = [*rng.uniform(0, 70, 2), *rng.uniform(5, 30, 2)]
            dets.append(_det(int(rng.integers(1, 4)), box, float(rng.random()), image_id))
    for ann in gt["annotations"]:
        ann["area"] = ann["bbox"][2] * ann["bbox"][3]

    coco = COCO()
    coco.dataset = json.loads(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes([dict(d) for d in dets]), "bbox")
        evaluator.params.iouThrs = np.array([0.5])
        evaluator.evaluate()
    coco_hits = {}  # (image, category, score) -> matched
    for record in evaluator.evalImgs:
        if record is None or record["aRng"] != [0, 1e10]:
            continue
        for det_id, matched, ignored in zip(record["dtIds"], record["dtMatches"][0], record["dtIgnore"][0]):
            det = evaluator.cocoDt.anns[det_id]
            if not ignored:
                coco_hits[(det["image_id"], det["category_id"], det["score"])] = bool(matched)

    matches = galleries.match_split(gt, dets, {1: -1.0, 2: -1.0, 3: -1.0})
    mine = {(d["image_id"], d["category_id"], d["score"]): True for m in matches.values() for d, _, _ in m.tp}
    mine.update({(d["image_id"], d["category_id"], d["score"]): False for m in matches.values() for d, _ in m.fp})
    assert sum(coco_hits.values()) > 10 and len(coco_hits) > 50
    assert mine == coco_hits  # ignored (on a crowd region) detections are in neither
