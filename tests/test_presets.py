"""Every preset is the official DEIMv2 size it names: constructor values, state-dict shapes, parameter count, criterion.

The reference is ``tests/fixtures/deimv2_official/architectures/<size>.json`` (see that folder's README.md):
the official model of each of the eight sizes (repository ``Intellindust-AI-Lab/DEIMv2``, commit 0fff8d4)
built from ``configs/deimv2/deimv2_*_coco.yml`` by the official config system with ``num_classes`` 5, with
its resolved YAML sections, criterion, schedule, post-processor, parameter count and the shape of every
state-dict entry. Our models are built on the meta device (shapes only, no memory, no initialisation):
well under a second per size, x included.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from official import official_fixture

from tfg_mm.config.presets import HGNETV2_ARCHS, OFFICIAL_CRITERION, VIT_ARCHS, criterion_settings
from tfg_mm.detector import PRESETS, TfgDeimv2Config, TfgDeimv2ForObjectDetection, preset_config
from tfg_mm.detector.convert import map_official_shapes
from tfg_mm.detector.loss import DEIMv2Criterion
from tfg_mm.evaluation.coco import postprocess

SIZES = ("atto", "femto", "pico", "n", "s", "m", "l", "x")
NUM_CLASSES = 5  # the fixtures' num_classes
REPO = Path(__file__).resolve().parents[1]


@functools.cache
def official(size: str) -> dict[str, Any]:
    return json.loads((official_fixture("architectures") / f"{size}.json").read_text())


@functools.cache
def ours(size: str) -> tuple[TfgDeimv2Config, TfgDeimv2ForObjectDetection]:
    config = preset_config(size, NUM_CLASSES)
    with torch.device("meta"):
        model = TfgDeimv2ForObjectDetection(config)
    return config, model


def test_the_presets_are_the_eight_official_sizes():
    assert tuple(PRESETS) == SIZES
    assert sorted(p.stem for p in official_fixture("architectures").glob("*.json")) == sorted(SIZES)
    for size in SIZES:
        assert official(size)["size"] == size and official(size)["num_classes"] == NUM_CLASSES


# ------------------------------------------------------------------------------------------------------------
# (a) Constructor values: each official key -> the value our config (or model) has for it
# ------------------------------------------------------------------------------------------------------------
Getter = Callable[[TfgDeimv2Config, TfgDeimv2ForObjectDetection], Any]


def _table_name(tables: dict[str, dict[str, Any]], config_values: Callable[[dict[str, Any]], bool]) -> str | None:
    """The name of the one architecture table whose values the built backbone config has."""
    names = [name for name, table in tables.items() if config_values(table)]
    return names[0] if len(names) == 1 else None


def _hgnet_name(config: TfgDeimv2Config, _model) -> str | None:
    backbone = config.backbone_config
    return _table_name(HGNETV2_ARCHS, lambda t: all(list(getattr(backbone, k)) == v for k, v in t.items()))


def _vit_name(config: TfgDeimv2Config, _model) -> str | None:
    backbone = config.backbone_config
    return _table_name(VIT_ARCHS, lambda t: all(getattr(backbone, k) == v for k, v in t.items()))


def _backbone_trainable(_config, model: TfgDeimv2ForObjectDetection) -> bool:
    return all(p.requires_grad for p in model.model.conv_encoder.parameters())


def _return_idx(config: TfgDeimv2Config, _model) -> list[int]:
    return [index - 1 for index in config.backbone_config.out_indices]  # transformers counts the stem as 0


OURS: dict[str, dict[str, Getter]] = {
    "DEIM": {
        "backbone": lambda c, m: {"hgnet_v2": "HGNetv2", "dinov3_vit": "DINOv3STAs"}[c.backbone_config.model_type],
        "encoder": lambda c, m: {"lite": "LiteEncoder", "hybrid": "HybridEncoder"}[c.encoder_type],
    },
    "HGNetv2": {
        "name": _hgnet_name,
        "return_idx": _return_idx,
        "use_lab": lambda c, m: c.backbone_config.use_learnable_affine_block,
        "freeze_norm": lambda c, m: c.freeze_backbone_batch_norms,
        "freeze_at": lambda c, m: -1 if _backbone_trainable(c, m) else "some backbone stage frozen",
    },
    "DINOv3STAs": {
        "name": _vit_name,
        "embed_dim": lambda c, m: c.backbone_config.hidden_size,
        "num_heads": lambda c, m: c.backbone_config.num_attention_heads,
        "interaction_indexes": _return_idx,
        "conv_inplane": lambda c, m: c.spatial_tuning_adapter_inplanes,
        "hidden_dim": lambda c, m: c.encoder_hidden_dim,  # width of the ViT + adapter fusion projections
        "finetune": _backbone_trainable,
    },
    "LiteEncoder": {
        "in_channels": lambda c, m: c.encoder_in_channels,
        # the lite encoder reads one backbone level; its second (stride 32) level is its own down-sampling
        "feat_strides": lambda c, m: c.feat_strides[: len(c.encoder_in_channels)],
        "hidden_dim": lambda c, m: c.encoder_hidden_dim,
        "expansion": lambda c, m: c.hidden_expansion,
        "depth_mult": lambda c, m: c.depth_mult,
        "act": lambda c, m: c.activation_function,
    },
    "HybridEncoder": {
        "in_channels": lambda c, m: c.encoder_in_channels,
        "feat_strides": lambda c, m: c.feat_strides,
        "hidden_dim": lambda c, m: c.encoder_hidden_dim,
        "use_encoder_idx": lambda c, m: c.encode_proj_layers,
        "num_encoder_layers": lambda c, m: c.encoder_layers,
        "nhead": lambda c, m: c.encoder_attention_heads,
        "dim_feedforward": lambda c, m: c.encoder_ffn_dim,
        "dropout": lambda c, m: c.dropout,
        "enc_act": lambda c, m: c.encoder_activation_function,
        "expansion": lambda c, m: c.hidden_expansion,
        "depth_mult": lambda c, m: c.depth_mult,
        "act": lambda c, m: c.activation_function,
        # "dfine" = RepNCSPELAN4 blocks (with the trailing 3x3 conv), "deim" = RepNCSPELAN5 (without)
        "version": lambda c, m: "dfine" if c.encoder_has_trailing_conv else "deim",
        "fuse_op": lambda c, m: c.encoder_fuse_op,
    },
    "DEIMTransformer": {
        "feat_channels": lambda c, m: c.decoder_in_channels,
        "feat_strides": lambda c, m: c.feat_strides,
        "hidden_dim": lambda c, m: c.d_model,
        "num_levels": lambda c, m: c.num_feature_levels,
        "num_layers": lambda c, m: c.decoder_layers,
        "eval_idx": lambda c, m: c.eval_idx,
        "num_queries": lambda c, m: c.num_queries,
        "num_denoising": lambda c, m: c.num_denoising,
        "label_noise_ratio": lambda c, m: c.label_noise_ratio,
        "box_noise_scale": lambda c, m: c.box_noise_scale,
        "reg_max": lambda c, m: c.max_num_bins,
        "reg_scale": lambda c, m: c.reg_scale,
        "layer_scale": lambda c, m: c.layer_scale,
        "num_points": lambda c, m: c.decoder_n_points,
        "cross_attn_method": lambda c, m: c.decoder_method,
        "activation": lambda c, m: c.decoder_activation_function,
        # transformers' box / LQE MLPs default to ReLU; the correction gives them the official SiLU
        "mlp_act": lambda c, m: "silu" if c.correction_enabled("silu_box_and_lqe_mlps") else "relu",
        "dim_feedforward": lambda c, m: c.decoder_ffn_dim,
        "share_bbox_head": lambda c, m: c.share_bbox_head,
        "use_gateway": lambda c, m: c.use_gateway,
    },
    "schedule": {
        "eval_spatial_size": lambda c, m: c.anchor_image_size,
        "base_size": lambda c, m: c.anchor_image_size[0],  # the size of the final no-augmentation epochs
    },
    "postprocessor": {
        "num_top_queries": lambda c, m: inspect.signature(postprocess).parameters["top_k"].default,
    },
}

#: Official keys with no counterpart in our config or model, and why. A new official key fails the test
#: until it is mapped above or explained here.
NO_COUNTERPART: dict[str, dict[str, str]] = {
    "DEIM": {"decoder": "DEIMTransformer is the only decoder (ours: transformers' DEIMv2 decoder, corrected)"},
    "HGNetv2": {
        "freeze_stem_only": "acts only with freeze_at >= 0; freeze_at is -1 (nothing frozen) in every size",
        "pretrained": "False for the fixture; pretrained weights are a run's choice (params `pretrained`)",
        "local_model_dir": "the official download folder of pretrained HGNetv2 weights",
    },
    "DINOv3STAs": {"weights_path": "None for the fixture; pretrained weights are a run's choice"},
    "HybridEncoder": {
        "csp_type": "csp2 is the only CSP block transformers implements (checked by the state-dict shapes)",
    },
    "DEIMTransformer": {
        "query_select_method": "'default' (class-aware top-k) is the only query selection transformers has",
    },
    "schedule": {
        key: "the official COCO training schedule; the project trains every size with its own TrainingParams"
        for key in (
            "epoches",
            "warmup_iter",
            "flat_epoch",
            "no_aug_epoch",
            "lr_gamma",
            "optimizer",
            "train_batch_size",
            "ema",
            "stop_epoch",
        )
    },
    "postprocessor": {},
}


def _backbone_sections_in_use(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The sections of the modules the official model is made of (the base config also lists HGNetv2 B4 and
    HybridEncoder for sizes that do not use them)."""
    deim = record["sections"]["DEIM"]
    used = ("DEIM", deim["backbone"], deim["encoder"], deim["decoder"])
    return {name: record["sections"][name] for name in used}


@pytest.mark.parametrize("size", SIZES)
def test_constructor_values_are_the_official_ones(size):
    config, model = ours(size)
    record = official(size)
    sections = {
        **_backbone_sections_in_use(record),
        "schedule": record["schedule"],
        "postprocessor": record["postprocessor"],
    }
    checked, differ, unexplained = [], [], []
    for section, values in sections.items():
        for key, official_value in values.items():
            if key in NO_COUNTERPART.get(section, {}):
                continue
            getter = OURS[section].get(key)
            if getter is None:
                unexplained.append(f"{section}.{key}")
                continue
            value = getter(config, model)
            checked.append(f"{section}.{key}")
            if value != official_value:
                differ.append(f"{section}.{key}: ours {value!r}, official {official_value!r}")
    assert unexplained == [], "official keys neither mapped (OURS) nor explained (NO_COUNTERPART)"
    assert differ == []
    assert len(checked) >= 30
    # Not in the fixture, but part of what makes the preset official:
    assert config.preset == size and config.eval_size is None and config.num_labels == NUM_CLASSES
    assert PRESETS[size]["image_size"] == record["schedule"]["eval_spatial_size"][0]


@pytest.mark.parametrize("size", SIZES)
def test_criterion_is_the_official_one(size):
    """The criterion a model of this preset trains with (built from its config) is the official criterion."""
    config, _ = ours(size)
    record = official(size)["criterion"]
    matcher = record["matcher"]
    criterion = DEIMv2Criterion.from_config(config)
    assert criterion.losses == record["losses"]
    assert criterion.weight_dict == {name: float(value) for name, value in record["weight_dict"].items()}
    assert (criterion.gamma, criterion.alpha) == (record["gamma"], record["alpha"])
    assert criterion.reg_max == record["reg_max"]
    # DEIMCriterion's constructor defaults where the size's config does not set them, as the n / s loss
    # fixtures record them: use_uni_set True, mal_alpha None.
    assert criterion.use_uni_set == record.get("use_uni_set", True)
    assert criterion.mal_alpha is None
    assert matcher["type"] == "HungarianMatcher" and matcher["change_matcher"]
    assert (criterion.matcher.class_cost, criterion.matcher.bbox_cost, criterion.matcher.giou_cost) == (
        matcher["weight_dict"]["cost_class"],
        matcher["weight_dict"]["cost_bbox"],
        matcher["weight_dict"]["cost_giou"],
    )
    assert (criterion.matcher.alpha, criterion.matcher.gamma) == (matcher["alpha"], matcher["gamma"])
    assert criterion.matcher.iou_order_alpha == matcher["iou_order_alpha"]
    assert criterion.matcher.change_epoch == matcher["matcher_change_epoch"]
    assert config.matcher_change_epoch == matcher["matcher_change_epoch"]

    # The per-size table gives the same criterion directly (what tests and tools build without a model).
    direct = DEIMv2Criterion(num_classes=NUM_CLASSES, **criterion_settings(size))
    for name in ("losses", "weight_dict", "gamma", "alpha", "use_uni_set", "reg_max", "mal_alpha"):
        assert getattr(direct, name) == getattr(criterion, name), name
    assert vars(direct.matcher) == vars(criterion.matcher)


@pytest.mark.parametrize("case", ["loss_atto_dn", "loss_n_dn", "loss_s_dn"])
def test_criterion_defaults_agree_with_the_loss_fixtures(case):
    """The settings the architectures record leaves to DEIMCriterion's defaults, as the loss fixtures show them."""
    recorded = json.loads((official_fixture(case) / "criterion.json").read_text())
    settings = criterion_settings(case.split("_")[1])
    assert settings["use_uni_set"] == recorded["use_uni_set"]
    assert recorded["mal_alpha"] is OFFICIAL_CRITERION["mal_alpha"]
    assert list(settings["losses"]) == recorded["losses"]


# ------------------------------------------------------------------------------------------------------------
# (b) State-dict shapes through the converter's key mapping (official -> ours)
# ------------------------------------------------------------------------------------------------------------
#: Official entries the converter drops (tfg_mm.detector.convert.DROPPED_KEYS), per size.
def _expected_dropped(size: str, official_shapes: dict[str, list[int]]) -> set[str]:
    dropped = {"decoder.up", "decoder.reg_scale", "decoder.anchors", "decoder.valid_mask"}
    dropped |= {key for key in official_shapes if key.endswith(("rope_embed.periods", "qkv.bias_mask"))}
    return dropped


#: Our tensors no official tensor fills: transformers' ViT always has a (masked-image-modelling) mask token,
#: which the official distilled vit_tiny / vit_tinyplus do not have and detection never uses, and a register
#: token tensor, empty for them (0 register tokens). Meta's ViTs (l, x) have both officially.
_VIT_TOKENS = {f"model.conv_encoder.backbone.embeddings.{name}" for name in ("mask_token", "register_tokens")}
UNFILLED = {"s": _VIT_TOKENS, "m": _VIT_TOKENS}


@pytest.mark.parametrize("size", SIZES)
def test_state_dict_shapes_are_the_official_ones(size, record_property):
    config, model = ours(size)
    our_shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    official_shapes = official(size)["state_dict_shapes"]
    mapped, dropped, unmapped = map_official_shapes(official_shapes, config)

    assert unmapped == []
    wrong = {name: (shape, our_shapes.get(name)) for name, shape in mapped.items() if our_shapes.get(name) != shape}
    assert wrong == {}, "official shape vs ours"
    assert set(our_shapes) - set(mapped) == UNFILLED.get(size, set())
    for name in UNFILLED.get(size, ()):
        if name.endswith("register_tokens"):
            assert our_shapes[name][1] == 0
    assert set(dropped) == _expected_dropped(size, official_shapes)

    # The dropped entries agree with what our model recomputes.
    inner = model.model
    assert tuple(inner.anchors.shape) == tuple(official_shapes["decoder.anchors"])
    assert tuple(inner.valid_mask.shape) == tuple(official_shapes["decoder.valid_mask"])
    periods = [shape for key, shape in official_shapes.items() if key.endswith("rope_embed.periods")]
    if periods:  # RoPE: head_dim / 4 periods, so the ViT's number of heads is checked too
        backbone = config.backbone_config
        assert periods == [[backbone.hidden_size // backbone.num_attention_heads // 4]]
    record_property("shapes_checked", len(mapped))
    print(
        f"\n{size}: {len(official_shapes)} official entries, {len(mapped)} of our tensors checked, "
        f"{len(dropped)} dropped (recomputed / duplicates)"
    )


# ------------------------------------------------------------------------------------------------------------
# (c) Parameter count
# ------------------------------------------------------------------------------------------------------------
#: transformers' ViT mask token (hidden size), which the official vit_tiny (s) / vit_tinyplus (m) do not have.
EXTRA_PARAMETERS = {"s": 192, "m": 256}


@pytest.mark.parametrize("size", SIZES)
def test_parameter_count_is_the_official_one(size, record_property):
    _, model = ours(size)
    count = sum(p.numel() for p in model.parameters())  # tied heads counted once, as in the official model
    official_count = official(size)["num_parameters"]
    mask_tokens = {n: p.numel() for n, p in model.named_parameters() if n.endswith("embeddings.mask_token")}
    extra = EXTRA_PARAMETERS.get(size, 0)
    assert count - official_count == extra
    if extra:
        assert sum(mask_tokens.values()) == extra
        assert not any(k.endswith("mask_token") for k in official(size)["state_dict_shapes"])
    record_property("parameters", count)
    print(f"\n{size}: {count:,} parameters, official {official_count:,}")


# ------------------------------------------------------------------------------------------------------------
# The record each preset names
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_every_preset_names_the_official_record_it_is_checked_against(size):
    verified = PRESETS[size]["verified"]
    path = verified.split()[0]
    assert path == f"tests/fixtures/deimv2_official/architectures/{size}.json" and (REPO / path).is_file()
    assert "official commit 0fff8d4" in verified
    assert "0fff8d4dcdc272e6cf2d84be31399db471357941" in (REPO / "tests/fixtures/deimv2_official/README.md").read_text()
    assert "NOT" not in verified
