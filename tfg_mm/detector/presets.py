"""Official DEIMv2 sizes as data: the project's one per-size table, and the factory that turns a preset into a config.

Like open_clip's ``model_configs/*.json``: each preset is a flat dict of the official settings (hidden
dims, layer counts, query counts, input size, backbone) plus ``criterion``, the official ``DEIMCriterion``
settings that differ by size. :func:`preset_config` is the only place that maps them onto transformers'
``Deimv2Config`` field names, and :func:`criterion_settings` the only place that merges a size's criterion
over the official base criterion :data:`OFFICIAL_CRITERION`. ``tfg_mm.loss`` (the criterion's defaults, via
the config) and ``tfg_mm.detector.checkpoint`` (criterion of a transformers checkpoint) read them from here.

Source: every size is checked against the official model (repository ``Intellindust-AI-Lab/DEIMv2``,
commit 0fff8d4) built from ``configs/deimv2/deimv2_*_coco.yml`` by the official config system, as recorded
in ``tests/fixtures/deimv2_official/architectures/<size>.json``: resolved YAML sections, criterion, eval
size, parameter count and the shape of every state-dict entry (``tests/test_presets.py``). Each preset's
``verified`` names its fixture.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import Deimv2Config, Deimv2ForObjectDetection
from transformers.models.dinov3_vit.configuration_dinov3_vit import DINOv3ViTConfig
from transformers.models.hgnet_v2.configuration_hgnet_v2 import HGNetV2Config

from tfg_mm.config import register_params_check
from tfg_mm.detector.official import (
    CRITERION_LOSSES,
    OFFICIAL_PRIOR_PROB,
    TfgDeimv2Config,
    TfgDeimv2ForObjectDetection,
    official_head_init,
)
from tfg_mm.errors import ConfigError

# HGNetv2 stage tables (official engine/backbone/hgnetv2.py arch_configs), as transformers names them.
HGNETV2_ARCHS: dict[str, dict[str, list]] = {
    "Atto": {
        "stem_channels": [3, 16, 16],
        "stage_in_channels": [16, 64, 256],
        "stage_mid_channels": [16, 32, 64],
        "stage_out_channels": [64, 256, 256],
        "stage_num_blocks": [1, 1, 1],
        "stage_downsample": [False, True, True],
        "stage_light_block": [False, False, True],
        "stage_kernel_size": [3, 3, 3],
        "stage_numb_of_layers": [3, 3, 3],
    },
    "Femto": {
        "stem_channels": [3, 16, 16],
        "stage_in_channels": [16, 64, 256],
        "stage_mid_channels": [16, 32, 64],
        "stage_out_channels": [64, 256, 512],
        "stage_num_blocks": [1, 1, 1],
        "stage_downsample": [False, True, True],
        "stage_light_block": [False, False, True],
        "stage_kernel_size": [3, 3, 5],
        "stage_numb_of_layers": [3, 3, 3],
    },
    "Pico": {
        "stem_channels": [3, 16, 16],
        "stage_in_channels": [16, 64, 256],
        "stage_mid_channels": [16, 32, 64],
        "stage_out_channels": [64, 256, 512],
        "stage_num_blocks": [1, 1, 2],
        "stage_downsample": [False, True, True],
        "stage_light_block": [False, False, True],
        "stage_kernel_size": [3, 3, 5],
        "stage_numb_of_layers": [3, 3, 3],
    },
    "B0": {
        "stem_channels": [3, 16, 16],
        "stage_in_channels": [16, 64, 256, 512],
        "stage_mid_channels": [16, 32, 64, 128],
        "stage_out_channels": [64, 256, 512, 1024],
        "stage_num_blocks": [1, 1, 2, 1],
        "stage_downsample": [False, True, True, True],
        "stage_light_block": [False, False, True, True],
        "stage_kernel_size": [3, 3, 5, 5],
        "stage_numb_of_layers": [3, 3, 3, 3],
    },
}

# ViT backbones of the DINOv3 sizes. vit_tiny / vit_tinyplus are the official distilled ViTs: no layer
# scale, no register tokens, raw (un-normalised) returned blocks, a bias on the keys, LayerNorm eps 1e-6.
# dinov3_vits16 / vits16plus are Meta's DINOv3 ViTs (layer scale, 4 register tokens), whose returned layers
# are normalised (get_intermediate_layers(norm=True)). Widths, heads, MLP kinds and token counts are checked
# by the state-dict shapes of the official models; pos_embed_rescale, apply_layernorm, layer_norm_eps and
# rope_theta leave no trace in a shape (the s forward fixture checks them for vit_tiny).
VIT_ARCHS: dict[str, dict[str, Any]] = {
    "vit_tiny": dict(
        hidden_size=192,
        num_attention_heads=3,
        intermediate_size=768,
        use_gated_mlp=False,
        layerscale_value=1.0,
        num_register_tokens=0,
        pos_embed_rescale=None,
        apply_layernorm=False,
    ),
    "vit_tinyplus": dict(
        hidden_size=256,
        num_attention_heads=4,
        intermediate_size=1024,
        use_gated_mlp=False,
        layerscale_value=1.0,
        num_register_tokens=0,
        pos_embed_rescale=None,
        apply_layernorm=False,
    ),
    "dinov3_vits16": dict(
        hidden_size=384,
        num_attention_heads=6,
        intermediate_size=1536,
        use_gated_mlp=False,
        layerscale_value=1e-5,
        num_register_tokens=4,
        pos_embed_rescale=2.0,
        apply_layernorm=True,
    ),
    "dinov3_vits16plus": dict(
        hidden_size=384,
        num_attention_heads=6,
        intermediate_size=1536,
        use_gated_mlp=True,
        layerscale_value=1e-5,
        num_register_tokens=4,
        pos_embed_rescale=2.0,
        apply_layernorm=True,
    ),
}

#: The official criterion of ``configs/base/deimv2.yml`` (``DEIMCriterion`` and its ``HungarianMatcher``),
#: shared by every size, in the argument names of ``tfg_mm.loss.DEIMv2Criterion``. A preset's ``criterion``
#: overrides some of these (:func:`criterion_settings`). MAL's ``gamma`` is 1.5 (transformers' default 2.0 is
#: not the official value); the matcher's focal class cost has its own alpha 0.25 / gamma 2.0. The FGL bin
#: count ``reg_max`` is the decoder's (:data:`OFFICIAL_DECODER` ``max_num_bins``).
OFFICIAL_CRITERION: dict[str, Any] = dict(
    losses=CRITERION_LOSSES,  # mal, boxes, local
    weight_dict={"loss_mal": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_fgl": 0.15, "loss_ddf": 1.5},
    gamma=1.5,
    alpha=0.75,
    use_uni_set=True,
    mal_alpha=None,
    matcher_cost_class=2.0,
    matcher_cost_bbox=5.0,
    matcher_cost_giou=2.0,
    matcher_alpha=0.25,
    matcher_gamma=2.0,
    matcher_change_epoch=None,
    iou_order_alpha=4.0,
)

#: Decoder settings of ``configs/base/deimv2.yml`` that no size changes, as ``Deimv2Config`` fields.
OFFICIAL_DECODER: dict[str, Any] = dict(
    decoder_attention_heads=8,
    decoder_activation_function="silu",
    decoder_method="default",
    num_denoising=100,
    label_noise_ratio=0.5,
    box_noise_scale=1.0,
    max_num_bins=32,
    reg_scale=4.0,
    up=0.5,
    eval_idx=-1,
    layer_scale=1,
)

# The small sizes train without FGL / DDF and without the union set. ``matcher_change_epoch`` (from this
# epoch on the matcher uses the -score * IoU^4 cost; the official loop counts epochs from 0, the project's
# from 1) is tuned to each size's COCO schedule (e.g. 450 of atto's 500 epochs); a shorter fine-tuning run
# chooses its own switch epoch (parameter `matcher_change_epoch`) or none.
_LITE_CRITERION = dict(losses=("mal", "boxes"), use_uni_set=False)


def _verified(size: str) -> str:
    return f"tests/fixtures/deimv2_official/architectures/{size}.json (official commit 0fff8d4)"


# name -> official settings. Keys: backbone ("hgnetv2" | "dinov3"), backbone_arch, return_idx (official
# 0-based stage / block indices), encoder ("lite" | "hybrid"), encoder_in_channels, encoder_hidden_dim,
# feat_strides (decoder levels), expansion, depth_mult, encoder_ffn_dim, encoder_idx, d_model,
# decoder_layers, decoder_ffn_dim, num_queries, num_points, share_bbox_head, use_gateway, image_size
# (official eval size), sta_inplanes (DINOv3 adapter width), criterion (official DEIMCriterion settings over
# OFFICIAL_CRITERION), verified (the official record the preset is checked against).
PRESETS: dict[str, dict[str, Any]] = {
    "atto": dict(
        backbone="hgnetv2",
        backbone_arch="Atto",
        return_idx=[2],
        encoder="lite",
        encoder_in_channels=[256],
        encoder_hidden_dim=64,
        feat_strides=[16, 32],
        expansion=0.34,
        depth_mult=0.5,
        d_model=64,
        decoder_layers=3,
        decoder_ffn_dim=160,
        num_queries=100,
        num_points=[4, 2],
        share_bbox_head=True,
        use_gateway=False,
        image_size=320,
        criterion=dict(**_LITE_CRITERION, matcher_change_epoch=450),
        verified=_verified("atto"),
    ),
    "femto": dict(
        backbone="hgnetv2",
        backbone_arch="Femto",
        return_idx=[2],
        encoder="lite",
        encoder_in_channels=[512],
        encoder_hidden_dim=96,
        feat_strides=[16, 32],
        expansion=0.34,
        depth_mult=0.5,
        d_model=96,
        decoder_layers=3,
        decoder_ffn_dim=256,
        num_queries=150,
        num_points=[4, 2],
        share_bbox_head=True,
        use_gateway=False,
        image_size=416,
        criterion=dict(**_LITE_CRITERION, matcher_change_epoch=450),
        verified=_verified("femto"),
    ),
    "pico": dict(
        backbone="hgnetv2",
        backbone_arch="Pico",
        return_idx=[2],
        encoder="lite",
        encoder_in_channels=[512],
        encoder_hidden_dim=112,
        feat_strides=[16, 32],
        expansion=0.34,
        depth_mult=0.5,
        d_model=112,
        decoder_layers=3,
        decoder_ffn_dim=320,
        num_queries=200,
        num_points=[4, 2],
        share_bbox_head=True,
        use_gateway=False,
        image_size=640,
        criterion=dict(**_LITE_CRITERION, matcher_change_epoch=450),
        verified=_verified("pico"),
    ),
    "n": dict(
        backbone="hgnetv2",
        backbone_arch="B0",
        return_idx=[2, 3],
        encoder="hybrid",
        encoder_in_channels=[512, 1024],
        encoder_hidden_dim=128,
        feat_strides=[16, 32],
        expansion=0.34,
        depth_mult=0.5,
        encoder_ffn_dim=512,
        encoder_idx=[1],
        d_model=128,
        decoder_layers=3,
        decoder_ffn_dim=512,
        num_queries=300,
        num_points=[6, 6],
        share_bbox_head=False,
        use_gateway=True,
        image_size=640,
        criterion=dict(matcher_change_epoch=136),
        verified=_verified("n"),
    ),
    "s": dict(
        backbone="dinov3",
        backbone_arch="vit_tiny",
        return_idx=[3, 7, 11],
        encoder="hybrid",
        encoder_in_channels=[192, 192, 192],
        encoder_hidden_dim=192,
        feat_strides=[8, 16, 32],
        expansion=0.34,
        depth_mult=0.67,
        encoder_ffn_dim=512,
        encoder_idx=[2],
        d_model=192,
        decoder_layers=4,
        decoder_ffn_dim=512,
        num_queries=300,
        num_points=[3, 6, 3],
        share_bbox_head=False,
        use_gateway=True,
        image_size=640,
        sta_inplanes=16,
        criterion=dict(matcher_change_epoch=100),
        verified=_verified("s"),
    ),
    "m": dict(
        backbone="dinov3",
        backbone_arch="vit_tinyplus",
        return_idx=[3, 7, 11],
        encoder="hybrid",
        encoder_in_channels=[256, 256, 256],
        encoder_hidden_dim=256,
        feat_strides=[8, 16, 32],
        expansion=0.67,
        depth_mult=1.0,
        encoder_ffn_dim=512,
        encoder_idx=[2],
        d_model=256,
        decoder_layers=4,
        decoder_ffn_dim=512,
        num_queries=300,
        num_points=[3, 6, 3],
        share_bbox_head=False,
        use_gateway=True,
        image_size=640,
        sta_inplanes=16,
        criterion=dict(matcher_change_epoch=80),
        verified=_verified("m"),
    ),
    "l": dict(
        backbone="dinov3",
        backbone_arch="dinov3_vits16",
        return_idx=[5, 8, 11],
        encoder="hybrid",
        encoder_in_channels=[224, 224, 224],
        encoder_hidden_dim=224,
        feat_strides=[8, 16, 32],
        expansion=1.0,
        depth_mult=1.0,
        encoder_ffn_dim=896,
        encoder_idx=[2],
        d_model=224,
        decoder_layers=4,
        decoder_ffn_dim=1792,
        num_queries=300,
        num_points=[3, 6, 3],
        share_bbox_head=False,
        use_gateway=True,
        image_size=640,
        sta_inplanes=32,
        criterion=dict(matcher_change_epoch=50),
        verified=_verified("l"),
    ),
    "x": dict(
        backbone="dinov3",
        backbone_arch="dinov3_vits16plus",
        return_idx=[5, 8, 11],
        encoder="hybrid",
        encoder_in_channels=[256, 256, 256],
        encoder_hidden_dim=256,
        feat_strides=[8, 16, 32],
        expansion=1.25,
        depth_mult=1.37,
        encoder_ffn_dim=1024,
        encoder_idx=[2],
        d_model=256,
        decoder_layers=6,
        decoder_ffn_dim=2048,
        num_queries=300,
        num_points=[3, 6, 3],
        share_bbox_head=False,
        use_gateway=True,
        image_size=640,
        sta_inplanes=64,
        criterion=dict(matcher_change_epoch=45),
        verified=_verified("x"),
    ),
}


def _known_preset(preset: str) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ConfigError(f"DEIMv2 preset {preset!r} unknown; choose one of {sorted(PRESETS)}.")
    return PRESETS[preset]


def criterion_settings(preset: str) -> dict[str, Any]:
    """The official criterion of size ``preset``: keyword arguments of ``tfg_mm.loss.DEIMv2Criterion``.

    :data:`OFFICIAL_CRITERION` with the preset's ``criterion`` over it (a fresh copy, safe to modify).
    """
    return copy.deepcopy({**OFFICIAL_CRITERION, **_known_preset(preset)["criterion"]})


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


# -- input size vs query count (issue 9, item 5) ------------------------------------------------------------
#: The schema's ``image_size`` step (``tfg_mm.config``): every size is a multiple of the largest stride, 32.
IMAGE_SIZE_STEP = 32


def input_tokens(feat_strides: list[int] | tuple[int, ...], image_size: int) -> int:
    """Encoder tokens of a square input: one per feature-map cell, summed over the decoder's levels.

    DEIMv2 picks its ``num_queries`` initial queries as the top-k of these tokens, so it needs at least as many
    tokens as queries (transformers' ``topk`` otherwise dies with ``selected index k out of range``).
    """
    return sum((int(image_size) // int(stride)) ** 2 for stride in feat_strides)


def min_image_size(preset: str, num_queries: int | None = None) -> int:
    """The smallest multiple of 32 px at which ``preset`` (with ``num_queries`` queries, default the preset's)
    has enough tokens: e.g. atto 160, femto 192, pico 224, n 256, s/m/l/x 128."""
    settings = _known_preset(preset)
    queries = settings["num_queries"] if num_queries is None else int(num_queries)
    size = IMAGE_SIZE_STEP
    while input_tokens(settings["feat_strides"], size) < queries:
        size += IMAGE_SIZE_STEP
    return size


def max_queries(preset: str, image_size: int) -> int:
    """The most queries ``preset`` can select at ``image_size`` (its token count)."""
    return input_tokens(_known_preset(preset)["feat_strides"], image_size)


def image_size_problem(preset: str, image_size: int, num_queries: int | None = None) -> str | None:
    """Why ``image_size`` is too small for ``preset`` (and ``num_queries``), with the fixes; None when it fits."""
    settings = _known_preset(preset)
    queries = settings["num_queries"] if num_queries is None else int(num_queries)
    tokens = input_tokens(settings["feat_strides"], image_size)
    if tokens >= queries:
        return None
    strides = settings["feat_strides"]
    terms = " + ".join(f"({image_size}/{s})^2" for s in strides)
    whose = "the preset's" if num_queries is None else "`num_queries`"
    return (
        f"`image_size: {image_size}` is too small for preset `{preset}`: its encoder gives {terms} = {tokens} tokens "
        f"(feature strides {list(strides)}) but the decoder selects {queries} queries ({whose} value) from them. "
        f"Fix: `image_size: {min_image_size(preset, queries)}` or more (the minimum for {queries} queries), or "
        f"`num_queries: {tokens}` or fewer to keep {image_size} px."
    )


def check_image_size(preset: str, image_size: int, num_queries: int | None = None) -> None:
    """Raise ``ConfigError`` naming ``image_size``, the preset and the fixes when the input is too small."""
    problem = image_size_problem(preset, image_size, num_queries)
    if problem:
        raise ConfigError(problem)


def run_config_overrides(params: Any) -> dict[str, Any]:
    """The ``TfgDeimv2Config`` fields a run's parameters set over the preset's or the checkpoint's values.

    ``matcher_change_epoch`` and ``num_queries`` when given (None keeps the preset's / checkpoint's value), and
    ``attn_implementation`` (not a config field: :func:`set_attn_implementation` applies it, ``auto`` included, so
    that a loaded checkpoint trains with the same attention as a built model).
    """
    fields = {}
    if hasattr(params, "attn_implementation"):
        fields["attn_implementation"] = params.attn_implementation
    if getattr(params, "matcher_change_epoch", None) is not None:
        fields["matcher_change_epoch"] = int(params.matcher_change_epoch)
    if getattr(params, "num_queries", None) is not None:
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
    from tfg_mm.detector.speed import BLOCKS

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


def _register_params_check() -> None:
    """The schema (``tfg_mm.config``, a layer below) checks ``image_size`` against the preset before any work."""

    def check(params: Any) -> list[tuple[str, str]]:
        if params.pretrained or params.checkpoint or params.baseline:
            return []  # a loaded model's own config decides; the detector's forward checks it (_check_input_size)
        problem = image_size_problem(params.preset, params.image_size, params.num_queries)
        return [("image_size", problem)] if problem else []

    register_params_check(check)


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
    settings = copy.deepcopy(_known_preset(preset))
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
    and FFN width: the facts the tensor shapes of a checkpoint reveal too (``tfg_mm.convert``).
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


_register_params_check()
