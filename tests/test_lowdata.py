"""The low-data regime (`train_shots`) and the convergence flag: fast, no training."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tfg_mm.data.loaders import make_data
from tfg_mm.data.shots import class_image_counts, select_shots
from tfg_mm.data.split import split_coco
from tfg_mm.errors import ConfigError
from tfg_mm.evaluation.convergence import convergence


def _train(tiny_dataset) -> dict:
    return json.loads((tiny_dataset / "instances_train.json").read_text())


def _holders(data: dict, ids, name: str) -> int:
    cat = next(c["id"] for c in data["categories"] if c["name"] == name)
    return len({a["image_id"] for a in data["annotations"] if a["category_id"] == cat and a["image_id"] in set(ids)})


def test_shots_are_deterministic_per_seed_and_starve_only_the_named_classes(tiny_dataset):
    data = _train(tiny_dataset)
    counts = class_image_counts(data)
    first = select_shots(data, 2, ["perforation", "break"], seed=0)
    assert select_shots(data, 2, ["perforation", "break"], seed=0) == first
    seeds = {tuple(select_shots(data, 2, ["perforation", "break"], seed=s)["image_ids"]) for s in range(6)}
    assert len(seeds) > 1  # another seed, another subset
    for name in ("perforation", "break"):
        assert _holders(data, first["image_ids"], name) <= 2
        assert first["images"][name] == {"kept": _holders(data, first["image_ids"], name), "of": counts[name]}
    starved_images = {
        a["image_id"]
        for a in data["annotations"]
        if a["category_id"] in {c["id"] for c in data["categories"] if c["name"] in ("perforation", "break")}
    }
    others = {im["id"] for im in data["images"]} - starved_images
    assert others <= set(first["image_ids"])  # every image without a starved class stays
    everything = select_shots(data, 1, seed=3)  # empty = every class starved
    assert all(v["kept"] <= 1 for v in everything["images"].values()) and len(everything["classes"]) == 6


def test_train_shots_shrink_only_the_training_set(tiny_params, tiny_dataset):
    full = make_data(tiny_params(test_json="instances_test.json"), torch.Generator(), progress=False)
    few = make_data(
        tiny_params(test_json="instances_test.json", train_shots=2, shots_classes=["perforation"], shots_seed=1),
        torch.Generator(),
        progress=False,
    )
    assert full.shots is None and few.shots["k"] == 2 and few.shots["classes"] == ["perforation"]
    assert len(few.train) == few.shots["kept_images"] < len(full.train) == few.shots["of_images"]
    assert _holders(few.train.data, few.train.image_ids, "perforation") <= 2
    for split in ("val", "test"):  # untouched
        a, b = getattr(full, split), getattr(few, split)
        assert (a.image_ids, a.data["annotations"]) == (b.image_ids, b.data["annotations"])
    assert len(few.train_loader.dataset) == len(few.train)


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"train_shots": 50, "shots_classes": ["perforation"]}, ["train_shots = 50", "perforation (", "at most"]),
        ({"train_shots": 2, "shots_classes": ["perforaton"]}, ["perforaton", "'perforation'"]),
    ],
)
def test_impossible_shots_are_the_projects_error(tiny_params, overrides, words):
    with pytest.raises(ConfigError) as err:
        make_data(tiny_params(**overrides), torch.Generator(), progress=False)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_zero_shots_is_refused_when_the_params_load(tiny_params):
    with pytest.raises(ConfigError, match="train_shots"):
        tiny_params(train_shots=0)
    with pytest.raises(ConfigError, match="at least one"):
        select_shots({"categories": [], "images": [], "annotations": []}, 0)


def _history(values, every=2):
    return [{"epoch": every * (i + 1), "map": v} for i, v in enumerate(values)]


def test_convergence_flags_a_rising_history_and_not_a_flat_one():
    rising = convergence(_history([0.30, 0.34, 0.36, 0.37, 0.38, 0.389, 0.397, 0.407, 0.416, 0.424]))
    assert rising["verdict"] == "still rising" and rising["still_rising"] is True
    assert rising["epochs"] == [16, 20] and rising["gain"] > rising["noise"] > 0
    assert "still rising" in rising["sentence"] and "+0.0" in rising["sentence"]
    noisy_flat = convergence(_history([0.30, 0.38, 0.40, 0.41, 0.418, 0.421, 0.419, 0.422, 0.420, 0.421, 0.419, 0.421]))
    assert noisy_flat["verdict"] == "converged" and noisy_flat["still_rising"] is False
    falling = convergence(_history([0.3, 0.4, 0.42, 0.41, 0.40, 0.39]))
    assert falling["verdict"] == "falling" and falling["still_rising"] is False
    smooth_tiny_gain = convergence(_history([0.4, 0.4001, 0.4002, 0.4003]))
    assert smooth_tiny_gain["verdict"] == "converged"  # under MIN_GAIN however smooth
    short = convergence([{"epoch": 0, "map": 0.0}, *_history([0.3, 0.4])])
    assert short["verdict"] == "not assessed" and short["still_rising"] is None


def test_split_keeps_a_disjoint_held_out_test_file_quietly(tmp_path, caplog):
    categories = [{"id": 1, "name": "a"}]
    train = {
        "images": [{"id": i, "file_name": f"t{i}.png", "width": 8, "height": 8} for i in range(10)],
        "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 2, 2]} for i in range(10)],
        "categories": categories,
    }
    (tmp_path / "train_all.json").write_text(json.dumps(train))
    own_test = {"images": [{"id": 99, "file_name": "x.png", "width": 8, "height": 8}], "annotations": []}
    (tmp_path / "test.json").write_text(json.dumps({**own_test, "categories": categories}))
    with caplog.at_level(logging.WARNING, logger="tfg_mm.data.split"):
        split_coco(tmp_path / "train_all.json", val_fraction=0.2)
    assert "left from an earlier split" not in caplog.text
