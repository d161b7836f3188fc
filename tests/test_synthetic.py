"""The embedded synthetic defect generator: determinism, structure, caching, parameter errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tfg_mm.data.synthetic import DEFAULT_CLASSES, HARD_CLASSES, generate
from tfg_mm.errors import ConfigError, DataError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("syn") / "set", seed=3, n_train=60, n_val=10, progress=False)


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    kw = dict(n_train=5, n_val=2, image_size=64, progress=False)
    a = _files(generate(tmp_path / "a", seed=7, **kw))
    b = _files(generate(tmp_path / "b", seed=7, **kw))
    c = _files(generate(tmp_path / "c", seed=8, **kw))
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert "images/train_000000.png" in a and "instances_val.json" in a and "README.json" in a
    pngs = [k for k in a if k.endswith(".png")]
    assert all(a[k] != c[k] for k in pngs)


def test_layout_and_coco_content(synth):
    train = json.loads((synth / "instances_train.json").read_text())
    val = json.loads((synth / "instances_val.json").read_text())
    assert [c["name"] for c in train["categories"]] == list(DEFAULT_CLASSES)
    assert [c["id"] for c in train["categories"]] == [1, 2, 3, 4, 5, 6]
    assert len(train["images"]) == 60 and len(val["images"]) == 10
    ids = [im["id"] for im in train["images"] + val["images"]]
    assert len(set(ids)) == len(ids)
    # an exact ~10 % share of defect-free images
    annotated = {a["image_id"] for a in train["annotations"]}
    assert sum(im["id"] not in annotated for im in train["images"]) == 6
    for im in train["images"][:5]:
        with Image.open(synth / "images" / im["file_name"]) as pil:
            assert pil.size == (160, 160) and pil.mode == "RGB"
    for a in train["annotations"]:
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 160 and y + h <= 160
    assert {a["category_id"] for a in train["annotations"]} == set(range(1, 7))
    # several defects per image occur
    per_image = np.bincount([a["image_id"] for a in train["annotations"]])
    assert per_image.max() >= 3


def test_hard_classes_are_the_small_or_faint_ones(synth):
    train = json.loads((synth / "instances_train.json").read_text())
    names = {c["id"]: c["name"] for c in train["categories"]}
    sides: dict[str, list[float]] = {}
    for a in train["annotations"]:
        sides.setdefault(names[a["category_id"]], []).append(float(np.sqrt(a["area"])))
    median = {k: float(np.median(v)) for k, v in sides.items()}
    assert median["perforation"] < 8  # a few pixels
    assert median["perforation"] < min(v for k, v in median.items() if k != "perforation")
    assert HARD_CLASSES == ("perforation", "break")
    # breaks are faint: the mean darkening inside their boxes is smaller than that of inclusions
    img_of = {im["id"]: im["file_name"] for im in train["images"]}

    def contrast(name: str) -> float:
        values = []
        for a in train["annotations"]:
            if names[a["category_id"]] != name:
                continue
            pixels = np.asarray(Image.open(synth / "images" / img_of[a["image_id"]]).convert("L"), dtype=float)
            x, y, w, h = (int(v) for v in a["bbox"])
            values.append(np.median(pixels) - pixels[y : y + h, x : x + w].min())
        return float(np.median(values))

    assert contrast("break") < contrast("inclusion")


def test_identical_manifest_skips_regeneration_and_new_params_regenerate(tmp_path):
    out = generate(tmp_path / "s", seed=1, n_train=3, n_val=1, image_size=64, progress=False)
    stamp = (out / "images" / "train_000000.png").stat().st_mtime_ns
    generate(tmp_path / "s", seed=1, n_train=3, n_val=1, image_size=64, progress=False)
    assert (out / "images" / "train_000000.png").stat().st_mtime_ns == stamp
    generate(tmp_path / "s", seed=1, n_train=4, n_val=1, image_size=64, progress=False)
    manifest = json.loads((out / "README.json").read_text())
    assert manifest["params"]["n_train"] == 4 and (out / "images" / "train_000003.png").is_file()


def test_class_subset_and_parameter_errors(tmp_path):
    out = generate(
        tmp_path / "sub",
        seed=0,
        n_train=4,
        n_val=1,
        image_size=64,
        classes=["stain", "break"],
        defect_free_fraction=0.0,
        progress=False,
    )
    cats = json.loads((out / "instances_train.json").read_text())["categories"]
    assert [(c["id"], c["name"]) for c in cats] == [(1, "stain"), (2, "break")]
    with pytest.raises(ConfigError, match="classes"):
        generate(tmp_path / "x", classes=["scratch", "rust"], progress=False)
    with pytest.raises(ConfigError, match="image_size"):
        generate(tmp_path / "x", image_size=16, progress=False)
    with pytest.raises(ConfigError, match="seed"):
        generate(tmp_path / "x", seed=-1, progress=False)
    with pytest.raises(ConfigError, match="defect_free_fraction"):
        generate(tmp_path / "x", defect_free_fraction=1.5, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        generate(foreign, n_train=2, n_val=1, image_size=64, progress=False)
    assert (foreign / "thesis.docx").read_text() == "keep me"


def test_stress_set_is_grayscale_with_boxes_spanning_and_touching_every_border(tmp_path):
    """``generate(stress=True)``: the issue-9 stress case (image-spanning defects, grayscale)."""
    size = 128
    root = generate(tmp_path / "stress", seed=1, n_train=24, n_val=4, image_size=size, stress=True, progress=False)
    train = json.loads((root / "instances_train.json").read_text())
    assert json.loads((root / "README.json").read_text())["params"]["stress"] is True
    boxes = [a["bbox"] for a in train["annotations"]]
    for x, y, w, h in boxes:
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= size and y + h <= size
    assert any(w == size for _, _, w, _ in boxes) and any(h == size for _, _, _, h in boxes)
    assert any(w == size and h == size for _, _, w, h in boxes)  # the whole image
    touches = {"left": 0, "top": 0, "right": 0, "bottom": 0}
    for x, y, w, h in boxes:
        touches["left"] += x == 0
        touches["top"] += y == 0
        touches["right"] += x + w == size
        touches["bottom"] += y + h == size
    assert all(count > 0 for count in touches.values()), touches
    assert sum(w * h > 0.5 * size * size for _, _, w, h in boxes) >= 5  # many boxes over most of the image
    assert sum(w * h < 0.05 * size * size for _, _, w, h in boxes) >= 5  # next to small ordinary defects
    for image in train["images"][:5]:
        with Image.open(root / "images" / image["file_name"]) as im:
            assert im.mode == "L" and im.size == (size, size)
    # the default set does not carry the option (its manifest, and so its dataset hash, is unchanged)
    plain = generate(tmp_path / "plain", seed=1, n_train=2, n_val=1, image_size=size, progress=False)
    assert "stress" not in json.loads((plain / "README.json").read_text())["params"]
    with Image.open(plain / "images" / "train_000000.png") as im:
        assert im.mode == "RGB"
