"""Numeric faults (issue 9, items 0 and 2): inverted predicted boxes and the non-finite guard.

Root cause of the raw ``ValueError: boxes1 must be in [x0, y0, x1, y1] (corner) format``: DEIMv2's FDR
decoding can give a negative width (the weighting function allows distances below ``-reg_scale / 2`` on both
sides), and transformers' ``center_to_corners_format`` does not clamp it as the official ``box_cxcywh_to_xyxy``
does. The criterion now converts predicted boxes the official way (``tfg_mm.detector.loss.box_cxcywh_to_xyxy``); these
tests prove it changes nothing on valid boxes (bit for bit, loss and gradients) and that an inverted box no
longer crashes. The guard tests prove that NaN outputs stop training with ``TrainingError`` naming epoch,
step and tensor, before the matcher.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.image_transforms import center_to_corners_format
from transformers.loss.loss_deimv2 import Deimv2Loss
from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher
from transformers.models.deimv2.modeling_deimv2 import distance2bbox, weighting_function

import tfg_mm.detector.loss as loss_module
from tfg_mm.config import load_params
from tfg_mm.config.presets import criterion_settings
from tfg_mm.detector import apply_config_overrides, build, load, min_image_size, run_config_overrides
from tfg_mm.detector.loss import DEIMv2Criterion, box_cxcywh_to_xyxy, check_finite_outputs, official_outputs
from tfg_mm.errors import ConfigError, NonFiniteError, TrainingError
from tfg_mm.training.baseline import BaselineTask, run_baseline

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 160
LABELS = [
    {"class_labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.5, 0.5, 1.0, 0.4]])},
    {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 1.0, 1.0]])},  # the whole image
]


def _model() -> torch.nn.Module:
    """Real atto with random last box-head / LQE layers (the official init zeroes them: all layers equal)."""
    torch.manual_seed(0)
    model = build("atto", 3, image_size=IMAGE_SIZE)
    with torch.no_grad():
        for head in model.model.decoder.bbox_embed:
            head.layers[-1].weight.normal_(std=0.05)
        for lqe in model.model.decoder.lqe_layers:
            lqe.reg_conf.layers[-1].weight.normal_(std=0.05)
    return model.train()


def _loss_and_grads(model, criterion) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One training forward (same seed: same images and denoising queries) -> terms and parameter gradients."""
    torch.manual_seed(1)
    pixels = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    model.zero_grad()
    output = model(pixels, labels=LABELS)
    terms = criterion(official_outputs(output, model.config), LABELS, epoch=1)
    sum(terms.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return terms, grads


# ----------------------------------------------------------------------------------------------
# Root cause
# ----------------------------------------------------------------------------------------------
def test_fdr_decoding_can_produce_an_inverted_box() -> None:
    """The decoder itself makes the inverted box: the weighting function spans [-2*up*R, 2*up*R] = [-4, 4], so
    left + right distances reach -8 < -R = -4 and the width (R + d_left + d_right) * w / R reaches -w."""
    up, reg_scale = torch.tensor([0.5]), torch.tensor([4.0])
    project = weighting_function(32, up, reg_scale)
    assert float(project.min()) == -4.0 and float(project.max()) == 4.0
    reference = torch.tensor([[0.5, 0.5, 0.8, 0.8]])  # a large reference box (learned from spanning GT)
    distances = torch.tensor([[float(project[0]), 0.0, float(project[0]), 0.0]])  # both x sides at the minimum
    decoded = distance2bbox(reference, distances, reg_scale)
    assert decoded[0, 2] == pytest.approx(-0.8)  # negative width: an inverted box
    corners = center_to_corners_format(decoded)
    assert corners[0, 2] < corners[0, 0]  # what transformers' GIoU assertion rejects
    official = box_cxcywh_to_xyxy(decoded)
    assert official[0, 2] == official[0, 0] == 0.5  # the official conversion: a zero-width box at the centre


# ----------------------------------------------------------------------------------------------
# Valid boxes: nothing changes, bit for bit
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings", ["atto", "full"], ids=["atto_criterion", "with_fgl_ddf_union"])
def test_official_conversion_changes_nothing_on_valid_boxes(settings, monkeypatch) -> None:
    model = _model()
    kwargs = criterion_settings("atto") if settings == "atto" else {}
    criterion = DEIMv2Criterion(num_classes=3, **kwargs)
    with torch.no_grad():
        torch.manual_seed(1)
        output = model(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE), labels=LABELS)
    assert (output.intermediate_reference_points[..., 2:] > 0).all(), "the test needs valid boxes"
    terms, grads = _loss_and_grads(model, criterion)
    # The code before the fix: transformers' unclamped conversion everywhere.
    monkeypatch.setattr(loss_module, "box_cxcywh_to_xyxy", center_to_corners_format)
    old_terms, old_grads = _loss_and_grads(model, criterion)
    assert list(terms) == list(old_terms)
    for name in terms:
        assert torch.equal(terms[name], old_terms[name]), name
    assert grads.keys() == old_grads.keys() and len(grads) > 50
    for name in grads:
        assert torch.equal(grads[name], old_grads[name]), name


def test_reimplemented_terms_and_matcher_equal_transformers_on_valid_boxes() -> None:
    """MAL, L1 / GIoU and the matcher's classic cost are transformers' own, bit for bit, on valid boxes."""
    model = _model()
    with torch.no_grad():
        torch.manual_seed(1)
        output = model(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE), labels=LABELS)
    criterion = DEIMv2Criterion(num_classes=3, **criterion_settings("atto"))
    outputs = official_outputs(output, model.config)
    views = [outputs, *outputs["aux_outputs"], outputs["pre_outputs"], *outputs["enc_aux_outputs"]]
    for out in views:
        view = {"logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}
        ours = criterion.matcher(view, LABELS, epoch=0)
        theirs = RTDetrHungarianMatcher.forward(criterion.matcher, view, LABELS)
        assert [(r.tolist(), c.tolist()) for r, c in ours] == [(r.tolist(), c.tolist()) for r, c in theirs]
        for method in ("loss_boxes", "loss_labels_mal"):
            mine = getattr(criterion, method)(view, LABELS, ours, 3.0)
            reference = getattr(Deimv2Loss, method)(criterion, view, LABELS, ours, 3.0)
            assert mine.keys() == reference.keys()
            assert all(torch.equal(mine[k], reference[k]) for k in mine), method


# ----------------------------------------------------------------------------------------------
# Inverted / degenerate boxes: no crash, finite loss, a gradient that restores the width
# ----------------------------------------------------------------------------------------------
def _inverted_case() -> tuple[dict, torch.Tensor]:
    model = _model()
    torch.manual_seed(1)
    with torch.no_grad():
        output = model(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE), labels=LABELS)
    outputs = official_outputs(output, model.config)
    boxes = outputs["pred_boxes"].detach().clone()
    boxes[..., 2] = -boxes[..., 2]  # every final-layer box inverted in x
    boxes[0, :5, 3] = 0.0  # and a few degenerate (zero height)
    boxes.requires_grad_(True)
    outputs["pred_boxes"] = boxes
    outputs["aux_outputs"][0]["pred_boxes"] = boxes * torch.tensor([1.0, 1.0, 1.0, -1.0])  # inverted in y
    return outputs, boxes


def test_inverted_predictions_crashed_the_unclamped_criterion(monkeypatch) -> None:
    outputs, _ = _inverted_case()
    monkeypatch.setattr(loss_module, "box_cxcywh_to_xyxy", center_to_corners_format)
    with pytest.raises(ValueError, match=r"boxes1 must be in \[x0, y0, x1, y1\] \(corner\) format"):
        DEIMv2Criterion(num_classes=3, **criterion_settings("atto"))(outputs, LABELS, epoch=1)


@pytest.mark.parametrize("settings", ["atto", "full"], ids=["atto_criterion", "with_fgl_ddf_union"])
@pytest.mark.parametrize("switched", [False, True], ids=["classic_cost", "iou_order_cost"])
def test_inverted_predictions_give_a_finite_loss(settings, switched) -> None:
    outputs, boxes = _inverted_case()
    kwargs = criterion_settings("atto") if settings == "atto" else {}
    kwargs["matcher_change_epoch"] = 1 if switched else None
    terms = DEIMv2Criterion(num_classes=3, **kwargs)(outputs, LABELS, epoch=1)
    total = sum(terms.values())
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())
    total.backward()
    assert torch.isfinite(boxes.grad).all()
    # L1 stays on the raw box: a matched inverted box is pushed back towards a positive width.
    matched = boxes.grad[..., 2] != 0
    assert matched.any() and (boxes.grad[..., 2][matched] < 0).all()


# ----------------------------------------------------------------------------------------------
# The non-finite guard
# ----------------------------------------------------------------------------------------------
def test_guard_names_the_first_non_finite_output_before_the_matcher() -> None:
    outputs, _ = _inverted_case()
    outputs = {**outputs, "aux_outputs": [dict(o) for o in outputs["aux_outputs"]]}
    boxes = outputs["aux_outputs"][1]["pred_boxes"].detach().clone()
    boxes[0, 3] = float("nan")
    outputs["aux_outputs"][1]["pred_boxes"] = boxes
    with pytest.raises(NonFiniteError, match=r"aux_outputs\[1\]\.pred_boxes.*4 NaN and 0 inf") as err:
        DEIMv2Criterion(num_classes=3, **criterion_settings("atto"))(outputs, LABELS, epoch=7)
    assert err.value.what == "aux_outputs[1].pred_boxes" and "epoch 7" in str(err.value)
    assert isinstance(err.value, TrainingError) and not isinstance(err.value, ValueError)
    outputs["dn_outputs"][0]["pred_logits"] = outputs["dn_outputs"][0]["pred_logits"] * float("inf")
    with pytest.raises(NonFiniteError, match=r"also non-finite: \['dn_outputs\[0\]\.pred_logits'\]"):
        check_finite_outputs(outputs)


def test_guard_checks_every_term() -> None:
    outputs, _ = _inverted_case()
    criterion = DEIMv2Criterion(num_classes=3, **criterion_settings("atto"))
    criterion.weight_dict = {**criterion.weight_dict, "loss_giou": float("inf")}
    with pytest.raises(NonFiniteError, match="non-finite loss term `loss_giou`"):
        criterion(outputs, LABELS, epoch=1)


def _poison_outputs(monkeypatch, at_call: int) -> None:
    """NaN in the second auxiliary layer's boxes from the ``at_call``-th training loss on (1-based)."""
    original = loss_module.official_outputs
    calls = {"n": 0}

    def poisoned(model_output, config):
        result = original(model_output, config)
        calls["n"] += 1
        if calls["n"] >= at_call:
            result["aux_outputs"][1]["pred_boxes"] = result["aux_outputs"][1]["pred_boxes"] * float("nan")
        return result

    monkeypatch.setattr(loss_module, "official_outputs", poisoned)


@pytest.mark.slow
def test_injected_nan_stops_with_training_error_and_the_previous_epoch_loads(tiny_params, monkeypatch) -> None:
    params = tiny_params(epochs=3, max_steps_per_epoch=2)
    _poison_outputs(monkeypatch, at_call=4)  # epoch 2, step 1
    with pytest.raises(TrainingError) as err:
        run_baseline(params, progress=False)
    message = str(err.value)
    assert type(err.value) is TrainingError and isinstance(err.value.__cause__, NonFiniteError)
    for part in ("epoch 2, step 1", "aux_outputs[1].pred_boxes", "`lr`", "`grad_clip`", "`amp: no`", "last.pt"):
        assert part in message, part
    run_dir = Path(params.run_dir)
    state = torch.load(run_dir / "state" / "last.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    model = load(run_dir / "checkpoints" / "last")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1]


@pytest.mark.slow
def test_huge_lr_stops_with_training_error_not_value_error(tiny_params) -> None:
    params = tiny_params(epochs=1, max_steps_per_epoch=3, lr=1e6, lr_backbone=1e6, lr_warmup_steps=0)
    with pytest.raises(TrainingError) as err:
        run_baseline(params, progress=False)
    message = str(err.value)
    assert "epoch 1, step" in message and "non-finite" in message and "(now 1000000.0" in message
    assert load(Path(params.run_dir) / "checkpoints" / "last") is not None  # the epoch-0 checkpoint


# ----------------------------------------------------------------------------------------------
# Small inputs (item 5): the project's error, and `num_queries` makes them trainable
# ----------------------------------------------------------------------------------------------
def test_an_input_with_fewer_tokens_than_queries_is_a_config_error_not_a_runtime_error() -> None:
    model = build("atto", 3, image_size=IMAGE_SIZE, seed=0).eval()
    with pytest.raises(ConfigError, match=r"64x64 px gives 20 encoder tokens.*selects 100 queries.*`num_queries: 20`"):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(ConfigError, match=r"`image_size: 128` is too small for preset `atto`.*`image_size: 160`"):
        build("atto", 3, image_size=128)


def test_num_queries_override_reaches_the_model_and_fits_a_small_image() -> None:
    params = load_params({"image_size": 128, "num_queries": 80})
    model = build("atto", 3, image_size=params.image_size, seed=0, **run_config_overrides(params)).train()
    assert model.config.num_queries == 80 and min_image_size("atto", 80) == 128 and min_image_size("atto") == 160
    batch = {"pixel_values": torch.rand(2, 3, 128, 128), "labels": LABELS}
    assert torch.isfinite(BaselineTask(model, ["a", "b", "c"]).loss(model, batch, epoch=1)[0])
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 128, 128)).logits.shape[:2] == (1, 80)
    # a loaded detector: the override is set on its config (the query count changes no weight)
    loaded = build("atto", 3, image_size=IMAGE_SIZE, seed=0)
    apply_config_overrides(loaded, {"num_queries": 50, "matcher_change_epoch": 4})
    assert loaded.config.num_queries == 50 and loaded.config.matcher_change_epoch == 4
    with pytest.raises(ConfigError, match="`num_queries: 20` or fewer"):
        apply_config_overrides(build("atto", 3, image_size=64, num_queries=20), {"num_queries": 21})


# ----------------------------------------------------------------------------------------------
# matcher_change_epoch (item 8): from the parameter to the criterion's matcher
# ----------------------------------------------------------------------------------------------
def test_matcher_change_epoch_parameter_reaches_the_criterion() -> None:
    # null: the preset's value (atto 450) stays; only the attention kind (not a config field) is always applied
    assert run_config_overrides(load_params({})) == {"attn_implementation": "auto"}
    assert build("atto", 3, image_size=IMAGE_SIZE).config.matcher_change_epoch == 450
    params = load_params({"matcher_change_epoch": 2})
    model = build("atto", 3, image_size=IMAGE_SIZE, **run_config_overrides(params))
    criterion = DEIMv2Criterion.from_config(model.config)
    assert [criterion.matcher.iou_order_active(epoch) for epoch in (1, 2, 3)] == [False, True, True]


@pytest.mark.slow
def test_matcher_switches_at_matcher_change_epoch_in_training(tiny_params, monkeypatch) -> None:
    """The trainer's epochs (1-based, as the history) reach the matcher; it switches exactly at the parameter."""
    seen: dict[int, set[bool]] = {}
    original = loss_module.DEIMv2HungarianMatcher.forward

    def spy(self, outputs, targets, epoch=0):
        seen.setdefault(epoch, set()).add(self.iou_order_active(epoch))
        return original(self, outputs, targets, epoch=epoch)

    monkeypatch.setattr(loss_module.DEIMv2HungarianMatcher, "forward", spy)
    params = tiny_params(epochs=3, max_steps_per_epoch=1, matcher_change_epoch=2, eval_every=3)
    contract = run_baseline(params, progress=False)
    assert seen == {1: {False}, 2: {True}, 3: {True}}
    assert contract["status"] == "finished" and contract["params"]["matcher_change_epoch"] == 2


# ----------------------------------------------------------------------------------------------
# The stress case (item 0): image-spanning defects, boxes on every border, grayscale
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_on_the_stress_set_runs(tmp_path, tiny_params) -> None:
    """``python -m tfg_mm generate --stress`` writes the set; a few training steps on it finish, all finite."""
    root = tmp_path / "stress"
    command = [sys.executable, "-m", "tfg_mm", "generate", "--stress", "--out", str(root)]
    command += ["--n-train", "8", "--n-val", "4", "--image-size", "200"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert done.returncode == 0, done.stderr
    params = tiny_params(dataset=str(root), epochs=2, max_steps_per_epoch=2, batch_size=4, augment=True)
    contract = run_baseline(params, progress=False)
    assert contract["status"] == "finished"
    losses = [h["loss"] for h in contract["history"] if h["epoch"] > 0]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
