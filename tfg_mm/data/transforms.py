"""Augmentation with ``torchvision.transforms.v2``: boxes travel with the image as ``tv_tensors``.

Why v2 and not hand-written flips: v2 transforms the ``BoundingBoxes`` together with the pixels
(flips, crops, resizes), and ``SanitizeBoundingBoxes`` removes boxes that a crop shrank to nothing
together with their labels, so a training target can never hold an invalid box.

The training recipe is deliberately mild: flips (surfaces have no canonical orientation), a small
photometric jitter (illumination varies between cameras), and with probability 0.5 a random crop
of 80-100 % of the area (a mild scale jitter that never pads with black borders, which would be
an artificial edge on a metal surface). Images are not normalised by mean / std: the DEIMv2
HGNetv2 backbones take [0, 1] input.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from tfg_mm.errors import ConfigError


def build_transforms(image_size: int, train: bool, augment: bool = True) -> v2.Compose:
    """Transforms for ``(tv_tensors.Image uint8, {"boxes": BoundingBoxes, "labels": Tensor})``.

    ``train and augment`` adds the random augmentation; otherwise it is the plain square resize
    and conversion to float in [0, 1] (what evaluation uses).
    """
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 32:
        raise ConfigError(f"image_size={image_size!r}: must be an integer >= 32 (e.g. 160 for the default set).")
    size = (image_size, image_size)
    steps: list[v2.Transform] = []
    if train and augment:
        steps += [
            v2.RandomApply([v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True)], p=0.5),
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomVerticalFlip(p=0.5),
            v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.1),
        ]
    steps += [v2.Resize(size, antialias=True), v2.ToDtype(torch.float32, scale=True), v2.ClampBoundingBoxes()]
    if train and augment:
        # A crop can cut a box down to a sliver: drop boxes under one pixel, with their labels.
        steps.append(v2.SanitizeBoundingBoxes(min_size=1.0))
    return v2.Compose(steps)
