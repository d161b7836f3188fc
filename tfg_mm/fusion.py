"""Residual text fusion: the detector's class logits plus a gated text-similarity term.

    fused = base_logits + gate * (scale * cos(P(h), T) + bias)

``h`` is a decoder layer's hidden state of each query, ``P`` projects it into the text space
(``linear``: the thesis's ``Linear(hidden, text_dim)``; ``mlp``: Linear → ReLU → Dropout →
Linear), ``T`` is the fixed ``[C, text_dim]`` matrix of class embeddings (:mod:`tfg_mm.text`),
``scale`` a learnable logit scale (a cosine lives in [-1, 1], detector logits in about [-5, 5]),
``bias`` an optional learnable offset (GLIP / Grounding-DINO), and ``gate`` = α, a scalar or one
per class.

Why the residual form: replacing the detector's logits by a freshly initialised head collapsed
mAP from 0.785 to 0.26 in the thesis. With α = 0 the fused logits *are* the base logits
(bit-exact), so training starts from the baseline and can only move away from it as far as the
data pushes α.

The saddle (DESIGN "Facts about the fusion"): with α = 0 the projection gets no gradient at the
first step, only α does (∂L/∂α ∝ the text term, which is non-zero because P's output is not). So
P keeps PyTorch's default (non-zero) initialisation and is never zero-initialised; after the
first optimiser step has moved α, P learns. Zero-initialising both would be an exact saddle.

``text_encoder: none``: there is no fusion module at all; :func:`apply_fusion` with ``None``
returns the outputs unchanged (identity). ``text_encoder: random``: ``T`` holds fixed random unit
prototypes of the same dimension, the control for "extra capacity, no semantics".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tfg_mm.errors import ConfigError, TfgError

PROJECTIONS = ("linear", "mlp")
GATES = ("scalar", "per_class")

#: Output entries that hold decoder logits (and therefore a decoder ``hidden`` state) in the
#: official DEIMv2 layout of :func:`tfg_mm.loss.official_outputs`. The encoder proposals
#: (``enc_aux_outputs``) are scored from the encoder memory, not from decoder queries, and stay
#: as they are.
DECODER_ENTRIES = ("aux_outputs", "pre_outputs", "dn_outputs", "dn_pre_outputs")


class ResidualTextFusion(nn.Module):
    """``fused = base + gate * (scale * cos(P(h), T) + bias)``; see the module docstring.

    Args:
        hidden_dim: the decoder's hidden size D.
        text_embeddings: ``[C, text_dim]`` class embeddings; stored L2-normalised as a buffer
            (saved in checkpoints, never trained).
        projection: ``linear`` or ``mlp``.
        fusion_hidden: width of the ``mlp``'s inner layer.
        dropout: ``linear``: dropout on ``h`` before P; ``mlp``: between its two layers.
        scale_init: initial logit scale (> 0). Stored as its log, so it stays positive.
        scale_learnable: train the scale, or keep it fixed.
        bias: add a learnable scalar bias (initial 0) to the scaled similarity.
        gate: ``scalar`` (one α) or ``per_class`` (one α per class).
        gate_init: initial α (default 0.0: an exact baseline start).
        gate_learnable: train α, or keep it fixed (e.g. the thesis's fixed α = 0.1).
        gate_tanh: bound α to (-1, 1) through tanh (Flamingo). ``gate_init`` is then the initial
            value *after* tanh, so it must lie in (-1, 1).
    """

    def __init__(
        self,
        hidden_dim: int,
        text_embeddings: Tensor,
        projection: str = "linear",
        fusion_hidden: int = 256,
        dropout: float = 0.0,
        scale_init: float = 10.0,
        scale_learnable: bool = True,
        bias: bool = True,
        gate: str = "scalar",
        gate_init: float = 0.0,
        gate_learnable: bool = True,
        gate_tanh: bool = False,
    ):
        super().__init__()
        if text_embeddings.ndim != 2:
            raise ConfigError(f"text_embeddings must be [num_classes, text_dim], got shape {tuple(text_embeddings.shape)}.")
        if projection not in PROJECTIONS:
            raise ConfigError(f"`fusion_projection: {projection}` is unknown. Fix: use one of {list(PROJECTIONS)}.")
        if gate not in GATES:
            raise ConfigError(f"`fusion_gate: {gate}` is unknown. Fix: use one of {list(GATES)}.")
        if not scale_init > 0:
            raise ConfigError(f"`fusion_scale_init: {scale_init}` must be > 0 (it multiplies a cosine). Fix: e.g. 10.")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"`fusion_dropout: {dropout}` must be in [0, 1).")
        if gate_tanh and not -1.0 < gate_init < 1.0:
            raise ConfigError(f"`fusion_gate_init: {gate_init}` must be in (-1, 1) with `fusion_gate_tanh: true`.")

        num_classes, text_dim = text_embeddings.shape
        self.num_classes = int(num_classes)
        self.projection_kind = projection
        self.gate_kind = gate
        self.gate_tanh = gate_tanh
        self.register_buffer("text_embeddings", F.normalize(text_embeddings.detach().float(), dim=-1).clone())

        # P keeps PyTorch's default initialisation: never zero (see the module docstring).
        if projection == "linear":
            self.projection = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, text_dim))
        else:
            self.projection = nn.Sequential(
                nn.Linear(hidden_dim, fusion_hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(fusion_hidden, text_dim)
            )

        log_scale = torch.tensor(math.log(scale_init))
        if scale_learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.bias = nn.Parameter(torch.zeros(())) if bias else None

        raw = math.atanh(gate_init) if gate_tanh else float(gate_init)
        gate_tensor = torch.full((self.num_classes,) if gate == "per_class" else (), raw)
        if gate_learnable:
            self.gate = nn.Parameter(gate_tensor)
        else:
            self.register_buffer("gate", gate_tensor)

    def gate_value(self) -> Tensor:
        """The effective α: ``[]`` or ``[C]``, after tanh when it is used."""
        return torch.tanh(self.gate) if self.gate_tanh else self.gate

    def scale(self) -> Tensor:
        return self.log_scale.exp()

    def text_term(self, hidden: Tensor) -> Tensor:
        """``scale * cos(P(h), T) + bias``, shape ``[..., C]`` (before the gate)."""
        projected = F.normalize(self.projection(hidden), dim=-1)
        cosine = projected @ self.text_embeddings.to(projected.dtype).T
        term = self.scale() * cosine
        return term + self.bias if self.bias is not None else term

    def forward(self, base_logits: Tensor, hidden: Tensor) -> Tensor:
        if base_logits.shape[-1] != self.num_classes:
            raise TfgError(f"The detector gives {base_logits.shape[-1]} class logits but the fusion has "
                           f"{self.num_classes} class embeddings. Fix: build the text embeddings from the "
                           "dataset's class names.")
        if base_logits.shape[:-1] != hidden.shape[:-1]:
            raise TfgError(f"logits {tuple(base_logits.shape)} and hidden states {tuple(hidden.shape)} do not "
                           "describe the same queries (denoising queries not split off?).")
        return base_logits + self.gate_value() * self.text_term(hidden)

    def param_groups(self, lr_fusion: float, lr_gate: float, weight_decay: float) -> list[dict]:
        """Optimiser groups: P with ``lr_fusion`` and ``weight_decay``; gate / scale / bias with
        ``lr_gate`` and no weight decay (AdamW's decay would pull a scalar gate to 0).

        Fixed (non-learnable) gate or scale are buffers and appear in no group; an empty group is
        left out.
        """
        gate_like = [p for p in (self.gate, self.log_scale, self.bias) if isinstance(p, nn.Parameter)]
        groups = [
            {"name": "fusion", "params": list(self.projection.parameters()), "lr": lr_fusion,
             "weight_decay": weight_decay},
            {"name": "fusion_gate", "params": gate_like, "lr": lr_gate, "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    @torch.no_grad()
    def state_summary(self) -> dict:
        """α (mean, and per class for a per-class gate), scale and bias, for the per-epoch log."""
        alpha = self.gate_value().detach().float().cpu()
        summary = {
            "alpha_mean": float(alpha.mean()),
            "alpha": alpha.tolist() if alpha.ndim else float(alpha),
            "scale": float(self.scale()),
            "bias": float(self.bias) if self.bias is not None else None,
        }
        return summary


def apply_fusion(fusion: ResidualTextFusion | None, outputs: dict) -> dict:
    """Fuse every decoder-logit entry of an official-layout output dict.

    The final layer (top level) and every dict in ``aux_outputs``, ``pre_outputs``,
    ``dn_outputs`` and ``dn_pre_outputs`` get ``pred_logits = fusion(pred_logits, hidden)``. The
    DDF teachers follow their source: ``aux_outputs[i]['teacher_logits']`` becomes the fused
    final logits and ``dn_outputs[i]['teacher_logits']`` the fused last denoising layer, as in the
    official layout where they are the same tensors. Boxes, corners and the encoder proposals are
    untouched. Returns a new dict (new containers for what changed); the input is not mutated.
    ``fusion=None`` (``text_encoder: none``) is the identity.
    """
    result = dict(outputs)
    if fusion is None:
        return result

    result.update(_fuse_entry(fusion, outputs, "the final layer (top level)"))
    for key in DECODER_ENTRIES:
        if key not in outputs:
            continue
        value = outputs[key]
        if isinstance(value, dict):
            result[key] = _fuse_entry(fusion, value, key)
        else:
            result[key] = [_fuse_entry(fusion, entry, f"{key}[{i}]") for i, entry in enumerate(value)]

    for key, teacher in (("aux_outputs", result["pred_logits"]),
                         ("dn_outputs", result["dn_outputs"][-1]["pred_logits"] if result.get("dn_outputs") else None)):
        for entry in result.get(key, []):
            if "teacher_logits" in entry:
                entry["teacher_logits"] = teacher
    return result


def _fuse_entry(fusion: ResidualTextFusion, entry: dict, where: str) -> dict:
    if "hidden" not in entry:
        raise TfgError(f"Output entry {where} has decoder logits but no 'hidden' state, so it cannot be fused. "
                       "Fix: build the outputs with tfg_mm.loss.official_outputs, which adds each layer's hidden state.")
    fused = dict(entry)
    fused["pred_logits"] = fusion(entry["pred_logits"], entry["hidden"])
    return fused
