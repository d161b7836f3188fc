"""A deterministic, stratified train / val (/ test) split of one COCO json by class presence.

Public defect sets often ship as one annotated folder; :func:`split_coco` cuts it into
``train.json`` / ``val.json`` (/ ``test.json``) so the rest of the toolkit can use it. Images are
multi-label (an image may show a scratch *and* a stain), so the split stratifies on the *set of
classes present* per image with iterative stratification (Sechidis, Tsoumakas & Vlahavas, 2011):

1. **Coverage first.** For every class, rarest first, each split that does not yet hold the class
   takes one still-unassigned image showing it (random among them, seeded). This keeps every class
   in every split whenever the class has at least as many images as there are splits; when it
   cannot, a warning names the class and the splits that miss it.
2. **Iterative stratification** of the rest: the class with the fewest unassigned images goes
   first; each of its images (in seeded random order) goes to the split that still wants the most
   images of that class (ties: the split that wants the most images in all; then seeded random).
   Images without annotations are spread last by the images each split still wants.

Everything else is kept as it is: image and annotation ids, every image / annotation field, every
top-level key (``info``, ``licenses``...), and ``categories`` identical in every split. Annotations
follow their image. The same input and ``seed`` give the same split; the union of the splits is
the input. Per-split counts (images, annotations, images and annotations per class) are returned
and written as ``split_counts.json`` beside the jsons.
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from pathlib import Path

from tfg_mm.data.validate import read_json, validate_coco_dict
from tfg_mm.errors import ConfigError
from tfg_mm.io import atomic_write_text

log = logging.getLogger(__name__)

#: The split names, in the order of their files and counts.
SPLITS = ("train", "val", "test")
COUNTS_FILE = "split_counts.json"


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value, low_open in (("val_fraction", val_fraction, True), ("test_fraction", test_fraction, False)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"split: `{name}` = {value!r} is not a number. Fix: give a fraction such as 0.2.")
        if value >= 1 or value < 0 or (low_open and value == 0):
            where = "0 < " if low_open else "0 ≤ "
            raise ConfigError(
                f"split: `{name}` = {value} is out of range ({where}{name} < 1). Fix: give a fraction such as 0.2."
            )
    if val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"split: `val_fraction` + `test_fraction` = {val_fraction + test_fraction:g} leaves no training "
            "images. Fix: keep their sum below 1 (e.g. 0.2 and 0.1)."
        )


def assign_splits(
    image_labels: dict[int, set[int]], fractions: dict[str, float], seed: int = 0
) -> tuple[dict[int, str], dict[int, list[str]]]:
    """Image id → split name, and class id → the splits it is missing from (empty when none).

    ``image_labels`` maps each image id to the category ids present in it (possibly none);
    ``fractions`` maps split name → fraction of the images (summing to 1). Deterministic in ``seed``
    (and in the order of ``image_labels``).
    """
    rng = random.Random(seed)
    names = [s for s in fractions if fractions[s] > 0]
    n_images = len(image_labels)
    by_class: dict[int, list[int]] = defaultdict(list)
    for image_id, labels in image_labels.items():
        for c in labels:
            by_class[c].append(image_id)
    classes = sorted(by_class)
    want_images = {s: fractions[s] * n_images for s in names}
    want_class = {s: {c: fractions[s] * len(by_class[c]) for c in classes} for s in names}
    assigned: dict[int, str] = {}

    def put(image_id: int, split: str) -> None:
        assigned[image_id] = split
        want_images[split] -= 1
        for c in image_labels[image_id]:
            want_class[split][c] -= 1

    # 1. coverage: every class in every split, rarest class first
    missing: dict[int, list[str]] = {}
    for c in sorted(classes, key=lambda k: (len(by_class[k]), k)):
        for split in names:
            if any(assigned.get(i) == split for i in by_class[c]):
                continue
            free = [i for i in by_class[c] if i not in assigned]
            if not free:
                missing.setdefault(c, []).append(split)
                continue
            put(rng.choice(free), split)

    # 2. iterative stratification of the labelled rest
    while True:
        remaining = {c: [i for i in by_class[c] if i not in assigned] for c in classes}
        remaining = {c: ids for c, ids in remaining.items() if ids}
        if not remaining:
            break
        c = min(remaining, key=lambda k: (len(remaining[k]), k))
        ids = remaining[c]
        rng.shuffle(ids)
        for image_id in ids:
            best = max(want_class[s][c] for s in names)
            tied = [s for s in names if want_class[s][c] == best]
            if len(tied) > 1:
                most = max(want_images[s] for s in tied)
                tied = [s for s in tied if want_images[s] == most]
            put(image_id, tied[0] if len(tied) == 1 else rng.choice(tied))

    # 3. images without annotations, by the images each split still wants
    empty = [i for i in image_labels if i not in assigned]
    rng.shuffle(empty)
    for image_id in empty:
        most = max(want_images[s] for s in names)
        tied = [s for s in names if want_images[s] == most]
        put(image_id, tied[0] if len(tied) == 1 else rng.choice(tied))
    return assigned, missing


def split_counts(data: dict) -> dict:
    """Images, annotations, and per class name the images showing it and its annotations."""
    names = {c["id"]: c["name"] for c in data["categories"]}
    per_class = {n: {"images": 0, "annotations": 0} for n in names.values()}
    seen: dict[int, set[int]] = defaultdict(set)
    for a in data["annotations"]:
        per_class[names[a["category_id"]]]["annotations"] += 1
        seen[a["category_id"]].add(a["image_id"])
    for c, ids in seen.items():
        per_class[names[c]]["images"] = len(ids)
    return {"images": len(data["images"]), "annotations": len(data["annotations"]), "classes": per_class}


def split_coco(
    coco_json: str | Path,
    out_dir: str | Path | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> dict:
    """Split ``coco_json`` into ``train.json`` / ``val.json`` (/ ``test.json`` when ``test_fraction`` > 0)
    in ``out_dir`` (default: beside the input), plus ``split_counts.json``. Returns the counts record
    (``{"splits": {name: counts}, "files": {name: path}, "missing": {class: [splits]}, ...}``).

    Raises ``ConfigError`` for fractions out of range and ``DataError`` for a malformed COCO file
    (the project's validation, without opening the images).
    """
    _check_fractions(val_fraction, test_fraction)
    coco_json = Path(coco_json)
    data = read_json(coco_json)
    # the checks only: the splits keep the input's own entries (ids, fields) untouched
    validate_coco_dict(data, coco_json, check_images=False, strict=False)
    fractions = {"train": 1 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    labels: dict[int, set[int]] = {im["id"]: set() for im in data["images"]}
    for a in data["annotations"]:
        if a["image_id"] in labels:
            labels[a["image_id"]].add(a["category_id"])
    assigned, missing = assign_splits(labels, fractions, seed)
    cat_names = {c["id"]: c["name"] for c in data["categories"]}
    missing_named = {cat_names[c]: splits for c, splits in missing.items()}
    for name, splits in missing_named.items():
        log.warning(
            "%s: class '%s' is in too few images to appear in every split; it is missing from %s. "
            "Fix: annotate more images of it, or lower the number of splits (no --test-fraction).",
            coco_json,
            name,
            ", ".join(splits),
        )
    absent = sorted(set(cat_names.values()) - set(cat_names[c] for ls in labels.values() for c in ls))
    for name in absent:
        log.warning("%s: class '%s' has no annotation at all, so no split holds it.", coco_json, name)

    out = Path(out_dir) if out_dir is not None else coco_json.parent
    out.mkdir(parents=True, exist_ok=True)
    used = [s for s in SPLITS if fractions[s] > 0]
    record: dict = {
        "source": str(coco_json),
        "seed": seed,
        "fractions": {s: round(fractions[s], 6) for s in used},
        "files": {},
        "splits": {},
        "missing": missing_named,
    }
    for split in used:
        part = {k: v for k, v in data.items() if k not in ("images", "annotations")}
        part["images"] = [im for im in data["images"] if assigned[im["id"]] == split]
        part["annotations"] = [a for a in data["annotations"] if assigned.get(a["image_id"]) == split]
        path = out / f"{split}.json"
        atomic_write_text(path, json.dumps(part, indent=1, ensure_ascii=False) + "\n")
        record["files"][split] = path.name
        record["splits"][split] = split_counts(part)
    names = {im["file_name"] for im in data["images"]}
    for split in SPLITS:
        other = out / f"{split}.json"
        if split in used or not other.exists():
            continue
        try:  # a held-out file of the dataset's own (DeepPCB's test.json) may sit there: only a shared image matters
            shared = len(names & {im["file_name"] for im in json.loads(other.read_text())["images"]})
        except (OSError, ValueError, KeyError, TypeError):
            shared = -1
        if shared:
            log.warning(
                "%s is left from an earlier split and %s. Fix: delete it, or split again with --%s-fraction.",
                other,
                f"shares {shared} images with this one" if shared > 0 else "could not be read to check it",
                split,
            )
    atomic_write_text(out / COUNTS_FILE, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    return record


def format_counts(record: dict) -> str:
    """The counts record as a plain table: one row per class, images / annotations per split."""
    used = list(record["splits"])
    classes = list(next(iter(record["splits"].values()))["classes"]) if used else []
    width = max([len("class (images / annotations)"), *(len(c) for c in classes)])
    lines = [f"{'class (images / annotations)':<{width}}  " + "  ".join(f"{s:>14}" for s in used)]
    for c in classes:
        cells = [
            f"{record['splits'][s]['classes'][c]['images']:>6} / {record['splits'][s]['classes'][c]['annotations']:<5}"
            for s in used
        ]
        lines.append(f"{c:<{width}}  " + "  ".join(f"{x:>14}" for x in cells))
    totals = [f"{record['splits'][s]['images']:>6} / {record['splits'][s]['annotations']:<5}" for s in used]
    lines.append(f"{'all classes':<{width}}  " + "  ".join(f"{x:>14}" for x in totals))
    return "\n".join(lines)
