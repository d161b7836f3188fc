"""The multimodal model: the DEIMv2 detector + cached class text embeddings + residual fusion.

Forward pass (training), in one place:

1. The detector runs. ``detector_mode`` decides how a *frozen* detector runs:
   - ``train_frozen``: ``train()`` mode with ``requires_grad=False``, BatchNorm statistics frozen
     and no dropout (:func:`tfg_mm.detector.shim.set_train_frozen`). It produces every output the
     official criterion reads (all decoder layers, pre-outputs, encoder proposals and, given
     labels, the denoising queries).
   - ``eval_shim``: ``eval()`` mode, as the thesis did. Only the final layer exists, so the
     aux-output shim (:mod:`tfg_mm.detector.shim`) replicates it into the entries the loss expects.
   A detector that is (partly) unfrozen in stage B always runs in ``train()`` mode.
2. :func:`tfg_mm.detector.outputs.official_outputs` lays the outputs out as the official criterion expects
   (denoising queries split off), with each layer's decoder hidden state beside its logits.
3. :func:`tfg_mm.multimodal.fusion.apply_fusion` adds ``alpha * (logit_scale * cos(P(h), T) + bias)`` to every
   logits tensor the loss reads and to the final logits used for prediction. Boxes are untouched.
4. The official criterion (:class:`tfg_mm.detector.loss.DEIMv2Criterion`) on the fused outputs, plus an
   optional distillation term (``kd_weight``) to the frozen baseline's final score head.

With ``alpha = 0`` step 3 adds exactly zero, so predictions equal the baseline's bit for bit.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn

from tfg_mm import detector as det
from tfg_mm.config import DetectorMode, default_of
from tfg_mm.detector.loss import DEIMv2Criterion
from tfg_mm.detector.outputs import official_outputs
from tfg_mm.detector.shim import add_aux_outputs, set_train_frozen
from tfg_mm.errors import ConfigError, TfgError
from tfg_mm.io import atomic_dir
from tfg_mm.multimodal.fusion import ResidualTextFusion, apply_fusion

log = logging.getLogger(__name__)


class MultimodalDetector(nn.Module):
    """The detector, the residual text fusion (``None`` for ``text_encoder: none``) and the criterion it trains with.

    ``criterion``: the official criterion built from the detector's config by the phase
    (``DEIMv2Criterion.from_config(detector.config)``, the one route from a run's parameters to its loss); None for
    a model that only predicts (re-prediction, WiSE-FT). ``detector_mode`` and ``kd_weight`` are the schema
    parameters of the same name.
    """

    def __init__(
        self,
        detector: nn.Module,
        fusion: ResidualTextFusion | None,
        detector_mode: DetectorMode = default_of("detector_mode"),
        kd_weight: float = default_of("kd_weight"),
        *,
        criterion: DEIMv2Criterion | None = None,
    ):
        super().__init__()
        if detector_mode not in get_args(DetectorMode):
            raise ConfigError(
                f"`detector_mode: {detector_mode}` is unknown. Fix: use one of {list(get_args(DetectorMode))}."
            )
        self.detector = detector
        self.fusion = fusion
        self.detector_mode = detector_mode
        self.kd_weight = float(kd_weight)
        self.criterion = criterion
        # The distillation teacher: the baseline's final score head (+ LQE), frozen. It scores the
        # current hidden states, so it needs no second backbone pass. Kept out of the module tree
        # (a plain attribute) so it is neither optimised, averaged by the EMA, nor saved.
        self._teacher = None
        if self.kd_weight > 0:
            dec = detector.model.decoder
            idx = dec.eval_idx
            teacher = nn.ModuleDict(
                {"score": copy.deepcopy(dec.class_embed[idx]), "lqe": copy.deepcopy(dec.lqe_layers[idx])}
            ).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            self._teacher = [teacher]

    # -- detector state ------------------------------------------------------------------------
    @property
    def config(self):
        return self.detector.config

    def detector_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.detector.parameters())

    def set_train_mode(self) -> None:
        """Training mode for the fusion; the detector's mode follows ``detector_mode`` while frozen."""
        self.train()
        if self.detector_frozen():
            if self.detector_mode == "eval_shim":
                self.detector.eval()
            else:
                set_train_frozen(self.detector)
        else:
            # stage B: the unfrozen part trains; the frozen parts keep their BatchNorm statistics
            for module in self.detector.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters()
                ):
                    module.eval()

    # -- detector outputs in the official layout -------------------------------------------------
    def detector_outputs(self, pixel_values: torch.Tensor, labels: list[dict] | None = None, epoch: int = 0) -> dict:
        frozen = self.detector_frozen()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            out = self.detector(pixel_values, labels=labels if self.detector.training else None)
            outputs = official_outputs(out, self.detector.config)
        if self.training and not self.detector.training:
            outputs = add_aux_outputs(outputs, self.detector.config.decoder_layers)
        return outputs

    # -- fusion, loss, prediction ----------------------------------------------------------------
    def fuse(self, outputs: dict) -> dict:
        return outputs if self.fusion is None else apply_fusion(self.fusion, outputs)

    def loss_from_outputs(self, outputs: dict, labels: list[dict], epoch: int) -> tuple[torch.Tensor, dict]:
        if self.criterion is None:
            raise TfgError(
                "MultimodalDetector was built without a criterion (a prediction-only model). Fix: build it with "
                "criterion=DEIMv2Criterion.from_config(detector.config) to train it (tfg_mm.training.phase2 does)."
            )
        fused = self.fuse(outputs)
        terms = self.criterion(fused, _official_targets(labels), epoch=epoch)
        total = sum(terms.values())
        logged = {k: float(v.detach()) for k, v in terms.items()}
        if self._teacher is not None:
            teacher = self._teacher[0].to(outputs["pred_logits"].device)
            with torch.no_grad():
                target = teacher["lqe"](
                    teacher["score"](outputs["hidden"].detach()), outputs["pred_corners"].detach()
                ).sigmoid()
            kd = F.binary_cross_entropy_with_logits(fused["pred_logits"], target) * self.kd_weight
            total = total + kd
            logged["loss_kd"] = float(kd.detach())
        return total, logged

    def forward(self, pixel_values: torch.Tensor, labels: list[dict] | None = None, epoch: int = 0) -> dict:
        outputs = self.detector_outputs(pixel_values, labels, epoch)
        result = {"outputs": outputs}
        if labels is not None and self.training:
            result["loss"], result["loss_dict"] = self.loss_from_outputs(outputs, labels, epoch)
        fused_final = self.fuse({"pred_logits": outputs["pred_logits"], "hidden": outputs["hidden"]})
        result["logits"] = fused_final["pred_logits"]
        result["pred_boxes"] = outputs["pred_boxes"]
        return result

    @torch.no_grad()
    def predict(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused final logits and boxes for evaluation / deployment (the model in ``eval()``).

        The short path: the detector's final logits, boxes and last decoder hidden state (the
        ``eval_idx`` layer, the one :func:`tfg_mm.detector.outputs.official_outputs` pairs with the final
        logits) and one fusion call — no output re-layout, so the text branch costs only its own
        compute (``make benchmark`` measures the overhead).
        """
        out = self.detector(pixel_values)
        logits = out.logits
        if self.fusion is not None:
            logits = self.fusion(logits, out.last_hidden_state)
        return logits, out.pred_boxes

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, folder: str | Path, metadata: dict | None = None, fusion_config: dict | None = None) -> Path:
        """Our checkpoint format: the detector folder (``tfg_mm.detector.save``) + ``fusion.pt``.

        ``fusion_config`` is the fusion's settings under the schema's names (``tfg_mm.training.phase2.fusion_config``,
        equal to ``self.fusion.config``); ``tfg_mm.training.phase2.build_fusion_from_config`` rebuilds the fusion
        from it and the saved text embeddings.
        """
        folder = Path(folder)
        meta = dict(metadata or {})
        meta["fusion_config"] = fusion_config or {}
        with atomic_dir(folder) as tmp:
            det.save(self.detector, tmp / "detector", meta)
            if self.fusion is not None:
                torch.save({"state_dict": self.fusion.state_dict(), "config": fusion_config or {}}, tmp / "fusion.pt")
        return folder


def _official_targets(labels: list[dict]) -> list[dict]:
    """The criterion accepts transformers' ``class_labels``; pass only what it reads."""
    return [{"labels": t.get("class_labels", t.get("labels")), "boxes": t["boxes"]} for t in labels]
