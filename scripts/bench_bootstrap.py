"""Bootstrap resamples per second: COCOeval rerun per draw (before) vs matches once per image (after).

    python scripts/bench_bootstrap.py            # also part of `python scripts/benchmark.py --only bootstrap`

The data has the embedded default's size: 60 validation images, 6 classes, 1-5 boxes per image
(all three COCO sizes), and 300 detections per image for each of two models (DEIMv2 keeps its top
300 (query, class) pairs): a few near each box, scored high, and background boxes of every class
scored low. Both paths run in this process, side by side, on the same draws (same seed): the
reference (``method="cocoeval"``, rebuilt COCO dicts and COCOeval per draw, the former
implementation) and the default (``method="matches"``); their intervals must agree.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from tfg_mm.evaluation.coco import load_coco_gt, resolve_classes
from tfg_mm.evaluation.stats import ImageMatches, _cocoeval_replicas, paired_bootstrap


def synthetic_pair(n_images: int = 60, n_classes: int = 6, per_image: int = 300, seed: int = 0):
    """Ground truth and two models' detections of the embedded default's size (see the module docstring)."""
    rng = np.random.default_rng(seed)
    categories = [{"id": c + 1, "name": f"class{c}"} for c in range(n_classes)]
    images = [{"id": i + 1, "height": 640, "width": 640} for i in range(n_images)]
    annotations = []
    for image in images:
        for _ in range(int(rng.integers(1, 6))):
            box = [*rng.uniform(0, 560, 2), *np.exp(rng.uniform(2.0, 5.5, 2))]  # 7-245 px sides
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image["id"],
                    "category_id": int(rng.integers(1, n_classes + 1)),
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )

    def model(quality: float) -> list[dict]:
        dets = []
        for image in images:
            own = [a for a in annotations if a["image_id"] == image["id"]]
            near = [a for a in own for _ in range(int(rng.integers(1, 4)))]
            for j in range(per_image):
                if j < len(near):
                    a = near[j]
                    wrong = rng.uniform() < 0.1
                    dets.append(
                        {
                            "image_id": image["id"],
                            "category_id": int(rng.integers(1, n_classes + 1)) if wrong else a["category_id"],
                            "bbox": [v + rng.normal(0, 2 + 0.05 * a["bbox"][2]) for v in a["bbox"]],
                            "score": float(rng.beta(2 + quality, 2)),
                        }
                    )
                else:
                    dets.append(
                        {
                            "image_id": image["id"],
                            "category_id": int(rng.integers(1, n_classes + 1)),
                            "bbox": [*rng.uniform(0, 560, 2), *np.exp(rng.uniform(2.0, 5.5, 2))],
                            "score": float(rng.beta(1, 12)),
                        }
                    )
        return dets

    gt = {"images": images, "annotations": annotations, "categories": categories}
    return gt, model(3.0), model(3.5)


def bench_bootstrap(rounds: int = 3, n_before: int = 4, n_after: int = 200) -> dict:
    gt, dets_a, dets_b = synthetic_pair()
    hard = ["class0", "class1"]
    coco = load_coco_gt(gt, "faster_coco_eval")
    names, cat_ids = resolve_classes(coco, None, None)
    rng = np.random.default_rng(0)
    n = len(gt["images"])

    # The per-resample work of each path, timed apart from its one-off setup: rebuilding both COCO
    # datasets and running COCOeval twice (before), re-accumulating both models' matches (after).
    # Rounds alternate the two so that a shared machine's load falls on both alike.
    t0 = time.perf_counter()
    matches = [ImageMatches.build(coco, dets, cat_ids) for dets in (dets_a, dets_b)]
    setup = time.perf_counter() - t0
    before_rates, after_rates = [], []
    for _ in range(rounds):
        draws = [rng.integers(0, n, size=n) for _ in range(n_before)]
        replicas = _cocoeval_replicas(coco, (dets_a, dets_b), draws, names, cat_ids, "faster_coco_eval")
        t0 = time.perf_counter()
        for _ in draws:
            next(replicas)
        before_rates.append(n_before / (time.perf_counter() - t0))
        draws = [rng.integers(0, n, size=n) for _ in range(n_after)]
        t0 = time.perf_counter()
        for draw in draws:
            for m in matches:
                m.metrics(draw, names, cat_ids)
        after_rates.append(n_after / (time.perf_counter() - t0))
    before_rate, after_rate = float(np.median(before_rates)), float(np.median(after_rates))
    before = paired_bootstrap(gt, dets_a, dets_b, n_resamples=n_before + 1, classes=hard, method="cocoeval")
    # the same draws: the first n_before + 1 replicas of both paths must give the same interval
    same = paired_bootstrap(gt, dets_a, dets_b, n_resamples=n_before + 1, classes=hard)
    diff = max(abs(same[k] - before[k]) for k in ("lo", "hi", "delta"))
    seconds_1000 = setup + 1000 / after_rate
    result = {
        "images": len(gt["images"]),
        "classes": len(gt["categories"]),
        "detections_per_image": len(dets_a) // len(gt["images"]),
        "before_resamples_per_s": round(before_rate, 2),
        "after_resamples_per_s": round(after_rate, 1),
        "speedup": round(after_rate / before_rate, 1),
        "after_setup_seconds": round(setup, 2),  # matching both models once
        "speedup_per_round": [round(a / b, 1) for a, b in zip(after_rates, before_rates)],
        "after_1000_resamples_seconds": round(seconds_1000, 1),
        "before_1000_resamples_seconds": round(1000 / before_rate, 1),
        "max_interval_difference": diff,
    }
    print(
        f"[bootstrap] {result['images']} images x {result['classes']} classes x "
        f"{result['detections_per_image']} detections, 2 models: COCOeval per draw "
        f"{before_rate:.2f} resamples/s; matches once per image {after_rate:.0f} resamples/s "
        f"({result['speedup']:.0f}x, target >= 20x; setup {setup:.1f} s, 1000 resamples in "
        f"{seconds_1000:.0f} s instead of {1000 / before_rate:.0f} s); same draws -> max |Δ interval "
        f"difference| {diff:.1e}"
    )
    return result


if __name__ == "__main__":
    bench_bootstrap()
