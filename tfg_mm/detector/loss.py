"""The official DEIMv2 training criterion, on top of transformers' loss terms.

Why this module exists: transformers' ``Deimv2ForObjectDetectionLoss`` (5.24) computes the right
*terms* but feeds them the wrong *outputs* and settings (fed the same official outputs, its total
is 25 % below the official one on the atto fixture):

- it pairs decoder layers off by one (the pre-output gets layer 0's corners, the second-to-last
  layer gets no MAL / L1 / GIoU, the last denoising layer is dropped, the final layer has no FGL);
- MAL uses ``focal_loss_gamma`` = 2.0 where the official configs set ``gamma: 1.5``;
- the small sizes (atto / femto / pico) officially train with ``losses: [mal, boxes]`` and no union
  set, transformers always adds ``local`` and the dense one-to-one union;
- the official matcher switches to a ``-score * IoU^4`` cost from ``matcher_change_epoch`` on;
  transformers has no such switch;
- denoising DDF terms officially reuse the positive / negative normalisers of the last auxiliary
  layer (counted over the matching queries); transformers recomputes them per denoising layer.

So the module does two things:

1. :func:`official_outputs` maps transformers' train-mode output tensors
   (``intermediate_logits`` has one entry more than layers: the pre-head scores of layer 0 come
   first) to the official output dict layout of ``DEIMTransformer`` (``pred_logits``,
   ``aux_outputs``, ``pre_outputs``, ``enc_aux_outputs``, ``dn_outputs``, ...), splitting off the
   denoising queries.
2. :class:`DEIMv2Criterion` is the official ``DEIMCriterion`` over that layout. It inherits the
   term implementations that are right from transformers' :class:`Deimv2Loss` (MAL, L1 / GIoU,
   union set, denoising indices, the unimodal distribution focal loss) and reimplements only the
   pairing / normalisation logic, the matcher switch and the FGL / DDF bookkeeping.

It reproduces every term of the official fixtures (``tests/fixtures/deimv2_official/loss_*``)
for atto, n and s with and without denoising (tests/test_loss.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from transformers.loss.loss_d_fine import bbox2distance
from transformers.loss.loss_deimv2 import Deimv2Loss
from transformers.loss.loss_for_object_detection import box_area, box_iou, generalized_box_iou
from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher

from tfg_mm.config.presets import OFFICIAL_CRITERION, OFFICIAL_DECODER
from tfg_mm.detector.outputs import check_finite_outputs, official_outputs, raise_if_not_finite
from tfg_mm.errors import ConfigError, DataError

#: The official base criterion (``configs/base/deimv2.yml``), the defaults of :class:`DEIMv2Criterion`. The
#: settings of each size (``losses``, ``use_uni_set``, ``matcher_change_epoch``) are in the one per-size table,
#: :mod:`tfg_mm.config.presets` (:func:`~tfg_mm.config.presets.criterion_settings`), and reach the loss
#: through the model's config (:meth:`DEIMv2Criterion.from_config`).
_BASE: Mapping[str, Any] = OFFICIAL_CRITERION
#: Loss groups of the official base config: all three (the small sizes drop ``local``).
OFFICIAL_LOSSES: tuple[str, ...] = tuple(_BASE["losses"])
#: ``weight_dict`` of ``configs/base/deimv2.yml`` (no size overrides it).
OFFICIAL_WEIGHTS: dict[str, float] = dict(_BASE["weight_dict"])
#: The weighted terms each loss group returns, in order.
_TERMS_OF_GROUP: dict[str, tuple[str, ...]] = {
    "mal": ("loss_mal",),
    "boxes": ("loss_bbox", "loss_giou"),
    "local": ("loss_fgl", "loss_ddf"),
}
#: Temperature of the DDF distillation (a default argument of the official ``loss_local``).
DDF_TEMPERATURE = 5.0
#: The official DDF normaliser uses ``batch_scale = 8 / B`` ("avoid the influence of batch size").
_DDF_BATCH_SCALE_NUMERATOR = 8.0


# ----------------------------------------------------------------------------------------------
# Box conversion: the official one (inverted predicted boxes)
# ----------------------------------------------------------------------------------------------
def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(cx, cy, w, h) -> (x0, y0, x1, y1)`` exactly as the official ``engine/deim/box_ops.py`` does it:
    a negative width or height is clamped to 0 first.

    Why it matters (issue 9, item 0): DEIMv2 decodes a box from its initial reference box ``(cx, cy, w, h)``
    and four FDR distances ``d`` (``distance2bbox``): ``x0 = cx - (R/2 + d_left) * w / R`` and
    ``x1 = cx + (R/2 + d_right) * w / R`` with ``R = reg_scale``. Each distance is an expectation over the
    weighting function, whose values span ``[-2 * up * R, 2 * up * R]`` (``[-4, 4]`` with the official
    ``up = 0.5``, ``R = 4``), so the decoded width ``(R + d_left + d_right) * w / R`` can reach ``-w``: the box
    is *inverted* whenever ``d_left + d_right < -R``. Nothing in the decoder prevents it; it happens when a
    large reference box (learned from image-spanning ground truth) must shrink onto a small object and the
    two distances overshoot. The official criterion never sees the inversion because its
    ``box_cxcywh_to_xyxy`` clamps ``w, h >= 0`` (an inverted box becomes a zero-area box at its centre, with
    IoU / GIoU defined); transformers' ``center_to_corners_format`` does not clamp, so the first inverted
    prediction made transformers' GIoU cost raise ``ValueError: boxes1 must be in [x0, y0, x1, y1] (corner)
    format`` in the matcher (and, before that, silently gave wrong IoUs: two negative sides make a positive
    "area").

    The choice: *sanitise where the official code does*, not change the decoder. Making boxes valid by
    construction would change the model's forward (its boxes in evaluation too, and the outputs of every
    converted official checkpoint, which the project reproduces to float32 noise). The criterion instead uses
    this conversion for every IoU / GIoU of a predicted box (matcher costs, MAL targets, GIoU loss, FGL / DDF
    IoU weights), while the L1 terms keep the raw ``(cx, cy, w, h)``, so an inverted box still gets the L1
    gradient that turns it back (as in the official criterion). For ``w, h >= 0`` the result is bit-identical
    to ``center_to_corners_format`` (same operations; ``clamp`` is the identity there and passes the gradient
    unchanged), so nothing changes for valid boxes (tests/test_faults_numeric.py). NaN boxes are not
    "sanitised": the training loop's non-finite guard (:func:`check_finite_outputs`) stops at them first.
    """
    center_x, center_y, width, height = boxes.unbind(-1)
    width = width.clamp(min=0.0)
    height = height.clamp(min=0.0)
    return torch.stack(
        [center_x - 0.5 * width, center_y - 0.5 * height, center_x + 0.5 * width, center_y + 0.5 * height], dim=-1
    )


def paired_box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and union of ``boxes1[i]`` with ``boxes2[i]`` (corner format, ``[N, 4]`` each): the diagonal of
    transformers' ``box_iou(boxes1, boxes2)``, computed by the same operations on ``N`` pairs instead of
    ``N x N``, so the values are bit-identical (and so are the gradients: off the diagonal the matrix form only
    adds exact zeros). The loss terms compare each matched prediction with its own target only; the matrix form
    cost ``O(N^2)`` for the denoising layers, whose ``N`` is the targets times the denoising groups."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    left_top = torch.max(boxes1[:, :2], boxes2[:, :2])
    right_bottom = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    width_height = (right_bottom - left_top).clamp(min=0)
    inter = width_height[:, 0] * width_height[:, 1]
    union = area1 + area2 - inter
    return inter / union, union


def paired_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of ``boxes1[i]`` with ``boxes2[i]``: the diagonal of transformers' ``generalized_box_iou``, same
    operations and the same corner-format check, on ``N`` pairs (see :func:`paired_box_iou`)."""
    if not (boxes1[:, 2:] >= boxes1[:, :2]).all():
        raise ValueError(f"boxes1 must be in [x0, y0, x1, y1] (corner) format, but got {boxes1}")
    if not (boxes2[:, 2:] >= boxes2[:, :2]).all():
        raise ValueError(f"boxes2 must be in [x0, y0, x1, y1] (corner) format, but got {boxes2}")
    iou, union = paired_box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.max(boxes1[:, 2:], boxes2[:, 2:])
    width_height = (bottom_right - top_left).clamp(min=0)
    area = width_height[:, 0] * width_height[:, 1]
    return iou - (area - union) / area


# ----------------------------------------------------------------------------------------------
# Matcher
# ----------------------------------------------------------------------------------------------
class DEIMv2HungarianMatcher(RTDetrHungarianMatcher):
    """Hungarian matcher with the official DEIMv2 cost switch.

    Before ``change_epoch`` (or always, when it is ``None``) the cost is transformers' classic
    RT-DETR cost ``cost_bbox * L1 + cost_class * focal_class_cost + cost_giou * (-GIoU)``, which is
    the official formula term for term. From ``epoch >= change_epoch`` on the official matcher uses
    ``-sigmoid(logit)[gt class] * IoU(box, gt) ** iou_order_alpha`` instead (only the class score and
    the IoU order the pairs; no L1 / GIoU).

    Inputs use transformers' key names (``logits``, ``class_labels``), as the parent class does.
    Returns index pairs on the device of ``pred_boxes``.
    """

    def __init__(
        self,
        cost_class: float = _BASE["matcher_cost_class"],
        cost_bbox: float = _BASE["matcher_cost_bbox"],
        cost_giou: float = _BASE["matcher_cost_giou"],
        alpha: float = _BASE["matcher_alpha"],
        gamma: float = _BASE["matcher_gamma"],
        change_epoch: int | None = None,
        iou_order_alpha: float = _BASE["iou_order_alpha"],
    ) -> None:
        super().__init__(
            SimpleNamespace(
                matcher_class_cost=cost_class,
                matcher_bbox_cost=cost_bbox,
                matcher_giou_cost=cost_giou,
                use_focal_loss=True,
                matcher_alpha=alpha,
                matcher_gamma=gamma,
            )
        )
        self.change_epoch = change_epoch
        self.iou_order_alpha = iou_order_alpha

    def iou_order_active(self, epoch: int) -> bool:
        """Whether the ``-score * IoU^alpha`` cost is used at ``epoch`` (``epoch >= change_epoch``)."""
        return self.change_epoch is not None and epoch >= self.change_epoch

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict], epoch: int = 0) -> list[tuple[Tensor, Tensor]]:
        device = outputs["pred_boxes"].device
        batch_size, num_queries = outputs["logits"].shape[:2]
        boxes = outputs["pred_boxes"].flatten(0, 1)
        target_ids = torch.cat([t["class_labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets])
        if not self.iou_order_active(epoch):
            cost = self._classic_cost(outputs["logits"].flatten(0, 1), boxes, target_ids, target_boxes)
        else:
            scores = outputs["logits"].flatten(0, 1).sigmoid()
            iou, _ = box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target_boxes))
            cost = -(scores[:, target_ids] * iou.pow(self.iou_order_alpha))
        # transformers' NaN / inf policy (both costs): such pairs are matched only as a last resort.
        max_value = torch.finfo(cost.dtype).max
        cost = torch.nan_to_num(cost, nan=max_value, posinf=max_value, neginf=max_value)
        cost = cost.view(batch_size, num_queries, -1).cpu()
        sizes = [len(t["boxes"]) for t in targets]
        indices = []
        for i, block in enumerate(cost.split(sizes, -1)):
            rows, cols = linear_sum_assignment(block[i])
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return [(i.to(device), j.to(device)) for i, j in indices]

    def _classic_cost(self, logits: Tensor, boxes: Tensor, target_ids: Tensor, target_boxes: Tensor) -> Tensor:
        """transformers' ``RTDetrHungarianMatcher`` cost (focal class cost + L1 + GIoU), term for term, with the
        official box conversion (:func:`box_cxcywh_to_xyxy`) in the GIoU cost, so an inverted predicted box
        costs like a zero-area box instead of raising; L1 stays on the raw boxes."""
        out_prob = F.sigmoid(logits)[:, target_ids]
        neg_cost_class = (1 - self.alpha) * (out_prob**self.gamma) * (-(1 - out_prob + 1e-8).log())
        pos_cost_class = self.alpha * ((1 - out_prob) ** self.gamma) * (-(out_prob + 1e-8).log())
        class_cost = pos_cost_class - neg_cost_class
        bbox_cost = torch.cdist(boxes, target_boxes, p=1)
        giou_cost = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target_boxes))
        return self.bbox_cost * bbox_cost + self.class_cost * class_cost + self.giou_cost * giou_cost


# ----------------------------------------------------------------------------------------------
# Criterion
# ----------------------------------------------------------------------------------------------
class DEIMv2Criterion(Deimv2Loss):
    """The official ``DEIMCriterion`` of DEIMv2 over the official output layout.

    Args:
        num_classes: number of object classes (no background class).
        losses: loss groups, in the order their terms are returned: ``"mal"`` (matching-aware
            loss), ``"boxes"`` (L1 + GIoU), ``"local"`` (FGL + DDF). Official: ``("mal", "boxes",
            "local")``; atto / femto / pico ``("mal", "boxes")``.
        weight_dict: weight of each term (``loss_mal``, ``loss_bbox``, ``loss_giou``, ``loss_fgl``,
            ``loss_ddf``); defaults to :data:`OFFICIAL_WEIGHTS`.
        gamma: MAL exponent (official 1.5; transformers' default 2.0 is not the official value).
        alpha: the criterion's focal alpha, kept for parity; MAL does not use it.
        use_uni_set: supervise boxes / FGL / DDF of the final, auxiliary and pre outputs (and the
            encoder's boxes) with the union of all layers' matchings (official n and larger);
            ``False`` for atto / femto / pico.
        reg_max: number of FGL bins minus one (``max_num_bins``).
        matcher_*: Hungarian matcher costs; ``matcher_alpha`` / ``matcher_gamma`` are the focal
            class-cost parameters (0.25 / 2.0, distinct from MAL's gamma).
        matcher_change_epoch: from this epoch on, match with ``-score * IoU^4``; ``None`` never switches
            (transformers' behaviour). The official loop counts epochs from 0; the project's training loop passes
            its 1-based epoch (as its history counts them), which the ``matcher_change_epoch`` parameter uses too.
            A preset's official value (e.g. atto 450) therefore switches one epoch before the official schedule
            would; the short runs of this project never reach it.
        iou_order_alpha: the IoU exponent of the switched cost (official 4.0).
        mal_alpha: optional MAL weight of the negatives (official ``None``).
        reg_scale, up: FGL weighting-function parameters, used when the outputs do not carry them.
        check_finite: the non-finite guard (default). Every output tensor the criterion reads (logits, boxes,
            corners of the final, auxiliary, pre, encoder and denoising outputs) is checked *before* the
            matcher, and every term before it is returned; the first NaN / inf raises
            :class:`~tfg_mm.errors.NonFiniteError` naming the tensor or term (the training loop adds epoch,
            step and the fixes). ``False`` keeps the official behaviour: a NaN term silently becomes 0 and
            NaN boxes reach the matcher.

    ``forward(outputs, targets, epoch)`` returns every weighted term under its official name, in
    the official order (final, ``_aux_i``, ``_pre``, ``_enc_i``, ``_dn_i``, ``_dn_pre``). The
    training total is their sum. Outputs may also carry a ``hidden`` key per layer (used by the
    text fusion); it is ignored here.
    """

    def __init__(
        self,
        num_classes: int,
        losses: Sequence[str] = OFFICIAL_LOSSES,
        weight_dict: Mapping[str, float] | None = None,
        gamma: float = _BASE["gamma"],
        alpha: float = _BASE["alpha"],
        use_uni_set: bool = _BASE["use_uni_set"],
        reg_max: int = OFFICIAL_DECODER["max_num_bins"],
        matcher_cost_class: float = _BASE["matcher_cost_class"],
        matcher_cost_bbox: float = _BASE["matcher_cost_bbox"],
        matcher_cost_giou: float = _BASE["matcher_cost_giou"],
        matcher_alpha: float = _BASE["matcher_alpha"],
        matcher_gamma: float = _BASE["matcher_gamma"],
        matcher_change_epoch: int | None = _BASE["matcher_change_epoch"],
        iou_order_alpha: float = _BASE["iou_order_alpha"],
        mal_alpha: float | None = _BASE["mal_alpha"],
        reg_scale: float = OFFICIAL_DECODER["reg_scale"],
        up: float = OFFICIAL_DECODER["up"],
        check_finite: bool = True,
    ) -> None:
        unknown = [name for name in losses if name not in OFFICIAL_LOSSES]
        if unknown:
            raise ConfigError(
                f"criterion losses {list(losses)}: unknown entries {unknown}. "
                f"Use a subset of {list(OFFICIAL_LOSSES)} (official: all three; atto/femto/pico: ['mal', 'boxes'])."
            )
        weights = dict(OFFICIAL_WEIGHTS if weight_dict is None else weight_dict)
        missing = [key for group in losses for key in _TERMS_OF_GROUP[group] if key not in weights]
        if missing:
            raise ConfigError(f"criterion weight_dict {weights}: missing weights {missing} for losses {list(losses)}.")
        # transformers' Deimv2Loss reads everything from a config; give it exactly our settings.
        super().__init__(
            SimpleNamespace(
                num_labels=num_classes,
                matcher_class_cost=matcher_cost_class,
                matcher_bbox_cost=matcher_cost_bbox,
                matcher_giou_cost=matcher_cost_giou,
                use_focal_loss=True,
                matcher_alpha=matcher_alpha,
                matcher_gamma=matcher_gamma,
                weight_loss_vfl=1.0,
                weight_loss_mal=weights.get("loss_mal", 0.0),
                weight_loss_bbox=weights.get("loss_bbox", 0.0),
                weight_loss_giou=weights.get("loss_giou", 0.0),
                weight_loss_fgl=weights.get("loss_fgl", 0.0),
                weight_loss_ddf=weights.get("loss_ddf", 0.0),
                eos_coefficient=1e-4,
                focal_loss_alpha=alpha,
                focal_loss_gamma=gamma,
                max_num_bins=reg_max,
                reg_scale=reg_scale,
                up=up,
                mal_alpha=mal_alpha,
                use_dense_one_to_one=use_uni_set,
            )
        )
        self.weight_dict = weights
        self.check_finite = check_finite
        self.losses = list(losses)
        self.use_uni_set = use_uni_set
        self.reg_max = reg_max
        self.matcher = DEIMv2HungarianMatcher(
            cost_class=matcher_cost_class,
            cost_bbox=matcher_cost_bbox,
            cost_giou=matcher_cost_giou,
            alpha=matcher_alpha,
            gamma=matcher_gamma,
            change_epoch=matcher_change_epoch,
            iou_order_alpha=iou_order_alpha,
        )

    @classmethod
    def from_config(cls, config: Any) -> DEIMv2Criterion:
        """Build the criterion from a (Tfg)Deimv2Config.

        Reads ``num_labels``, ``focal_loss_gamma`` (MAL gamma), ``focal_loss_alpha``,
        ``use_dense_one_to_one`` (union set), ``criterion_losses``, ``matcher_change_epoch``,
        ``matcher_iou_order_alpha``, ``weight_loss_*``, ``matcher_*``, ``mal_alpha``,
        ``max_num_bins``, ``reg_scale`` and ``up``; a missing attribute takes the official base value.
        A missing ``matcher_change_epoch`` means the matcher never switches (the official switch
        epoch depends on the size and schedule). The project's presets set every one of these
        (``tfg_mm.detector.factory.criterion_fields``). Note that a plain transformers ``Deimv2Config``
        carries ``focal_loss_gamma=2.0``, not the official 1.5.
        """

        def get(name: str, default: Any) -> Any:
            value = getattr(config, name, None)
            return default if value is None else value

        return cls(
            num_classes=config.num_labels,
            losses=tuple(get("criterion_losses", OFFICIAL_LOSSES)),
            weight_dict={name: get(f"weight_{name}", weight) for name, weight in OFFICIAL_WEIGHTS.items()},
            gamma=get("focal_loss_gamma", _BASE["gamma"]),
            alpha=get("focal_loss_alpha", _BASE["alpha"]),
            use_uni_set=bool(get("use_dense_one_to_one", _BASE["use_uni_set"])),
            reg_max=get("max_num_bins", OFFICIAL_DECODER["max_num_bins"]),
            matcher_cost_class=get("matcher_class_cost", _BASE["matcher_cost_class"]),
            matcher_cost_bbox=get("matcher_bbox_cost", _BASE["matcher_cost_bbox"]),
            matcher_cost_giou=get("matcher_giou_cost", _BASE["matcher_cost_giou"]),
            matcher_alpha=get("matcher_alpha", _BASE["matcher_alpha"]),
            matcher_gamma=get("matcher_gamma", _BASE["matcher_gamma"]),
            matcher_change_epoch=getattr(config, "matcher_change_epoch", None),
            iou_order_alpha=get("matcher_iou_order_alpha", _BASE["iou_order_alpha"]),
            mal_alpha=getattr(config, "mal_alpha", None),
            reg_scale=get("reg_scale", OFFICIAL_DECODER["reg_scale"]),
            up=get("up", OFFICIAL_DECODER["up"]),
        )

    # ------------------------------------------------------------------------------------------
    # MAL and boxes: transformers' terms with the official box conversion
    # ------------------------------------------------------------------------------------------
    def loss_labels_mal(self, outputs, targets, indices, num_boxes):
        """Matching-aware loss: transformers' ``Deimv2Loss.loss_labels_mal`` line for line, except that the IoU
        target uses the official conversion (:func:`box_cxcywh_to_xyxy`: an inverted box has IoU 0, not the
        IoU of a box with a "positive" area made of two negative sides)."""
        idx = self._get_source_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx]
        target_boxes = torch.cat([t["boxes"][i] for t, (_, i) in zip(targets, indices)], dim=0)
        ious, _ = paired_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes))
        ious = ious.detach()

        src_logits = outputs["logits"]
        target_classes_original = torch.cat([t["class_labels"][i] for t, (_, i) in zip(targets, indices)])
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64, device=src_logits.device)
        target_classes[idx] = target_classes_original
        target = F.one_hot(target_classes, num_classes=self.num_classes + 1)[..., :-1]

        target_score_original = torch.zeros_like(target_classes, dtype=src_logits.dtype)
        target_score_original[idx] = ious.to(target_score_original.dtype)
        target_score = target_score_original.unsqueeze(-1) * target

        pred_score = F.sigmoid(src_logits).detach()
        target_score = target_score.pow(self.gamma)
        if self.mal_alpha is not None:
            weight = self.mal_alpha * pred_score.pow(self.gamma) * (1 - target) + target
        else:
            weight = pred_score.pow(self.gamma) * (1 - target) + target

        loss = F.binary_cross_entropy_with_logits(src_logits, target_score, weight=weight, reduction="none")
        loss = loss.mean(1).sum() * src_logits.shape[1] / num_boxes
        return {"loss_mal": loss}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        """L1 on the raw ``(cx, cy, w, h)`` and GIoU on the official conversion (:func:`box_cxcywh_to_xyxy`):
        transformers' ``RTDetrLoss.loss_boxes`` line for line otherwise. An inverted box gets a GIoU loss (as a
        zero-area box) and the L1 gradient that restores a positive width, instead of a ``ValueError``."""
        idx = self._get_source_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx]
        target_boxes = torch.cat([t["boxes"][i] for t, (_, i) in zip(targets, indices)], dim=0)
        losses = {}
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        losses["loss_bbox"] = loss_bbox.sum() / num_boxes
        loss_giou = 1 - paired_generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes))
        losses["loss_giou"] = loss_giou.sum() / num_boxes
        return losses

    # ------------------------------------------------------------------------------------------
    # FGL / DDF with the official bookkeeping
    # ------------------------------------------------------------------------------------------
    def _loss_local(
        self,
        out: dict,
        targets: list[dict],
        indices: list[tuple[Tensor, Tensor]],
        num_boxes: float,
        up: Tensor,
        reg_scale: Tensor | float,
        ddf_norm: tuple[Tensor, Tensor] | None,
    ) -> tuple[dict[str, Tensor], tuple[Tensor, Tensor] | None]:
        """Fine-grained localisation (FGL) and decoupled distillation focal (DDF) losses.

        Differs from transformers' ``DFineLoss.loss_local`` only where the official code differs:
        no DDF without a teacher (final layer) or when the layer is its own teacher (last
        denoising layer); and the DDF positive / negative normalisers are computed on matching
        layers and *reused* by denoising layers (``ddf_norm`` in / out). A denoising layer computes
        its own only if no matching layer had a DDF term (a one-layer decoder, where the official
        code fails). Returns the terms and the normaliser to pass on.

        FGL targets are computed per call from that call's matching. The official code caches the
        first call's targets; that is the same whenever the layers share one matching (union set,
        or the fixed denoising matching), which covers every official config using ``local``.
        """
        losses: dict[str, Tensor] = {}
        if "pred_corners" not in out:
            return losses, ddf_norm
        bins = self.reg_max + 1
        idx = self._get_source_permutation_idx(indices)
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)

        pred_corners = out["pred_corners"][idx].reshape(-1, bins)
        ref_points = out["ref_points"][idx].detach()
        with torch.no_grad():
            target_corners, weight_right, weight_left = bbox2distance(
                ref_points, box_cxcywh_to_xyxy(target_boxes), self.reg_max, reg_scale, up
            )
        ious = paired_box_iou(box_cxcywh_to_xyxy(out["pred_boxes"][idx]), box_cxcywh_to_xyxy(target_boxes))[0]
        weight_targets = ious.unsqueeze(-1).repeat(1, 1, 4).reshape(-1).detach()
        losses["loss_fgl"] = self.unimodal_distribution_focal_loss(
            pred_corners, target_corners, weight_right, weight_left, weight_targets, avg_factor=num_boxes
        )

        if "teacher_corners" not in out:
            return losses, ddf_norm
        all_corners = out["pred_corners"].reshape(-1, bins)
        teacher_corners = out["teacher_corners"].reshape(-1, bins)
        if torch.equal(all_corners, teacher_corners):
            return losses, ddf_norm

        # Weight: this layer's IoU for matched queries, the teacher's best score for the rest.
        weight_local = out["teacher_logits"].sigmoid().max(dim=-1)[0]
        mask = torch.zeros_like(weight_local, dtype=torch.bool)
        mask[idx] = True
        mask = mask.unsqueeze(-1).repeat(1, 1, 4).reshape(-1)
        weight_local[idx] = ious.reshape_as(weight_local[idx]).to(weight_local.dtype)
        weight_local = weight_local.unsqueeze(-1).repeat(1, 1, 4).reshape(-1).detach()

        temperature = DDF_TEMPERATURE
        kl = F.kl_div(
            F.log_softmax(all_corners / temperature, dim=1),
            F.softmax(teacher_corners.detach() / temperature, dim=1),
            reduction="none",
        ).sum(-1)
        loss_match = weight_local * (temperature**2) * kl

        if not out.get("is_dn", False) or ddf_norm is None:
            batch_scale = _DDF_BATCH_SCALE_NUMERATOR / out["pred_boxes"].shape[0]
            ddf_norm = ((mask.sum() * batch_scale) ** 0.5, ((~mask).sum() * batch_scale) ** 0.5)
        num_pos, num_neg = ddf_norm
        loss_pos = loss_match[mask].mean() if mask.any() else 0
        loss_neg = loss_match[~mask].mean() if (~mask).any() else 0
        losses["loss_ddf"] = (loss_pos * num_pos + loss_neg * num_neg) / (num_pos + num_neg)
        return losses, ddf_norm

    # ------------------------------------------------------------------------------------------
    # Forward: the official pairing and normalisation
    # ------------------------------------------------------------------------------------------
    def forward(self, outputs: dict, targets: list[dict], epoch: int = 0) -> dict[str, Tensor]:
        """Every weighted loss term, official names and order. See the class docstring."""
        targets = normalize_targets(targets)
        if self.check_finite:
            check_finite_outputs(outputs, epoch)
        device = outputs["pred_logits"].device
        up = outputs.get("up", self.up)
        up = up.to(device) if isinstance(up, Tensor) else torch.tensor([float(up)], device=device)
        reg_scale = outputs.get("reg_scale", self.reg_scale)

        main = _hf_view(outputs)
        aux = [_hf_view(o) for o in outputs.get("aux_outputs", [])]
        pre = _hf_view(outputs["pre_outputs"]) if "pre_outputs" in outputs else None
        enc = [_hf_view(o) for o in outputs.get("enc_aux_outputs", [])]
        class_agnostic = bool(outputs.get("enc_meta", {}).get("class_agnostic", False))
        enc_targets = (
            [{"class_labels": torch.zeros_like(t["class_labels"]), "boxes": t["boxes"]} for t in targets]
            if class_agnostic
            else targets
        )

        # Matchings: final layer, then aux layers + pre (in that order), then the encoder.
        indices_main = self.matcher(main, targets, epoch=epoch)
        indices_aux = [self.matcher(o, targets, epoch=epoch) for o in aux]
        indices_pre = self.matcher(pre, targets, epoch=epoch) if pre is not None else None
        indices_enc = [self.matcher(o, enc_targets, epoch=epoch) for o in enc]
        pooled = indices_aux + ([indices_pre] if indices_pre is not None else []) + indices_enc
        indices_union = self._get_dense_o2o_indices(indices_main, pooled)
        num_boxes_union = _mean_over_ranks(sum(len(rows) for rows, _ in indices_union), device)
        num_boxes = _mean_over_ranks(sum(len(t["class_labels"]) for t in targets), device)

        losses: dict[str, Tensor] = {}
        ddf_norm: tuple[Tensor, Tensor] | None = None

        def supervise(out, tgts, own_indices, own_num, suffix, union_groups, is_dn=False):
            nonlocal ddf_norm
            for group in self.losses:
                if group in union_groups:
                    indices_in, num_in = indices_union, num_boxes_union
                else:
                    indices_in, num_in = own_indices, own_num
                if group == "mal":
                    terms = self.loss_labels_mal(out, tgts, indices_in, num_in)
                elif group == "boxes":
                    terms = self.loss_boxes(out, tgts, indices_in, num_in)
                else:
                    view = dict(out, is_dn=is_dn)
                    terms, ddf_norm = self._loss_local(view, tgts, indices_in, num_in, up, reg_scale, ddf_norm)
                for name, value in terms.items():
                    losses[name + suffix] = value * self.weight_dict[name]

        decoder_union = ("boxes", "local") if self.use_uni_set else ()
        supervise(main, targets, indices_main, num_boxes, "", decoder_union)
        for i, (out, own) in enumerate(zip(aux, indices_aux)):
            supervise(out, targets, own, num_boxes, f"_aux_{i}", decoder_union)
        if pre is not None:
            supervise(pre, targets, indices_pre, num_boxes, "_pre", decoder_union)
        if enc:
            original_num_classes = self.num_classes
            if class_agnostic:
                self.num_classes = 1
            enc_union = ("boxes",) if self.use_uni_set else ()
            try:
                for i, (out, own) in enumerate(zip(enc, indices_enc)):
                    supervise(out, enc_targets, own, num_boxes, f"_enc_{i}", enc_union)
            finally:
                self.num_classes = original_num_classes

        if "dn_outputs" in outputs:
            dn_meta = outputs["dn_meta"]
            indices_dn = self.get_cdn_matched_indices(dn_meta, targets)
            num_boxes_dn = num_boxes * dn_meta["dn_num_group"]
            for i, out in enumerate(outputs["dn_outputs"]):
                supervise(_hf_view(out), targets, indices_dn, num_boxes_dn, f"_dn_{i}", (), is_dn=True)
            if "dn_pre_outputs" in outputs:
                supervise(_hf_view(outputs["dn_pre_outputs"]), targets, indices_dn, num_boxes_dn, "_dn_pre", ())

        if self.check_finite:
            raise_if_not_finite(list(losses.items()), epoch, "loss term")
        # Official (check_finite=False): a NaN term becomes 0. Unlike the official bare ``nan_to_num`` an
        # infinite term stays infinite (not float max), so the training loop's non-finite check still sees it.
        inf = float("inf")
        return {name: torch.nan_to_num(value, nan=0.0, posinf=inf, neginf=-inf) for name, value in losses.items()}


def _mean_over_ranks(count: int, device: torch.device) -> float:
    """A box count for normalisation: averaged over distributed ranks as the official code does, >= 1.

    Under ``accelerate launch`` every rank then divides by the same number, so the gradient does not
    depend on how the boxes happen to be split across GPUs.
    """
    value = torch.tensor([float(count)], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(value)
        value = value / torch.distributed.get_world_size()
    return max(float(value.item()), 1.0)


def _hf_view(out: Mapping) -> dict:
    """The official output dict with transformers' logits key, which the inherited terms read."""
    view = dict(out)
    view["logits"] = view.pop("pred_logits")
    return view


def normalize_targets(targets: Sequence[Mapping]) -> list[dict]:
    """Accept transformers' ``class_labels`` or the official ``labels`` key; return transformers' form."""
    result = []
    for i, target in enumerate(targets):
        labels = target.get("class_labels", target.get("labels"))
        if labels is None or "boxes" not in target:
            raise DataError(
                f"loss targets, entry {i}: keys {sorted(target)}; expected 'class_labels' (or 'labels') "
                "and 'boxes' (cx, cy, w, h normalised). Build targets with the project's collate function."
            )
        boxes = target["boxes"]
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or len(boxes) != len(labels):
            raise DataError(
                f"loss targets, entry {i}: 'boxes' has shape {tuple(boxes.shape)} for {len(labels)} labels; "
                "expected [n, 4] (cx, cy, w, h normalised), one row per label."
            )
        result.append({"class_labels": labels.long(), "boxes": boxes})
    return result


def compute_loss(
    model_output: Any,
    labels: Sequence[Mapping],
    config: Any,
    criterion: DEIMv2Criterion,
    epoch: int = 0,
) -> tuple[Tensor, dict[str, float]]:
    """Official total loss and its terms for one batch: official_outputs -> criterion -> sum.

    ``criterion`` is built once per run from the model's config (``DEIMv2Criterion.from_config(model.config)``:
    the one route from a run's parameters to its loss, phase 2 included); ``config`` lays the outputs out
    (:func:`official_outputs`).
    """
    terms = criterion(official_outputs(model_output, config), list(labels), epoch=epoch)
    total = sum(terms.values())
    return total, {name: float(value.detach()) for name, value in terms.items()}
