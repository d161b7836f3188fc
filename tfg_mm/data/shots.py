"""The low-data regime: keep at most ``k`` training images of each starved class (``train_shots``).

:func:`select_shots` chooses, from a COCO training file, which images stay: the images are visited in
an order drawn from ``shots_seed`` (the same seed, the same subset, whatever the run's training seed), and
an image that holds a starved class is kept only while every starved class it holds has fewer than ``k``
kept images. Images without a starved class (other classes, defect-free negatives) all stay, so only the
starved classes lose examples; an image is dropped whole, never stripped of some boxes (a stripped box
would be a defect taught as background). Validation and test files are never touched.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tfg_mm.errors import ConfigError


def class_image_counts(data: dict) -> dict[str, int]:
    """Images holding at least one (non-crowd) box of each class, every class of the file listed."""
    name_of = {c["id"]: c["name"] for c in data["categories"]}
    holders: dict[str, set] = {name: set() for name in name_of.values()}
    for a in data["annotations"]:
        if not a.get("iscrowd", 0) and a["category_id"] in name_of:
            holders[name_of[a["category_id"]]].add(a["image_id"])
    return {name: len(ids) for name, ids in holders.items()}


def select_shots(data: dict, k: int, classes: Sequence[str] = (), seed: int = 0, source: str = "train_json") -> dict:
    """The images to keep and what was kept: ``{"image_ids", "k", "classes", "seed", "images", "of"}``.

    ``classes``: the starved classes (empty = every class). ``images`` gives, per starved class, the images
    kept / the images the file had. Raises ``ConfigError`` for ``k < 1``, an unknown class, or ``k`` above a
    starved class's image count (the subset would not be low-data for that class)."""
    names = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(
            f"train_shots = {k!r}: keep at least one training image per class. Fix: a whole number >= 1 "
            "(e.g. 5, 10, 20), or leave it empty (null) to train on every image."
        )
    starved = list(classes) or names
    unknown = [c for c in starved if c not in names]
    if unknown:
        raise ConfigError(
            f"shots_classes names {unknown}, which {source} does not have. Fix: use the dataset's class names "
            f"{names} (empty = every class)."
        )
    counts = class_image_counts(data)
    short = {c: counts[c] for c in starved if counts[c] < k}
    if short:
        raise ConfigError(
            f"train_shots = {k}, but {source} has fewer training images of "
            + ", ".join(f"{c} ({n})" for c, n in short.items())
            + f": the subset would not be a low-data one for {'these classes' if len(short) > 1 else 'that class'}. "
            f"Fix: a train_shots of at most {min(short.values())}, or leave "
            f"{'these classes' if len(short) > 1 else 'it'} out of shots_classes."
        )
    name_of = {c["id"]: c["name"] for c in data["categories"]}
    held: dict[int, set[str]] = {}
    for a in data["annotations"]:
        if not a.get("iscrowd", 0) and name_of.get(a["category_id"]) in starved:
            held.setdefault(a["image_id"], set()).add(name_of[a["category_id"]])
    image_ids = sorted(im["id"] for im in data["images"])
    order = np.random.default_rng(seed).permutation(len(image_ids))
    kept_of = {c: 0 for c in starved}
    keep = set()
    for index in order:
        image_id = image_ids[index]
        holds = held.get(image_id, set())
        if all(kept_of[c] < k for c in holds):
            keep.add(image_id)
            for c in holds:
                kept_of[c] += 1
    return {
        "image_ids": sorted(keep),
        "k": k,
        "classes": starved,
        "seed": seed,
        "images": {c: {"kept": kept_of[c], "of": counts[c]} for c in starved},
        "kept_images": len(keep),
        "of_images": len(image_ids),
    }
