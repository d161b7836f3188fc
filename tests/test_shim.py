"""The aux-output shim and the train_frozen mode (tfg_mm.detector.shim), on a tiny real transformers DEIMv2
and the project's official criterion (tfg_mm.detector.loss)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from transformers import Deimv2Config, Deimv2ForObjectDetection
from transformers.models.hgnet_v2.configuration_hgnet_v2 import HGNetV2Config

from tfg_mm.detector import shim
from tfg_mm.detector.loss import DEIMv2Criterion
from tfg_mm.detector.outputs import official_outputs
from tfg_mm.errors import TfgError
from tfg_mm.multimodal.fusion import ResidualTextFusion, apply_fusion

LAYERS, CLASSES = 3, 3
LABELS = [
    {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])},
    {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
]


def tiny_detector(num_denoising: int = 0, dropout: float = 0.0) -> Deimv2ForObjectDetection:
    """A 34k-parameter atto-like DEIMv2 (HGNetv2 + lite encoder, 3 decoder layers, 10 queries).

    Zero-initialised tensors (the last box-head layers, ...) are perturbed so that every decoder
    layer's corners differ (otherwise the criterion rightly finds no DDF term), and BatchNorm is
    a real BatchNorm (``freeze_backbone_batch_norms=False``).
    """
    backbone = HGNetV2Config(
        stem_channels=[3, 8, 8],
        stage_in_channels=[8, 16, 32],
        stage_mid_channels=[8, 8, 16],
        stage_out_channels=[16, 32, 32],
        stage_num_blocks=[1, 1, 1],
        stage_downsample=[False, True, True],
        stage_light_block=[False, False, True],
        stage_kernel_size=[3, 3, 3],
        stage_numb_of_layers=[1, 1, 1],
        hidden_sizes=[16, 32, 32],
        depths=[1, 1, 1],
        use_learnable_affine_block=True,
        hidden_act="relu",
        out_indices=[3],
        drop_path_rate=0.0,
    )
    config = Deimv2Config(
        backbone_config=backbone,
        freeze_backbone_batch_norms=False,
        encoder_type="lite",
        encoder_layers=0,
        encoder_in_channels=[32],
        encoder_hidden_dim=16,
        feat_strides=[16, 32],
        hidden_expansion=0.34,
        depth_mult=0.5,
        d_model=16,
        decoder_in_channels=[16, 16],
        num_feature_levels=2,
        decoder_layers=LAYERS,
        decoder_ffn_dim=32,
        decoder_attention_heads=2,
        decoder_n_points=[2, 2],
        num_queries=10,
        num_denoising=num_denoising,
        share_bbox_head=False,
        use_gateway=False,
        num_labels=CLASSES,
        dropout=dropout,
        attention_dropout=dropout,
        activation_function="silu",
        decoder_activation_function="silu",
    )
    torch.manual_seed(0)
    model = Deimv2ForObjectDetection(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.numel() > 1 and torch.count_nonzero(parameter) == 0:
                parameter.normal_(0.0, 0.1)
    return model


def images() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def criterion(losses: tuple[str, ...]) -> DEIMv2Criterion:
    return DEIMv2Criterion(num_classes=CLASSES, losses=losses, use_uni_set=False)


@pytest.fixture()
def fresh_log_flag(monkeypatch):
    monkeypatch.setattr(shim, "_logged_once", False)


def eval_outputs(model) -> dict:
    model.eval()
    with torch.no_grad():
        return official_outputs(model(images()), model.config)


def train_outputs(model) -> dict:
    model.train()
    return official_outputs(model(images(), labels=LABELS), model.config)


def test_eval_outputs_lack_aux_and_the_shim_replicates_the_final_layer(fresh_log_flag):
    model = tiny_detector()
    outputs = eval_outputs(model)
    assert "aux_outputs" not in outputs and "pre_outputs" not in outputs  # what eval() gives
    shimmed = shim.add_aux_outputs(outputs, LAYERS)
    assert "aux_outputs" not in outputs  # input not mutated
    assert len(shimmed["aux_outputs"]) == LAYERS - 1
    for entry in shimmed["aux_outputs"]:
        for key in ("pred_logits", "pred_boxes", "pred_corners", "ref_points", "hidden"):
            assert entry[key] is outputs[key]
        assert entry["teacher_corners"] is outputs["pred_corners"] and entry["teacher_logits"] is outputs["pred_logits"]
    assert shimmed["pre_outputs"]["pred_logits"] is outputs["pred_logits"]
    assert shimmed["pre_outputs"]["hidden"] is outputs["hidden"]
    assert shimmed["enc_aux_outputs"] is outputs["enc_aux_outputs"]  # real encoder proposals are kept

    complete = shim.add_aux_outputs(shimmed, LAYERS)  # already complete: unchanged
    assert complete == shimmed and complete is not shimmed
    with pytest.raises(TfgError, match="decoder_layers"):
        shim.add_aux_outputs(shimmed, LAYERS + 2)
    with pytest.raises(TfgError, match="pred_corners"):
        shim.add_aux_outputs({k: v for k, v in outputs.items() if k != "pred_corners"}, LAYERS)


def test_shim_logs_once_per_process(fresh_log_flag, caplog):
    outputs = eval_outputs(tiny_detector())
    with caplog.at_level(logging.INFO, logger="tfg_mm.detector.shim"):
        shim.add_aux_outputs(outputs, LAYERS)
        shim.add_aux_outputs(outputs, LAYERS)
    records = [r for r in caplog.records if r.name == "tfg_mm.detector.shim"]
    assert len(records) == 1 and "copies of the final layer" in records[0].getMessage()


def test_shim_gives_a_finite_loss_with_the_terms_of_train_mode(fresh_log_flag):
    model = tiny_detector(num_denoising=0)
    train_terms = criterion(("mal", "boxes"))(train_outputs(model), LABELS)
    shim_terms = criterion(("mal", "boxes"))(shim.add_aux_outputs(eval_outputs(model), LAYERS), LABELS)
    assert list(shim_terms) == list(train_terms)  # same names, same order
    assert len(shim_terms) == 3 * (1 + (LAYERS - 1) + 1 + 1)  # final, aux, pre, enc
    assert all(torch.isfinite(v) for v in shim_terms.values())
    assert torch.isfinite(sum(shim_terms.values()))

    # With FGL / DDF ('local'): the same terms except the DDF of the aux layers, which distils a
    # layer from its teacher and vanishes (the criterion drops it) when both are the final layer.
    local = ("mal", "boxes", "local")
    train_local = criterion(local)(train_outputs(model), LABELS)
    shim_local = criterion(local)(shim.add_aux_outputs(eval_outputs(model), LAYERS), LABELS)
    ddf_aux = [f"loss_ddf_aux_{i}" for i in range(LAYERS - 1)]
    assert set(ddf_aux) <= set(train_local)
    assert list(shim_local) == [name for name in train_local if name not in ddf_aux]
    assert all(torch.isfinite(v) for v in shim_local.values())


def test_shim_then_fusion_trains_the_fusion(fresh_log_flag):
    model = tiny_detector()
    outputs = shim.add_aux_outputs(eval_outputs(model), LAYERS)
    torch.manual_seed(0)
    fusion = ResidualTextFusion(16, torch.randn(CLASSES, 8), alpha=0.1)
    terms = criterion(("mal", "boxes", "local"))(apply_fusion(fusion, outputs), LABELS)
    total = sum(terms.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fusion.parameters())
    assert fusion.gate.grad.abs() > 0


def test_set_train_frozen_keeps_train_outputs_without_any_change():
    model = tiny_detector(num_denoising=6, dropout=0.3)
    model.eval()
    with torch.no_grad():
        eval_logits = model(images()).logits
    batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batch_norms
    running = [bn.running_mean.clone() for bn in batch_norms]

    shim.set_train_frozen(model)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.training and model.model.training and model.model.decoder.training
    assert not any(bn.training for bn in batch_norms)
    assert not any(layer.training for layer in model.model.decoder.layers)  # no dropout

    first = model(images())
    second = model(images())
    assert first.intermediate_logits.shape[1] == LAYERS + 1  # every layer scored, plus the pre-output
    torch.testing.assert_close(first.logits, second.logits, rtol=0, atol=0)  # no dropout, no BN update
    torch.testing.assert_close(first.logits, eval_logits, rtol=1e-5, atol=1e-5)  # frozen = eval numerics
    assert all(torch.equal(bn.running_mean, r) for bn, r in zip(batch_norms, running))

    with_labels = official_outputs(model(images(), labels=LABELS), model.config)
    assert {"aux_outputs", "pre_outputs", "dn_outputs", "dn_meta"} <= set(with_labels)  # denoising runs
    with pytest.raises(TfgError, match="DEIMv2"):
        shim.set_train_frozen(nn.Linear(2, 2))
