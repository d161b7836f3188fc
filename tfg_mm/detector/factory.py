"""The factory of the official DEIMv2 sizes: a preset of the size table (:mod:`tfg_mm.config.presets`) turned into
a transformers config (:func:`preset_config`) and a model (:func:`build`).

:func:`preset_config` is the only place that maps a preset's settings onto transformers' ``Deimv2Config`` field
names, and :func:`criterion_fields` the only place that writes a size's criterion into them (``tfg_mm.detector.loss``
reads the criterion's settings from the model's config: :meth:`~tfg_mm.detector.loss.DEIMv2Criterion.from_config`).
A run's parameters that change a built or loaded model's config go through :func:`run_config_overrides` /
:func:`apply_config_overrides`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import Deimv2Config, Deimv2ForObjectDetection
from transformers.models.dinov3_vit.configuration_dinov3_vit import DINOv3ViTConfig
from transformers.models.hgnet_v2.configuration_hgnet_v2 import HGNetV2Config

from tfg_mm.config import Params
from tfg_mm.config.presets import (
    HGNETV2_ARCHS,
    OFFICIAL_DECODER,
    PRESETS,
    VIT_ARCHS,
    check_image_size,
    criterion_settings,
    input_tokens,
    known_preset,
)
from tfg_mm.detector.official import (
    OFFICIAL_PRIOR_PROB,
    TfgDeimv2Config,
    TfgDeimv2ForObjectDetection,
    official_head_init,
)
from tfg_mm.detector.speed import BLOCKS
from tfg_mm.errors import ConfigError


def criterion_fields(preset: str) -> dict[str, Any]:
    """The criterion of size ``preset`` as ``TfgDeimv2Config`` fields (``DEIMv2Criterion.from_config`` reads them).

    ``iou_order_alpha`` has no config field: the criterion takes it from :data:`OFFICIAL_CRITERION`.
    """
    settings = criterion_settings(preset)
    weights = settings["weight_dict"]
    return dict(
        criterion_losses=list(settings["losses"]),
        weight_loss_mal=weights["loss_mal"],
        weight_loss_bbox=weights["loss_bbox"],
        weight_loss_giou=weights["loss_giou"],
        weight_loss_fgl=weights["loss_fgl"],
        weight_loss_ddf=weights["loss_ddf"],
        focal_loss_gamma=settings["gamma"],
        focal_loss_alpha=settings["alpha"],
        use_dense_one_to_one=settings["use_uni_set"],
        mal_alpha=settings["mal_alpha"],
        matcher_class_cost=settings["matcher_cost_class"],
        matcher_bbox_cost=settings["matcher_cost_bbox"],
        matcher_giou_cost=settings["matcher_cost_giou"],
        matcher_alpha=settings["matcher_alpha"],
        matcher_gamma=settings["matcher_gamma"],
        matcher_change_epoch=settings["matcher_change_epoch"],
    )


def run_config_overrides(params: Params) -> dict[str, Any]:
    """The ``TfgDeimv2Config`` fields a run's parameters set over the preset's or the checkpoint's values.

    ``matcher_change_epoch`` and ``num_queries`` when given (None keeps the preset's / checkpoint's value), and
    ``attn_implementation`` (not a config field: :func:`set_attn_implementation` applies it, ``auto`` included, so
    that a loaded checkpoint trains with the same attention as a built model).
    """
    fields: dict[str, Any] = {"attn_implementation": params.attn_implementation}
    if params.matcher_change_epoch is not None:
        fields["matcher_change_epoch"] = int(params.matcher_change_epoch)
    if params.num_queries is not None:
        fields["num_queries"] = int(params.num_queries)
    return fields


def apply_config_overrides(model: Any, fields: dict[str, Any]) -> None:
    """Set :func:`run_config_overrides` on a loaded detector's config (the criterion and the query selection read
    them at every forward). Neither changes a weight shape: the queries are selected encoder tokens."""
    config = model.config
    for name, value in fields.items():
        if name == "attn_implementation":
            set_attn_implementation(model, value)
        else:
            setattr(config, name, value)
    if "num_queries" in fields:
        check_image_size_of_config(config)


def set_attn_implementation(model: Any, impl: str) -> None:
    """Run the detector's self-attention (AIFI encoder and decoder) as ``blocks``, ``sdpa`` or ``eager``; ``auto``
    is ``blocks``.

    - ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` over every query pair, the denoising mask
      applied (transformers' default);
    - ``eager``: the same as matmul + softmax;
    - ``blocks``: the training decoder's attention computed only over the blocks the denoising mask leaves
      visible (:mod:`tfg_mm.detector.speed`); every other attention (evaluation, the encoder) is ``sdpa``.

    All three compute the same attention up to float rounding (tests/test_speed.py); which is faster depends on
    the device (scripts/bench_step.py: ``blocks`` on CPU). Set on the detector's own config, which its attention
    modules read at every forward; the HGNetV2 / DINOv3 backbone config is left alone (HGNetV2 has no attention
    and refuses ``sdpa``).
    """
    names = {"auto": BLOCKS, "blocks": BLOCKS, "eager": "eager", "sdpa": "sdpa"}
    if impl not in names:
        raise ConfigError(f"`attn_implementation: {impl}` is unknown. Fix: use auto, blocks, sdpa or eager.")
    model.config._attn_implementation = names[impl]


def check_image_size_of_config(config: Deimv2Config, image_size: int | None = None) -> None:
    """:func:`check_image_size` for a built config (any preset, any ``num_queries``; default its anchors' size)."""
    size = int(image_size if image_size is not None else config.anchor_image_size[0])
    tokens = input_tokens(config.feat_strides, size)
    if tokens < config.num_queries:
        preset = getattr(config, "preset", None)
        if preset in PRESETS:
            check_image_size(preset, size, config.num_queries)
        raise ConfigError(
            f"`image_size: {size}` gives {tokens} tokens (strides {list(config.feat_strides)}) for "
            f"{config.num_queries} queries. Fix: a larger `image_size`, or `num_queries: {tokens}` or fewer."
        )


def _backbone_config(preset: dict[str, Any]) -> HGNetV2Config | DINOv3ViTConfig:
    """transformers backbone config of a preset (official ``return_idx`` -> ``out_indices``, stem = 0)."""
    out_indices = [index + 1 for index in preset["return_idx"]]
    if preset["backbone"] == "hgnetv2":
        arch = HGNETV2_ARCHS[preset["backbone_arch"]]
        return HGNetV2Config(
            **arch,
            hidden_sizes=list(arch["stage_out_channels"]),
            depths=list(arch["stage_numb_of_layers"]),
            use_learnable_affine_block=True,  # official use_lab: True
            hidden_act="relu",
            out_indices=out_indices,
        )
    return DINOv3ViTConfig(
        **VIT_ARCHS[preset["backbone_arch"]],
        num_hidden_layers=12,
        patch_size=16,
        rope_theta=100.0,
        key_bias=True,  # the official qkv projection has a bias for the keys too
        layer_norm_eps=1e-6,
        reshape_hidden_states=True,
        out_indices=out_indices,
    )


def preset_config(
    preset: str,
    num_classes: int,
    id2label: dict[int, str] | None = None,
    image_size: int | None = None,
    **overrides: Any,
) -> TfgDeimv2Config:
    """Config of the official DEIMv2 size ``preset`` with ``num_classes`` classes.

    ``image_size`` (default: the preset's official eval size) sets the anchors (``anchor_image_size``) and
    is the input size the model expects in eval; ``eval_size`` stays None (correction
    ``aifi_pos_embed_in_eval``). ``overrides`` are ``TfgDeimv2Config`` field names (e.g.
    ``num_denoising=0``, ``freeze_backbone_batch_norms=True`` for a pretrained backbone); an unknown name
    raises ``ConfigError``. BatchNorm is not frozen by default: the official models keep ``freeze_norm``
    False, and transformers' frozen identity-like norm makes a model trained from scratch diverge (encoder
    gradient norms of 1e7 at the first step).
    """
    settings = copy.deepcopy(known_preset(preset))
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes={num_classes!r}: a detector needs a positive integer number of classes.")
    if id2label is not None:
        id2label = {int(k): str(v) for k, v in id2label.items()}
        if sorted(id2label) != list(range(num_classes)):
            raise ConfigError(
                f"id2label has ids {sorted(id2label)} but num_classes={num_classes}: give one name per class id "
                f"0..{num_classes - 1}."
            )
    else:
        id2label = {i: f"class_{i}" for i in range(num_classes)}
    size = int(image_size) if image_size is not None else settings["image_size"]
    if size % max(settings["feat_strides"]):
        raise ConfigError(
            f"image_size={size}: DEIMv2 needs a multiple of {max(settings['feat_strides'])} (largest stride)."
        )
    fields = dict(
        backbone_config=_backbone_config(settings),
        freeze_backbone_batch_norms=False,
        initializer_bias_prior_prob=OFFICIAL_PRIOR_PROB,
        encoder_type=settings["encoder"],
        encoder_in_channels=settings["encoder_in_channels"],
        encoder_hidden_dim=settings["encoder_hidden_dim"],
        feat_strides=settings["feat_strides"],
        hidden_expansion=settings["expansion"],
        depth_mult=settings["depth_mult"],
        activation_function="silu",
        encoder_fuse_op="sum",
        d_model=settings["d_model"],
        decoder_in_channels=[settings["d_model"]] * len(settings["feat_strides"]),
        num_feature_levels=len(settings["feat_strides"]),
        decoder_layers=settings["decoder_layers"],
        decoder_ffn_dim=settings["decoder_ffn_dim"],
        decoder_n_points=settings["num_points"],
        num_queries=settings["num_queries"],
        **OFFICIAL_DECODER,
        share_bbox_head=settings["share_bbox_head"],
        use_gateway=settings["use_gateway"],
        # DINOv3 sizes use RepNCSPELAN5 blocks without the trailing 3x3 conv (official version "deim").
        encoder_has_trailing_conv=settings["backbone"] == "hgnetv2",
        eval_size=None,
        anchor_image_size=[size, size],
        **criterion_fields(preset),
        preset=preset,
        num_labels=num_classes,
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
    )
    if settings["encoder"] == "lite":
        fields["encoder_layers"] = 0
    else:
        fields.update(
            encoder_layers=1,
            encoder_ffn_dim=settings["encoder_ffn_dim"],
            encoder_attention_heads=8,
            encode_proj_layers=settings["encoder_idx"],
            encoder_activation_function="gelu",
        )
    if settings["backbone"] == "dinov3":
        fields["spatial_tuning_adapter_inplanes"] = settings["sta_inplanes"]
    known = set(TfgDeimv2Config.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"preset_config overrides {unknown} are not TfgDeimv2Config fields.")
    fields.update(overrides)
    check_image_size(preset, size, None if "num_queries" not in overrides else fields["num_queries"])
    try:
        return TfgDeimv2Config(**fields)
    except StrictDataclassClassValidationError as error:  # show our ConfigError, not the wrapper
        if isinstance(error.__cause__, ConfigError):
            raise error.__cause__ from None
        raise


def preset_image_size(config: TfgDeimv2Config) -> int:
    """The square input size a model built from ``config`` expects in eval (its anchors' size)."""
    return int(config.anchor_image_size[0])


def architecture_fingerprint(config: Deimv2Config) -> dict[str, Any]:
    """The architecture facts that tell the official sizes apart, read from a (Tfg)Deimv2Config.

    Backbone type, widths and depths (and the DINOv3 adapter), encoder type and width, decoder width, depth
    and FFN width: the facts the tensor shapes of a checkpoint reveal too (``tfg_mm.detector.convert``).
    """
    fingerprint: dict[str, Any] = {
        "d_model": config.d_model,
        "decoder_layers": config.decoder_layers,
        "decoder_ffn_dim": config.decoder_ffn_dim,
        "encoder_type": "lite" if config.encoder_type == "lite" else "hybrid",
        "encoder_hidden_dim": config.encoder_hidden_dim,
    }
    backbone = config.backbone_config
    if getattr(backbone, "model_type", None) == "dinov3_vit":
        fingerprint.update(
            backbone="dinov3",
            backbone_width=backbone.hidden_size,
            backbone_depth=backbone.num_hidden_layers,
            adapter=True,
        )
    else:
        fingerprint.update(
            backbone="hgnetv2",
            backbone_width=tuple(backbone.stage_out_channels),
            backbone_depth=tuple(backbone.stage_num_blocks),
        )
    return fingerprint


def presets_matching(fingerprint: dict[str, Any]) -> list[str]:
    """The presets whose architecture has this fingerprint (see :func:`architecture_fingerprint`)."""
    return [name for name in PRESETS if architecture_fingerprint(preset_config(name, num_classes=1)) == fingerprint]


def build(
    preset: str,
    num_classes: int,
    id2label: dict[int, str] | None = None,
    image_size: int | None = None,
    seed: int | None = None,
    fidelity: str = "official",
    **overrides: Any,
) -> TfgDeimv2ForObjectDetection | Deimv2ForObjectDetection:
    """A randomly initialised DEIMv2 of size ``preset`` with from-scratch settings.

    ``seed`` (if given) seeds torch before the weights are drawn, so two builds are identical.
    ``fidelity="transformers"`` is a BENCHMARK-ONLY option: it returns transformers' plain, uncorrected
    ``Deimv2ForObjectDetection`` with the same settings (same weights for the same seed, apart from
    ``model.enc_output`` which only it has), so a report can show what the corrections change. Never train
    or evaluate the project's models with it.
    """
    if fidelity not in ("official", "transformers"):
        raise ConfigError(f"build(fidelity={fidelity!r}): choose 'official' or 'transformers' (benchmark only).")
    attn = overrides.pop("attn_implementation", "auto")
    config = preset_config(preset, num_classes, id2label=id2label, image_size=image_size, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    if fidelity == "transformers":
        plain = config.to_dict()
        for key in (
            "model_type",
            "transformers_version",
            "focal_loss_gamma",
            "criterion_losses",
            "matcher_change_epoch",
            "preset",
            "disabled_corrections",
        ):
            plain.pop(key, None)
        return Deimv2ForObjectDetection(Deimv2Config(**plain))
    model = TfgDeimv2ForObjectDetection(config)
    official_head_init(model)
    set_attn_implementation(model, attn)
    return model
