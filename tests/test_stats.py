"""Tests of tfg_mm.stats: seed summaries, verdicts and the paired image bootstrap of ΔAP.

The synthetic detections make AP computable by hand: one class, one GT box per image, and a model
either finds an image's box exactly or outputs nothing there. Precision is then 1 up to the
model's recall r, so AP (every IoU threshold alike) = (number of recall thresholds 0.00, 0.01, ...
<= r) / 101 = (floor(100 r) + 1) / 101, which moves with r almost one to one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from tfg_mm.errors import ConfigError, DataError
from tfg_mm.evaluate import coco_evaluate, coco_from_dict, cocoeval_metrics, load_coco_gt
from tfg_mm.stats import (
    _detection_arrays,
    _ground_truth_arrays,
    _resampled_detections,
    _resampled_ground_truth,
    _resampled_images,
    paired_bootstrap,
    summarize_seeds,
    verdict,
)

BOX = [20.0, 30.0, 50.0, 40.0]


def _one_box_per_image(n: int) -> dict:
    return {
        "images": [{"id": i, "height": 200, "width": 300} for i in range(1, n + 1)],
        "annotations": [
            {"id": i, "image_id": i, "category_id": 1, "bbox": list(BOX), "area": 2000.0, "iscrowd": 0}
            for i in range(1, n + 1)
        ],
        "categories": [{"id": 1, "name": "hole"}],
    }


def _finds(image_ids, scores) -> list[dict]:
    """Exact detections on the given images (a model that finds those boxes and nothing else)."""
    return [
        {"image_id": int(i), "category_id": 1, "bbox": list(BOX), "score": float(s)} for i, s in zip(image_ids, scores)
    ]


# --------------------------------------------------------------------------------------------
# summarize_seeds / verdict
# --------------------------------------------------------------------------------------------
def test_summarize_seeds():
    assert summarize_seeds([0.7, 0.8, 0.9]) == {"mean": pytest.approx(0.8), "sd": pytest.approx(0.1), "n": 3}
    assert summarize_seeds([0.785]) == {"mean": 0.785, "sd": 0.0, "n": 1}
    with pytest.raises(ValueError):
        summarize_seeds([])


def test_verdict():
    assert verdict(0.01, 0.03) == "improves"
    assert verdict(-0.03, -0.01) == "worse"
    assert verdict(-0.01, 0.02) == "within noise"
    assert verdict(0.0, 0.02) == "within noise"  # touching 0 is not evidence of a difference
    assert verdict(0.0, 0.0) == "within noise"
    with pytest.raises(ValueError):
        verdict(math.nan, 0.1)
    with pytest.raises(ValueError):
        verdict(0.2, 0.1)


# --------------------------------------------------------------------------------------------
# Resampled datasets
# --------------------------------------------------------------------------------------------
def _evaluate_draw(gt_dict: dict, dets: list[dict], draw: list[int], backend: str = "faster_coco_eval") -> dict:
    gt = load_coco_gt(gt_dict, backend)
    images, categories = gt.dataset["images"], gt.dataset["categories"]
    image_pos = {image["id"]: pos for pos, image in enumerate(images)}
    draw = np.asarray(draw)
    new_images = _resampled_images(images, draw)
    gt_r = _resampled_ground_truth(_ground_truth_arrays(gt.dataset, image_pos), new_images, categories, draw)
    dt_r = _resampled_detections(_detection_arrays(dets, image_pos), new_images, categories, draw)
    assert [im["id"] for im in gt_r["images"]] == list(range(1, len(draw) + 1))
    for anns in (gt_r["annotations"], dt_r["annotations"]):
        assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))
    names = [c["name"] for c in categories]
    cat_ids = [c["id"] for c in categories]
    return cocoeval_metrics(coco_from_dict(gt_r, backend), coco_from_dict(dt_r, backend), names, cat_ids, backend)


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_duplicated_images_count_as_separate_images(backend):
    # Image 1's box is found, image 2's is not. Drawing [1, 1, 2] must give 3 images and 3 GT
    # boxes, 2 of them found: recall 2/3 = 0.667 -> thresholds 0.00..0.66 = 67 -> AP = 67/101.
    # Had the duplicate been merged into one image, recall would be 1/2 -> AP = 51/101.
    metrics = _evaluate_draw(_one_box_per_image(2), _finds([1], [0.9]), [0, 0, 1], backend)
    assert metrics["map"] == pytest.approx(67 / 101)


def test_identity_draw_reproduces_full_evaluation_including_top100_pruning():
    rng = np.random.default_rng(3)
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    images = [{"id": i, "height": 300, "width": 400} for i in range(1, 9)]
    annotations, dets = [], []
    for image in images:
        for _ in range(int(rng.integers(1, 4))):
            box = [*rng.uniform(0, 250, 2), *rng.uniform(10, 120, 2)]
            cat = int(rng.integers(1, 3))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image["id"],
                    "category_id": cat,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
            dets.append(
                {
                    "image_id": image["id"],
                    "category_id": cat,
                    "bbox": [v + rng.normal(0, 3) for v in box],
                    "score": float(rng.uniform(0.2, 1.0)),
                }
            )
    # 150 low-score false positives of class "a" on image 1: more than COCOeval's 100 per
    # (image, category), so the bootstrap's pruning must keep exactly the ones COCOeval uses.
    for _ in range(150):
        dets.append(
            {
                "image_id": 1,
                "category_id": 1,
                "bbox": [*rng.uniform(0, 250, 2), *rng.uniform(10, 120, 2)],
                "score": float(rng.uniform(0.0, 0.6)),
            }
        )
    gt = {"images": images, "annotations": annotations, "categories": categories}
    full = coco_evaluate(gt, dets, backend="faster_coco_eval")
    redrawn = _evaluate_draw(gt, dets, list(range(8)))
    for key in ("map", "map50", "map75", "map_small", "map_medium", "map_large"):
        assert redrawn[key] == pytest.approx(full[key], nan_ok=True), key
    for name in ("a", "b"):
        assert redrawn["per_class"][name] == pytest.approx(full["per_class"][name]), name


# --------------------------------------------------------------------------------------------
# paired_bootstrap
# --------------------------------------------------------------------------------------------
def test_identical_pair_is_within_noise():
    rng = np.random.default_rng(0)
    gt = _one_box_per_image(30)
    dets = _finds(range(1, 21), rng.uniform(size=20))
    result = paired_bootstrap(gt, dets, [dict(d) for d in dets], n_resamples=50, classes=["hole"])
    assert result["delta"] == 0.0 and result["lo"] == 0.0 and result["hi"] == 0.0
    assert result["verdict"] == "within noise"
    assert result["per_class"]["hole"]["verdict"] == "within noise"
    assert result["n_resamples"] == 50 and result["n_valid"] == 50 and result["n_images"] == 30


@pytest.mark.slow  # hundreds of bootstrap resamples
def test_known_difference_is_covered_and_interval_has_binomial_width():
    # 97 images. A finds images 1-58, B finds images 1-78 (B finds all that A finds, plus 20).
    # AP_A: recall 58/97 = 0.598 -> 60 thresholds -> 60/101; AP_B: 78/97 = 0.804 -> 81/101.
    # Known difference: ΔmAP = 21/101.
    n, found_a, found_b = 97, 58, 78
    scores = np.random.default_rng(1).uniform(0.1, 1.0, size=n)
    gt = _one_box_per_image(n)
    dets_a = _finds(range(1, found_a + 1), scores[:found_a])
    dets_b = _finds(range(1, found_b + 1), scores[:found_b])
    result = paired_bootstrap(gt, dets_a, dets_b, n_resamples=300, confidence=0.95, seed=0, classes=["hole"])
    assert result["a"] == pytest.approx(60 / 101) and result["b"] == pytest.approx(81 / 101)
    assert result["delta"] == pytest.approx(21 / 101)
    assert 0 < result["lo"] < result["delta"] < result["hi"]
    assert result["verdict"] == "improves"
    assert result["per_class"]["hole"]["delta"] == pytest.approx(21 / 101)
    assert result["per_class"]["hole"]["verdict"] == "improves"

    # With paired draws, a replica's Δ is (about) the share of "B-only" images drawn, a
    # Binomial(n, 20/97) / n: the 95 % interval is about ±1.96 * sqrt(q (1 - q) / n) wide. Unpaired
    # draws would add both recalls' variances and give a ~1.5x wider interval.
    q = (found_b - found_a) / n
    expected_width = 2 * scipy_stats.norm.ppf(0.975) * math.sqrt(q * (1 - q) / n)
    assert result["hi"] - result["lo"] == pytest.approx(expected_width, rel=0.25)

    # Same seed, swapped roles: the same draws, so the interval is exactly mirrored.
    swapped = paired_bootstrap(gt, dets_b, dets_a, n_resamples=300, confidence=0.95, seed=0)
    assert swapped["verdict"] == "worse"
    assert (swapped["lo"], swapped["hi"]) == pytest.approx((-result["hi"], -result["lo"]))

    # The confidence level is a parameter: a 50 % interval of the same draws lies inside the 95 % one.
    narrow = paired_bootstrap(gt, dets_a, dets_b, n_resamples=300, confidence=0.5, seed=0)
    assert result["lo"] < narrow["lo"] < narrow["hi"] < result["hi"]
    assert narrow["confidence"] == 0.5


@pytest.mark.slow  # hundreds of bootstrap resamples
def test_interval_covers_population_difference_at_stated_level():
    """Repeated sampling: how often does the 90 % interval contain the population ΔmAP?

    Population: each image is found by A with probability 0.555 and by B with probability 0.755
    (B finds whatever A finds; the same uniform draw decides both). As n grows, recall -> p, so
    the population AP is (floor(100 p) + 1) / 101: 56/101 and 76/101, Δ = 20/101.
    """
    true_delta = 20 / 101
    confidence, n_images, n_datasets = 0.9, 60, 40
    rng = np.random.default_rng(0)
    covered = 0
    for k in range(n_datasets):
        u, scores = rng.uniform(size=n_images), rng.uniform(0.1, 1.0, size=n_images)
        ids = np.arange(1, n_images + 1)
        result = paired_bootstrap(
            _one_box_per_image(n_images),
            _finds(ids[u < 0.555], scores[u < 0.555]),
            _finds(ids[u < 0.755], scores[u < 0.755]),
            n_resamples=100,
            confidence=confidence,
            seed=k,
        )
        covered += result["lo"] <= true_delta <= result["hi"]
    # A procedure that covers 90 % of the time covers at most 30 of 40 with probability < 1 %
    # (binomial); an interval that ignored the resampling noise would cover far less often.
    assert scipy_stats.binom.cdf(covered, n_datasets, confidence) > 0.01, f"covered {covered}/{n_datasets}"


def test_seeded_and_validated():
    gt = _one_box_per_image(20)
    dets_a, dets_b = _finds(range(1, 11), np.linspace(0.2, 0.9, 10)), _finds(range(1, 15), np.linspace(0.2, 0.9, 14))
    first = paired_bootstrap(gt, dets_a, dets_b, n_resamples=30, seed=7)
    again = paired_bootstrap(gt, dets_a, dets_b, n_resamples=30, seed=7)
    assert (first["lo"], first["hi"]) == (again["lo"], again["hi"])
    with pytest.raises(ConfigError, match="metric"):
        paired_bootstrap(gt, dets_a, dets_b, metric="mAP")
    with pytest.raises(ConfigError, match="confidence"):
        paired_bootstrap(gt, dets_a, dets_b, confidence=95)
    with pytest.raises(ConfigError, match="Roturas"):
        paired_bootstrap(gt, dets_a, dets_b, classes=["Roturas"])
    two_classes = dict(gt, categories=[{"id": 1, "name": "hole"}, {"id": 2, "name": "crack"}])
    with pytest.raises(DataError, match="crack"):
        paired_bootstrap(two_classes, dets_a, dets_b, classes=["crack"])
    with pytest.raises(DataError, match="map_small"):  # every box is 50x40: no small objects
        paired_bootstrap(gt, dets_a, dets_b, metric="map_small")
