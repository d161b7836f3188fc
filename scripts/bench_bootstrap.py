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

from tfg_mm.stats import paired_bootstrap


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


def bench_bootstrap(n_before: int = 10, n_after: int = 300) -> dict:
    gt, dets_a, dets_b = synthetic_pair()
    hard = ["class0", "class1"]
    # before: the reference path; the first call also pays COCO indexing, so time n + 1 minus 1
    t0 = time.perf_counter()
    paired_bootstrap(gt, dets_a, dets_b, n_resamples=1, classes=hard, method="cocoeval")
    t1 = time.perf_counter()
    before = paired_bootstrap(gt, dets_a, dets_b, n_resamples=n_before + 1, classes=hard, method="cocoeval")
    t2 = time.perf_counter()
    before_rate = n_before / ((t2 - t1) - (t1 - t0))
    # after: one matching per model (timed apart), then re-accumulation per draw
    t3 = time.perf_counter()
    paired_bootstrap(gt, dets_a, dets_b, n_resamples=1, classes=hard)
    t4 = time.perf_counter()
    paired_bootstrap(gt, dets_a, dets_b, n_resamples=n_after + 1, classes=hard)
    t5 = time.perf_counter()
    after_rate = n_after / ((t5 - t4) - (t4 - t3))
    # the same draws: the first n_before + 1 replicas of both paths must give the same interval
    same = paired_bootstrap(gt, dets_a, dets_b, n_resamples=n_before + 1, classes=hard)
    diff = max(abs(same[k] - before[k]) for k in ("lo", "hi", "delta"))
    seconds_1000 = (t4 - t3) + 1000 / after_rate
    result = {
        "images": len(gt["images"]),
        "classes": len(gt["categories"]),
        "detections_per_image": len(dets_a) // len(gt["images"]),
        "before_resamples_per_s": round(before_rate, 2),
        "after_resamples_per_s": round(after_rate, 1),
        "speedup": round(after_rate / before_rate, 1),
        "after_setup_seconds": round(t4 - t3, 2),
        "after_1000_resamples_seconds": round(seconds_1000, 1),
        "before_1000_resamples_seconds": round(1000 / before_rate, 1),
        "max_interval_difference": diff,
    }
    print(
        f"[bootstrap] {result['images']} images x {result['classes']} classes x "
        f"{result['detections_per_image']} detections, 2 models: COCOeval per draw "
        f"{before_rate:.2f} resamples/s; matches once per image {after_rate:.0f} resamples/s "
        f"({result['speedup']:.0f}x, target >= 20x; setup {t4 - t3:.1f} s, 1000 resamples in "
        f"{seconds_1000:.0f} s instead of {1000 / before_rate:.0f} s); same draws -> max |Δ interval "
        f"difference| {diff:.1e}"
    )
    return result


if __name__ == "__main__":
    bench_bootstrap()
