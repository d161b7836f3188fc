"""Running a frozen detector under the training loss: the aux-output shim and ``train_frozen``.

In phase 2 the DEIMv2 detector is frozen and only the text fusion learns. Two ways to run it:

* ``eval`` + :func:`add_aux_outputs` (the thesis's approach). In ``eval()`` transformers' DEIMv2
  scores only the final decoder layer and produces no denoising queries, so the official-layout
  outputs lack ``aux_outputs`` / ``pre_outputs`` / ``enc_aux_outputs`` that the criterion expects.
  The shim fills each missing entry with the final layer's outputs (boxes, corners, logits and the
  hidden state), so the loss runs with the same terms as in training, every one of them
  supervising the final layer. What it cannot invent: denoising (``dn_*``) terms, and the DDF
  distillation between layers, which is zero between identical layers (the official criterion
  drops the term when prediction and teacher are equal).
* ``train_frozen`` (:func:`set_train_frozen`): the detector in ``train()`` so every decoder layer
  is scored and denoising runs, but with frozen weights, BatchNorm statistics and no dropout. The
  loss then has its real per-layer terms.
"""

from __future__ import annotations

import logging

from torch import nn
from transformers.models.deimv2.modeling_deimv2 import Deimv2Decoder, Deimv2ForObjectDetection, Deimv2Model

from tfg_mm.errors import TfgError

logger = logging.getLogger(__name__)

_FINAL_KEYS = ("pred_logits", "pred_boxes", "pred_corners", "ref_points")
_logged_once = False


def add_aux_outputs(outputs: dict, num_decoder_layers: int) -> dict:
    """Complete an eval-mode official-layout output dict with replicated auxiliary entries.

    Adds, only where missing: ``aux_outputs`` (``num_decoder_layers - 1`` copies of the final
    layer, each with the final layer as its DDF teacher), ``pre_outputs`` and
    ``enc_aux_outputs`` (final logits and boxes), and ``enc_meta``. The copies share the final
    tensors (no memory, and the gradient of every replicated term reaches the final layer), and a
    ``hidden`` state is carried along so the fusion can be applied before or after the shim. A
    dict that already has all of them (train mode) is returned as a shallow copy, unchanged.
    Logs once per process that it replicated outputs.
    """
    global _logged_once
    if num_decoder_layers < 1:
        raise TfgError(f"num_decoder_layers must be ≥ 1, got {num_decoder_layers}.")
    result = dict(outputs)
    aux = outputs.get("aux_outputs") or []
    if len(aux) not in (0, num_decoder_layers - 1):
        raise TfgError(
            f"The outputs have {len(aux)} aux_outputs but a {num_decoder_layers}-layer decoder has "
            f"{num_decoder_layers - 1}. Fix: pass the detector's config.decoder_layers."
        )
    if len(aux) == num_decoder_layers - 1 and "pre_outputs" in outputs and outputs.get("enc_aux_outputs"):
        return result  # already complete (train mode): nothing to replicate
    missing = [k for k in _FINAL_KEYS if k not in outputs]
    if missing:
        raise TfgError(
            f"The eval-mode outputs lack {missing}, so the shim cannot replicate them. Fix: build them "
            "with tfg_mm.detector.outputs.official_outputs from the detector's output."
        )

    final = {k: outputs[k] for k in _FINAL_KEYS}
    carried = {"hidden": outputs["hidden"]} if "hidden" in outputs else {}
    if not aux:
        result["aux_outputs"] = [
            {**final, "teacher_corners": outputs["pred_corners"], "teacher_logits": outputs["pred_logits"], **carried}
            for _ in range(num_decoder_layers - 1)
        ]
    if "pre_outputs" not in outputs:
        result["pre_outputs"] = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"], **carried}
    if not outputs.get("enc_aux_outputs"):
        result["enc_aux_outputs"] = [{"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}]
    result.setdefault("enc_meta", {"class_agnostic": False})

    if not _logged_once:
        logger.info(
            "aux-output shim: the detector ran in eval(), so aux_outputs (%d layers), pre_outputs and "
            "enc_aux_outputs were filled with copies of the final layer's outputs; the loss has no denoising "
            "terms and its auxiliary terms all supervise the final layer.",
            num_decoder_layers - 1,
        )
        _logged_once = True
    return result


def set_train_frozen(detector: nn.Module) -> None:
    """Put a detector in the ``train_frozen`` state: train-mode outputs, nothing that changes.

    * every parameter gets ``requires_grad=False``;
    * the modules whose ``training`` flag decides *which outputs exist* stay in train mode: the
      detection model (denoising, ``dn_meta``), the DEIMv2 model (denoising queries) and the
      decoder (class scores of every layer, not only ``eval_idx``);
    * every other module is in eval mode: BatchNorm uses its running statistics and does not
      update them, dropout / drop-path are off, DINOv3 does not jitter its RoPE coordinates.

    ``module.train()`` is recursive and would undo this: call it again after any
    ``model.train()`` (e.g. at the start of each epoch).
    """
    structural = (Deimv2ForObjectDetection, Deimv2Model, Deimv2Decoder)
    found = [m for m in detector.modules() if isinstance(m, structural)]
    if not any(isinstance(m, Deimv2Decoder) for m in found):
        raise TfgError(
            f"set_train_frozen expects a DEIMv2 detector, got {type(detector).__name__} (no Deimv2Decoder "
            "inside). Fix: pass the model from tfg_mm.detector.build / from_pretrained."
        )
    for parameter in detector.parameters():
        parameter.requires_grad_(False)
    detector.eval()
    for module in found:
        module.training = True  # not .train(): that would switch its children back to train mode
