"""Augmentation with ``torchvision.transforms.v2``: boxes travel with the image as ``tv_tensors``.

Why v2 and not hand-written flips: v2 transforms the ``BoundingBoxes`` together with the pixels
(flips, crops, resizes), and ``SanitizeBoundingBoxes`` removes boxes that a crop shrank to nothing
together with their labels, so a training target can never hold an invalid box.

Three recipes (parameter ``augment``; ``true`` / ``false`` are the older spellings of ``light`` / ``none``):

- ``light`` (the default): deliberately mild. Flips (surfaces have no canonical orientation), a small
  photometric jitter (illumination varies between cameras), and with probability 0.5 a random crop
  of 80-100 % of the area (a mild scale jitter that never pads with black borders, which would be
  an artificial edge on a metal surface).
- ``official``: the official DEIMv2 training pipeline (``configs/base/dataloader.yml`` of
  ``Intellindust-AI-Lab/DEIMv2``) rebuilt from torchvision v2 ops: photometric distortion (p 0.5),
  zoom-out on a black canvas (p 0.5, up to 4x), IoU crop (p 0.8), sanitise, horizontal flip, resize,
  sanitise; with probability ``mosaic_prob`` (default 0) a 2 x 2 mosaic of the image and three random
  others under a random affine (:func:`mosaic`) replaces the zoom-out and IoU crop, as officially. In the
  no-augmentation tail (``no_aug=True``, the official
  ``stop_epoch`` policy) the policy ops (photometric, zoom-out, IoU crop) are left out; the flip
  stays, as officially.
- ``none``: the plain square resize and conversion to float in [0, 1] (what evaluation uses).

Images are not normalised by mean / std: the DEIMv2 HGNetv2 backbones take [0, 1] input.
"""

from __future__ import annotations

from typing import Any, get_args

import torch
from torch.utils._pytree import tree_flatten
from torchvision import tv_tensors
from torchvision.transforms import v2

from tfg_mm.config import Augment
from tfg_mm.errors import ConfigError

#: ``augment: true / false`` (the parameter was a bool before the official recipe existed)
LEGACY_AUGMENT = {True: "light", False: "none"}
#: the official ``stop_epoch`` policy's ops: left out in the no-augmentation tail (Mosaic is not built)
POLICY_OPS = ("RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop")


def augment_mode(value: bool | str) -> str:
    """``official`` / ``light`` / ``none`` from a parameter value (``true`` → ``light``, ``false`` → ``none``)."""
    if isinstance(value, bool):
        return LEGACY_AUGMENT[value]
    if value not in get_args(Augment):
        raise ConfigError(
            f"augment={value!r}: unknown augmentation; choose one of {', '.join(get_args(Augment))} "
            "(or true = light, false = none)."
        )
    return value


class RandomIoUCropWithBoxes(v2.RandomIoUCrop):
    """``v2.RandomIoUCrop`` applied with probability ``p``, skipped for an image without boxes.

    torchvision's crop searches for a window overlapping the boxes and fails on an image with none (a
    defect-free negative); the official DEIMv2 op also takes ``p``.
    """

    def __init__(self, p: float = 0.8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.p = p

    def forward(self, *inputs: Any) -> Any:
        sample = inputs if len(inputs) > 1 else inputs[0]
        boxes = [x for x in tree_flatten(sample)[0] if isinstance(x, tv_tensors.BoundingBoxes)]
        if not boxes or boxes[0].shape[0] == 0 or torch.rand(1).item() >= self.p:
            return sample
        return super().forward(*inputs)


def mosaic(samples: list[tuple[tv_tensors.Image, dict]], image_size: int) -> tuple[tv_tensors.Image, dict]:
    """Four ``(uint8 image, {"boxes", "labels"})`` samples tiled 2 x 2 into one ``image_size`` canvas (each
    resized to a half-size square tile), then a random affine (rotation ±10°, translation ±10 %, scale 0.5-1.5,
    black fill): the official DEIMv2 ``Mosaic`` settings, from torchvision v2 ops."""
    if len(samples) != 4:
        raise ValueError(f"mosaic takes 4 samples, got {len(samples)}")
    tile = image_size // 2
    resize = v2.Resize((tile, tile), antialias=True)
    canvas = torch.zeros(3, 2 * tile, 2 * tile, dtype=torch.uint8)
    boxes, labels = [], []
    for k, (image, target) in enumerate(samples):
        image, target = resize(image, target)
        y0, x0 = (k // 2) * tile, (k % 2) * tile
        canvas[:, y0 : y0 + tile, x0 : x0 + tile] = image
        boxes.append(target["boxes"].as_subclass(torch.Tensor).reshape(-1, 4) + torch.tensor([x0, y0, x0, y0]))
        labels.append(target["labels"])
    merged = tv_tensors.BoundingBoxes(torch.cat(boxes), format="XYXY", canvas_size=(2 * tile, 2 * tile))
    affine = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.5, 1.5), fill=0)
    return affine(tv_tensors.Image(canvas), {"boxes": merged, "labels": torch.cat(labels)})


def _official_steps(size: tuple[int, int], no_aug: bool, mosaic: bool = False) -> list[v2.Transform]:
    steps: list[v2.Transform] = []
    if not no_aug:
        steps.append(v2.RandomPhotometricDistort(p=0.5))
        if not mosaic:  # officially, mosaic and zoom-out / IoU crop never act on the same sample
            steps += [v2.RandomZoomOut(fill=0, side_range=(1.0, 4.0), p=0.5), RandomIoUCropWithBoxes(p=0.8)]
        steps.append(v2.SanitizeBoundingBoxes(min_size=1.0))
    steps += [
        v2.RandomHorizontalFlip(p=0.5),
        v2.Resize(size, antialias=True),
        v2.SanitizeBoundingBoxes(min_size=1.0),
        v2.ToDtype(torch.float32, scale=True),
        v2.ClampBoundingBoxes(),
    ]
    return steps


def build_transforms(
    image_size: int,
    train: bool,
    augment: bool | str = "light",
    no_aug: bool = False,
    mosaic: bool = False,
    crop: int | None = None,
) -> v2.Compose:
    """Transforms for ``(tv_tensors.Image uint8, {"boxes": BoundingBoxes, "labels": Tensor})``.

    ``train`` with ``augment`` ``light`` / ``official`` adds that random augmentation (module docstring);
    otherwise it is the plain square resize and conversion to float in [0, 1] (what evaluation uses).
    ``no_aug``: the no-augmentation tail of a training run (``no_aug_epochs``): ``official`` keeps only
    its flip, ``light`` becomes the plain resize. ``mosaic``: the ``official`` steps that follow a
    :func:`mosaic` (no zoom-out, no IoU crop). ``crop`` (``train_crop``): a training image, once at ``image_size``,
    is cut to a random ``crop`` x ``crop`` square (whenever ``augment`` is not ``none``, the no-augmentation tail
    included: it is the training scale, not a policy op); boxes the cut leaves under 4 px go with their labels.
    """
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 32:
        raise ConfigError(f"image_size={image_size!r}: must be an integer >= 32 (e.g. 160 for the default set).")
    mode = augment_mode(augment)
    size = (image_size, image_size)
    cut = _crop_steps(image_size, crop) if train and mode != "none" else []
    if train and mode == "official":
        return v2.Compose(_official_steps(size, no_aug, mosaic) + cut)
    light = train and mode == "light" and not no_aug
    steps: list[v2.Transform] = []
    if light:
        steps += [
            v2.RandomApply([v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True)], p=0.5),
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomVerticalFlip(p=0.5),
            v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.1),
        ]
    steps += [v2.Resize(size, antialias=True), v2.ToDtype(torch.float32, scale=True), v2.ClampBoundingBoxes()]
    if light:
        # A crop can cut a box down to a sliver: drop boxes under one pixel, with their labels.
        steps.append(v2.SanitizeBoundingBoxes(min_size=1.0))
    return v2.Compose(steps + cut)


def _crop_steps(image_size: int, crop: int | None) -> list[v2.Transform]:
    """``train_crop``: a random square of the image at ``image_size``; a defect the cut leaves under 4 px is no longer
    a defect to learn, so it goes (a sliver at the edge would teach a half-defect as a whole one)."""
    if crop is None:
        return []
    if crop > image_size:
        raise ConfigError(
            f"train_crop = {crop} is larger than image_size = {image_size}: a crop is cut from the image at "
            "image_size. Fix: a train_crop of at most image_size (e.g. half of it), or leave it empty."
        )
    return [v2.RandomCrop((crop, crop)), v2.SanitizeBoundingBoxes(min_size=4.0)]
