"""Official DEIMv2 sizes as data, and the one factory that turns a preset into a config.

Like open_clip's ``model_configs/*.json``: each preset is a flat dict of the official settings (hidden
dims, layer counts, query counts, input size, backbone); :func:`preset_config` is the only place that maps
them onto transformers' ``Deimv2Config`` field names.

Sources. atto, n and s are checked against the fully resolved constructor arguments of the official code
in ``shared/fixtures/deimv2_official/{atto,n,s}_calibrated/meta.json`` (official repo commit 0fff8d4) and
their criteria against ``loss_*/criterion.json``. The HGNetv2 stage tables of Femto / Pico come from
transformers' DEIMv2 conversion script. The remaining femto, pico, m, l and x values (widths, queries,
points, input sizes, STA widths and ``matcher_change_epoch``) are recalled from the official
``configs/deimv2/*.yml`` and could NOT be verified here: each such preset says so in ``verified``.
"""

from __future__ import annotations

import copy
from typing import Any

from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers.models.dinov3_vit.configuration_dinov3_vit import DINOv3ViTConfig
from transformers.models.hgnet_v2.configuration_hgnet_v2 import HGNetV2Config

from tfg_mm.errors import ConfigError
from tfg_mm.detector.official import OFFICIAL_PRIOR_PROB, TfgDeimv2Config

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
# scale, no register tokens, raw (un-normalised) returned blocks, key bias, LayerNorm eps 1e-6
# (DESIGN fact 5, s fixture meta.json). dinov3_vits16 / vits16plus are Meta's DINOv3 ViTs, whose returned
# layers are normalised (get_intermediate_layers(norm=True)).
VIT_ARCHS: dict[str, dict[str, Any]] = {
    "vit_tiny": dict(hidden_size=192, num_attention_heads=3, intermediate_size=768, use_gated_mlp=False,
                     layerscale_value=1.0, num_register_tokens=0, pos_embed_rescale=None, apply_layernorm=False),
    "vit_tinyplus": dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024, use_gated_mlp=False,
                         layerscale_value=1.0, num_register_tokens=0, pos_embed_rescale=None, apply_layernorm=False),
    "dinov3_vits16": dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536, use_gated_mlp=False,
                          layerscale_value=1e-5, num_register_tokens=4, pos_embed_rescale=2.0, apply_layernorm=True),
    "dinov3_vits16plus": dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536, use_gated_mlp=True,
                              layerscale_value=1e-5, num_register_tokens=4, pos_embed_rescale=2.0,
                              apply_layernorm=True),
}

_LITE_CRITERION = dict(criterion_losses=["mal", "boxes"], use_dense_one_to_one=False)
_FULL_CRITERION = dict(criterion_losses=["mal", "boxes", "local"], use_dense_one_to_one=True)

# name -> official settings. Keys: backbone ("hgnetv2" | "dinov3"), backbone_arch, return_idx (official
# 0-based stage / block indices), encoder ("lite" | "hybrid"), encoder_in_channels, encoder_hidden_dim,
# feat_strides (decoder levels), expansion, depth_mult, encoder_ffn_dim, encoder_idx, d_model,
# decoder_layers, decoder_ffn_dim, num_queries, num_points, share_bbox_head, use_gateway, image_size
# (official eval size), sta_inplanes, focal_loss_gamma, criterion_losses, use_dense_one_to_one,
# matcher_change_epoch, verified.
PRESETS: dict[str, dict[str, Any]] = {
    "atto": dict(
        backbone="hgnetv2", backbone_arch="Atto", return_idx=[2], encoder="lite", encoder_in_channels=[256],
        encoder_hidden_dim=64, feat_strides=[16, 32], expansion=0.34, depth_mult=0.5, d_model=64,
        decoder_layers=3, decoder_ffn_dim=160, num_queries=100, num_points=[4, 2], share_bbox_head=True,
        use_gateway=False, image_size=320, focal_loss_gamma=1.5, matcher_change_epoch=450, **_LITE_CRITERION,
        verified="fixtures atto_calibrated/meta.json and loss_atto_*/criterion.json",
    ),
    "femto": dict(
        backbone="hgnetv2", backbone_arch="Femto", return_idx=[2], encoder="lite", encoder_in_channels=[512],
        encoder_hidden_dim=96, feat_strides=[16, 32], expansion=0.34, depth_mult=0.5, d_model=96,
        decoder_layers=3, decoder_ffn_dim=256, num_queries=150, num_points=[4, 2], share_bbox_head=True,
        use_gateway=False, image_size=416, focal_loss_gamma=1.5, matcher_change_epoch=450, **_LITE_CRITERION,
        verified="NOT verified: widths, queries, points, image size and matcher_change_epoch recalled from "
        "configs/deimv2/deimv2_hgnetv2_femto_coco.yml; HGNetv2 Femto table from transformers' converter",
    ),
    "pico": dict(
        backbone="hgnetv2", backbone_arch="Pico", return_idx=[2], encoder="lite", encoder_in_channels=[512],
        encoder_hidden_dim=112, feat_strides=[16, 32], expansion=0.34, depth_mult=0.5, d_model=112,
        decoder_layers=3, decoder_ffn_dim=320, num_queries=200, num_points=[4, 2], share_bbox_head=True,
        use_gateway=False, image_size=640, focal_loss_gamma=1.5, matcher_change_epoch=450, **_LITE_CRITERION,
        verified="NOT verified: widths, queries, points, image size and matcher_change_epoch recalled from "
        "configs/deimv2/deimv2_hgnetv2_pico_coco.yml; HGNetv2 Pico table from transformers' converter",
    ),
    "n": dict(
        backbone="hgnetv2", backbone_arch="B0", return_idx=[2, 3], encoder="hybrid",
        encoder_in_channels=[512, 1024], encoder_hidden_dim=128, feat_strides=[16, 32], expansion=0.34,
        depth_mult=0.5, encoder_ffn_dim=512, encoder_idx=[1], d_model=128, decoder_layers=3,
        decoder_ffn_dim=512, num_queries=300, num_points=[6, 6], share_bbox_head=False, use_gateway=True,
        image_size=640, focal_loss_gamma=1.5, matcher_change_epoch=136, **_FULL_CRITERION,
        verified="fixtures n_calibrated/meta.json and loss_n_*/criterion.json",
    ),
    "s": dict(
        backbone="dinov3", backbone_arch="vit_tiny", return_idx=[3, 7, 11], encoder="hybrid",
        encoder_in_channels=[192, 192, 192], encoder_hidden_dim=192, feat_strides=[8, 16, 32], expansion=0.34,
        depth_mult=0.67, encoder_ffn_dim=512, encoder_idx=[2], d_model=192, decoder_layers=4,
        decoder_ffn_dim=512, num_queries=300, num_points=[3, 6, 3], share_bbox_head=False, use_gateway=True,
        image_size=640, sta_inplanes=16, focal_loss_gamma=1.5, matcher_change_epoch=100, **_FULL_CRITERION,
        verified="fixtures s_calibrated/meta.json (built there at 320 px; the official eval size is 640) and "
        "loss_s_*/criterion.json",
    ),
    "m": dict(
        backbone="dinov3", backbone_arch="vit_tinyplus", return_idx=[3, 7, 11], encoder="hybrid",
        encoder_in_channels=[256, 256, 256], encoder_hidden_dim=256, feat_strides=[8, 16, 32], expansion=0.67,
        depth_mult=1.0, encoder_ffn_dim=512, encoder_idx=[2], d_model=256, decoder_layers=4,
        decoder_ffn_dim=512, num_queries=300, num_points=[3, 6, 3], share_bbox_head=False, use_gateway=True,
        image_size=640, sta_inplanes=16, focal_loss_gamma=1.5, matcher_change_epoch=80, **_FULL_CRITERION,
        verified="NOT verified: recalled from configs/deimv2/deimv2_dinov3_m_coco.yml",
    ),
    "l": dict(
        backbone="dinov3", backbone_arch="dinov3_vits16", return_idx=[5, 8, 11], encoder="hybrid",
        encoder_in_channels=[224, 224, 224], encoder_hidden_dim=224, feat_strides=[8, 16, 32], expansion=1.0,
        depth_mult=1.0, encoder_ffn_dim=896, encoder_idx=[2], d_model=224, decoder_layers=4,
        decoder_ffn_dim=1792, num_queries=300, num_points=[3, 6, 3], share_bbox_head=False, use_gateway=True,
        image_size=640, sta_inplanes=32, focal_loss_gamma=1.5, matcher_change_epoch=50, **_FULL_CRITERION,
        verified="NOT verified: recalled from configs/deimv2/deimv2_dinov3_l_coco.yml",
    ),
    "x": dict(
        backbone="dinov3", backbone_arch="dinov3_vits16plus", return_idx=[5, 8, 11], encoder="hybrid",
        encoder_in_channels=[256, 256, 256], encoder_hidden_dim=256, feat_strides=[8, 16, 32], expansion=1.25,
        depth_mult=1.37, encoder_ffn_dim=1024, encoder_idx=[2], d_model=256, decoder_layers=6,
        decoder_ffn_dim=2048, num_queries=300, num_points=[3, 6, 3], share_bbox_head=False, use_gateway=True,
        image_size=640, sta_inplanes=64, focal_loss_gamma=1.5, matcher_change_epoch=40, **_FULL_CRITERION,
        verified="NOT verified: recalled from configs/deimv2/deimv2_dinov3_x_coco.yml",
    ),
}


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
        key_bias=True,  # official ViT qkv has a bias for k too (DESIGN fact 5)
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
    False, and a frozen identity norm makes training from scratch diverge (DESIGN).
    """
    if preset not in PRESETS:
        raise ConfigError(f"DEIMv2 preset {preset!r} unknown; choose one of {sorted(PRESETS)}.")
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
    settings = copy.deepcopy(PRESETS[preset])
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
        decoder_attention_heads=8,
        decoder_n_points=settings["num_points"],
        decoder_activation_function="silu",
        num_queries=settings["num_queries"],
        num_denoising=100,
        label_noise_ratio=0.5,
        box_noise_scale=1.0,
        max_num_bins=32,
        reg_scale=4.0,
        up=0.5,
        eval_idx=-1,
        layer_scale=1,
        share_bbox_head=settings["share_bbox_head"],
        use_gateway=settings["use_gateway"],
        # DINOv3 sizes use RepNCSPELAN5 blocks without the trailing 3x3 conv (official version "deim").
        encoder_has_trailing_conv=settings["backbone"] == "hgnetv2",
        eval_size=None,
        anchor_image_size=[size, size],
        focal_loss_gamma=settings["focal_loss_gamma"],
        criterion_losses=list(settings["criterion_losses"]),
        use_dense_one_to_one=settings["use_dense_one_to_one"],
        matcher_change_epoch=settings["matcher_change_epoch"],
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
    try:
        return TfgDeimv2Config(**fields)
    except StrictDataclassClassValidationError as error:  # show our ConfigError, not the wrapper
        if isinstance(error.__cause__, ConfigError):
            raise error.__cause__ from None
        raise


def preset_image_size(config: TfgDeimv2Config) -> int:
    """The square input size a model built from ``config`` expects in eval (its anchors' size)."""
    return int(config.anchor_image_size[0])


def build(
    preset: str,
    num_classes: int,
    id2label: dict[int, str] | None = None,
    image_size: int | None = None,
    seed: int | None = None,
    fidelity: str = "official",
    **overrides: Any,
):
    """A randomly initialised DEIMv2 of size ``preset`` with from-scratch settings.

    ``seed`` (if given) seeds torch before the weights are drawn, so two builds are identical.
    ``fidelity="transformers"`` is a BENCHMARK-ONLY option: it returns transformers' plain, uncorrected
    ``Deimv2ForObjectDetection`` with the same settings (same weights for the same seed, apart from
    ``model.enc_output`` which only it has), so a report can show what the corrections change. Never train
    or evaluate the project's models with it.
    """
    import torch
    from transformers import Deimv2Config, Deimv2ForObjectDetection

    from tfg_mm.detector.official import TfgDeimv2ForObjectDetection, official_head_init

    if fidelity not in ("official", "transformers"):
        raise ConfigError(f"build(fidelity={fidelity!r}): choose 'official' or 'transformers' (benchmark only).")
    config = preset_config(preset, num_classes, id2label=id2label, image_size=image_size, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    if fidelity == "transformers":
        plain = config.to_dict()
        for key in ("model_type", "transformers_version", "focal_loss_gamma", "criterion_losses",
                    "matcher_change_epoch", "preset", "disabled_corrections"):
            plain.pop(key, None)
        return Deimv2ForObjectDetection(Deimv2Config(**plain))
    model = TfgDeimv2ForObjectDetection(config)
    official_head_init(model)
    return model
