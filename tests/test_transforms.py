"""Training augmentation: `augment: official | light | none`, valid boxes, determinism, the no-augmentation tail."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from tfg_mm.config import load_params
from tfg_mm.data import CocoDetection, collate
from tfg_mm.data.transforms import build_transforms
from tfg_mm.errors import ConfigError
from tfg_mm.training.optim import set_augment_tail

H, W = 200, 180  # a non-square canvas: the resize scales x and y differently
BOXES = [[10.0, 20.0, 60.0, 90.0], [100.0, 100.0, 170.0, 190.0], [0.0, 0.0, 5.0, 4.0]]


def _sample(n_boxes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    image = tv_tensors.Image(torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g))
    boxes = tv_tensors.BoundingBoxes(torch.tensor(BOXES[:n_boxes]).reshape(-1, 4), format="XYXY", canvas_size=(H, W))
    return image, {"boxes": boxes, "labels": torch.arange(n_boxes, dtype=torch.int64) + 1}


def _apply(transforms, seed: int, n_boxes: int = 3):
    torch.manual_seed(seed)
    return transforms(*_sample(n_boxes))


@pytest.mark.parametrize("n_boxes", [3, 1, 0])
def test_official_transforms_keep_boxes_valid(n_boxes):
    """Whatever the zoom-out / IoU crop did, every box is inside the 160 px image, at least 1 px wide and high,
    with its label (v2 sanitising); an image without boxes (a negative) goes through."""
    transforms = build_transforms(160, train=True, augment="official")
    changed = 0
    for seed in range(60):
        image, target = _apply(transforms, seed, n_boxes)
        boxes = target["boxes"]
        assert image.shape == (3, 160, 160) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert boxes.canvas_size == (160, 160) and len(boxes) == len(target["labels"]) <= n_boxes
        assert bool((boxes[:, 2] - boxes[:, 0] >= 1).all() and (boxes[:, 3] - boxes[:, 1] >= 1).all())
        assert bool((boxes >= 0).all() and (boxes <= 160).all())
        assert set(target["labels"].tolist()) <= set(range(1, n_boxes + 1))
        plain = build_transforms(160, train=False)(*_sample(n_boxes))[0]
        changed += not torch.equal(image, plain) and not torch.equal(image, plain.flip(-1))
    assert changed >= 30  # the random ops act on most samples (photometric p 0.5, zoom-out 0.5, crop 0.8)


def test_official_transforms_are_deterministic_under_a_seed():
    transforms = build_transforms(160, train=True, augment="official")
    for seed in (0, 7):
        a, b = _apply(transforms, seed), _apply(transforms, seed)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    outputs = [_apply(transforms, seed)[0] for seed in range(4)]
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])


def test_official_tail_is_flip_and_resize_only():
    """The no-augmentation tail (official `stop_epoch` policy): no photometric / zoom-out / crop, the flip stays.
    Known answer: 200 x 180 -> 160 x 160 scales x by 160/180 and y by 160/200."""
    transforms = build_transforms(160, train=True, augment="official", no_aug=True)
    names = [type(t).__name__ for t in transforms.transforms]
    assert "RandomPhotometricDistort" not in names and "RandomZoomOut" not in names and "RandomHorizontalFlip" in names
    sx, sy = 160 / W, 160 / H
    expected = torch.tensor([[10 * sx, 20 * sy, 60 * sx, 90 * sy]])
    flipped = torch.tensor([[160 - 60 * sx, 20 * sy, 160 - 10 * sx, 90 * sy]])
    seen = set()
    for seed in range(12):
        _, target = _apply(transforms, seed, n_boxes=1)
        box = target["boxes"].as_subclass(torch.Tensor)
        if torch.allclose(box, expected, atol=1e-4):
            seen.add("plain")
        else:
            assert torch.allclose(box, flipped, atol=1e-4), box
            seen.add("flipped")
    assert seen == {"plain", "flipped"}


def test_augment_bool_spellings_are_light_and_none():
    """`augment: true / false` (the old bool) are `light` / `none`; the default `light` is unchanged."""
    assert repr(build_transforms(160, True, True)) == repr(build_transforms(160, True, "light"))
    assert repr(build_transforms(160, True, False)) == repr(build_transforms(160, False, "official"))
    for seed in range(5):
        a, b = _apply(build_transforms(160, True, True), seed), _apply(build_transforms(160, True, "light"), seed)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    assert load_params({"augment": True}).augment == "light" and load_params({}).augment == "light"
    assert load_params({"augment": False}).augment == "none" and load_params({"augment": "no"}).augment == "none"
    with pytest.raises(ConfigError, match="unknown augmentation"):
        build_transforms(160, True, "heavy")


def test_no_aug_tail_switches_at_the_right_epoch(tiny_dataset):
    """A real training loader: with 5 epochs and `no_aug_epochs: 2`, epochs 4 and 5 are the plain (flip-only) tail."""
    train = CocoDetection(tiny_dataset, "instances_train.json", image_size=160, train=True, augment="official")
    plain = CocoDetection(tiny_dataset, "instances_train.json", image_size=160, train=False)
    loader = DataLoader(train, batch_size=2, shuffle=False, collate_fn=collate)
    reference = plain[0][0]
    for epoch in range(1, 6):
        tail = set_augment_tail(loader, epoch, epochs=5, no_aug_epochs=2)
        assert tail == (epoch >= 4) and train.no_aug == tail
        same = 0
        for seed in range(8):
            torch.manual_seed(seed)
            image = next(iter(loader))["pixel_values"][0]
            same += torch.allclose(image, reference, atol=1e-6) or torch.allclose(image, reference.flip(-1), atol=1e-6)
        assert same == 8 if tail else same < 8, (epoch, same)
    assert set_augment_tail(loader, 3, epochs=5, no_aug_epochs=0) is False and train.no_aug is False


def test_mosaic_tiles_four_samples_with_valid_boxes(monkeypatch):
    """Known answer without the affine's motion: each sample's box lands in its quadrant, halved."""
    from tfg_mm.data.transforms import mosaic

    samples = [_sample(1, seed=k) for k in range(4)]
    torch.manual_seed(0)
    for seed in range(20):
        torch.manual_seed(seed)
        image, target = mosaic(samples, 160)
        boxes = target["boxes"]
        assert image.shape == (3, 160, 160) and image.dtype == torch.uint8 and len(target["labels"]) == len(boxes) == 4
        assert bool((boxes >= 0).all() and (boxes <= 160).all())
    # the tiles before the affine: scale (0.5 tile / image) and the quadrant offsets
    monkeypatch.setattr(v2, "RandomAffine", lambda **kw: v2.Identity())
    _, target = mosaic(samples, 160)
    sx, sy = 80 / W, 80 / H
    box = torch.tensor([10 * sx, 20 * sy, 60 * sx, 90 * sy])
    offsets = torch.tensor([[0, 0, 0, 0], [80, 0, 80, 0], [0, 80, 0, 80], [80, 80, 80, 80]], dtype=torch.float32)
    assert torch.allclose(target["boxes"].as_subclass(torch.Tensor), box + offsets, atol=1e-4)


@pytest.mark.parametrize("mosaic_prob", [0.0, 1.0])
def test_mosaic_in_the_dataset(tiny_dataset, mosaic_prob):
    """`mosaic_prob` 0 draws no extra random number (items as without it); 1 makes every item a valid mosaic,
    never in the no-augmentation tail."""
    kwargs = dict(image_size=160, train=True, augment="official")
    base = CocoDetection(tiny_dataset, "instances_train.json", **kwargs)
    ds = CocoDetection(tiny_dataset, "instances_train.json", mosaic_prob=mosaic_prob, **kwargs)
    torch.manual_seed(3)
    a = ds[0]
    torch.manual_seed(3)
    b = base[0]
    assert torch.equal(a[0], b[0]) == (mosaic_prob == 0)
    boxes = a[1]["boxes"]
    assert bool((boxes >= 0).all() and (boxes <= 1).all()) and len(boxes) == len(a[1]["class_labels"])
    ds.no_aug = True
    torch.manual_seed(3)
    plain = CocoDetection(tiny_dataset, "instances_train.json", image_size=160)[0][0]
    image = ds[0][0]
    assert torch.allclose(image, plain, atol=1e-6) or torch.allclose(image, plain.flip(-1), atol=1e-6)
    with pytest.raises(ConfigError, match="`mosaic_prob: 0.5` applies to `augment: official` only"):
        load_params({"mosaic_prob": 0.5})


@pytest.mark.parametrize("augment", ["light", "official"])
def test_train_crop_cuts_training_items_and_leaves_evaluation_whole(tiny_dataset, augment):
    """`train_crop`: training items are random crops of the image at image_size (normalised to the crop), boxes the
    cut leaves under 4 px dropped; the validation items stay whole images at image_size."""
    torch.manual_seed(0)
    train = CocoDetection(tiny_dataset, "instances_train.json", image_size=160, train=True, augment=augment, crop=64)
    val = CocoDetection(tiny_dataset, "instances_val.json", image_size=160, train=False, crop=64)
    kept = 0
    for i in range(len(train)):
        image, target = train[i]
        assert image.shape == (3, 64, 64)
        boxes = target["boxes"]
        assert ((boxes >= 0) & (boxes <= 1)).all() and len(boxes) == len(target["class_labels"])
        assert (boxes[:, 2:] * 64 >= 4 - 1e-4).all()  # no sliver under 4 px
        kept += len(boxes)
    assert kept > 0
    train.no_aug = True  # the no-augmentation tail keeps the training scale
    assert train[0][0].shape == (3, 64, 64)
    assert val[0][0].shape == (3, 160, 160)


def test_train_crop_larger_than_the_image_or_without_augmentation_is_refused(tiny_params):
    from tfg_mm.data.loaders import make_data

    with pytest.raises(ConfigError, match="larger than image_size"):
        build_transforms(160, train=True, augment="light", crop=192)
    with pytest.raises(ConfigError, match="augment: none"):
        make_data(tiny_params(train_crop=64, augment="none"), torch.Generator(), progress=False)
    with pytest.raises(ConfigError, match="train_crop"):
        tiny_params(train_crop=50)  # a multiple of 32
