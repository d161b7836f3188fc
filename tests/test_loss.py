"""The official DEIMv2 criterion (tfg_mm.detector.loss), checked against the official loss fixtures and a real model.

The fixtures (``tests/fixtures/deimv2_official/loss_*``, produced by the official ``DEIMCriterion``)
are in the repository (``tests/official.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from official import official_fixture
from transformers import Deimv2Config
from transformers.models.deimv2.modeling_deimv2 import distance2bbox, weighting_function

from tfg_mm.config.presets import criterion_settings
from tfg_mm.detector import build, preset_config
from tfg_mm.detector.loss import (
    OFFICIAL_WEIGHTS,
    DEIMv2Criterion,
    DEIMv2HungarianMatcher,
    compute_loss,
    normalize_targets,
    official_outputs,
)
from tfg_mm.errors import ConfigError, DataError

LOSS_CASES = ["loss_atto_nodn", "loss_atto_dn", "loss_n_nodn", "loss_n_dn", "loss_s_nodn", "loss_s_dn"]
REL_TOL = 1e-4  # every term and the total
DDF_ABS_TOL = 1e-6  # the tiny DDF terms (4e-4 .. 3e-3) may also pass on absolute difference


def _fixture(case: str) -> Path:
    return official_fixture(case)


def _load(case: str) -> tuple[dict, list[dict], dict, dict, dict]:
    folder = _fixture(case)
    outputs = torch.load(folder / "outputs.pt", weights_only=True)
    targets = torch.load(folder / "targets.pt", weights_only=True)
    criterion = json.loads((folder / "criterion.json").read_text())
    expected = json.loads((folder / "expected_loss.json").read_text())
    matching = json.loads((folder / "matching.json").read_text())
    return outputs, targets, criterion, expected, matching


def _criterion_from_json(settings: dict) -> DEIMv2Criterion:
    """The criterion exactly as the fixture's criterion.json describes the official one."""
    matcher = settings["matcher"]
    assert matcher["use_focal_loss"] and matcher["change_matcher"]
    assert settings["boxes_weight_format"] is None and not settings["share_matched_indices"]
    return DEIMv2Criterion(
        num_classes=settings["num_classes"],
        losses=settings["losses"],
        weight_dict=settings["weight_dict"],
        gamma=settings["gamma"],
        alpha=settings["alpha"],
        use_uni_set=settings["use_uni_set"],
        reg_max=settings["reg_max"],
        matcher_cost_class=matcher["cost_class"],
        matcher_cost_bbox=matcher["cost_bbox"],
        matcher_cost_giou=matcher["cost_giou"],
        matcher_alpha=matcher["alpha"],
        matcher_gamma=matcher["gamma"],
        matcher_change_epoch=matcher["matcher_change_epoch"],
        iou_order_alpha=matcher["iou_order_alpha"],
        mal_alpha=settings["mal_alpha"],
    )


def _compare(got: dict[str, torch.Tensor], expected: dict[str, float]) -> float:
    """Assert names, order and values; return the largest relative difference."""
    values = {name: float(value) for name, value in got.items()}
    values["total"] = float(sum(got.values()))
    assert list(values) == list(expected), "term names / order differ from the official criterion"
    worst = 0.0
    for name, reference in expected.items():
        diff = abs(values[name] - reference)
        rel = diff / abs(reference)
        worst = max(worst, rel)
        ok = rel <= REL_TOL or (name.startswith("loss_ddf") and diff <= DDF_ABS_TOL)
        assert ok, f"{name}: got {values[name]!r}, official {reference!r} (rel {rel:.2e})"
    return worst


# ----------------------------------------------------------------------------------------------
# Official fixtures
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", LOSS_CASES)
def test_every_term_matches_official_fixture(case: str) -> None:
    outputs, targets, settings, expected, _ = _load(case)
    criterion = _criterion_from_json(settings)
    worst = _compare(criterion(outputs, targets, epoch=settings["epoch"]), expected)
    print(f"{case}: {len(expected) - 1} terms + total, max relative difference {worst:.3g}")


@pytest.mark.parametrize("case", LOSS_CASES)
def test_the_presets_criterion_reproduces_the_official_terms(case: str) -> None:
    """The criterion of the size's preset (not the fixture's own settings) gives the official terms."""
    outputs, targets, settings, expected, _ = _load(case)
    criterion = DEIMv2Criterion(num_classes=settings["num_classes"], **criterion_settings(case.split("_")[1]))
    _compare(criterion(outputs, targets, epoch=settings["epoch"]), expected)
    active = settings["matcher"]["iou_order_cost_active_at_epoch"]
    assert criterion.matcher.iou_order_active(settings["epoch"]) == active


@pytest.mark.parametrize("case", ["loss_atto_dn", "loss_n_dn"])
def test_matchings_and_union_set_match_official(case: str) -> None:
    outputs, targets, settings, _, matching = _load(case)
    criterion = _criterion_from_json(settings)
    hf_targets = normalize_targets(targets)

    def match(out: dict) -> list[list[list[int]]]:
        view = {"logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}
        return [[rows.tolist(), cols.tolist()] for rows, cols in criterion.matcher(view, hf_targets)]

    main = match(outputs)
    aux = [match(o) for o in outputs["aux_outputs"]]
    pre = match(outputs["pre_outputs"])
    enc = [match(o) for o in outputs["enc_aux_outputs"]]
    assert (main, aux, pre, enc) == (matching["main"], matching["aux"], matching["pre"], matching["enc"])
    as_tensors = [[(torch.tensor(r), torch.tensor(c)) for r, c in m] for m in (main, *aux, pre, *enc)]
    union = criterion._get_dense_o2o_indices(as_tensors[0], as_tensors[1:])
    assert [[r.tolist(), c.tolist()] for r, c in union] == matching["union"]
    assert sum(len(r) for r, _ in union) == matching["num_boxes_union"]


def test_both_target_formats_give_the_same_terms() -> None:
    outputs, targets, settings, expected, _ = _load("loss_n_dn")
    hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    criterion = _criterion_from_json(settings)
    _compare(criterion(outputs, hf_targets), expected)


@pytest.mark.parametrize(
    "config",
    [
        preset_config("atto", 5),
        SimpleNamespace(
            num_labels=5,
            focal_loss_gamma=1.5,
            criterion_losses=["mal", "boxes"],
            use_dense_one_to_one=False,
            matcher_change_epoch=450,
        ),  # the rest from the base criterion
    ],
    ids=["atto_preset", "atto_settings_only"],
)
def test_from_config_reads_the_project_settings(config) -> None:
    """The atto preset's config (or any config carrying its criterion) reproduces the atto fixture."""
    outputs, targets, _, expected, _ = _load("loss_atto_dn")
    criterion = DEIMv2Criterion.from_config(config)
    assert criterion.matcher.change_epoch == 450
    _compare(criterion(outputs, targets, epoch=0), expected)


def test_from_config_on_plain_transformers_config_states_its_gaps() -> None:
    """transformers' config has no criterion_losses / matcher_change_epoch: base losses, no switch."""
    criterion = DEIMv2Criterion.from_config(Deimv2Config(num_labels=3))
    assert criterion.losses == ["mal", "boxes", "local"] and criterion.use_uni_set
    assert criterion.matcher.change_epoch is None and not criterion.matcher.iou_order_active(10**6)
    assert criterion.gamma == 2.0  # transformers' default, not official: the project presets set 1.5


def test_bad_settings_and_targets_raise_clear_errors() -> None:
    with pytest.raises(ConfigError, match="vfl"):
        DEIMv2Criterion(num_classes=3, losses=("mal", "vfl"))
    with pytest.raises(ConfigError, match="loss_fgl"):
        DEIMv2Criterion(num_classes=3, weight_dict={"loss_mal": 1, "loss_bbox": 5, "loss_giou": 2})
    with pytest.raises(DataError, match="class_labels"):
        normalize_targets([{"boxes": torch.zeros(1, 4)}])
    with pytest.raises(DataError, match=r"\[n, 4\]"):
        normalize_targets([{"labels": torch.tensor([0, 1]), "boxes": torch.zeros(2, 2)}])


# ----------------------------------------------------------------------------------------------
# Matcher switch (official: -score * IoU^4 from matcher_change_epoch on)
# ----------------------------------------------------------------------------------------------
def _switch_case() -> tuple[dict, list[dict]]:
    """One GT; query 0 fits it exactly with a low score, query 1 is a looser box with a high score.

    Classic cost (focal class cost dominates) prefers query 1; score * IoU^4 prefers query 0
    (0.3 * 1 > 0.95 * 0.7^4 = 0.23). Query 2 is far away.
    """
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    side = (0.04 / 0.7) ** 0.5  # concentric box with IoU 0.7
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, side, side], [0.1, 0.1, 0.1, 0.1]]])
    logits = torch.full((1, 3, 2), -6.0)
    logits[0, 0, 1] = torch.logit(torch.tensor(0.3))
    logits[0, 1, 1] = torch.logit(torch.tensor(0.95))
    return {"pred_logits": logits, "pred_boxes": boxes}, [{"class_labels": torch.tensor([1]), "boxes": gt}]


def test_matcher_switches_to_iou_order_cost_at_change_epoch() -> None:
    outputs, targets = _switch_case()
    view = {"logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
    # Independent reference for the switched cost: argmax of sigmoid score * IoU^4 (torchvision IoU).
    iou = torchvision.ops.box_iou(
        torchvision.ops.box_convert(view["pred_boxes"][0], "cxcywh", "xyxy"),
        torchvision.ops.box_convert(targets[0]["boxes"], "cxcywh", "xyxy"),
    )[:, 0]
    quality = view["logits"][0, :, 1].sigmoid() * iou**4
    assert int(quality.argmax()) == 0

    matcher = DEIMv2HungarianMatcher(change_epoch=10)
    assert matcher(view, targets, epoch=9)[0][0].tolist() == [1]  # classic cost
    assert matcher(view, targets, epoch=10)[0][0].tolist() == [0]  # IoU-order cost
    assert matcher(view, targets, epoch=11)[0][0].tolist() == [0]
    never = DEIMv2HungarianMatcher(change_epoch=None)
    assert never(view, targets, epoch=10**6)[0][0].tolist() == [1]


def test_criterion_passes_the_epoch_to_the_matcher() -> None:
    outputs, targets = _switch_case()
    criterion = DEIMv2Criterion(num_classes=2, losses=("mal", "boxes"), use_uni_set=False, matcher_change_epoch=3)
    gt = targets[0]["boxes"][0]
    for epoch, query in ((2, 1), (3, 0)):
        l1 = (outputs["pred_boxes"][0, query] - gt).abs().sum()
        terms = criterion(outputs, targets, epoch=epoch)
        torch.testing.assert_close(terms["loss_bbox"], OFFICIAL_WEIGHTS["loss_bbox"] * l1)


# ----------------------------------------------------------------------------------------------
# official_outputs on a real model
# ----------------------------------------------------------------------------------------------
def _tiny_model() -> torch.nn.Module:
    """The project's atto detector with random box-head and LQE last layers.

    The official init zeroes them: every layer would then predict the same corners and DDF would vanish
    (prediction == teacher); random weights make the layers differ.
    """
    torch.manual_seed(0)
    model = build("atto", 5)
    with torch.no_grad():
        for head in model.model.decoder.bbox_embed:
            head.layers[-1].weight.normal_(std=0.05)
        for lqe in model.model.decoder.lqe_layers:
            lqe.reg_conf.layers[-1].weight.normal_(std=0.05)
    return model


IMAGE_SIZE = 320  # atto's official eval size
LABELS = [
    {"class_labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])},
    {"class_labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
]


@pytest.fixture(scope="module")
def train_run():
    model = _tiny_model()
    model.train()
    torch.manual_seed(1)
    output = model(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE), labels=LABELS)
    return model, output


def test_official_outputs_pairs_layers_like_the_official_decoder(train_run) -> None:
    model, output = train_run
    config = model.config
    decoder = model.model.decoder
    layers = config.decoder_layers
    num_dn, num_q = output.denoising_meta_values["dn_num_split"]
    official = official_outputs(output, config)

    assert len(official["aux_outputs"]) == layers - 1 and len(official["dn_outputs"]) == layers
    assert official["pred_logits"].shape == (2, num_q, config.num_labels)
    assert official["dn_outputs"][0]["pred_logits"].shape == (2, num_dn, config.num_labels)
    torch.testing.assert_close(official["pred_logits"], output.intermediate_logits[:, -1, num_dn:])

    project = weighting_function(decoder.max_num_bins, decoder.up, decoder.reg_scale)
    hidden = output.intermediate_hidden_states  # [L, B, Q', D]
    entries = [(i, "match", official["aux_outputs"][i]) for i in range(layers - 1)]
    entries += [(layers - 1, "match", official)]
    entries += [(i, "dn", official["dn_outputs"][i]) for i in range(layers)]
    with torch.no_grad():
        for layer, part, entry in entries:
            queries = slice(num_dn, None) if part == "match" else slice(0, num_dn)
            h = hidden[layer][:, queries]
            torch.testing.assert_close(entry["hidden"], h)
            # Layer i's logits are its score head + LQE on its own hidden state and corners ...
            scores = decoder.lqe_layers[layer](decoder.class_embed[layer](h), entry["pred_corners"])
            torch.testing.assert_close(entry["pred_logits"], scores)
            # ... and its boxes are its own corners decoded against the initial reference boxes.
            boxes = distance2bbox(
                entry["ref_points"], decoder.integral(entry["pred_corners"], project), decoder.reg_scale
            )
            torch.testing.assert_close(entry["pred_boxes"], boxes)
        parts = (
            ("pre_outputs", slice(num_dn, None), official["ref_points"]),
            ("dn_pre_outputs", slice(0, num_dn), official["dn_outputs"][0]["ref_points"]),
        )
        for key, queries, initial_boxes in parts:
            pre = official[key]
            assert "pred_corners" not in pre
            h0 = hidden[0][:, queries]
            torch.testing.assert_close(pre["hidden"], h0)
            torch.testing.assert_close(pre["pred_logits"], decoder.class_embed[0](h0))  # no LQE
            torch.testing.assert_close(pre["pred_boxes"].detach(), initial_boxes)  # the FGL reference
    for entry in official["aux_outputs"]:
        assert entry["teacher_corners"] is not None
        torch.testing.assert_close(entry["teacher_corners"], official["pred_corners"])
        torch.testing.assert_close(entry["teacher_logits"], official["pred_logits"])
    torch.testing.assert_close(official["dn_outputs"][0]["teacher_logits"], official["dn_outputs"][-1]["pred_logits"])
    torch.testing.assert_close(official["enc_aux_outputs"][0]["pred_logits"], output.enc_topk_logits)


def test_total_loss_reaches_every_decoder_head(train_run) -> None:
    """Unlike transformers' wrapper (0 gradient to layer L-2's score head), every head is supervised."""
    model, output = train_run
    config = model.config
    criterion = DEIMv2Criterion(num_classes=config.num_labels)  # n-style: every term incl. FGL / DDF
    total, terms = compute_loss(output, LABELS, config, criterion=criterion)
    layers = config.decoder_layers
    expected = ["loss_mal", "loss_bbox", "loss_giou", "loss_fgl"]
    for i in range(layers - 1):
        expected += [f"loss_{t}_aux_{i}" for t in ("mal", "bbox", "giou", "fgl", "ddf")]
    expected += [f"loss_{t}_pre" for t in ("mal", "bbox", "giou")] + [
        f"loss_{t}_enc_0" for t in ("mal", "bbox", "giou")
    ]
    for i in range(layers):
        expected += [f"loss_{t}_dn_{i}" for t in ("mal", "bbox", "giou", "fgl")]
        expected += [f"loss_ddf_dn_{i}"] if i < layers - 1 else []
    expected += [f"loss_{t}_dn_pre" for t in ("mal", "bbox", "giou")]
    assert list(terms) == expected
    assert torch.isfinite(total) and total.item() == pytest.approx(sum(terms.values()), rel=1e-6)

    model.zero_grad()
    total.backward()
    decoder = model.model.decoder
    for i in range(layers):
        assert decoder.class_embed[i].weight.grad.norm() > 0, f"score head {i} gets no gradient"
        assert decoder.lqe_layers[i].reg_conf.layers[-1].weight.grad.norm() > 0, f"LQE {i} gets no gradient"
    assert decoder.pre_bbox_head.layers[-1].weight.grad.norm() > 0


def test_small_size_criterion_has_no_local_terms(train_run) -> None:
    model, output = train_run
    criterion = DEIMv2Criterion(num_classes=model.config.num_labels, **criterion_settings("atto"))
    _, terms = compute_loss(output, LABELS, model.config, criterion=criterion)
    assert terms and not any("fgl" in name or "ddf" in name for name in terms)
    layers = model.config.decoder_layers
    assert len(terms) == 3 * (layers + 2) + 3 * (layers + 1)  # mal/bbox/giou: L + pre + enc, L dn + dn_pre


def test_official_outputs_in_eval_mode_returns_what_exists(train_run) -> None:
    model, _ = train_run
    model.eval()
    try:
        with torch.no_grad():
            output = model(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    finally:
        model.train()
    official = official_outputs(output, model.config)
    assert not {"aux_outputs", "pre_outputs", "dn_outputs", "dn_pre_outputs"} & set(official)
    torch.testing.assert_close(official["pred_logits"], output.logits)
    torch.testing.assert_close(official["hidden"], output.intermediate_hidden_states[-1])
    criterion = DEIMv2Criterion(num_classes=model.config.num_labels)
    terms = criterion(official, LABELS)
    assert set(terms) == {
        "loss_mal",
        "loss_bbox",
        "loss_giou",
        "loss_fgl",
        "loss_mal_enc_0",
        "loss_bbox_enc_0",
        "loss_giou_enc_0",
    }
    assert all(torch.isfinite(v) for v in terms.values())


def test_nan_terms_become_zero_as_in_the_official_criterion() -> None:
    outputs, targets = _switch_case()
    outputs["pred_logits"][0, 2, 0] = float("nan")  # an unmatched query: only MAL sees it
    terms = DEIMv2Criterion(num_classes=2, losses=("mal", "boxes"), use_uni_set=False, check_finite=False)(
        outputs, targets
    )
    assert terms["loss_mal"].item() == 0.0
    assert all(torch.isfinite(value) and value > 0 for name, value in terms.items() if name != "loss_mal")
