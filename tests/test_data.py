"""COCO dataset, transforms, collate, fingerprint and the notebook-00 inspection helpers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import torch

from tfg_mm.config import load_params
from tfg_mm.data import CocoDetection, collate, dataset_fingerprint, load_coco, loaders
from tfg_mm.data.synthetic import DEFAULT_CLASSES, generate
from tfg_mm.errors import ConfigError
from tfg_mm.reporting.data import class_counts, class_statistics, class_table, show_samples

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("syn") / "set", seed=5, n_train=24, n_val=6, image_size=96, progress=False)


def test_item_format_and_plain_resize(synth):
    ds = CocoDetection(synth, "instances_val.json", image_size=64, train=False)
    assert ds.categories == list(DEFAULT_CLASSES) and ds.cat_ids == [1, 2, 3, 4, 5, 6]
    assert ds.coco_path == synth / "instances_val.json" and len(ds) == 6 == len(ds.image_ids)
    data = json.loads(ds.coco_path.read_text())
    for index in range(len(ds)):
        image, target = ds[index]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and type(image) is torch.Tensor
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert set(target) == {"class_labels", "boxes", "image_id", "orig_size"}
        assert target["class_labels"].dtype == torch.int64 and target["boxes"].dtype == torch.float32
        assert target["orig_size"].tolist() == [96, 96] and target["image_id"] == ds.image_ids[index]
        # boxes are the annotations, normalised cxcywh (unchanged by the square resize)
        anns = [a for a in data["annotations"] if a["image_id"] == target["image_id"]]
        expected = torch.tensor(
            [[(x + w / 2) / 96, (y + h / 2) / 96, w / 96, h / 96] for x, y, w, h in (a["bbox"] for a in anns)]
        ).reshape(-1, 4)
        torch.testing.assert_close(target["boxes"], expected, atol=1e-5, rtol=0)
        assert target["class_labels"].tolist() == [a["category_id"] - 1 for a in anns]


def test_augment_false_is_the_plain_resize(synth):
    plain = CocoDetection(synth, image_size=64, train=False)
    no_aug = CocoDetection(synth, image_size=64, train=True, augment=False)
    a, ta = plain[3]
    b, tb = no_aug[3]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ta["boxes"], tb["boxes"])


def test_augmentation_keeps_boxes_valid(synth):
    ds = CocoDetection(synth, image_size=64, train=True)
    torch.manual_seed(0)
    changed = 0
    plain = CocoDetection(synth, image_size=64, train=False)
    for _ in range(3):
        for index in range(len(ds)):
            image, target = ds[index]
            boxes = target["boxes"]
            assert image.shape == (3, 64, 64) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
            assert boxes.shape[0] == target["class_labels"].shape[0]
            if boxes.numel():
                cx, cy, w, h = boxes.unbind(-1)
                assert bool((w > 0).all() and (h > 0).all())
                assert bool((cx - w / 2 >= -1e-5).all() and (cx + w / 2 <= 1 + 1e-5).all())
                assert bool((cy - h / 2 >= -1e-5).all() and (cy + h / 2 <= 1 + 1e-5).all())
                assert int(target["class_labels"].min()) >= 0 and int(target["class_labels"].max()) < 6
            changed += not torch.equal(boxes, plain[index][1]["boxes"])
    assert changed > 0  # the augmentation really moves boxes


def test_arbitrary_category_ids_map_to_contiguous_labels(synth, tmp_path):
    data = json.loads((synth / "instances_val.json").read_text())
    remap = {c["id"]: c["id"] * 10 for c in data["categories"]}
    for c in data["categories"]:
        c["id"] = remap[c["id"]]
    for a in data["annotations"]:
        a["category_id"] = remap[a["category_id"]]
    data["categories"].reverse()  # order in the file must not matter
    (tmp_path / "remapped.json").write_text(json.dumps(data))
    ds = CocoDetection(tmp_path, "remapped.json", images_dir=synth / "images", image_size=64)
    assert ds.cat_ids == [10, 20, 30, 40, 50, 60] and ds.categories == list(DEFAULT_CLASSES)
    assert ds.id2label == dict(enumerate(DEFAULT_CLASSES)) and ds.num_classes == 6
    labels = torch.cat([ds[i][1]["class_labels"] for i in range(len(ds))])
    expected = sorted(a["category_id"] // 10 - 1 for a in data["annotations"])
    assert sorted(labels.tolist()) == expected
    assert sorted(ds.coco.getCatIds()) == ds.cat_ids


def test_collate_gives_deimv2_inputs(synth):
    ds = CocoDetection(synth, image_size=64, train=True)
    batch = collate([ds[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    assert len(batch["labels"]) == 4 and all("class_labels" in t and "boxes" in t for t in batch["labels"])
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate)
    first = next(iter(loader))
    assert first["pixel_values"].shape[0] == 5


def test_fingerprint_tracks_annotations_and_image_bytes(synth, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(synth, copy)
    fp = dataset_fingerprint(synth)
    assert len(fp) == 64 and fp == dataset_fingerprint(copy)
    (copy / "notes.txt").write_text("unrelated")
    assert dataset_fingerprint(copy) == fp
    image = copy / "images" / "val_000001.png"
    image.write_bytes(image.read_bytes() + b"\0")
    assert dataset_fingerprint(copy) != fp
    assert dataset_fingerprint(synth, ["instances_val.json"]) != fp


def test_load_coco_returns_validated_dict(synth):
    data = load_coco(synth / "instances_train.json")
    assert len(data["images"]) == 24 and all("area" in a and "iscrowd" in a for a in data["annotations"])


def test_inspection_helpers(synth):
    stats = class_statistics([synth / "instances_train.json", synth / "instances_val.json"])
    assert isinstance(stats, pd.DataFrame) and set(stats["split"]) == {"train", "val"}
    assert (stats["rel_size"] > 0).all() and (stats["rel_size"] <= 1).all()
    counts = class_counts(synth / "instances_train.json")
    assert counts["boxes"].sum() == len(json.loads((synth / "instances_train.json").read_text())["annotations"])
    assert set(counts["category"]) <= set(DEFAULT_CLASSES)
    files = [synth / f"instances_{split}.json" for split in ("train", "val")]
    table = class_table(class_counts(files))
    assert list(dict.fromkeys(table.columns.get_level_values("split"))) == ["train", "val"]  # the files' order
    assert list(table.columns.get_level_values(1)[:3]) == ["boxes", "images", "median side (px)"]
    boxes = {split: int(table[(split, "boxes")].sum()) for split in ("train", "val")}
    assert boxes == {split: len(json.loads(f.read_text())["annotations"]) for split, f in zip(("train", "val"), files)}
    assert table[("val", "boxes")].dtype.kind == "i" and (table[("val", "images")] <= table[("val", "boxes")]).all()
    fig = show_samples(synth / "instances_train.json", n=4, ncols=2)
    assert len(fig.axes) == 4 and sum(len(ax.patches) for ax in fig.axes) > 0
    matplotlib.pyplot.close(fig)


def test_make_data_takes_the_runs_dataset_record(synth, monkeypatch):
    params = load_params({"dataset": str(synth), "image_size": 160, "batch_size": 4, "generate_if_missing": False})
    gen = torch.Generator().manual_seed(0)
    fresh = loaders.make_data(params, gen, progress=False)
    assert fresh.record == loaders.dataset_record(synth, params.train_json, params.val_json, params.images_dir)
    assert len(fresh.train) == 24 and len(fresh.val) == 6 and fresh.class_names == list(DEFAULT_CLASSES)
    monkeypatch.setattr(loaders, "dataset_fingerprint", lambda *a, **k: pytest.fail("fingerprinted again"))
    given = loaders.make_data(params, gen, progress=False, need_train=False, record=fresh.record)
    assert given.record is fresh.record and given.root == synth and given.train_loader is None


def test_missing_dataset_folder_names_the_parameter(tmp_path):
    params = load_params({"dataset": str(tmp_path / "nowhere"), "generate_if_missing": False})
    with pytest.raises(ConfigError, match="Parameter `dataset`: folder .*nowhere does not exist"):
        loaders.resolve_dataset(params, progress=False)
