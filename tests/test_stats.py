"""Tests of tfg_mm.evaluation.stats: seed summaries, verdicts and the paired image bootstrap of ΔAP.

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
from tfg_mm.evaluation.coco import coco_evaluate, coco_from_dict, cocoeval_metrics, load_coco_gt
from tfg_mm.evaluation.stats import (
    ImageMatches,
    _detection_arrays,
    _ground_truth_arrays,
    _resampled_detections,
    _resampled_ground_truth,
    _resampled_images,
    hierarchical_bootstrap,
    hierarchical_draws,
    hierarchical_replicas,
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


# --------------------------------------------------------------------------------------------
# Matches once per image, re-accumulated per resample (ImageMatches)
# --------------------------------------------------------------------------------------------
def _random_case(rng: np.random.Generator, n_images: int, n_classes: int, ties: bool) -> tuple[dict, list[dict]]:
    """Random ground truth and detections: several classes, empty images, crowd boxes, all sizes
    (small / medium / large), near-misses, wrong classes, >100 detections of one class in an image,
    and (``ties``) scores rounded to 0.1 so that equal scores across images test the stable sort."""

    def box() -> list[float]:
        return [*rng.uniform(0, 250, 2), *np.exp(rng.uniform(1, 5.5, 2))]

    def score() -> float:
        return float(np.round(rng.uniform(), 1) if ties else rng.uniform())

    categories = [{"id": c + 1, "name": f"c{c}"} for c in range(n_classes)]
    images = [{"id": 10 * i + 5, "height": 300, "width": 400} for i in range(n_images)]
    annotations, dets = [], []
    for image in images:
        if rng.uniform() < 0.2:
            continue  # an empty image
        for _ in range(int(rng.integers(0, 5))):
            b, cat = box(), int(rng.integers(1, n_classes + 1))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image["id"],
                    "category_id": cat,
                    "bbox": b,
                    "area": b[2] * b[3],
                    "iscrowd": int(rng.uniform() < 0.1),
                }
            )
            for _ in range(int(rng.integers(0, 3))):  # hits, near-misses and wrong classes
                wrong = rng.uniform() < 0.2
                dets.append(
                    {
                        "image_id": image["id"],
                        "category_id": int(rng.integers(1, n_classes + 1)) if wrong else cat,
                        "bbox": [v + rng.normal(0, 4) for v in b],
                        "score": score(),
                    }
                )
        for _ in range(int(rng.integers(0, 120 if rng.uniform() < 0.1 else 8))):  # background
            dets.append(
                {
                    "image_id": image["id"],
                    "category_id": int(rng.integers(1, n_classes + 1)),
                    "bbox": box(),
                    "score": score(),
                }
            )
    return {"images": images, "annotations": annotations, "categories": categories}, dets


def _flat(metrics: dict) -> dict:
    out = {key: metrics[key] for key in ("map", "map50", "map75", "map_small", "map_medium", "map_large")}
    for name, values in metrics["per_class"].items():
        out[f"ap:{name}"], out[f"ap50:{name}"] = values["ap"], values["ap50"]
    return out


@pytest.mark.parametrize("case", range(12))
def test_matches_equal_cocoeval_on_the_rebuilt_resample(case):
    rng = np.random.default_rng(case)
    gt_dict, dets = _random_case(rng, int(rng.integers(1, 14)), int(rng.integers(1, 5)), ties=case % 2 == 0)
    names, cat_ids = [c["name"] for c in gt_dict["categories"]], [c["id"] for c in gt_dict["categories"]]
    matches = ImageMatches.build(load_coco_gt(gt_dict, "faster_coco_eval"), dets, cat_ids)
    n = len(gt_dict["images"])
    draws = [np.arange(n), *(rng.integers(0, n, size=n) for _ in range(4)), np.zeros(n, dtype=np.int64)]
    for draw in draws:  # identity, random draws with duplicates, one image n times
        fast = _flat(matches.metrics(draw, names, cat_ids))
        reference = _flat(_evaluate_draw(gt_dict, dets, list(draw), backend="pycocotools"))
        assert fast.keys() == reference.keys()
        for key, value in reference.items():  # exactly pycocotools' numbers, NaN where undefined
            assert (math.isnan(value) and math.isnan(fast[key])) or fast[key] == value, (key, draw)
        faster = _flat(_evaluate_draw(gt_dict, dets, list(draw), backend="faster_coco_eval"))
        for key, value in faster.items():  # faster_coco_eval's C++ sums round differently, in the last bit
            assert fast[key] == pytest.approx(value, abs=1e-12, nan_ok=True), (key, draw)


def test_matches_with_a_class_absent_from_the_draw_and_no_detections():
    gt = {
        "images": [{"id": 1, "height": 100, "width": 100}, {"id": 2, "height": 100, "width": 100}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400.0, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [10, 10, 20, 20], "area": 400.0, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    dets = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9}]
    matches = ImageMatches.build(gt, dets, [1, 2])
    only_first = matches.metrics(np.array([0, 0]), ["a", "b"], [1, 2])
    assert only_first["per_class"]["a"]["ap"] == pytest.approx(1.0)
    assert math.isnan(only_first["per_class"]["b"]["ap"])  # no ground truth of b in this draw
    only_second = matches.metrics(np.array([1, 1]), ["a", "b"], [1, 2])
    assert only_second["per_class"]["b"]["ap"] == 0.0 and math.isnan(only_second["per_class"]["a"]["ap"])
    empty = ImageMatches.build(gt, [], [1, 2]).metrics(np.array([0, 1]), ["a", "b"], [1, 2])
    assert empty["map"] == 0.0


def test_fast_bootstrap_equals_the_cocoeval_reference_draw_for_draw():
    rng = np.random.default_rng(5)
    gt_dict, dets_a = _random_case(rng, 10, 3, ties=False)
    dets_b = [dict(d, score=float(d["score"] * rng.uniform(0.5, 1.5))) for d in dets_a]
    kwargs = {"n_resamples": 25, "seed": 3, "classes": ["c0"], "backend": "pycocotools"}
    fast = paired_bootstrap(gt_dict, dets_a, dets_b, **kwargs)
    reference = paired_bootstrap(gt_dict, dets_a, dets_b, method="cocoeval", **kwargs)
    for key in ("lo", "hi", "delta", "n_valid"):
        assert fast[key] == reference[key], key
        assert fast["per_class"]["c0"][key] == reference["per_class"]["c0"][key], key


# --------------------------------------------------------------------------------------------
# Hierarchical (seeds, then images) bootstrap
# --------------------------------------------------------------------------------------------
def test_hierarchical_interval_has_the_known_spread():
    """Δ of seed s on image i is u_s + e_i: between-seed sd 0.02, image sd 0.05 (additive, no
    interaction). A replica is mean(u over the drawn seeds) + mean(e over the drawn images), two
    independent draws, so its variance is var(u) / S + var(e) / n (population variances of the
    observed values): the seeds' share is what the image-only bootstrap misses."""
    rng = np.random.default_rng(0)
    n_seeds, n_images = 20, 60
    u = rng.normal(0, 0.02, n_seeds)
    e = rng.normal(0, 0.05, n_images)
    contributions = u[:, None] + e[None, :]
    replicas = hierarchical_replicas(lambda s, draw: contributions[s, draw].mean(), n_seeds, n_images, 4000, seed=1)
    expected_sd = math.sqrt(u.var() / n_seeds + e.var() / n_images)
    assert replicas.std() == pytest.approx(expected_sd, rel=0.06)
    lo, hi = np.quantile(replicas, [0.025, 0.975])
    assert hi - lo == pytest.approx(2 * scipy_stats.norm.ppf(0.975) * expected_sd, rel=0.1)
    # images only (one seed): the seed spread is not in the interval
    one_seed = hierarchical_replicas(lambda s, draw: contributions[0, draw].mean(), 1, n_images, 4000, seed=1)
    assert one_seed.std() == pytest.approx(e.std() / math.sqrt(n_images), rel=0.06)
    # identical seeds: drawing seeds changes nothing, the replicas are the one-seed replicas
    same = hierarchical_replicas(lambda s, draw: contributions[0, draw].mean(), 3, n_images, 200, seed=1)
    assert same == pytest.approx(one_seed[:200], abs=1e-15)


def test_hierarchical_draws_reuse_the_paired_image_draws():
    counts, draws = hierarchical_draws(3, 10, 50, seed=4)
    _, one_seed_draws = hierarchical_draws(1, 10, 50, seed=4)
    assert all((a == b).all() for a, b in zip(draws, one_seed_draws))
    assert counts.shape == (50, 3) and (counts.sum(axis=1) == 3).all() and (counts == 0).any()


def test_hierarchical_bootstrap_one_seed_is_the_plain_paired_bootstrap():
    rng = np.random.default_rng(11)
    gt_dict, dets_a = _random_case(rng, 9, 2, ties=False)
    dets_b = [dict(d, score=float(d["score"] * rng.uniform(0.5, 1.5))) for d in dets_a]
    kwargs = {"n_resamples": 20, "seed": 2, "classes": ["c1"], "backend": "pycocotools"}
    plain = paired_bootstrap(gt_dict, dets_a, dets_b, method="cocoeval", **kwargs)
    one = hierarchical_bootstrap(gt_dict, [(dets_a, dets_b)], **kwargs)
    assert (one["lo"], one["hi"], one["delta"]) == (plain["lo"], plain["hi"], plain["delta"])
    assert one["n_seeds"] == 1 and one["per_seed"][0]["delta"] == plain["delta"]
    # Two seeds that are the same model: same interval (resampling identical seeds adds nothing)
    copies = hierarchical_bootstrap(gt_dict, [(dets_a, dets_b), (list(dets_a), list(dets_b))], **kwargs)
    assert (copies["lo"], copies["hi"]) == pytest.approx((one["lo"], one["hi"]), abs=1e-12)
    # A second seed whose Δ differs widens the interval and moves Δ to the seed mean
    worse = hierarchical_bootstrap(gt_dict, [(dets_a, dets_b), (dets_a, dets_a)], **kwargs)
    assert worse["delta"] == pytest.approx(plain["delta"] / 2)
    assert worse["n_seeds"] == 2 and [p["delta"] for p in worse["per_seed"]] == [plain["delta"], 0.0]
