"""How every tensor of an official DEIMv2 checkpoint is named in the project's detector: one rule per official key
pattern (:func:`rules_for` a config; :func:`map_key` one key), and the official tensors deliberately dropped
(:data:`DROPPED_KEYS`) or ours the official model lacks (:data:`UNUSED_OURS`), each with its reason.
:mod:`tfg_mm.detector.convert` applies them."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# How one official tensor becomes one or more of ours.
COPY = "copy"  # the same tensor under every target name (tied copies of heads)
SPLIT = "split"  # chunks along dim 0, one per target, in order (q/k/v, gate/up)
TOKEN = "token"  # a (1, D) token reshaped to transformers' (1, 1, D)


@dataclass(frozen=True)
class Rule:
    """``pattern`` (anchored regex on an official key) → ``targets`` (``re`` templates)."""

    pattern: re.Pattern[str]
    targets: tuple[str, ...]
    op: str = COPY


def rule(pattern: str, *targets: str, op: str = COPY) -> Rule:
    return Rule(re.compile(f"^{pattern}$"), targets, op)


_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_WB = r"(weight|bias)"

# Official key segments → transformers' names inside an HGNetv2 conv block.
_HGNET_SEGMENTS = {"conv": "convolution", "bn": "normalization"}

# Official encoder block: cv1 | cv2 = [CSPLayer2, (trailing 3x3 ConvNorm, RepNCSPELAN4 only)] | cv3 = same | cv4.
_ELAN_SUBMODULES = {
    "cv1": "conv1",
    "cv4": "conv2",
    "cv2.0": "csp_rep1",
    "cv2.1": "csp_rep1.conv2",
    "cv3.0": "csp_rep2",
    "cv3.1": "csp_rep2.conv2",
}


def _hgnet_rename(key: str) -> str | None:
    """HGNetv2 backbone: same tree, only the container and the conv / bn names differ."""
    for prefix, ours in (
        ("backbone.stem.", "model.conv_encoder.model.embedder."),
        ("backbone.stages.", "model.conv_encoder.model.encoder.stages."),
    ):
        if key.startswith(prefix):
            parts = key[len(prefix) :].split(".")
            return ours + ".".join(_HGNET_SEGMENTS.get(p, p) for p in parts)
    return None


def _elan_rename(key: str, official_prefix: str, our_prefix: str) -> str | None:
    """One official encoder block (RepNCSPELAN4 / RepNCSPELAN5, ``cv1..cv4``) → transformers' ``Deimv2RepNCSPELAN5``."""
    if not key.startswith(official_prefix):
        return None
    rest = key[len(official_prefix) :]
    for official, ours in _ELAN_SUBMODULES.items():
        if rest.startswith(official + "."):
            return f"{our_prefix}{ours}.{rest[len(official) + 1 :]}"
    return None


def _attention_rules(official: str, ours: str) -> list[Rule]:
    """torch's ``MultiheadAttention`` of the official layer ``official`` (a pattern; its groups are the layer
    indices): the fused ``in_proj`` split into transformers' q / k / v projections of ``ours``, ``out_proj`` → o."""
    wb = re.compile(official).groups + 1  # the group of weight / bias after the layer indices
    return [
        *(
            rule(
                rf"{official}\.self_attn\.in_proj_{kind}",
                *(rf"{ours}.self_attn.{p}_proj.{kind}" for p in "qkv"),
                op=SPLIT,
            )
            for kind in ("weight", "bias")
        ),
        rule(rf"{official}\.self_attn\.out_proj\.{_WB}", rf"{ours}.self_attn.o_proj.\{wb}"),
    ]


def _common_rules() -> list[Rule]:
    """Decoder and head rules, shared by every size."""
    dec = "model.decoder"
    return [
        # Decoder layers.
        *_attention_rules(r"decoder\.decoder\.layers\.(\d+)", rf"{dec}.layers.\1"),
        rule(r"decoder\.decoder\.layers\.(\d+)\.norm1\.scale", rf"{dec}.layers.\1.self_attn_layer_norm.weight"),
        rule(r"decoder\.decoder\.layers\.(\d+)\.cross_attn\.(.+)", rf"{dec}.layers.\1.encoder_attn.\2"),
        rule(r"decoder\.decoder\.layers\.(\d+)\.norm2\.scale", rf"{dec}.layers.\1.encoder_attn_layer_norm.weight"),
        rule(rf"decoder\.decoder\.layers\.(\d+)\.gateway\.gate\.{_WB}", rf"{dec}.layers.\1.gateway.gate.\2"),
        rule(r"decoder\.decoder\.layers\.(\d+)\.gateway\.norm\.scale", rf"{dec}.layers.\1.gateway.norm.weight"),
        # SwiGLU: the official w12 is [gate; up] along the output dim, gate goes through SiLU.
        rule(
            rf"decoder\.decoder\.layers\.(\d+)\.swish_ffn\.w12\.{_WB}",
            rf"{dec}.layers.\1.mlp.gate_proj.\2",
            rf"{dec}.layers.\1.mlp.up_proj.\2",
            op=SPLIT,
        ),
        rule(rf"decoder\.decoder\.layers\.(\d+)\.swish_ffn\.w3\.{_WB}", rf"{dec}.layers.\1.mlp.down_proj.\2"),
        rule(r"decoder\.decoder\.layers\.(\d+)\.norm3\.scale", rf"{dec}.layers.\1.final_layer_norm.weight"),
        rule(r"decoder\.decoder\.lqe_layers\.(.+)", rf"{dec}.lqe_layers.\1"),
        rule(r"decoder\.decoder\.(up|reg_scale)", rf"{dec}.\1"),
        # Heads. The detection heads exist twice in transformers (the decoder's copy used for the
        # iterative refinement and the top-level copy used by the loss); both get the tensor.
        rule(rf"decoder\.dec_score_head\.(\d+)\.{_WB}", rf"{dec}.class_embed.\1.\2", r"class_embed.\1.\2"),
        rule(
            rf"decoder\.dec_bbox_head\.(\d+)\.layers\.(\d+)\.{_WB}",
            rf"{dec}.bbox_embed.\1.layers.\2.\3",
            r"bbox_embed.\1.layers.\2.\3",
        ),
        rule(r"decoder\.pre_bbox_head\.(.+)", rf"{dec}.pre_bbox_head.\1"),
        rule(r"decoder\.query_pos_head\.(.+)", rf"{dec}.query_pos_head.\1"),
        rule(r"decoder\.enc_score_head\.(.+)", r"model.enc_score_head.\1"),
        rule(r"decoder\.enc_bbox_head\.(.+)", r"model.enc_bbox_head.\1"),
        rule(rf"decoder\.enc_output\.proj\.{_WB}", r"model.enc_output.0.\1"),
        rule(rf"decoder\.enc_output\.norm\.{_WB}", r"model.enc_output.1.\1"),
        rule(r"decoder\.denoising_class_embed\.weight", r"model.denoising_class_embed.weight"),
        rule(r"decoder\.tgt_embed\.weight", r"model.weight_embedding.weight"),
        # Decoder input projections (only when the encoder width differs from the decoder's).
        rule(r"decoder\.input_proj\.(\d+)\.(?:0|conv)\.weight", r"model.decoder_input_proj.\1.conv.weight"),
        rule(rf"decoder\.input_proj\.(\d+)\.(?:1|norm)\.{_BN}", r"model.decoder_input_proj.\1.norm.\2"),
    ]


def _hybrid_encoder_rules() -> list[Rule]:
    aifi = r"model.encoder.aifi.\1.layers.\2"
    return [
        rule(r"encoder\.input_proj\.(\d+)\.(conv\.weight|norm\..+)", r"model.conv_encoder.encoder_input_proj.\1.\2"),
        *_attention_rules(r"encoder\.encoder\.(\d+)\.layers\.(\d+)", aifi),
        rule(rf"encoder\.encoder\.(\d+)\.layers\.(\d+)\.linear1\.{_WB}", rf"{aifi}.mlp.layers.0.\3"),
        rule(rf"encoder\.encoder\.(\d+)\.layers\.(\d+)\.linear2\.{_WB}", rf"{aifi}.mlp.layers.1.\3"),
        rule(rf"encoder\.encoder\.(\d+)\.layers\.(\d+)\.norm1\.{_WB}", rf"{aifi}.self_attn_layer_norm.\3"),
        rule(rf"encoder\.encoder\.(\d+)\.layers\.(\d+)\.norm2\.{_WB}", rf"{aifi}.final_layer_norm.\3"),
        rule(r"encoder\.lateral_convs\.(.+)", r"model.encoder.lateral_convs.\1"),
        rule(r"encoder\.downsample_convs\.(\d+)\.0\.cv(\d)\.(.+)", r"model.encoder.downsample_convs.\1.conv\2.\3"),
    ]


def _lite_encoder_rules() -> list[Rule]:
    return [
        rule(r"encoder\.input_proj\.(\d+)\.(conv\.weight|norm\..+)", r"model.encoder.input_proj.\1.\2"),
        # down_sample{1,2} = Sequential(AvgPool2d, Conv2d, BatchNorm2d, SiLU).
        rule(r"encoder\.down_sample(\d)\.1\.weight", r"model.encoder.down_conv\1.conv.weight"),
        rule(rf"encoder\.down_sample(\d)\.2\.{_BN}", r"model.encoder.down_conv\1.norm.\2"),
        rule(r"encoder\.bi_fusion\.cv\.(.+)", r"model.encoder.bi_fusion_conv.\1"),
    ]


def _dinov3_rules() -> list[Rule]:
    vit = r"backbone\.dinov3\.(?:_model\.)?"
    ours = "model.conv_encoder.backbone"
    layer = rf"{ours}.model.layer.\1"
    return [
        rule(rf"{vit}cls_token", f"{ours}.embeddings.cls_token"),
        rule(rf"{vit}storage_tokens", f"{ours}.embeddings.register_tokens"),
        rule(rf"{vit}mask_token", f"{ours}.embeddings.mask_token", op=TOKEN),
        rule(rf"{vit}patch_embed\.proj\.{_WB}", rf"{ours}.embeddings.patch_embeddings.\1"),
        rule(rf"{vit}blocks\.(\d+)\.norm([12])\.{_WB}", rf"{layer}.norm\2.\3"),
        rule(rf"{vit}blocks\.(\d+)\.attn\.qkv\.{_WB}", *(rf"{layer}.attention.{p}_proj.\2" for p in "qkv"), op=SPLIT),
        rule(rf"{vit}blocks\.(\d+)\.attn\.proj\.{_WB}", rf"{layer}.attention.o_proj.\2"),
        rule(rf"{vit}blocks\.(\d+)\.mlp\.fc1\.{_WB}", rf"{layer}.mlp.up_proj.\2"),
        rule(rf"{vit}blocks\.(\d+)\.mlp\.fc2\.{_WB}", rf"{layer}.mlp.down_proj.\2"),
        rule(rf"{vit}blocks\.(\d+)\.mlp\.w1\.{_WB}", rf"{layer}.mlp.gate_proj.\2"),
        rule(rf"{vit}blocks\.(\d+)\.mlp\.w2\.{_WB}", rf"{layer}.mlp.up_proj.\2"),
        rule(rf"{vit}blocks\.(\d+)\.mlp\.w3\.{_WB}", rf"{layer}.mlp.down_proj.\2"),
        rule(rf"{vit}blocks\.(\d+)\.ls([12])\.gamma", rf"{layer}.layer_scale\2.lambda1"),
        rule(rf"{vit}norm\.{_WB}", rf"{ours}.norm.\1"),
        # Spatial tuning adapter: stem = [conv, bn, gelu, maxpool]; conv2 = [conv, bn];
        # conv3 / conv4 = [gelu, conv, bn] (the activation comes first, so the indices shift).
        rule(r"backbone\.sta\.stem\.0\.weight", "model.conv_encoder.spatial_tuning_adapter.stem_conv.conv.weight"),
        rule(rf"backbone\.sta\.stem\.1\.{_BN}", r"model.conv_encoder.spatial_tuning_adapter.stem_conv.norm.\1"),
        rule(r"backbone\.sta\.conv2\.0\.weight", "model.conv_encoder.spatial_tuning_adapter.conv2.conv.weight"),
        rule(rf"backbone\.sta\.conv2\.1\.{_BN}", r"model.conv_encoder.spatial_tuning_adapter.conv2.norm.\1"),
        rule(r"backbone\.sta\.conv([34])\.1\.weight", r"model.conv_encoder.spatial_tuning_adapter.conv\1.conv.weight"),
        rule(rf"backbone\.sta\.conv([34])\.2\.{_BN}", r"model.conv_encoder.spatial_tuning_adapter.conv\1.norm.\2"),
        rule(r"backbone\.convs\.(\d+)\.weight", r"model.conv_encoder.fusion_proj.\1.conv.weight"),
        rule(rf"backbone\.norms\.(\d+)\.{_BN}", r"model.conv_encoder.fusion_proj.\1.norm.\2"),
    ]


#: Official tensors that are deliberately not carried over, and why.
DROPPED_KEYS: tuple[tuple[str, str], ...] = (
    (r"decoder\.(up|reg_scale)", "duplicate of decoder.decoder.up / decoder.decoder.reg_scale"),
    (r"decoder\.(anchors|valid_mask)", "recomputed from the eval size (checked equal to the model's anchors)"),
    (r"backbone\.dinov3\.(?:_model\.)?rope_embed\.periods", "RoPE periods are recomputed by transformers"),
    (r"backbone\.dinov3\.(?:_model\.)?blocks\.\d+\.attn\.qkv\.bias_mask", "mask applied to the k bias at conversion"),
)
DROPPED = [(re.compile(f"^{p}$"), why) for p, why in DROPPED_KEYS]

#: Our tensors that the official architecture does not have and the official forward pass does not
#: use: they may stay at the model's initial values.
UNUSED_OURS: tuple[tuple[str, str], ...] = (
    (r".*\.embeddings\.mask_token", "masked-image-modelling token of the ViT, unused for detection"),
)
UNUSED = [re.compile(f"^{p}$") for p, _ in UNUSED_OURS]

#: Tensors whose shape depends on the number of classes (re-initialised when it changes).
CLASS_DEPENDENT = re.compile(r"^decoder\.(enc_score_head|dec_score_head\.\d+|denoising_class_embed)\.")


def is_dinov3_config(config: Any) -> bool:
    return getattr(config.backbone_config, "model_type", None) == "dinov3_vit"


def rules_for(config: Any) -> list[Rule]:
    rules = _common_rules()
    rules += _lite_encoder_rules() if config.encoder_type == "lite" else _hybrid_encoder_rules()
    if is_dinov3_config(config):
        rules += _dinov3_rules()
    return rules


def map_key(key: str, rules: Sequence[Rule], encoder_type: str) -> tuple[list[str], str] | None:
    """Our target names for one official key and how the tensor is cut, or None when unknown."""
    hgnet = _hgnet_rename(key)
    if hgnet is not None:
        return [hgnet], COPY
    if encoder_type == "lite":
        blocks = (
            ("encoder.fpn_block.", "model.encoder.fpn_block."),
            ("encoder.pan_block.", "model.encoder.pan_block."),
        )
    else:
        index = re.match(r"^encoder\.(fpn|pan)_blocks\.(\d+)\.", key)
        blocks = ((index.group(0), f"model.encoder.{index.group(1)}_blocks.{index.group(2)}."),) if index else ()
    for official_prefix, our_prefix in blocks:
        renamed = _elan_rename(key, official_prefix, our_prefix)
        if renamed is not None:
            return [renamed], COPY
    for rule in rules:
        match = rule.pattern.match(key)
        if match:
            return [match.expand(t) for t in rule.targets], rule.op
    return None
