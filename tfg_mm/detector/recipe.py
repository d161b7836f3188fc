"""The official DEIMv2 training schedule of each size, and ``recipe: official``: that schedule scaled to a run.

:data:`OFFICIAL_SCHEDULES` is the per-size table of the official COCO schedules (``configs/deimv2/*.yml``
of ``Intellindust-AI-Lab/DEIMv2``, commit 0fff8d4), checked entry by entry against the ``schedule`` of
``tests/fixtures/deimv2_official/architectures/<size>.json`` (``tests/test_recipe.py``).

:func:`resolve_recipe` is the one place that turns a run's parameters into the schedule it trains with:
``recipe: custom`` returns the explicit parameters as they are; ``recipe: official`` scales the preset's
official schedule to the run. What is scaled, and how (``E`` = the run's epochs, ``T`` = its optimiser
steps, ``OT`` = the official run's iterations = ``epoches`` x ceil(118,287 COCO train2017 images /
official total batch)):

- lr, backbone lr (the official backbone group), weight decay (never on norms, biases and scalars, as
  ``tfg_mm.training.optim.split_decay`` does for every run), AdamW: as officially (no batch-size scaling);
- warm-up: ``round(warmup_iter / OT * T)`` steps (the same share of the run), quadratic as officially
  (``lr * (step / warmup)^2``);
- flat-cosine: flat for ``min(1, flat_epoch / epoches)`` of the steps, then cosine down to ``lr_gamma``
  of the initial lr, reached where the no-augmentation tail starts; the tail keeps that minimum (as
  the official ``FlatCosineLRScheduler``);
- no-augmentation tail: ``no_aug_epochs = round(E * no_aug_epoch / epoches)`` epochs, halves rounded
  up (atto, 40 epochs: 40 x 32 / 500 = 2.56 -> 3);
- EMA: the official decay's time constant ``1 / (1 - decay)`` and its warm-up (iterations) as the same
  share of the run (atto, 2,000 steps: 10,000 / 462,500 x 2,000 = 43.2 steps -> decay 0.9769).
"""

from __future__ import annotations

import math
from typing import Any

from tfg_mm.config import RECIPE_KEYS
from tfg_mm.errors import ConfigError

#: COCO train2017 images: the official schedules' epoch length, with their total batch size.
COCO_TRAIN_IMAGES = 118_287


def _schedule(epoches, warmup_iter, flat_epoch, no_aug_epoch, lr_gamma, lr, lr_backbone, weight_decay, batch):
    return dict(
        epoches=epoches,
        warmup_iter=warmup_iter,
        flat_epoch=flat_epoch,
        no_aug_epoch=no_aug_epoch,
        lr_gamma=lr_gamma,
        lr=lr,
        lr_backbone=lr_backbone,
        weight_decay=weight_decay,
        train_batch_size=batch,
        ema_decay=0.9999,
        ema_warmups=1000,
        betas=(0.9, 0.999),
    )


#: size -> the official COCO schedule (``schedule`` of the architecture fixtures; ``lr_backbone`` is the lr of
#: the official backbone groups: ``backbone`` for HGNetv2, ``dinov3`` for the DINOv3 sizes).
OFFICIAL_SCHEDULES: dict[str, dict[str, Any]] = {
    "atto": _schedule(500, 4000, 250, 32, 0.5, 0.002, 0.001, 0.0001, 128),
    "femto": _schedule(500, 4000, 250, 32, 0.5, 0.0016, 0.0008, 0.0001, 128),
    "pico": _schedule(500, 4000, 250, 32, 0.5, 0.0016, 0.0008, 0.0001, 128),
    "n": _schedule(160, 2000, 7800, 12, 1.0, 0.0008, 0.0004, 0.0001, 32),
    "s": _schedule(132, 2000, 64, 12, 0.5, 0.0005, 2.5e-05, 0.0001, 32),
    "m": _schedule(102, 2000, 49, 12, 0.5, 0.0005, 2.5e-05, 0.0001, 32),
    "l": _schedule(68, 2000, 34, 8, 0.5, 0.0005, 1.25e-05, 0.000125, 32),
    "x": _schedule(58, 2000, 29, 8, 0.5, 0.0005, 1e-05, 0.000125, 32),
}


def round_half_up(x: float) -> int:
    """``x`` rounded to the nearest integer, halves up (Python's ``round`` sends 2.5 to 2)."""
    return math.floor(x + 0.5)


def official_iterations(preset: str) -> int:
    """Iterations of the official COCO run of ``preset``: epochs x ceil(train2017 images / total batch)."""
    s = OFFICIAL_SCHEDULES[preset]
    return s["epoches"] * math.ceil(COCO_TRAIN_IMAGES / s["train_batch_size"])


def resolve_recipe(params: Any, steps_per_epoch: int) -> dict[str, Any]:
    """The schedule a run trains with: ``{"recipe", "preset", <every RECIPE_KEYS value>, "warmup_power",
    "decay_end", ...}``, recorded as ``recipe`` in the run contract.

    ``steps_per_epoch``: optimiser steps of one epoch (after ``max_steps_per_epoch``). ``decay_end`` is the
    share of the steps at which the cosine reaches ``min_lr_ratio`` (1 = the end of the run);
    ``warmup_power`` 1 is a linear warm-up, 2 the official quadratic one. See the module docstring.
    """
    custom = {key: getattr(params, key) for key in RECIPE_KEYS}
    if params.recipe == "custom":
        return {"recipe": "custom", **custom, "warmup_power": 1, "decay_end": 1.0}
    if params.preset not in OFFICIAL_SCHEDULES:
        raise ConfigError(
            f"`recipe: official` has no official schedule for preset {params.preset!r}; choose one of "
            f"{', '.join(OFFICIAL_SCHEDULES)} or `recipe: custom`."
        )
    s = OFFICIAL_SCHEDULES[params.preset]
    epochs = int(params.epochs)
    total = epochs * int(steps_per_epoch)
    official_total = official_iterations(params.preset)
    share = total / official_total  # this run's steps per official iteration
    no_aug = min(epochs, round_half_up(epochs * s["no_aug_epoch"] / s["epoches"]))
    ema_steps = (1.0 / (1.0 - s["ema_decay"])) * share
    return {
        "recipe": "official",
        "preset": params.preset,
        "optimizer": "AdamW",
        "lr": s["lr"],
        "lr_backbone": s["lr_backbone"],
        "weight_decay": s["weight_decay"],
        "scheduler": "flatcosine",
        "lr_warmup_steps": round_half_up(s["warmup_iter"] * share),
        "flat_fraction": min(1.0, s["flat_epoch"] / s["epoches"]),
        "min_lr_ratio": s["lr_gamma"],
        # the official decay's time constant as the same share of the run; at least 2 steps (decay 0.5)
        "ema_decay": 1.0 - 1.0 / max(2.0, ema_steps),
        "ema_warmup": round_half_up(s["ema_warmups"] * share),
        "no_aug_epochs": no_aug,
        "warmup_power": 2,
        "decay_end": (epochs - no_aug) / epochs if epochs else 1.0,
        "scaled_from": {
            "epochs": s["epoches"],
            "iterations": official_total,
            "warmup_iter": s["warmup_iter"],
            "flat_epoch": s["flat_epoch"],
            "no_aug_epoch": s["no_aug_epoch"],
            "ema_decay": s["ema_decay"],
            "ema_warmups": s["ema_warmups"],
            "train_batch_size": s["train_batch_size"],
        },
        "run_steps": total,
    }
