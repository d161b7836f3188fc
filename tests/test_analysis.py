"""Error analysis (tfg_mm.evaluation.analysis) on hand-built cases with known answers, and through a tiny real run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tfg_mm import io, paths
from tfg_mm.evaluation import analysis
from tfg_mm.evaluation.analysis import ERROR_TYPES
from tfg_mm.evaluation.coco import coco_evaluate
from tfg_mm.training import contract

#: AP of "TP, FP, TP" over two boxes (101-point COCO interpolation): recall <= 0.5 at precision 1, then 2/3
AP_TP_FP_TP = (51 + 50 * 2 / 3) / 101
#: AP of one of two boxes found (and no false positive): precision 1 up to recall 0.5, then nothing
AP_HALF = 51 / 101


def _gt(boxes, n_images=2):
    """COCO ground truth with classes a (id 1) and b (id 2); ``boxes`` = [(image id, category id, xywh)]."""
    return {
        "images": [{"id": i, "width": 400, "height": 400} for i in range(1, n_images + 1)],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {"id": n + 1, "image_id": i, "category_id": c, "bbox": list(b), "area": b[2] * b[3], "iscrowd": 0}
            for n, (i, c, b) in enumerate(boxes)
        ],
    }


def _det(image, cat, box, score):
    return {"image_id": image, "category_id": cat, "bbox": list(box), "score": score}


A1, A2, B1 = (0, 0, 100, 100), (200, 200, 100, 100), (0, 200, 100, 100)


def _only(errors, cls, expected):
    """Every error type of ``cls`` is 0 except those in ``expected`` (type -> ΔAP)."""
    for name in ERROR_TYPES:
        assert errors[cls][name] == pytest.approx(expected.get(name, 0.0), abs=1e-12), (cls, name, errors[cls])


def test_perfect_detector_has_no_error_and_f1_one():
    gt = _gt([(1, 1, A1), (1, 2, B1), (2, 1, A2)])
    dets = [_det(1, 1, A1, 0.9), _det(1, 2, B1, 0.8), _det(2, 1, A2, 0.7)]
    result = analysis.analyse(gt, dets)
    for cls in ("a", "b"):
        _only(result["errors"], cls, {})
        assert result["ap50"][cls] == 1.0
        assert result["operating_points"][cls]["f1"] == 1.0
    assert result["operating_points"]["a"] == {"threshold": 0.7, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert result["confusion"]["counts"] == [[2, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert max(result["f1_curves"]["a"]["f1"]) == 1.0


def test_pure_class_confusion():
    # a box of a detected as b (IoU 1); a correct b elsewhere with a lower score
    gt = _gt([(1, 1, A1), (2, 2, B1)])
    dets = [_det(1, 2, A1, 0.9), _det(2, 2, B1, 0.8)]
    result = analysis.analyse(gt, dets)
    assert result["ap50"] == {"a": 0.0, "b": pytest.approx(0.5)}  # b: FP then TP -> precision 1/2 at recall 1
    _only(result["errors"], "a", {"classification": 1.0})  # the fixed detection becomes a's true positive
    _only(result["errors"], "b", {"classification": 0.5})  # and leaves b's false positives
    assert result["error_counts"]["b"]["classification"] == 1
    assert result["error_counts"]["a"]["missed"] == 0  # the box is the target of the classification error
    # a has no true positive: no operating point; b: F1 2/3 at threshold 0.8
    assert result["operating_points"]["a"] == {"threshold": None, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert result["operating_points"]["b"] == pytest.approx(
        {"threshold": 0.8, "precision": 0.5, "recall": 1.0, "f1": 2 / 3}
    )
    # at b's threshold both b detections are kept: the a box predicted as b, the b box found
    assert result["confusion"]["counts"] == [[0, 1, 0], [0, 1, 0], [0, 0, 0]]


def test_pure_localisation_error_at_iou_0_3():
    gt = _gt([(1, 1, A1)])
    box = (0, 0, 30, 100)  # IoU 3000 / 10000 = 0.3 with A1
    assert analysis.box_iou(np.array([box]), np.array([A1]))[0, 0] == pytest.approx(0.3)
    result = analysis.analyse(gt, [_det(1, 1, box, 0.9)])
    assert result["ap50"]["a"] == 0.0
    _only(result["errors"], "a", {"localisation": 1.0})
    assert result["error_counts"]["a"] == {**dict.fromkeys(ERROR_TYPES, 0), "localisation": 1}
    # a has no operating point (no true positive): its box is missed
    assert result["confusion"]["counts"] == [[0, 0, 1], [0, 0, 0], [0, 0, 0]]
    # kept anyway, the mislocalised detection is a background detection at IoU 0.5
    counts = analysis.confusion(gt, [_det(1, 1, box, 0.9)], [0.0, 0.0])
    assert counts.tolist() == [[0, 0, 1], [0, 0, 0], [1, 0, 0]]


def test_duplicate_and_operating_point_by_hand():
    # TP 0.9, its duplicate 0.8 (IoU 0.9), TP 0.7 on the second image
    gt = _gt([(1, 1, A1), (2, 1, A2)])
    dets = [_det(1, 1, A1, 0.9), _det(1, 1, (0, 0, 100, 90), 0.8), _det(2, 1, A2, 0.7)]
    result = analysis.analyse(gt, dets)
    assert result["ap50"]["a"] == pytest.approx(AP_TP_FP_TP)
    _only(result["errors"], "a", {"duplicate": 1 - AP_TP_FP_TP})
    # cuts: 0.9 -> P 1, R 1/2, F1 2/3; 0.8 -> P 1/2, R 1/2, F1 1/2; 0.7 -> P 2/3, R 1, F1 4/5
    assert result["operating_points"]["a"] == pytest.approx(
        {"threshold": 0.7, "precision": 2 / 3, "recall": 1.0, "f1": 0.8}
    )
    f1 = dict(zip(result["f1_curves"]["thresholds"], result["f1_curves"]["a"]["f1"]))
    assert f1[0.5] == pytest.approx(0.8) and f1[0.85] == pytest.approx(2 / 3) and f1[0.95] == 0.0
    # the duplicate is a background detection in the confusion matrix
    assert result["confusion"]["counts"] == [[2, 0, 0], [0, 0, 0], [1, 0, 0]]


def test_background_false_positive():
    gt = _gt([(1, 1, A1), (2, 1, A2)])
    dets = [_det(1, 1, A1, 0.9), _det(1, 1, (300, 300, 50, 50), 0.8), _det(2, 1, A2, 0.7)]
    result = analysis.analyse(gt, dets)
    _only(result["errors"], "a", {"background": 1 - AP_TP_FP_TP})
    assert result["error_counts"]["a"]["background"] == 1


def test_a_missed_box():
    gt = _gt([(1, 1, A1), (2, 1, A2)])
    result = analysis.analyse(gt, [_det(1, 1, A1, 0.9)])
    assert result["ap50"]["a"] == pytest.approx(AP_HALF)
    _only(result["errors"], "a", {"missed": 1 - AP_HALF})
    assert result["operating_points"]["a"] == pytest.approx(
        {"threshold": 0.9, "precision": 1.0, "recall": 0.5, "f1": 2 / 3}
    )
    assert result["confusion"]["counts"] == [[1, 0, 1], [0, 0, 0], [0, 0, 0]]
    # nothing found at all: removing the missed boxes leaves nothing to find (AP 1 by convention)
    assert analysis.analyse(gt, [])["errors"]["a"]["missed"] == 1.0


def test_both_class_and_localisation():
    # a b detection at IoU 0.3 with an a box (and nothing of its own class there); b found elsewhere
    gt = _gt([(1, 1, A1), (2, 2, B1)])
    dets = [_det(1, 2, (0, 0, 30, 100), 0.9), _det(2, 2, B1, 0.8)]
    result = analysis.analyse(gt, dets)
    _only(result["errors"], "b", {"both": 0.5})
    _only(result["errors"], "a", {"missed": 1.0})  # the a box is not the target of a cls / loc error


def test_one_fix_per_box_the_highest_scoring_claimant():
    """A classification error (0.9) and a localisation error (0.5) on the same box: only the first is fixable
    (TIDE's BestGTMatch); fixing localisation alone removes the other detection, which leaves AP unchanged."""
    gt = _gt([(1, 1, A1), (2, 2, B1)])
    dets = [_det(1, 2, A1, 0.9), _det(1, 1, (0, 0, 30, 100), 0.5), _det(2, 2, B1, 0.8)]
    result = analysis.analyse(gt, dets)
    assert result["error_counts"]["a"]["localisation"] == 1 and result["error_counts"]["b"]["classification"] == 1
    _only(result["errors"], "a", {"classification": 1.0})  # a: the fixed TP (0.9) ranks above its FP (0.5)
    _only(result["errors"], "b", {"classification": 0.5})


def test_confusion_matrix_counts_by_hand():
    gt = _gt([(1, 1, A1), (1, 1, A2), (1, 2, B1), (2, 2, B1)])
    dets = [
        _det(1, 1, A1, 0.9),  # a on a: diagonal
        _det(1, 2, A2, 0.9),  # b on an a box: row a, column b
        _det(1, 1, (350, 350, 30, 30), 0.8),  # a on nothing: background row
        _det(2, 2, B1, 0.95),  # b on b
    ]  # image 1's b box is missed
    counts = analysis.confusion(gt, dets, [0.0, 0.0])
    assert counts.tolist() == [[1, 1, 0], [0, 1, 1], [1, 0, 0]]
    # at a's threshold 0.85 the background detection is dropped; b at None keeps no b detection
    counts = analysis.confusion(gt, dets, [0.85, None])
    assert counts.tolist() == [[1, 0, 1], [0, 0, 2], [0, 0, 0]]


def _random_case(rng):
    boxes = []
    for image in range(1, 6):
        for _ in range(rng.integers(0, 5)):
            x, y = rng.uniform(0, 150, 2)
            w, h = rng.uniform(5, 50, 2)
            boxes.append((image, int(rng.integers(1, 3)), (x, y, w, h)))
    dets = []
    for image, cat, (x, y, w, h) in boxes:
        for _ in range(rng.integers(0, 3)):
            box = (
                x + rng.normal(0, 5),
                y + rng.normal(0, 5),
                max(1, w + rng.normal(0, 5)),
                max(1, h + rng.normal(0, 5)),
            )
            dets.append(_det(image, int(rng.integers(1, 3)) if rng.random() < 0.2 else cat, box, float(rng.random())))
    for _ in range(rng.integers(0, 5)):
        box = (*rng.uniform(0, 100, 2), *rng.uniform(5, 40, 2))
        dets.append(_det(int(rng.integers(1, 6)), int(rng.integers(1, 3)), box, float(rng.random())))
    return _gt(boxes, n_images=5), dets


def test_ap50_and_pr_curves_equal_cocoeval_on_random_cases():
    """The module's own matching gives COCOeval's AP50, and the PR curves average to COCOeval's AP / AP50."""
    rng = np.random.default_rng(0)
    for _ in range(25):
        gt, dets = _random_case(rng)
        reference = coco_evaluate(gt, dets)["per_class"]
        result = analysis.analyse(gt, dets)
        for cls in ("a", "b"):
            ap50 = reference[cls]["ap50"]
            if np.isnan(ap50):
                assert result["ap50"][cls] is None and result["pr_curves"]["iou50"][cls] is None
                continue
            assert result["ap50"][cls] == pytest.approx(ap50, abs=1e-12)
            assert np.mean(result["pr_curves"]["iou50"][cls]) == pytest.approx(ap50, abs=1e-12)
            assert np.mean(result["pr_curves"]["iou50_95"][cls]) == pytest.approx(reference[cls]["ap"], abs=1e-12)
            assert all(v is None or v >= 0 for v in result["errors"][cls].values())
            # every non-TP detection of the class has exactly one error type
            assert sum(result["error_counts"][cls].values()) >= 0


def test_analyse_run_writes_the_side_file(tmp_path):
    gt = _gt([(1, 1, A1), (2, 1, A2)])
    (tmp_path / "detections_val.json").write_text(json.dumps([_det(1, 1, A1, 0.9)]))
    entries = analysis.analyse_run(tmp_path, gt)
    assert set(entries) == {"operating_points", "errors"}
    assert entries["errors"]["a"]["missed"] == pytest.approx(1 - AP_HALF)
    assert entries["errors"]["b"] == dict.fromkeys(ERROR_TYPES)  # no b boxes: nothing to measure
    side = analysis.read_analysis(tmp_path)
    assert side["confusion"]["counts"] == [[1, 0, 1], [0, 0, 0], [0, 0, 0]]
    assert side["pr_curves"]["iou50"]["b"] is None


@pytest.mark.slow
def test_a_tiny_run_records_operating_points_and_errors_for_every_class(tiny_params, tmp_path):
    """Train 1 epoch (2 steps), then evaluate the checkpoint only: both contracts carry the analysis."""
    from tfg_mm.training.baseline import run_baseline

    m = run_baseline(tiny_params(epochs=1, max_steps_per_epoch=2, run_dir=str(tmp_path / "run")), progress=False)
    classes = list(m["final"]["per_class"])
    assert classes
    for run_dir, metrics in (
        (tmp_path / "run", m),
        (
            tmp_path / "eval",
            run_baseline(tiny_params(checkpoint=str(tmp_path / "run"), run_dir=str(tmp_path / "eval")), progress=False),
        ),
    ):
        final = metrics["final"]
        assert list(final["operating_points"]) == classes and list(final["errors"]) == classes
        assert all(set(v) == {"threshold", "precision", "recall", "f1"} for v in final["operating_points"].values())
        assert all(set(v) == set(ERROR_TYPES) for v in final["errors"].values())
        side = analysis.read_analysis(run_dir)
        assert side["classes"] == classes and len(side["confusion"]["counts"]) == len(classes) + 1
        # the side file is the analysis of the detections the run kept, as analyse() computes it again
        again = analysis.analyse(
            metrics["dataset"]["val_json"], json.loads((run_dir / paths.DETECTIONS_FILE).read_text()), classes
        )
        assert io.json_safe(again["errors"]) == final["errors"]
        assert contract.read_metrics(run_dir)["schema_version"] == 4


# ------------------------------------------------------------------------------------------------
# The run contract, the grid summary and the report functions
# ------------------------------------------------------------------------------------------------
def _final_with(points, errors):
    return {
        "map": 0.5,
        "map50": 0.7,
        "map75": 0.4,
        "per_class": {"a": {"ap": 0.5, "ap50": 0.7}},
        "operating_points": points,
        "errors": errors,
    }


def _final_problems(final: dict) -> list[str]:
    """The contract's problems with ``final`` alone (a finished run's record around it)."""
    record = {"status": "finished", "history": [], "final": final}
    return [p for p in contract.contract_problems(record) if p.startswith("final")]


def test_contract_checks_operating_points_and_errors_when_present():

    good_point = {"a": {"threshold": 0.4, "precision": 0.9, "recall": 0.8, "f1": 0.85}}
    good_errors = {"a": dict.fromkeys(ERROR_TYPES, 0.0)}
    assert _final_problems(_final_with(good_point, good_errors)) == []
    old = _final_with(good_point, good_errors)
    del old["operating_points"], old["errors"]
    assert _final_problems(old) == []  # a schema-2 final still reads
    problems = _final_problems(_final_with({"a": {"threshold": 0.4}}, {"b": good_errors["a"]}))
    assert any("operating_points['a'] must have exactly threshold, precision, recall, f1" in p for p in problems)
    assert any("`errors` must have one entry per class" in p for p in problems)


def test_summary_means_errors_and_operating_points_over_seeds():
    from tfg_mm.ablations.summary import _mean_per_class

    seeds = [{"a": {"missed": 0.1, "background": None}}, {"a": {"missed": 0.3, "background": 0.2}}]
    assert _mean_per_class(seeds) == {"a": {"missed": pytest.approx(0.2), "background": 0.2}}
    assert _mean_per_class([]) is None


def _analysed_run(tmp_path):
    """A run folder with the analysis of a hand-built case, and its contract's final."""
    gt = _gt([(1, 1, A1), (1, 2, B1), (2, 1, A2)])
    dets = [_det(1, 1, A1, 0.9), _det(1, 1, (0, 0, 100, 90), 0.8), _det(2, 2, A2, 0.7), _det(1, 2, B1, 0.6)]
    tmp_path.mkdir()
    (tmp_path / "detections_val.json").write_text(json.dumps(dets))
    entries = analysis.analyse_run(tmp_path, gt)
    final = {"map": 0.5, "map50": 0.6, "map75": 0.4, "per_class": {c: {"ap": 0.5, "ap50": 0.6} for c in "ab"}}
    return {"params": {"run_dir": str(tmp_path)}, "final": {**final, **entries}}


def test_show_error_analysis_draws_and_saves_every_figure(tmp_path, monkeypatch):
    from tfg_mm import reporting

    monkeypatch.setenv("TFG_MM_FIGURES_DIR", str(tmp_path / "figures"))
    metrics = _analysed_run(tmp_path / "run")
    figures = reporting.show_error_analysis(metrics, save_prefix="01_baseline", hard_classes=["a"])
    assert set(figures) == {"pr", "f1", "confusion", "errors"}
    for stem in ("pr", "f1", "confusion", "errors"):
        assert (tmp_path / "figures" / f"01_baseline_{stem}.png").read_bytes()[:4] == b"\x89PNG"
        assert "<svg" in (tmp_path / "figures" / f"01_baseline_{stem}.svg").read_text()
    # the operating points are marked where the contract says
    points = metrics["final"]["operating_points"]
    marks = {
        (line.get_xdata()[0], line.get_ydata()[0])
        for line in figures["f1"].axes[0].get_lines()
        if line.get_marker() == "o"
    }
    assert marks == {(p["threshold"], p["f1"]) for p in points.values()}
    # the confusion heatmap shows the counts of analysis.json
    counts = analysis.read_analysis(tmp_path / "run")["confusion"]["counts"]
    shown = [int(t.get_text()) for t in figures["confusion"].axes[0].texts]
    assert shown == [v for row in counts for v in row]
    # one bar per class and error type, at the recorded ΔAP
    heights = sorted(round(p.get_height(), 6) for p in figures["errors"].axes[0].patches if p.get_width() > 0)
    recorded = sorted(round(v, 6) for e in metrics["final"]["errors"].values() for v in e.values())
    assert heights == recorded
    table = reporting.operating_points_table(metrics, hard_classes=["a"])
    assert list(table.index) == ["a (hard)", "b"] and table.loc["a (hard)", "F1"] == round(points["a"]["f1"], 3)
    # a figure title above both panels, each panel keeping its own
    curves = {**analysis.read_analysis(tmp_path / "run"), "classes": ["a", "b"]}
    titled = reporting.plot_pr_curves(curves, ["a"], title="on the test images")
    assert titled.get_suptitle() == "on the test images"
    assert [ax.get_title() for ax in titled.axes] == ["IoU 0.5", "IoU 0.50:0.95 (mean of 10)"]
    # a contract written before the analysis existed: a note, no figure
    old = {"params": {"run_dir": str(tmp_path / "old")}, "final": {"map": 0.5}}
    assert reporting.show_error_analysis(old) == {}


def test_error_table_and_index_section(tmp_path):
    from tfg_mm import reporting

    errors = {c: dict.fromkeys(ERROR_TYPES, 0.0) | {"missed": 0.1 * (i + 1)} for i, c in enumerate("ab")}
    summary = {
        "hard_classes": ["b"],
        "confidence": 0.95,
        "baseline": {"final": {"map": 0.5, "map50": 0.6, "per_class": {}, "errors": errors}},
        "variants": [
            {"name": "v1", "status": "finished", "error_analysis": {"errors": {"b": {**errors["b"], "missed": 0.05}}}},
            {"name": "v2", "status": "failed", "errors": [{"seed": 0, "error": "x"}]},
        ],
    }
    table = reporting.error_table(summary)
    assert list(table.index) == ["baseline", "v1"]
    assert table.loc["baseline", ("b", "missed")] == 0.2 and table.loc["v1", ("b", "missed")] == 0.05
    assert list(table.columns.get_level_values(1))[:3] == ["classification", "localisation", "cls + loc"]
    assert list(reporting.error_table(summary, classes=["a", "b"]).columns.get_level_values(0)).count("a") == 6
    page = reporting.index._error_table_section(summary, tmp_path)
    assert "Errors per class" in page and "0.05" in page
    assert (tmp_path / "ablations_errors.csv").exists()
    assert "No error analysis" in reporting.index._error_table_section({"variants": []}, tmp_path)


def test_error_comparison_of_a_run_with_its_baseline():
    from tfg_mm import reporting

    errors = {c: dict.fromkeys(ERROR_TYPES, 0.0) | {"missed": m} for c, m in (("perforation", 0.3), ("scratch", 0.1))}
    better = {c: v | {"missed": v["missed"] / 2} for c, v in errors.items()}
    metrics = {"final": {"errors": better}, "baseline": {"final": {"errors": errors}}}
    table = reporting.error_comparison(metrics)  # the hard classes this run has
    assert list(table.index) == ["baseline", "this run"]
    assert sorted(set(table.columns.get_level_values(0))) == ["perforation"]
    assert table.loc["this run", ("perforation", "missed")] == 0.15
    assert reporting.error_comparison(metrics, {"errors": errors}, classes=["scratch"]).shape == (2, 6)
