"""The project's DEIMv2: transformers' ``Deimv2ForObjectDetection`` corrected to the official architecture.

transformers 5.24's DEIMv2 is not numerically the official DEIMv2 (``Intellindust-AI-Lab/DEIMv2``):
converting an official checkpoint with a correct key mapping gives logit errors of about 2 on every
size (with the corrections, float32 noise: ``tests/test_convert.py``). Every model of this project is built
here, as :class:`TfgDeimv2ForObjectDetection`, whose constructor applies the corrections listed in
:data:`CORRECTIONS` *by construction* (module replacement, a per-forward cache, configuration checks and
explicit tied-weight keys). Nothing in the installed transformers package is edited.

Each correction can be switched off with ``TfgDeimv2Config.disabled_corrections`` so that a test can show
that it matters; the only reason to do so outside a test is to reproduce transformers' behaviour.
``tests/test_version_guard.py`` checks that transformers still behaves the way each correction assumes.

The model type is ``tfg_deimv2`` (registered with transformers' Auto classes when :mod:`tfg_mm` is
imported), so a checkpoint of ours can never be silently loaded as transformers' uncorrected class.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForObjectDetection, Deimv2Config, Deimv2ForObjectDetection
from transformers.models.deimv2.modeling_deimv2 import Deimv2MLP, Deimv2ObjectDetectionOutput

from tfg_mm.config.presets import CRITERION_LOSSES
from tfg_mm.detector.speed import use_fast_modules
from tfg_mm.errors import ConfigError

logger = logging.getLogger(__name__)

MODEL_TYPE = "tfg_deimv2"

# Name -> the official behaviour it restores.
CORRECTION_DOCS: dict[str, str] = {
    "enc_output_identity": (
        "Deimv2Model.enc_output (Linear + LayerNorm) does not exist in the official decoder, which scores "
        "the encoder memory directly; identity weights are not enough because the LayerNorm still normalises, "
        "so the module is replaced by nn.Identity."
    ),
    "silu_box_and_lqe_mlps": (
        "Deimv2MLP defaults to ReLU and transformers passes no activation for enc_bbox_head, pre_bbox_head, "
        "bbox_embed and the LQE MLP; the official code uses SiLU in all four."
    ),
    "query_pos_once": (
        "transformers recomputes the query position embedding from the refined boxes at every decoder layer; "
        "the official decoder computes it once, from the initial reference points, before the layer loop."
    ),
    "aifi_pos_embed_in_eval": (
        "transformers skips the AIFI positional embedding in eval whenever eval_size is set; the official "
        "encoder always adds it, so eval_size must stay None (checked by the config)."
    ),
    "dinov3_raw_last_stage": (
        "transformers layer-normalises the last returned DINOv3 stage even with apply_layernorm=False; the "
        "official vit_tiny / vit_tinyplus return raw block outputs, so that norm is replaced by nn.Identity "
        "(the presets also set the official key bias and layer_norm_eps=1e-6)."
    ),
    "vit_tiny_no_layer_scale": (
        "transformers' DINOv3 layers always multiply by a trainable layer scale (lambda1); the official "
        "distilled vit_tiny / vit_tinyplus have none (s fixture: 4,608 extra parameters), so training would "
        "move the model away from the official architecture; the layer scales are replaced by nn.Identity."
    ),
    "anchors_at_input_size": (
        "In eval transformers uses anchors precomputed for anchor_image_size whatever the input size; the "
        "official model's anchors are those of its eval size. anchor_image_size is the preset's (or the "
        "caller's image_size) and an eval input of another size gets anchors recomputed for that size."
    ),
    "lossless_shared_box_head": (
        "With share_bbox_head=True transformers' tied-weight keys make save_pretrained keep an alias that "
        "from_pretrained does not read, so the shared box head is silently re-initialised on reload; the "
        "tied keys are redefined so that model.decoder.bbox_embed.0 is saved and read back."
    ),
    "independent_score_heads": (
        "transformers' _tied_weights_keys contains class_embed.N -> class_embed.0 (one score head for every "
        "layer); the official model has a separate score head per decoder layer. In 5.24 a later key happens "
        "to override that rule; the project's tied keys leave it out, so each layer keeps its own head."
    ),
}
CORRECTIONS: list[str] = list(CORRECTION_DOCS)


@strict
class TfgDeimv2Config(Deimv2Config):
    r"""Configuration of the project's corrected DEIMv2 (``model_type = "tfg_deimv2"``).

    On top of transformers' fields it carries the official criterion settings (read by ``tfg_mm.detector.loss``; the
    values of each size come from ``tfg_mm.detector.factory`` (the size table :mod:`tfg_mm.config.presets`), which sets them all):

    focal_loss_gamma (`float`, defaults to 1.5): the official MAL ``gamma`` (transformers defaults to 2.0).
    use_dense_one_to_one (`bool`): the official ``use_uni_set`` (False for atto / femto / pico).
    criterion_losses (`list[str]`): official ``losses`` (``["mal", "boxes"]`` for the lite sizes).
    matcher_change_epoch (`int`, *optional*): epoch from which the official matcher uses the IoU-order cost;
        None never switches.
    preset (`str`, *optional*): the preset the config was made from (for diagnostics and reports).
    disabled_corrections (`list[str]`): names from ``CORRECTIONS`` to *not* apply; tests only.
    """

    model_type = MODEL_TYPE

    focal_loss_gamma: float = 1.5
    criterion_losses: list[str] | tuple[str, ...] = CRITERION_LOSSES
    matcher_change_epoch: int | None = None
    preset: str | None = None
    disabled_corrections: list[str] | tuple[str, ...] = ()

    def validate_architecture(self):
        """Reject settings that would silently give a non-official model or loss."""
        super().validate_architecture()
        unknown = sorted(set(self.disabled_corrections) - set(CORRECTIONS))
        if unknown:
            raise ConfigError(
                f"TfgDeimv2Config.disabled_corrections: unknown correction(s) {unknown}; known: {CORRECTIONS}."
            )
        if self.eval_size is not None and "aifi_pos_embed_in_eval" not in self.disabled_corrections:
            raise ConfigError(
                f"TfgDeimv2Config.eval_size={list(self.eval_size)}: transformers then drops the AIFI positional "
                "embedding in eval, which the official DEIMv2 never does. Leave eval_size=None and set the "
                "evaluation size with anchor_image_size (tfg_mm.detector.preset_config(..., image_size=...))."
            )
        bad_losses = sorted(set(self.criterion_losses) - set(CRITERION_LOSSES))
        if bad_losses:
            raise ConfigError(
                f"TfgDeimv2Config.criterion_losses: unknown loss(es) {bad_losses}; choose from {list(CRITERION_LOSSES)}."
            )

    def correction_enabled(self, name: str) -> bool:
        """Whether correction ``name`` (one of ``CORRECTIONS``) is applied to models built from this config."""
        return name not in self.disabled_corrections


class _QueryPosHeadOnce(Deimv2MLP):
    """``Deimv2MLP`` that returns, within one decoder forward, the embedding of its first call.

    The official decoder computes ``query_pos_head(ref_points)`` once before the layer loop; transformers'
    loop calls it at every layer with the refined boxes. The decoder's forward pre-hook clears the cache,
    so the first call of each forward (the initial reference points) is the one every layer uses. Same
    parameters and state-dict keys as ``Deimv2MLP``.
    """

    _cached: torch.Tensor | None = None

    def forward(self, stat_features: torch.Tensor) -> torch.Tensor:
        if self._cached is None:
            self._cached = super().forward(stat_features)
        return self._cached

    def clear(self, *_args, **_kwargs) -> None:
        self._cached = None


class TfgDeimv2ForObjectDetection(Deimv2ForObjectDetection):
    """DEIMv2 with the official architecture (see :data:`CORRECTIONS`) and the project's official loss.

    The forward pass runs ``model.decoder.class_embed`` / ``model.decoder.bbox_embed``. The top-level
    ``class_embed`` / ``bbox_embed`` are transformers' deep copies whose parameters are *tied* to those
    (same ``Parameter`` objects), so freezing, training or saving either name acts on the heads in use.
    """

    config_class = TfgDeimv2Config

    def __init__(self, config: TfgDeimv2Config):
        if not isinstance(config, TfgDeimv2Config):
            raise ConfigError(
                f"TfgDeimv2ForObjectDetection needs a TfgDeimv2Config, got {type(config).__name__}; build one "
                "with tfg_mm.detector.preset_config(...)."
            )
        super().__init__(config)
        self._anchors_hw: tuple[int, int] | None = (
            tuple(int(s) for s in _as_hw(config.anchor_image_size)) if config.anchor_image_size else None
        )
        self._warned_anchor_sizes: set[tuple[int, int]] = set()
        apply_corrections(self)
        use_fast_modules(self)  # same numbers, a faster CPU step (tfg_mm.detector.speed)

    # -- tied weights ------------------------------------------------------------------------------------
    @property
    def _tied_weights_keys(self) -> dict[str, str]:
        """Targets (regex) -> sources. Sources are the decoder's heads, which the forward pass uses.

        Corrections ``lossless_shared_box_head`` and ``independent_score_heads``: no ``class_embed.N ->
        class_embed.0`` rule, and with a shared box head every alias points at
        ``model.decoder.bbox_embed.0`` while that key itself matches no target pattern, so it is the copy
        save_pretrained keeps and from_pretrained reads.
        """
        config = self.config
        keys: dict[str, str] = {}
        if not config.correction_enabled("independent_score_heads"):
            keys[r"class_embed.(?![0])\d+"] = r"^class_embed.0"
        keys[r"^class_embed\."] = r"model.decoder.class_embed."
        if config.share_bbox_head and config.correction_enabled("lossless_shared_box_head"):
            keys[r"^bbox_embed\.\d+\."] = r"model.decoder.bbox_embed.0."
            keys[r"model\.decoder\.bbox_embed\.(?!0\.)\d+\."] = r"model.decoder.bbox_embed.0."
        elif config.share_bbox_head:  # transformers' own rules (benchmark of the correction only)
            keys[r"^bbox_embed\."] = r"model.decoder.bbox_embed."
            keys[r"model\.decoder\.bbox_embed\.(?![0])\d+"] = r"model.decoder.bbox_embed.0"
            keys[r"bbox_embed.(?![0])\d+"] = r"bbox_embed.0"
        else:
            keys[r"^bbox_embed\."] = r"model.decoder.bbox_embed."
        return keys

    # -- anchors -----------------------------------------------------------------------------------------
    def set_image_size(self, size: int) -> None:
        """Build the eval anchors for ``size`` x ``size`` inputs and record it as the model's size
        (``anchor_image_size``, saved with the checkpoint): a model fine-tuned at another size than its source's
        is then evaluated and exported at the size it was trained at, without recomputing anchors."""
        hw = (int(size), int(size))
        largest_stride = max(self.config.feat_strides)
        if hw[0] % largest_stride:
            raise ConfigError(f"image size {size}: DEIMv2 needs a multiple of {largest_stride} px (largest stride).")
        shapes = tuple((hw[0] // s, hw[1] // s) for s in self.config.feat_strides)
        anchors, valid_mask = self.model.generate_anchors(shapes)
        device = next(self.parameters()).device
        self.model.anchors, self.model.valid_mask = anchors.to(device), valid_mask.to(device)
        self.config.anchor_image_size = list(hw)
        self._anchors_hw = hw

    def _match_anchors_to_input(self, pixel_values: torch.Tensor) -> None:
        """Correction ``anchors_at_input_size``: eval anchors are those of the actual input size.

        transformers recomputes anchors per input in training but uses the ``anchor_image_size`` ones in
        eval. For an eval input of another size (e.g. a model evaluated at a size it was not built for) the
        anchors are recomputed for that size, exactly as training does, and a warning says so once.
        """
        if self.training or self._anchors_hw is None or not self.config.correction_enabled("anchors_at_input_size"):
            return
        height, width = int(pixel_values.shape[-2]), int(pixel_values.shape[-1])
        if (height, width) == self._anchors_hw:
            return
        largest_stride = max(self.config.feat_strides)
        if height % largest_stride or width % largest_stride:
            raise ConfigError(
                f"DEIMv2 input of {height}x{width} px: eval inputs must be multiples of {largest_stride} px (the "
                f"largest feature stride); resize images to the model's image size {self._anchors_hw}."
            )
        shapes = tuple((height // s, width // s) for s in self.config.feat_strides)
        self.model.anchors, self.model.valid_mask = self.model.generate_anchors(shapes)
        if (height, width) not in self._warned_anchor_sizes:
            self._warned_anchor_sizes.add((height, width))
            logger.warning(
                "DEIMv2 built for %sx%s px evaluated at %sx%s px: anchors recomputed for the input size.",
                *self._anchors_hw,
                height,
                width,
            )
        self._anchors_hw = (height, width)

    def _check_input_size(self, pixel_values: torch.Tensor) -> None:
        """The query selection needs ``num_queries`` encoder tokens: say so (ConfigError) instead of transformers'
        ``RuntimeError: selected index k out of range``. The schema checks ``image_size`` before any work for a
        preset-built model; this covers loaded checkpoints and any other input size."""
        height, width = int(pixel_values.shape[-2]), int(pixel_values.shape[-1])
        strides = self.config.feat_strides
        tokens = sum(-(-height // s) * -(-width // s) for s in strides)
        if tokens < self.config.num_queries:
            raise ConfigError(
                f"DEIMv2 input of {height}x{width} px gives {tokens} encoder tokens (feature strides {list(strides)}) "
                f"but the model selects {self.config.num_queries} queries from them. Fix: a larger `image_size`, or "
                f"`num_queries: {tokens}` or fewer."
            )

    # -- forward -----------------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.LongTensor | None = None,
        labels: list[dict] | None = None,
        **kwargs,
    ) -> Deimv2ObjectDetectionOutput:
        """transformers' outputs of the corrected architecture, without a loss (``loss`` is None).

        ``labels`` (list of ``{"class_labels", "boxes"}``, boxes cxcywh normalised) reach the inner model, so
        denoising queries are built in training. The loss is the caller's: the training task computes it with the
        official criterion, ``tfg_mm.detector.loss.compute_loss(output, labels, model.config, criterion, epoch)``
        with ``criterion = DEIMv2Criterion.from_config(model.config)`` (never transformers'
        ``Deimv2ForObjectDetectionLoss``, which pairs layers off by one).
        """
        self._match_anchors_to_input(pixel_values)
        self._check_input_size(pixel_values)
        outputs = self.model(pixel_values, pixel_mask=pixel_mask, labels=labels, **kwargs)
        result = Deimv2ObjectDetectionOutput(
            logits=outputs.intermediate_logits[:, -1],
            pred_boxes=outputs.intermediate_reference_points[:, -1],
            last_hidden_state=outputs.last_hidden_state,
            intermediate_hidden_states=outputs.intermediate_hidden_states,
            intermediate_logits=outputs.intermediate_logits,
            intermediate_reference_points=outputs.intermediate_reference_points,
            intermediate_predicted_corners=outputs.intermediate_predicted_corners,
            initial_reference_points=outputs.initial_reference_points,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
            init_reference_points=outputs.init_reference_points,
            enc_topk_logits=outputs.enc_topk_logits,
            enc_topk_bboxes=outputs.enc_topk_bboxes,
            enc_outputs_class=outputs.enc_outputs_class,
            enc_outputs_coord_logits=outputs.enc_outputs_coord_logits,
            denoising_meta_values=outputs.denoising_meta_values,
        )
        return result


def _as_hw(size: int | Iterable[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def apply_corrections(model: TfgDeimv2ForObjectDetection) -> None:
    """Apply the module-level corrections to a freshly constructed model (called by its constructor).

    Only modules without parameters are replaced (or, for the query position head, given a subclass with
    the same parameters), so the state-dict keys are transformers' keys minus ``model.enc_output.*`` and,
    for the official distilled ViTs (DINOv3 config without per-stage layer norm), ``...backbone.norm.*``
    and ``...layer_scale{1,2}.lambda1``.
    """
    config = model.config
    inner = model.model
    decoder = inner.decoder

    if config.correction_enabled("enc_output_identity"):
        inner.enc_output = nn.Identity()

    if config.correction_enabled("silu_box_and_lqe_mlps"):
        box_mlps = [inner.enc_bbox_head, decoder.pre_bbox_head, *decoder.bbox_embed, *model.bbox_embed]
        lqe_mlps = [lqe.reg_conf for lqe in decoder.lqe_layers]
        for mlp in box_mlps + lqe_mlps:
            mlp.act = nn.SiLU()

    if config.correction_enabled("query_pos_once"):
        decoder.query_pos_head.__class__ = _QueryPosHeadOnce  # same parameters, cached forward
        decoder.register_forward_pre_hook(decoder.query_pos_head.clear)
        decoder.register_forward_hook(decoder.query_pos_head.clear)  # drop the graph after the forward

    backbone_config = config.backbone_config
    if (
        config.correction_enabled("dinov3_raw_last_stage")
        and getattr(backbone_config, "model_type", None) == "dinov3_vit"
        and not backbone_config.apply_layernorm
    ):
        inner.conv_encoder.backbone.norm = nn.Identity()

    if (
        config.correction_enabled("vit_tiny_no_layer_scale")
        and getattr(backbone_config, "model_type", None) == "dinov3_vit"
        and not backbone_config.apply_layernorm  # the official distilled ViTs (see presets.VIT_ARCHS)
    ):
        for layer in inner.conv_encoder.backbone.model.layer:
            layer.layer_scale1 = nn.Identity()
            layer.layer_scale2 = nn.Identity()


#: The official score heads start at a focal prior of 0.01 (``bias_init_with_prob(0.01)`` in the
#: official decoder), not transformers' ``1 / (num_classes + 1)``.
OFFICIAL_PRIOR_PROB = 0.01


def official_head_init(model: TfgDeimv2ForObjectDetection) -> None:
    """Initialise the heads as the official decoder's ``_reset_parameters`` does.

    transformers' ``_init_weights`` is not applied to the heads of this subclass as it is to its own
    class (the decoder score heads came out with bias 0 and the box heads' last layers non-zero, a
    start from which a from-scratch model learned nothing in 60 steps on 4 images). Official: score
    heads (decoder and encoder) xavier weights and the prior bias; the last layer of every box MLP
    (decoder box heads, pre box head, encoder box head) and of the LQE zero; query position head
    xavier.
    """
    inner = model.model
    decoder = inner.decoder
    bias = prior_bias(model.config)
    with torch.no_grad():
        for layer in [*decoder.class_embed, inner.enc_score_head]:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.constant_(layer.bias, bias)
        for mlp in [
            *decoder.bbox_embed,
            decoder.pre_bbox_head,
            inner.enc_bbox_head,
            *(lqe.reg_conf for lqe in decoder.lqe_layers),
        ]:
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        for layer in decoder.query_pos_head.layers[:-1]:
            nn.init.xavier_uniform_(layer.weight)


def prior_bias(config: Deimv2Config) -> float:
    """Focal-loss prior bias of the score heads, as transformers' ``_init_weights`` computes it."""
    prior_prob = config.initializer_bias_prior_prob or 1 / (config.num_labels + 1)
    return float(-math.log((1 - prior_prob) / prior_prob))


# -- freezing ------------------------------------------------------------------------------------------------
FREEZE_PARTS = ("backbone", "encoder", "decoder", "heads")

_HEAD_MARKERS = (
    "model.decoder.class_embed.",
    "model.decoder.bbox_embed.",
    "model.decoder.pre_bbox_head.",
    "model.decoder.lqe_layers.",
    "model.enc_score_head.",
    "model.enc_bbox_head.",
)


def parameter_part(name: str) -> str:
    """Module group of a parameter name of a DEIMv2 detector (one of ``FREEZE_PARTS``).

    backbone = ``model.conv_encoder``; encoder = ``model.encoder`` + ``model.decoder_input_proj``; heads =
    score heads, box heads, encoder score / box heads, pre-box head and LQE (the decoder's copies, used in
    forward, and the tied top-level aliases); decoder = everything else of ``model`` (decoder layers, query
    position head, denoising class embedding, learned queries).
    """
    if name.startswith(("class_embed.", "bbox_embed.")) or name.startswith(_HEAD_MARKERS):
        return "heads"
    if name.startswith("model.conv_encoder."):
        return "backbone"
    if name.startswith(("model.encoder.", "model.decoder_input_proj.")):
        return "encoder"
    if name.startswith("model."):
        return "decoder"
    raise ConfigError(f"Parameter {name!r} is not part of a DEIMv2 detector (no backbone/encoder/decoder/heads).")


def _resolve_parts(parts: Iterable[str]) -> set[str]:
    parts = [parts] if isinstance(parts, str) else list(parts)
    unknown = sorted(set(parts) - set(FREEZE_PARTS) - {"all"})
    if unknown:
        raise ConfigError(f"freeze/unfreeze parts {unknown} unknown; choose from {list(FREEZE_PARTS) + ['all']}.")
    return set(FREEZE_PARTS) if "all" in parts else set(parts)


def _set_requires_grad(model: nn.Module, parts: Iterable[str], value: bool) -> None:
    chosen = _resolve_parts(parts)
    for name, parameter in _detector_parameters(model):
        if parameter_part(name) in chosen:
            parameter.requires_grad_(value)


def _detector_parameters(model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
    # named_parameters() reports a tied parameter once, under its first name (model.decoder.*); the
    # top-level aliases are the same objects, so setting requires_grad once covers both names.
    return model.named_parameters()


def freeze(model: nn.Module, parts: Iterable[str]) -> None:
    """Stop gradients for ``parts`` ⊆ {"backbone", "encoder", "decoder", "heads", "all"}.

    Replaces ``Deimv2Model.freeze_backbone()``, which raises AttributeError in transformers 5.24. Only
    ``requires_grad`` changes: BatchNorm running statistics of a frozen part still update in ``train()``
    mode unless the trainer puts those modules in ``eval()``.
    """
    _set_requires_grad(model, parts, False)


def unfreeze(model: nn.Module, parts: Iterable[str]) -> None:
    """Re-enable gradients for ``parts`` (see :func:`freeze`)."""
    _set_requires_grad(model, parts, True)


def trainable_parameter_summary(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts per part, plus ``trainable`` and ``total`` (tied parameters counted once)."""
    summary = {part: 0 for part in FREEZE_PARTS}
    total = 0
    for name, parameter in _detector_parameters(model):
        total += parameter.numel()
        if parameter.requires_grad:
            summary[parameter_part(name)] += parameter.numel()
    summary["trainable"] = sum(summary[part] for part in FREEZE_PARTS)
    summary["total"] = total
    return summary


def register_auto_classes() -> None:
    """Register ``tfg_deimv2`` with AutoConfig / AutoModelForObjectDetection (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, TfgDeimv2Config)
    except ValueError:  # already registered (module reloaded)
        pass
    try:
        AutoModelForObjectDetection.register(TfgDeimv2Config, TfgDeimv2ForObjectDetection)
    except ValueError:
        pass
