"""`recipe: official`: the per-size official schedules, scaled to a run, against the official fixtures."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from tests.conftest import TINY
from tfg_mm.config import RECIPE_KEYS, load_params
from tfg_mm.detector.recipe import COCO_TRAIN_IMAGES, OFFICIAL_SCHEDULES, resolve_recipe, round_half_up
from tfg_mm.errors import ConfigError
from tfg_mm.training.optim import lr_factor

ARCHITECTURES = Path(__file__).parent / "fixtures" / "deimv2_official" / "architectures"
#: the same fixtures outside the repository (TFG_MM_FIXTURES), when the repository copy is absent
if not ARCHITECTURES.is_dir() and os.environ.get("TFG_MM_FIXTURES"):
    ARCHITECTURES = Path(os.environ["TFG_MM_FIXTURES"]) / "deimv2_official" / "architectures"
SIZES = sorted(p.stem for p in ARCHITECTURES.glob("*.json"))
needs_fixtures = pytest.mark.skipif(
    not SIZES, reason=f"no official architecture fixtures in {ARCHITECTURES} (set TFG_MM_FIXTURES)"
)

EPOCHS, STEPS = 40, 50  # the embedded default: 400 images / batch 8, 40 epochs


def _official(size: str) -> dict:
    return json.loads((ARCHITECTURES / f"{size}.json").read_text())["schedule"]


@needs_fixtures
def test_every_size_has_a_fixture():
    assert SIZES == sorted(OFFICIAL_SCHEDULES)


@needs_fixtures
@pytest.mark.parametrize("size", SIZES)
def test_schedule_table_matches_the_official_fixture(size):
    fixture, table = _official(size), OFFICIAL_SCHEDULES[size]
    optimizer = fixture["optimizer"]
    backbone = [g for g in optimizer["params"] if "backbone" in g["params"] or "dinov3" in g["params"]]
    assert backbone and all(g["lr"] == table["lr_backbone"] for g in backbone)
    assert all(g.get("weight_decay", optimizer["weight_decay"]) == 0.0 for g in optimizer["params"][1:])
    assert optimizer["type"] == "AdamW" and tuple(optimizer["betas"]) == table["betas"]
    assert (optimizer["lr"], optimizer["weight_decay"]) == (table["lr"], table["weight_decay"])
    for key in ("epoches", "warmup_iter", "flat_epoch", "no_aug_epoch", "lr_gamma", "train_batch_size"):
        assert fixture[key] == table[key], key
    assert (fixture["ema"]["decay"], fixture["ema"]["warmups"]) == (table["ema_decay"], table["ema_warmups"])
    assert fixture["stop_epoch"] == fixture["epoches"] - fixture["no_aug_epoch"]  # the tail is the policy's stop


@needs_fixtures
@pytest.mark.parametrize("size", SIZES)
def test_official_recipe_scaled_to_a_40_epoch_run(size):
    """Each size's resolved schedule for 40 epochs x 50 steps, recomputed here from the fixture's numbers."""
    s = _official(size)
    params = load_params({"preset": size, "image_size": 640, "epochs": EPOCHS, "recipe": "official"})
    got = resolve_recipe(params, STEPS)
    share = EPOCHS * STEPS / (s["epoches"] * math.ceil(COCO_TRAIN_IMAGES / s["train_batch_size"]))
    no_aug = math.floor(EPOCHS * s["no_aug_epoch"] / s["epoches"] + 0.5)
    assert got["lr"] == s["optimizer"]["lr"] and got["weight_decay"] == s["optimizer"]["weight_decay"]
    assert got["lr_backbone"] == s["optimizer"]["params"][0]["lr"]
    assert got["lr_warmup_steps"] == math.floor(s["warmup_iter"] * share + 0.5)
    assert got["flat_fraction"] == min(1.0, s["flat_epoch"] / s["epoches"])
    assert got["min_lr_ratio"] == s["lr_gamma"]
    assert got["no_aug_epochs"] == no_aug and got["decay_end"] == (EPOCHS - no_aug) / EPOCHS
    assert got["ema_decay"] == pytest.approx(1 - 1 / max(2.0, share / (1 - s["ema"]["decay"])))
    assert got["ema_warmup"] == math.floor(s["ema"]["warmups"] * share + 0.5)
    # the resolved values are valid parameters of a custom run
    load_params({"preset": size, "image_size": 640, "epochs": EPOCHS, **{k: got[k] for k in RECIPE_KEYS}})


# hand-computed known answers (40 epochs x 50 steps = 2,000 steps)
KNOWN = {
    # atto: 500 epochs x ceil(118287 / 128) = 925 -> 462,500 iterations; warm-up 4000 x 2000 / 462500 = 17.3
    "atto": dict(no_aug_epochs=3, lr_warmup_steps=17, flat_fraction=0.5, min_lr_ratio=0.5, lr=0.002, lr_backbone=0.001),
    # n: 160 x 3697 = 591,520; warm-up 2000 x 2000 / 591520 = 6.76; flat 7800 of 160 epochs: never decays
    "n": dict(no_aug_epochs=3, lr_warmup_steps=7, flat_fraction=1.0, min_lr_ratio=1.0, lr=0.0008, lr_backbone=0.0004),
    # s: 40 x 12 / 132 = 3.64 -> 4; x: 40 x 8 / 58 = 5.52 -> 6
    "s": dict(no_aug_epochs=4, lr=0.0005, lr_backbone=2.5e-05),
    "x": dict(no_aug_epochs=6, weight_decay=0.000125, lr_backbone=1e-05),
}


@pytest.mark.parametrize("size", sorted(KNOWN))
def test_known_answers(size):
    got = resolve_recipe(
        load_params({"preset": size, "image_size": 640, "epochs": EPOCHS, "recipe": "official"}), STEPS
    )
    assert {k: got[k] for k in KNOWN[size]} == KNOWN[size]
    if size == "atto":
        assert got["ema_decay"] == pytest.approx(1 - 462_500 / (10_000 * 2_000))  # time constant 43.2 steps
        assert got["ema_warmup"] == 4 and got["warmup_power"] == 2


def test_rounding_is_half_up():
    assert [round_half_up(x) for x in (2.5, 2.56, 0.128, 3.49, 0.5)] == [3, 3, 0, 3, 1]


def test_official_lr_curve():
    """Quadratic warm-up, flat to 50 %, cosine down to lr_gamma at the tail's start, lr_gamma in the tail."""
    p = load_params({"epochs": EPOCHS, "recipe": "official"})
    r = resolve_recipe(p, STEPS)
    total = EPOCHS * STEPS

    def f(step):
        return lr_factor(
            step, total, r["lr_warmup_steps"], "flatcosine", r["flat_fraction"], r["min_lr_ratio"], 2, r["decay_end"]
        )

    assert f(0) == pytest.approx((1 / 17) ** 2) and f(8) == pytest.approx((9 / 17) ** 2)
    assert f(17) == 1.0 and f(999) == 1.0 and f(1001) < 1.0
    tail_start = (EPOCHS - 3) * STEPS  # epochs 38-40
    assert f(tail_start - 1) == pytest.approx(0.5, abs=1e-4) and f(tail_start) == 0.5 and f(total - 1) == 0.5
    mid = (1000 + tail_start) // 2
    assert f(mid) == pytest.approx(0.75, abs=2e-3)


def test_custom_recipe_is_the_explicit_params():
    p = load_params({"lr": 1e-3, "lr_warmup_steps": 7, "no_aug_epochs": 2})
    got = resolve_recipe(p, STEPS)
    assert got["recipe"] == "custom" and got["lr"] == 1e-3 and got["lr_warmup_steps"] == 7 and got["no_aug_epochs"] == 2
    assert got["warmup_power"] == 1 and got["decay_end"] == 1.0  # today's schedule, unchanged
    # the default schedule's curve: linear warm-up, flat to half the steps, cosine to the last step
    assert lr_factor(4, 100, 10, "flatcosine", 0.5, 0.05) == 0.5
    assert lr_factor(30, 100, 10, "flatcosine", 0.5, 0.05) == 1.0
    cosine = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 49 / 50))
    assert lr_factor(99, 100, 10, "flatcosine", 0.5, 0.05) == pytest.approx(cosine, abs=1e-15)


def test_official_recipe_refuses_explicit_schedule_values(tmp_path):
    """`recipe: official` decides the schedule: a schedule key set in a file is refused, naming file, key and fix."""
    path = tmp_path / "mine.yaml"
    path.write_text("recipe: official\nlr: 0.001\nema_decay: 0.99\nepochs: 12\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    text = str(err.value)
    assert f"{path}: `lr: 0.001` is set, but `recipe: official`" in text and "`ema_decay: 0.99`" in text
    assert "use `recipe: custom`" in text and "epochs" not in text.split("problems")[0]
    assert load_params({"recipe": "official", "epochs": 12}).recipe == "official"
    with pytest.raises(ConfigError, match="`no_aug_epochs: 5` is more than `epochs: 3`"):
        load_params({"epochs": 3, "no_aug_epochs": 5})
    with pytest.raises(ConfigError, match="did you mean `recipe`"):
        load_params({"recipie": "official"})


@pytest.mark.slow
def test_official_recipe_run_records_what_it_used(tiny_dataset, tmp_path):
    """A tiny run with `recipe: official` + `augment: official`: finite loss, the resolved schedule in metrics.json,
    the lr the loop used is the official one."""
    from tfg_mm.training.baseline import run_baseline

    params = load_params(
        {
            **{k: v for k, v in TINY.items() if k not in RECIPE_KEYS},  # the schedule is the recipe's
            "dataset": str(tiny_dataset),
            "run_dir": str(tmp_path / "run"),
            "recipe": "official",
            "augment": "official",
            "epochs": 2,
            "max_steps_per_epoch": 2,
        }
    )
    metrics = run_baseline(params, progress=False)
    recipe = metrics["recipe"]
    assert recipe["recipe"] == "official" and recipe["lr"] == 0.002 and recipe["run_steps"] == 4
    assert recipe["lr_warmup_steps"] == 0 and recipe["no_aug_epochs"] == 0
    last = metrics["history"][-1]
    assert math.isfinite(last["loss"])
    # group 0 is the backbone (lr 0.001): flat for steps 0-1, then cosine to 0.5 at step 4; step 3: 0.75
    assert last["lr"] == pytest.approx(0.001 * 0.75)
    assert metrics["params"]["recipe"] == "official"


def test_recipe_is_part_of_the_run_identity():
    """The resolved schedule is a function of the params (recipe, preset, epochs, batch size, step cap), the dataset
    (its length) and the code (the table): all three make the run id, so two recipes never share a run."""
    from tfg_mm.training.identity import code_version, run_id

    code = code_version()
    ids = {
        run_id(load_params({"recipe": r, "augment": a}), "hash", code)
        for r in ("custom", "official")
        for a in ("light", "official")
    }
    assert len(ids) == 4
    assert run_id(load_params({"augment": True}), "hash", code) == run_id(load_params({}), "hash", code)
