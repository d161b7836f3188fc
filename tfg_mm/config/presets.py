"""The eight official DEIMv2 sizes as data: the project's one per-size table (no torch, no transformers).

Like open_clip's ``model_configs/*.json``: a size is the settings every official size shares (:data:`BASE`) with
that size's differences over them (:data:`SIZES`), flat: hidden dims, layer counts, query counts, input size,
backbone, and ``criterion``, the official ``DEIMCriterion`` settings that differ by size. :data:`PRESETS` is
the merged table. The factory that turns a preset into a transformers config and a model is
:mod:`tfg_mm.detector.factory`; the schema's sources check ``image_size`` against a preset here
(:func:`image_size_problem`) before any work.

Source: every size is checked against the official model (repository ``Intellindust-AI-Lab/DEIMv2``,
commit 0fff8d4) built from ``configs/deimv2/deimv2_*_coco.yml`` by the official config system, as recorded
in ``tests/fixtures/deimv2_official/architectures/<size>.json``: resolved YAML sections, criterion, eval
size, parameter count and the shape of every state-dict entry (``tests/test_presets.py``). Each preset's
``verified`` names its fixture.
"""

from __future__ import annotations

import copy
from typing import Any

from tfg_mm.errors import ConfigError

#: The loss groups the official criterion knows (``DEIMCriterion.losses``); the config default is all three.
CRITERION_LOSSES = ("mal", "boxes", "local")

# HGNetv2 stage tables (official engine/backbone/hgnetv2.py arch_configs), as transformers names them: the three
# lite backbones differ from Atto only where they say so; B0 (size n) has a fourth stage.
_ATTO: dict[str, list] = {
    "stem_channels": [3, 16, 16],
    "stage_in_channels": [16, 64, 256],
    "stage_mid_channels": [16, 32, 64],
    "stage_out_channels": [64, 256, 256],
    "stage_num_blocks": [1, 1, 1],
    "stage_downsample": [False, True, True],
    "stage_light_block": [False, False, True],
    "stage_kernel_size": [3, 3, 3],
    "stage_numb_of_layers": [3, 3, 3],
}
_FEMTO = {**_ATTO, "stage_out_channels": [64, 256, 512], "stage_kernel_size": [3, 3, 5]}
HGNETV2_ARCHS: dict[str, dict[str, list]] = {
    "Atto": _ATTO,
    "Femto": _FEMTO,
    "Pico": {**_FEMTO, "stage_num_blocks": [1, 1, 2]},
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
_DISTILLED = dict(
    use_gated_mlp=False, layerscale_value=1.0, num_register_tokens=0, pos_embed_rescale=None, apply_layernorm=False
)
_META_S16 = dict(
    hidden_size=384,
    num_attention_heads=6,
    intermediate_size=1536,
    use_gated_mlp=False,
    layerscale_value=1e-5,
    num_register_tokens=4,
    pos_embed_rescale=2.0,
    apply_layernorm=True,
)
VIT_ARCHS: dict[str, dict[str, Any]] = {
    "vit_tiny": dict(hidden_size=192, num_attention_heads=3, intermediate_size=768, **_DISTILLED),
    "vit_tinyplus": dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024, **_DISTILLED),
    "dinov3_vits16": _META_S16,
    "dinov3_vits16plus": {**_META_S16, "use_gated_mlp": True},
}

#: The official criterion of ``configs/base/deimv2.yml`` (``DEIMCriterion`` and its ``HungarianMatcher``),
#: shared by every size, in the argument names of ``tfg_mm.detector.loss.DEIMv2Criterion``. A preset's ``criterion``
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


# Keys: backbone ("hgnetv2" | "dinov3"), backbone_arch, return_idx (official 0-based stage / block indices),
# encoder ("lite" | "hybrid"), encoder_in_channels, encoder_hidden_dim, feat_strides (decoder levels), expansion,
# depth_mult, encoder_ffn_dim, encoder_idx, d_model, decoder_layers, decoder_ffn_dim, num_queries, num_points,
# share_bbox_head, use_gateway, image_size (official eval size), sta_inplanes (DINOv3 adapter width), criterion
# (official DEIMCriterion settings over OFFICIAL_CRITERION), verified (the official record the preset is checked
# against).
#: What the official sizes share unless a size says otherwise: an HGNetv2 backbone into the hybrid encoder at
#: strides 16 / 32, three decoder layers, 300 queries at 640 px, separate box heads and the gateway.
BASE: dict[str, Any] = dict(
    backbone="hgnetv2",
    encoder="hybrid",
    feat_strides=[16, 32],
    expansion=0.34,
    depth_mult=0.5,
    decoder_layers=3,
    num_queries=300,
    share_bbox_head=False,
    use_gateway=True,
    image_size=640,
)
#: The lite sizes (atto / femto / pico): HGNetv2's third stage into the lite encoder, a box head shared by every
#: decoder layer, no gateway, the small sizes' criterion.
_LITE: dict[str, Any] = dict(
    return_idx=[2],
    encoder="lite",
    num_points=[4, 2],
    share_bbox_head=True,
    use_gateway=False,
    criterion=dict(**_LITE_CRITERION, matcher_change_epoch=450),
)
#: The DINOv3 sizes (s / m / l / x): three levels at strides 8 / 16 / 32 from a ViT through the spatial tuning
#: adapter, four decoder layers.
_DINOV3: dict[str, Any] = dict(
    backbone="dinov3",
    feat_strides=[8, 16, 32],
    encoder_ffn_dim=512,
    encoder_idx=[2],
    decoder_layers=4,
    decoder_ffn_dim=512,
    num_points=[3, 6, 3],
)


def _lite(arch: str, in_channels: int, width: int, decoder_ffn: int, queries: int, image_size: int) -> dict[str, Any]:
    """A lite size: its HGNetv2 arch, the encoder's input channels, the encoder / decoder width, the decoder's FFN
    width, the query count and the official eval size."""
    return dict(
        **_LITE,
        backbone_arch=arch,
        encoder_in_channels=[in_channels],
        encoder_hidden_dim=width,
        d_model=width,
        decoder_ffn_dim=decoder_ffn,
        num_queries=queries,
        image_size=image_size,
    )


def _dinov3(
    arch: str, blocks: list[int], width: int, expansion: float, depth: float, adapter: int, change: int, **more: Any
) -> dict[str, Any]:
    """A DINOv3 size: its ViT, the ViT blocks returned, the encoder / decoder width, the encoder blocks' expansion
    and depth multiplier, the adapter's width, the matcher's change epoch, and what else differs (``more``)."""
    return {
        **_DINOV3,
        "backbone_arch": arch,
        "return_idx": blocks,
        "encoder_in_channels": [width] * 3,
        "encoder_hidden_dim": width,
        "expansion": expansion,
        "depth_mult": depth,
        "d_model": width,
        "sta_inplanes": adapter,
        "criterion": dict(matcher_change_epoch=change),
        **more,
    }


#: Each size: its differences over :data:`BASE`.
SIZES: dict[str, dict[str, Any]] = {
    "atto": _lite("Atto", 256, 64, 160, 100, 320),
    "femto": _lite("Femto", 512, 96, 256, 150, 416),
    "pico": _lite("Pico", 512, 112, 320, 200, 640),
    "n": dict(
        backbone_arch="B0",
        return_idx=[2, 3],
        encoder_in_channels=[512, 1024],
        encoder_hidden_dim=128,
        encoder_ffn_dim=512,
        encoder_idx=[1],
        d_model=128,
        decoder_ffn_dim=512,
        num_points=[6, 6],
        criterion=dict(matcher_change_epoch=136),
    ),
    "s": _dinov3("vit_tiny", [3, 7, 11], 192, 0.34, 0.67, 16, 100),
    "m": _dinov3("vit_tinyplus", [3, 7, 11], 256, 0.67, 1.0, 16, 80),
    "l": _dinov3("dinov3_vits16", [5, 8, 11], 224, 1.0, 1.0, 32, 50, encoder_ffn_dim=896, decoder_ffn_dim=1792),
    "x": _dinov3(
        "dinov3_vits16plus",
        [5, 8, 11],
        256,
        1.25,
        1.37,
        64,
        45,
        encoder_ffn_dim=1024,
        decoder_layers=6,
        decoder_ffn_dim=2048,
    ),
}
#: name -> the official settings of that size (:data:`BASE` with the size's differences; a fresh nested copy each).
PRESETS: dict[str, dict[str, Any]] = {
    name: copy.deepcopy({**BASE, **diff, "verified": _verified(name)}) for name, diff in SIZES.items()
}


def known_preset(preset: str) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ConfigError(f"DEIMv2 preset {preset!r} unknown; choose one of {sorted(PRESETS)}.")
    return PRESETS[preset]


def criterion_settings(preset: str) -> dict[str, Any]:
    """The official criterion of size ``preset``: keyword arguments of ``tfg_mm.detector.loss.DEIMv2Criterion``.

    :data:`OFFICIAL_CRITERION` with the preset's ``criterion`` over it (a fresh copy, safe to modify).
    """
    return copy.deepcopy({**OFFICIAL_CRITERION, **known_preset(preset)["criterion"]})


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
    settings = known_preset(preset)
    queries = settings["num_queries"] if num_queries is None else int(num_queries)
    size = IMAGE_SIZE_STEP
    while input_tokens(settings["feat_strides"], size) < queries:
        size += IMAGE_SIZE_STEP
    return size


def max_queries(preset: str, image_size: int) -> int:
    """The most queries ``preset`` can select at ``image_size`` (its token count)."""
    return input_tokens(known_preset(preset)["feat_strides"], image_size)


def image_size_problem(preset: str, image_size: int, num_queries: int | None = None) -> str | None:
    """Why ``image_size`` is too small for ``preset`` (and ``num_queries``), with the fixes; None when it fits."""
    settings = known_preset(preset)
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
