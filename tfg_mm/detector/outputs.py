"""transformers' DEIMv2 outputs in the official layout, and the non-finite guard on them.

:func:`official_outputs` maps transformers' train-mode output tensors (``intermediate_logits`` has one entry more
than layers: the pre-head scores of layer 0 come first) to the official output dict of ``DEIMTransformer``
(``pred_logits``, ``aux_outputs``, ``pre_outputs``, ``enc_aux_outputs``, ``dn_outputs``, ...), splitting off the
denoising queries; the criterion (:mod:`tfg_mm.detector.loss`), the shim and the text fusion read that layout.
:func:`check_finite_outputs` checks it before any matcher runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from tfg_mm.errors import NonFiniteError, TfgError
from tfg_mm.runtime import distributed


def _field(model_output: Any, name: str) -> Any:
    if isinstance(model_output, Mapping):
        return model_output.get(name)
    return getattr(model_output, name, None)


def official_outputs(model_output: Any, config: Any) -> dict:
    """Map a (Tfg)Deimv2ForObjectDetection output to the official ``DEIMTransformer`` output dict.

    transformers' train-mode layout (L decoder layers, Q' = D denoising + Q matching queries):
    ``intermediate_logits`` / ``intermediate_reference_points`` ``[B, L+1, Q', ...]`` with the
    pre-output (score head 0 without LQE, ``pre_bbox_head`` box) first and decoder layers
    0..L-1 after it; ``intermediate_predicted_corners`` / ``initial_reference_points``
    ``[B, L, Q', ...]`` for layers 0..L-1; ``intermediate_hidden_states`` ``[L, B, Q', D]``
    (layer first). In eval mode only the ``eval_idx`` layer is present (``[B, 1, Q, ...]``), and
    only the final output (plus the encoder proposals) is returned.

    Official layout: the final layer in ``pred_logits`` / ``pred_boxes`` / ``pred_corners`` /
    ``ref_points``; ``aux_outputs[i]`` = layer i (i < L-1) with its own corners and the final layer
    as DDF teacher; ``pre_outputs`` without corners; ``enc_aux_outputs`` the encoder top-k
    proposals; ``dn_outputs`` all L layers for the denoising queries with the last one as teacher;
    ``dn_pre_outputs``; ``dn_meta``. Every decoder dict also gets ``hidden`` = its layer's hidden
    state ``[B, Q, D]`` (layer 0's for the pre-outputs) for the text fusion.
    """
    logits = _field(model_output, "intermediate_logits")
    boxes = _field(model_output, "intermediate_reference_points")
    corners = _field(model_output, "intermediate_predicted_corners")
    refs = _field(model_output, "initial_reference_points")
    hidden = _field(model_output, "intermediate_hidden_states")
    if logits is None or boxes is None or corners is None or refs is None:
        raise TfgError(
            "official_outputs: the model output lacks intermediate_logits / intermediate_reference_points / "
            "intermediate_predicted_corners / initial_reference_points; pass the full output of "
            "(Tfg)Deimv2ForObjectDetection (return_dict=True)."
        )
    batch_size = logits.shape[0]
    num_corner_layers = corners.shape[1]
    has_pre = logits.shape[1] == num_corner_layers + 1
    if not has_pre and logits.shape[1] != num_corner_layers:
        raise TfgError(
            f"official_outputs: {logits.shape[1]} logit entries for {num_corner_layers} corner entries; "
            "expected one more (train mode) or as many (eval mode)."
        )
    if hidden is not None and hidden.shape[1] != batch_size:
        raise TfgError(
            f"official_outputs: intermediate_hidden_states has shape {tuple(hidden.shape)}; expected "
            f"[layers, batch={batch_size}, queries, dim] as transformers 5.24 returns it."
        )
    first = 1 if has_pre else 0  # index of decoder layer 0 in logits / boxes
    device = logits.device
    up = torch.tensor([float(getattr(config, "up", 0.5))], device=device)
    reg_scale = torch.tensor([float(getattr(config, "reg_scale", 4.0))], device=device)

    dn_meta = _field(model_output, "denoising_meta_values")
    if dn_meta is not None and has_pre:
        num_dn, _ = dn_meta["dn_num_split"]
    else:
        dn_meta, num_dn = None, 0

    def match(t: Tensor, dim: int) -> Tensor:
        return t.narrow(dim, num_dn, t.shape[dim] - num_dn)

    def denoise(t: Tensor, dim: int) -> Tensor:
        return t.narrow(dim, 0, num_dn)

    # In eval mode ``hidden`` still holds every layer, but only the ``eval_idx`` layer has logits.
    eval_idx = int(getattr(config, "eval_idx", -1))
    eval_layer = eval_idx if eval_idx >= 0 else int(getattr(config, "decoder_layers", num_corner_layers)) + eval_idx

    def hidden_of(layer: int, part) -> Tensor | None:
        return None if hidden is None else part(hidden[layer], 1)

    def layer_dict(part, layer: int, teacher: int | None) -> dict:
        """Decoder layer ``layer`` (0-based; -1 = last present) of one query part."""
        corner_index = layer if layer >= 0 else num_corner_layers + layer
        out = {
            "pred_logits": part(logits[:, first + corner_index], 1),
            "pred_boxes": part(boxes[:, first + corner_index], 1),
            "pred_corners": part(corners[:, corner_index], 1),
            "ref_points": part(refs[:, corner_index], 1),
        }
        if teacher is not None:
            out["teacher_corners"] = part(corners[:, teacher], 1)
            out["teacher_logits"] = part(logits[:, first + teacher], 1)
        hidden_state = hidden_of(corner_index if has_pre else eval_layer, part)
        if hidden_state is not None:
            out["hidden"] = hidden_state
        return out

    def pre_dict(part) -> dict:
        out = {"pred_logits": part(logits[:, 0], 1), "pred_boxes": part(boxes[:, 0], 1)}
        hidden_state = hidden_of(0, part)
        if hidden_state is not None:
            out["hidden"] = hidden_state
        return out

    result = layer_dict(match, -1, teacher=None)
    result["up"], result["reg_scale"] = up, reg_scale
    if has_pre:
        last = num_corner_layers - 1
        result["aux_outputs"] = [layer_dict(match, i, teacher=last) for i in range(last)]
        result["pre_outputs"] = pre_dict(match)
    enc_logits = _field(model_output, "enc_topk_logits")
    enc_boxes = _field(model_output, "enc_topk_bboxes")
    if enc_logits is not None and enc_boxes is not None:
        result["enc_aux_outputs"] = [{"pred_logits": enc_logits, "pred_boxes": enc_boxes}]
        # transformers' DEIMv2 has only the class-aware query selection (official "default").
        result["enc_meta"] = {"class_agnostic": False}
    if dn_meta is not None and num_dn > 0:
        last = num_corner_layers - 1
        result["dn_outputs"] = [layer_dict(denoise, i, teacher=last) for i in range(num_corner_layers)]
        result["dn_pre_outputs"] = pre_dict(denoise)
        result["dn_meta"] = dn_meta
    return result


#: The tensors of an official output dict the criterion reads (``ref_points`` / ``teacher_*`` are these same
#: tensors of another layer, or detached copies).
_CHECKED_KEYS = ("pred_logits", "pred_boxes", "pred_corners")


def _output_tensors(outputs: Mapping) -> list[tuple[str, Tensor]]:
    """``(name, tensor)`` of every checked tensor of an official output dict, in the criterion's order."""
    found = [(key, outputs[key]) for key in _CHECKED_KEYS if isinstance(outputs.get(key), Tensor)]
    for group in ("aux_outputs", "enc_aux_outputs", "dn_outputs"):
        for i, layer in enumerate(outputs.get(group, [])):
            found += [
                (f"{group}[{i}].{key}", layer[key]) for key in _CHECKED_KEYS if isinstance(layer.get(key), Tensor)
            ]
    for group in ("pre_outputs", "dn_pre_outputs"):
        if group in outputs:
            layer = outputs[group]
            found += [(f"{group}.{key}", layer[key]) for key in _CHECKED_KEYS if isinstance(layer.get(key), Tensor)]
    return found


def raise_if_not_finite(named: Sequence[tuple[str, Tensor]], epoch: int, kind: str) -> None:
    """One device sync for all tensors; on a failure, name the first non-finite one and count its entries.

    Under several processes the verdict is shared (:func:`tfg_mm.runtime.distributed.any_rank`): when one rank sees a
    non-finite value every rank raises (the others say so), instead of waiting in the next collective.
    """
    flags = None
    if named:
        # a cheap screen first: one float32 sum per tensor (NaN and inf propagate into it). Only when a sum is not
        # finite (a non-finite entry, or finite entries overflowing the sum) are the entries themselves checked.
        sums = torch.stack([t.detach().sum(dtype=torch.float32) for _, t in named])
        if not bool(torch.isfinite(sums).all()):
            flags = torch.stack([torch.isfinite(t.detach()).all() for _, t in named])
    ok = flags is None or bool(flags.all())
    if distributed.initialized() and distributed.any_rank(not ok, named[0][1].device if named else None):
        if ok:
            raise NonFiniteError(
                f"non-finite {kind} on another process (epoch {epoch}); that process's error names it.",
                what="another process",
            )
    elif ok:
        return
    name, tensor = named[int((~flags).nonzero()[0, 0])]
    values = tensor.detach()
    nan, inf = int(torch.isnan(values).sum()), int(torch.isinf(values).sum())
    others = [n for (n, _), ok in zip(named, flags.tolist()) if not ok][1:]
    also = f"; also non-finite: {others[:6]}{' ...' if len(others) > 6 else ''}" if others else ""
    raise NonFiniteError(
        f"non-finite {kind} `{name}` (epoch {epoch}): {nan} NaN and {inf} inf of {values.numel()} values{also}. "
        "The weights have diverged (or mixed precision overflowed) before the criterion's matcher ran.",
        what=name,
    )


def check_finite_outputs(outputs: Mapping, epoch: int = 0) -> None:
    """The non-finite guard on the model's outputs, run before any matcher or loss term.

    Checks logits, boxes and FDR corners of the final, auxiliary, pre, encoder and denoising outputs of an
    official output dict (:func:`official_outputs`) and raises :class:`~tfg_mm.errors.NonFiniteError` naming
    the first non-finite tensor. NaN boxes would otherwise reach transformers' GIoU assertion and surface as a
    raw ``ValueError: boxes1 must be in [x0, y0, x1, y1] (corner) format``.
    """
    raise_if_not_finite(_output_tensors(outputs), epoch, "model output")
