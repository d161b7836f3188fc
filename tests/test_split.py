"""`split`: a seeded, stratified train / val (/ test) split of one COCO json by class presence."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from tfg_mm.cli import main
from tfg_mm.data.importers import coco_to_yolo
from tfg_mm.data.split import COUNTS_FILE, split_coco, split_counts
from tfg_mm.data.synthetic import generate
from tfg_mm.errors import ConfigError, DataError

CLASSES = ["scratch", "oil-stain", "surface_crack", "dent"]


def _coco(n_images: int = 60, seed: int = 3, rare: dict[str, int] | None = None) -> dict:
    """Multi-label images: 1-3 boxes of random classes each, a few empty images; ``rare`` caps how
    many images show a class (its first images only)."""
    rng = random.Random(seed)
    cats = [{"id": i + 10, "name": n, "supercategory": "defect"} for i, n in enumerate(CLASSES)]
    images, anns = [], []
    shown = {n: 0 for n in CLASSES}
    for k in range(n_images):
        image_id = 1000 + 7 * k
        images.append({"id": image_id, "file_name": f"img_{k}.png", "width": 64, "height": 64, "extra": k})
        if k % 10 == 9:
            continue  # an image without defects
        for _ in range(rng.randint(1, 3)):
            name = rng.choice(CLASSES)
            if rare and name in rare and shown[name] >= rare[name]:
                name = CLASSES[0]
            shown[name] += 1
            cat = CLASSES.index(name) + 10
            anns.append(
                {
                    "id": 5000 + len(anns),
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [4, 4, 10, 12],
                    "area": 120,
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": "hand-built"},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": cats,
    }


def _write(tmp_path: Path, data: dict, name: str = "all.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _read(folder: Path, split: str) -> dict:
    return json.loads((folder / f"{split}.json").read_text())


def _ids(data: dict) -> list[int]:
    return [im["id"] for im in data["images"]]


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    src = _write(tmp_path, _coco())
    split_coco(src, tmp_path / "a", val_fraction=0.25, seed=1)
    split_coco(src, tmp_path / "b", val_fraction=0.25, seed=1)
    split_coco(src, tmp_path / "c", val_fraction=0.25, seed=2)
    assert _ids(_read(tmp_path / "a", "val")) == _ids(_read(tmp_path / "b", "val"))
    assert (tmp_path / "a" / "train.json").read_bytes() == (tmp_path / "b" / "train.json").read_bytes()
    assert set(_ids(_read(tmp_path / "a", "val"))) != set(_ids(_read(tmp_path / "c", "val")))


def test_round_trip_every_class_everywhere_and_counts(tmp_path):
    data = _coco(n_images=80)
    src = _write(tmp_path, data)
    record = split_coco(src, val_fraction=0.2, test_fraction=0.1, seed=0)
    parts = {s: _read(tmp_path, s) for s in ("train", "val", "test")}
    ids = [i for p in parts.values() for i in _ids(p)]
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(_ids(data))  # no image twice, none lost
    anns = [a for p in parts.values() for a in p["annotations"]]
    assert sorted(json.dumps(a, sort_keys=True) for a in anns) == sorted(
        json.dumps(a, sort_keys=True) for a in data["annotations"]
    )
    by_image = {im["id"]: im for p in parts.values() for im in p["images"]}
    assert all(by_image[im["id"]] == im for im in data["images"])  # fields kept as they are
    for s, p in parts.items():
        assert p["categories"] == data["categories"] and p["info"] == data["info"]
        assert {a["image_id"] for a in p["annotations"]} <= set(_ids(p)), s  # annotations follow their images
        present = {a["category_id"] for a in p["annotations"]}
        assert present == {c["id"] for c in data["categories"]}, s  # every class in every split
    # sizes near the fractions (80 images: 56 / 16 / 8)
    assert abs(len(parts["val"]["images"]) - 16) <= 2 and abs(len(parts["test"]["images"]) - 8) <= 2
    counts = json.loads((tmp_path / COUNTS_FILE).read_text())
    assert counts == json.loads(json.dumps(record)) and counts["missing"] == {}
    for s, p in parts.items():
        assert counts["splits"][s] == split_counts(p)
    # hand check of one count
    stain = 11
    assert counts["splits"]["val"]["classes"]["oil-stain"]["annotations"] == sum(
        a["category_id"] == stain for a in parts["val"]["annotations"]
    )


def test_stratified_class_shares(tmp_path):
    """Each class's images split close to the fractions, not only the image totals."""
    src = _write(tmp_path, _coco(n_images=200, seed=5))
    record = split_coco(src, val_fraction=0.3, seed=4)
    for name in CLASSES:
        n_val = record["splits"]["val"]["classes"][name]["images"]
        n_all = n_val + record["splits"]["train"]["classes"][name]["images"]
        assert abs(n_val - 0.3 * n_all) <= 0.06 * n_all + 1, (name, n_val, n_all)


def test_class_too_rare_for_every_split_is_named(tmp_path, caplog):
    src = _write(tmp_path, _coco(n_images=40, rare={"dent": 2}))
    with caplog.at_level(logging.WARNING, logger="tfg_mm.data.split"):
        record = split_coco(src, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert list(record["missing"]) == ["dent"] and len(record["missing"]["dent"]) == 1
    assert "class 'dent'" in caplog.text and "missing from" in caplog.text
    holding = [s for s in record["splits"] if record["splits"][s]["classes"]["dent"]["images"]]
    assert len(holding) == 2  # its two images went to two different splits
    assert all(record["splits"][s]["classes"]["oil-stain"]["images"] > 0 for s in record["splits"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_fraction": 0}, "val_fraction` = 0 is out of range"),
        ({"val_fraction": 1.2}, "val_fraction` = 1.2 is out of range"),
        ({"val_fraction": 0.2, "test_fraction": -0.1}, "test_fraction` = -0.1 is out of range"),
        ({"val_fraction": 0.6, "test_fraction": 0.4}, "leaves no training images"),
    ],
)
def test_fractions_out_of_range(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        split_coco(_write(tmp_path, _coco(n_images=10)), **kwargs)


def test_malformed_coco_is_a_data_error(tmp_path):
    bad = _coco(n_images=10)
    del bad["categories"]
    path = _write(tmp_path, bad, "bad.json")
    with pytest.raises(DataError, match=r"bad.json: missing top-level key\(s\) \['categories'\]"):
        split_coco(path)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="broken.json"):
        split_coco(tmp_path / "broken.json")
    assert not (tmp_path / "train.json").exists()


def test_split_command_and_import_with_val_fraction(tmp_path, capsys):
    src = _write(tmp_path, _coco(n_images=30))
    assert main(["split", str(src), "--val-fraction", "0.3", "--seed", "7", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "surface_crack" in out and "split_counts.json" in out
    assert len(_read(tmp_path / "s", "val")["images"]) == 9
    assert main(["split", str(src), "--val-fraction", "1.5"]) == 2
    assert "val_fraction` = 1.5" in capsys.readouterr().err

    synth = generate(tmp_path / "syn", seed=11, n_train=12, n_val=2, image_size=96, progress=False)
    yolo = coco_to_yolo(synth / "instances_train.json", tmp_path / "yolo", images_dir=synth / "images")
    out_json = tmp_path / "imported" / "all.json"
    argv = ["import-yolo", str(yolo / "labels"), str(yolo / "images"), str(out_json)]
    assert main([*argv, "--classes", str(yolo / "classes.txt"), "--val-fraction", "0.25"]) == 0
    parts = [_read(out_json.parent, s) for s in ("train", "val")]
    assert sorted(len(p["images"]) for p in parts) == [3, 9]
    assert (out_json.parent / COUNTS_FILE).is_file() and not (out_json.parent / "test.json").exists()


def test_a_test_json_left_from_an_earlier_split_is_named(tmp_path, caplog):
    src = _write(tmp_path, _coco(n_images=30))
    split_coco(src, val_fraction=0.2, test_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="tfg_mm.data.split"):
        split_coco(src, val_fraction=0.2)
    assert "test.json is left from an earlier split" in caplog.text
    assert (tmp_path / "test.json").exists()  # nothing deleted
