"""The residual text fusion (tfg_mm.multimodal.fusion): exact baseline at α = 0, the saddle, parameter groups,
and its application to every decoder entry of the official output layout."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from official import official_fixture

from tfg_mm.config import Params, default_of, load_params
from tfg_mm.errors import CheckpointError, ConfigError, TfgError
from tfg_mm.multimodal.fusion import FUSION_PARAMS, ResidualTextFusion, apply_fusion
from tfg_mm.training.phase2 import build_fusion_from_config, fusion_config

C, D, T = 5, 16, 12


def make_fusion(**kwargs) -> ResidualTextFusion:
    torch.manual_seed(0)
    return ResidualTextFusion(D, torch.randn(C, T), **kwargs)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("gate", ["scalar", "per_class"])
@pytest.mark.parametrize("gate_tanh", [False, True])
def test_alpha_zero_returns_base_logits_exactly(kind, gate, gate_tanh):
    fusion = make_fusion(fusion=kind, gate=gate, gate_tanh=gate_tanh, dropout=0.1)
    fusion.train()  # dropout active: still exact, the text term is multiplied by exactly 0
    base = torch.randn(2, 7, C) * 5 - 4.6
    hidden = torch.randn(2, 7, D)
    assert torch.equal(fusion(base, hidden), base)
    assert fusion.text_term(hidden).abs().sum() > 0  # ... although the text term itself is not zero


def test_text_term_formula_and_gate():
    fusion = make_fusion(fusion="linear", logit_scale=7.0, alpha=0.3)
    with torch.no_grad():
        fusion.bias.fill_(-0.5)
    hidden = torch.randn(3, D)
    linear = fusion.projection[1]
    cosine = F.normalize(linear(hidden), dim=-1) @ F.normalize(fusion.text_embeddings, dim=-1).T
    torch.testing.assert_close(fusion.text_term(hidden), 7.0 * cosine - 0.5)
    base = torch.randn(3, C)
    torch.testing.assert_close(fusion(base, hidden), base + 0.3 * (7.0 * cosine - 0.5))

    torch.testing.assert_close(fusion.logit_scale(), torch.tensor(7.0))

    tanh_gate = make_fusion(gate="per_class", alpha=0.2, gate_tanh=True)
    assert tanh_gate.alpha().shape == (C,)
    torch.testing.assert_close(tanh_gate.alpha(), torch.full((C,), 0.2))
    with torch.no_grad():
        tanh_gate.gate.fill_(100.0)
    assert tanh_gate.alpha().max() <= 1.0  # bounded


def test_alpha_zero_projection_learns_only_after_the_gate_moved():
    fusion = make_fusion(fusion="mlp", alpha=0.0)
    optimizer = torch.optim.AdamW(fusion.param_groups(lr_fusion=1e-2, lr_gate=1e-2, weight_decay=0.01))
    base = torch.randn(4, 9, C)
    hidden = torch.randn(4, 9, D)
    target = (torch.rand(4, 9, C) > 0.8).float()

    def step() -> None:
        optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(fusion(base, hidden), target).backward()

    step()
    projection_grads = [p.grad for p in fusion.projection.parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in projection_grads)  # exactly zero
    assert fusion.gate.grad.abs() > 0 and fusion.log_scale.grad == 0 and fusion.bias.grad == 0
    optimizer.step()
    assert fusion.alpha().abs() > 0  # α moved away from 0

    step()
    assert all(torch.count_nonzero(p.grad) > 0 for p in fusion.projection.parameters())  # P learns now


def test_param_groups_separate_gate_scale_bias_from_the_projection():
    fusion = make_fusion(fusion="mlp")
    groups = fusion.param_groups(lr_fusion=1e-3, lr_gate=1e-2, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"fusion", "fusion_gate"}
    gate_group, proj_group = by_name["fusion_gate"], by_name["fusion"]
    assert gate_group["lr"] == 1e-2 and gate_group["weight_decay"] == 0.0
    assert {id(p) for p in gate_group["params"]} == {id(fusion.gate), id(fusion.log_scale), id(fusion.bias)}
    assert proj_group["lr"] == 1e-3 and proj_group["weight_decay"] == 0.05
    assert {id(p) for p in proj_group["params"]} == {id(p) for p in fusion.projection.parameters()}
    covered = [id(p) for g in groups for p in g["params"]]
    assert sorted(covered) == sorted(id(p) for p in fusion.parameters())  # each parameter exactly once

    fixed = make_fusion(alpha_learnable=False, logit_scale_learnable=False, fusion_bias=False, alpha=0.1)
    assert [g["name"] for g in fixed.param_groups(1e-3, 1e-2, 0.05)] == ["fusion"]
    assert fixed.state_summary() == {
        "alpha_mean": pytest.approx(0.1),
        "alpha": pytest.approx(0.1),
        "scale": pytest.approx(10.0),
        "bias": None,
    }
    per_class = make_fusion(gate="per_class", alpha=0.01)
    assert per_class.state_summary()["alpha"] == pytest.approx([0.01] * C)


def _official_outputs_with_hidden() -> dict:
    """The official atto train-mode outputs (with denoising), plus a hidden state per decoder entry."""
    outputs = torch.load(official_fixture("loss_atto_dn") / "outputs.pt", weights_only=True)
    generator = torch.Generator().manual_seed(0)

    def with_hidden(entry: dict) -> dict:
        return {**entry, "hidden": torch.randn(*entry["pred_logits"].shape[:-1], D, generator=generator)}

    result = with_hidden(outputs)
    result["aux_outputs"] = [with_hidden(e) for e in outputs["aux_outputs"]]
    result["pre_outputs"] = with_hidden(outputs["pre_outputs"])
    result["dn_outputs"] = [with_hidden(e) for e in outputs["dn_outputs"]]
    result["dn_pre_outputs"] = with_hidden(outputs["dn_pre_outputs"])
    return result


def _decoder_entries(outputs: dict) -> list[dict]:
    return [outputs, *outputs["aux_outputs"], outputs["pre_outputs"], *outputs["dn_outputs"], outputs["dn_pre_outputs"]]


def test_apply_fusion_fuses_every_decoder_entry_and_nothing_else():
    outputs = _official_outputs_with_hidden()
    snapshot = {id(e): e["pred_logits"] for e in _decoder_entries(outputs)}
    fusion = make_fusion(gate="per_class", alpha=0.05)
    fused = apply_fusion(fusion, outputs)

    for before, after in zip(_decoder_entries(outputs), _decoder_entries(fused)):
        assert after is not before and before["pred_logits"] is snapshot[id(before)]  # input not mutated
        torch.testing.assert_close(after["pred_logits"], fusion(before["pred_logits"], before["hidden"]))
        assert not torch.equal(after["pred_logits"], before["pred_logits"])
        assert after["pred_boxes"] is before["pred_boxes"]  # boxes untouched
        if "pred_corners" in before:
            assert after["pred_corners"] is before["pred_corners"]
    # The DDF teachers are the fused final layers, as in the official layout.
    assert all(e["teacher_logits"] is fused["pred_logits"] for e in fused["aux_outputs"])
    assert all(e["teacher_logits"] is fused["dn_outputs"][-1]["pred_logits"] for e in fused["dn_outputs"])
    assert fused["enc_aux_outputs"] is outputs["enc_aux_outputs"]  # encoder proposals are not decoder logits
    assert outputs["aux_outputs"][0]["teacher_logits"] is outputs["pred_logits"]

    at_zero = apply_fusion(make_fusion(alpha=0.0), outputs)
    assert all(
        torch.equal(a["pred_logits"], b["pred_logits"])
        for a, b in zip(_decoder_entries(at_zero), _decoder_entries(outputs))
    )


def test_apply_fusion_none_is_identity_and_missing_hidden_is_an_error():
    outputs = _official_outputs_with_hidden()
    same = apply_fusion(None, outputs)
    assert same is not outputs and same == outputs
    broken = dict(outputs, pre_outputs={k: v for k, v in outputs["pre_outputs"].items() if k != "hidden"})
    with pytest.raises(TfgError, match="pre_outputs"):
        apply_fusion(make_fusion(), broken)
    with pytest.raises(TfgError, match="class embeddings"):
        make_fusion()(torch.randn(2, C + 1), torch.randn(2, D))


def test_constructor_takes_the_schema_names_and_defaults():
    signature = inspect.signature(ResidualTextFusion)
    assert FUSION_PARAMS == (
        "fusion",
        "fusion_hidden",
        "dropout",
        "logit_scale",
        "logit_scale_learnable",
        "fusion_bias",
        "gate",
        "alpha",
        "alpha_learnable",
        "gate_tanh",
    )
    for name in FUSION_PARAMS:
        assert name in Params.model_fields
        assert signature.parameters[name].default == default_of(name), name
    assert make_fusion().config == {"hidden_dim": D, **{name: default_of(name) for name in FUSION_PARAMS}}


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"fusion": "conv"}, "`fusion: conv` is unknown. Fix: use one of ['linear', 'mlp']"),
        ({"gate": "per_box"}, "`gate: per_box` is unknown. Fix: use one of ['scalar', 'per_class']"),
        ({"logit_scale": 0.0}, "`logit_scale: 0.0` must be > 0"),
        ({"dropout": 1.0}, "`dropout: 1.0` must be in [0, 1)"),
        ({"alpha": 1.0, "gate_tanh": True}, "`alpha: 1.0` must be in (-1, 1) with `gate_tanh: true`"),
    ],
)
def test_errors_name_the_schema_parameter_and_the_fix(settings, expected):
    assert set(settings) <= set(Params.model_fields)
    with pytest.raises(ConfigError) as info:
        make_fusion(**settings)
    assert str(info.value).startswith(expected) and "Fix:" in str(info.value)


def test_checkpoint_config_round_trip_under_the_schema_names():
    params = load_params(
        {
            "fusion": "mlp",
            "fusion_hidden": 32,
            "logit_scale": 3.0,
            "logit_scale_learnable": False,
            "fusion_bias": False,
            "gate": "per_class",
            "alpha": 0.25,
            "alpha_learnable": False,
            "gate_tanh": True,
            "dropout": 0.1,
        }
    )
    cfg = fusion_config(params, D)
    assert cfg == {"hidden_dim": D, **{name: getattr(params, name) for name in FUSION_PARAMS}}
    torch.manual_seed(0)
    built = build_fusion_from_config(cfg, torch.randn(C, T))
    assert built.config == cfg
    assert isinstance(built.projection[0], torch.nn.Linear) and built.projection[0].out_features == 32
    torch.testing.assert_close(built.alpha(), torch.full((C,), 0.25))
    assert "gate" in dict(built.named_buffers()) and "log_scale" in dict(built.named_buffers()) and built.bias is None

    # the state_dict keys stay those of the first checkpoints
    assert set(make_fusion().state_dict()) == {
        "text_embeddings",
        "projection.1.weight",
        "projection.1.bias",
        "log_scale",
        "bias",
        "gate",
    }


def test_checkpoint_config_with_the_old_names_still_loads():
    old = {
        "hidden_dim": D,
        "projection": "linear",
        "fusion_hidden": 256,
        "dropout": 0.0,
        "scale_init": 2.0,
        "scale_learnable": True,
        "bias": True,
        "gate": "scalar",
        "gate_init": 0.1,
        "gate_learnable": True,
        "gate_tanh": False,
    }
    fusion = build_fusion_from_config(old, torch.randn(C, T))
    assert fusion.config == {
        "hidden_dim": D,
        "fusion": "linear",
        "fusion_hidden": 256,
        "dropout": 0.0,
        "logit_scale": 2.0,
        "logit_scale_learnable": True,
        "fusion_bias": True,
        "gate": "scalar",
        "alpha": 0.1,
        "alpha_learnable": True,
        "gate_tanh": False,
    }
    with pytest.raises(CheckpointError, match="unknown entries"):
        build_fusion_from_config({**old, "fusion_gate_init": 0.1}, torch.randn(C, T))
