"""Residual text fusion: the detector's class logits plus a gated text-similarity term.

    fused = base_logits + alpha * (logit_scale * cos(P(h), T) + bias)

``h`` is a decoder layer's hidden state of each query, ``P`` projects it into the text space
(``fusion: linear``: the thesis's ``Linear(hidden, text dim)``; ``fusion: mlp``: Linear → ReLU →
Dropout → Linear), ``T`` is the fixed ``[C, text dim]`` matrix of class embeddings
(:mod:`tfg_mm.multimodal.text`), ``logit_scale`` a learnable multiplier (a cosine lives in [-1, 1], detector
logits in about [-5, 5]), ``bias`` an optional learnable offset (``fusion_bias``, as in GLIP /
Grounding-DINO), and ``alpha`` = α the gate, one scalar or one per class (``gate``).

The constructor takes the schema's parameter names (:data:`FUSION_PARAMS`), and a phase-2
checkpoint stores them as one dict (``{"hidden_dim", *FUSION_PARAMS}``, :attr:`ResidualTextFusion.config`)
that :meth:`ResidualTextFusion.from_config` rebuilds the module from.

Why the residual form: replacing the detector's logits by a freshly initialised head collapsed
mAP from 0.785 to 0.26 in the thesis. With α = 0 the fused logits *are* the base logits
(bit-exact), so training starts from the baseline and can only move away from it as far as the
data pushes α.

The saddle: with α = 0 the projection gets no gradient at the first step, only α does
(∂L/∂α ∝ the text term, which is non-zero because P's output is not). So P keeps PyTorch's
default (non-zero) initialisation and is never zero-initialised; after the first optimiser step
has moved α, P learns. Zero-initialising both would be an exact saddle.

``text_encoder: none``: there is no fusion module at all; :func:`apply_fusion` with ``None``
returns the outputs unchanged (identity). ``text_encoder: random``: ``T`` holds fixed random unit
prototypes of the same dimension, the control for "extra capacity, no semantics".
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tfg_mm.config import Fusion, Gate, default_of
from tfg_mm.errors import CheckpointError, ConfigError, TfgError

#: Output entries that hold decoder logits (and therefore a decoder ``hidden`` state) in the
#: official DEIMv2 layout of :func:`tfg_mm.detector.outputs.official_outputs`. The encoder proposals
#: (``enc_aux_outputs``) are scored from the encoder memory, not from decoder queries, and stay
#: as they are.
DECODER_ENTRIES = ("aux_outputs", "pre_outputs", "dn_outputs", "dn_pre_outputs")

#: The names of the fusion config in phase-2 checkpoints written before it took the schema's names.
_OLD_CONFIG_NAMES = {
    "projection": "fusion",
    "scale_init": "logit_scale",
    "scale_learnable": "logit_scale_learnable",
    "bias": "fusion_bias",
    "gate_init": "alpha",
    "gate_learnable": "alpha_learnable",
}


class ResidualTextFusion(nn.Module):
    """``fused = base + α * (logit_scale * cos(P(h), T) + bias)``; see the module docstring.

    Every argument after ``text_embeddings`` is the schema parameter of the same name, with the
    schema's default (``docs/parameters.md``, group "Phase 2").

    Args:
        hidden_dim: the decoder's hidden size D.
        text_embeddings: ``[C, dim]`` class embeddings; stored L2-normalised as a buffer
            (saved in checkpoints, never trained).
        fusion: the projection P, ``linear`` or ``mlp``.
        fusion_hidden: width of the ``mlp``'s inner layer.
        dropout: ``linear``: dropout on ``h`` before P; ``mlp``: between its two layers.
        logit_scale: initial multiplier of the cosine (> 0). Stored as its log, so it stays positive.
        logit_scale_learnable: train the logit scale, or keep it fixed.
        fusion_bias: add a learnable scalar bias (initial 0) to the scaled similarity.
        gate: ``scalar`` (one α) or ``per_class`` (one α per class).
        alpha: initial α (default 0.0: an exact baseline start).
        alpha_learnable: train α, or keep it fixed (e.g. the thesis's fixed α = 0.1).
        gate_tanh: bound α to (-1, 1) through tanh (Flamingo). ``alpha`` is then the initial
            value *after* tanh, so it must lie in (-1, 1).

    State (the ``state_dict`` keys, unchanged since the first checkpoints): ``projection`` (P),
    ``log_scale`` (log of the logit scale), ``bias``, ``gate`` (α as stored: α itself, or
    atanh(α) with ``gate_tanh``; :meth:`alpha` gives the effective value) and ``text_embeddings``.
    A fixed (not learnable) logit scale or α is a buffer instead of a parameter.
    """

    def __init__(
        self,
        hidden_dim: int,
        text_embeddings: Tensor,
        fusion: Fusion = default_of("fusion"),
        fusion_hidden: int = default_of("fusion_hidden"),
        dropout: float = default_of("dropout"),
        logit_scale: float = default_of("logit_scale"),
        logit_scale_learnable: bool = default_of("logit_scale_learnable"),
        fusion_bias: bool = default_of("fusion_bias"),
        gate: Gate = default_of("gate"),
        alpha: float = default_of("alpha"),
        alpha_learnable: bool = default_of("alpha_learnable"),
        gate_tanh: bool = default_of("gate_tanh"),
    ):
        super().__init__()
        if text_embeddings.ndim != 2:
            raise ConfigError(
                "The class text embeddings must be a [num_classes, dim] matrix, got shape "
                f"{tuple(text_embeddings.shape)}. Fix: build them with tfg_mm.multimodal.text.class_embeddings."
            )
        if fusion not in get_args(Fusion):
            raise ConfigError(f"`fusion: {fusion}` is unknown. Fix: use one of {list(get_args(Fusion))}.")
        if gate not in get_args(Gate):
            raise ConfigError(f"`gate: {gate}` is unknown. Fix: use one of {list(get_args(Gate))}.")
        if not logit_scale > 0:
            raise ConfigError(
                f"`logit_scale: {logit_scale}` must be > 0 (it multiplies a cosine). Fix: e.g. `logit_scale: 10.0`."
            )
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"`dropout: {dropout}` must be in [0, 1). Fix: e.g. `dropout: 0.1`.")
        if gate_tanh and not -1.0 < alpha < 1.0:
            raise ConfigError(
                f"`alpha: {alpha}` must be in (-1, 1) with `gate_tanh: true` (α is then the gate's "
                "value after tanh). Fix: choose `alpha` in (-1, 1), or set `gate_tanh: false`."
            )

        num_classes, text_dim = text_embeddings.shape
        self.num_classes = int(num_classes)
        #: The schema-named settings this module was built from; ``from_config`` rebuilds it.
        self.config = {
            "hidden_dim": hidden_dim,
            "fusion": fusion,
            "fusion_hidden": fusion_hidden,
            "dropout": dropout,
            "logit_scale": logit_scale,
            "logit_scale_learnable": logit_scale_learnable,
            "fusion_bias": fusion_bias,
            "gate": gate,
            "alpha": alpha,
            "alpha_learnable": alpha_learnable,
            "gate_tanh": gate_tanh,
        }
        self.gate_tanh = gate_tanh
        self.register_buffer("text_embeddings", F.normalize(text_embeddings.detach().float(), dim=-1).clone())

        # P keeps PyTorch's default initialisation: never zero (see the module docstring).
        if fusion == "linear":
            self.projection = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, text_dim))
        else:
            self.projection = nn.Sequential(
                nn.Linear(hidden_dim, fusion_hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(fusion_hidden, text_dim)
            )

        log_scale = torch.tensor(math.log(logit_scale))
        if logit_scale_learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.bias = nn.Parameter(torch.zeros(())) if fusion_bias else None

        raw = math.atanh(alpha) if gate_tanh else float(alpha)
        gate_tensor = torch.full((self.num_classes,) if gate == "per_class" else (), raw)
        if alpha_learnable:
            self.gate = nn.Parameter(gate_tensor)
        else:
            self.register_buffer("gate", gate_tensor)

    @classmethod
    def from_config(cls, config: Mapping, text_embeddings: Tensor) -> ResidualTextFusion:
        """The fusion described by ``config`` (``{"hidden_dim", *FUSION_PARAMS}``, as :attr:`config` and
        ``tfg_mm.training.phase2.fusion_config`` write it) over ``text_embeddings``; missing settings take the
        schema's defaults. Reads checkpoints written before the config took the schema's names, too.
        """
        settings = {_OLD_CONFIG_NAMES.get(name, name): value for name, value in config.items()}
        unknown = sorted(set(settings) - {"hidden_dim", *FUSION_PARAMS})
        if unknown or "hidden_dim" not in settings:
            raise CheckpointError(
                f"The fusion config {dict(config)} has unknown entries {unknown} or no `hidden_dim`. Fix: use a "
                f"phase-2 checkpoint written by this project (its fusion config holds hidden_dim and "
                f"{', '.join(FUSION_PARAMS)})."
            )
        hidden_dim = settings.pop("hidden_dim")
        return cls(hidden_dim, text_embeddings, **settings)

    def alpha(self) -> Tensor:
        """The effective α: ``[]`` or ``[C]``, after tanh when ``gate_tanh`` is on."""
        return torch.tanh(self.gate) if self.gate_tanh else self.gate

    def logit_scale(self) -> Tensor:
        """The current logit scale (``exp`` of the stored ``log_scale``)."""
        return self.log_scale.exp()

    def text_term(self, hidden: Tensor) -> Tensor:
        """``logit_scale * cos(P(h), T) + bias``, shape ``[..., C]`` (before the gate α)."""
        projected = F.normalize(self.projection(hidden), dim=-1)
        cosine = projected @ self.text_embeddings.to(projected.dtype).T
        term = self.logit_scale() * cosine
        return term + self.bias if self.bias is not None else term

    def forward(self, base_logits: Tensor, hidden: Tensor) -> Tensor:
        if base_logits.shape[-1] != self.num_classes:
            raise TfgError(
                f"The detector gives {base_logits.shape[-1]} class logits but the fusion has "
                f"{self.num_classes} class embeddings. Fix: build the text embeddings from the "
                "dataset's class names."
            )
        if base_logits.shape[:-1] != hidden.shape[:-1]:
            raise TfgError(
                f"logits {tuple(base_logits.shape)} and hidden states {tuple(hidden.shape)} do not "
                "describe the same queries (denoising queries not split off?)."
            )
        return base_logits + self.alpha() * self.text_term(hidden)

    def param_groups(self, lr_fusion: float, lr_gate: float, weight_decay: float) -> list[dict]:
        """Optimiser groups: P with ``lr_fusion`` and ``weight_decay``; α / logit scale / bias with
        ``lr_gate`` and no weight decay (AdamW's decay would pull a scalar α to 0).

        A fixed (not learnable) α or logit scale is a buffer and appears in no group; an empty group
        is left out.
        """
        gate_like = [p for p in (self.gate, self.log_scale, self.bias) if isinstance(p, nn.Parameter)]
        groups = [
            {
                "name": "fusion",
                "params": list(self.projection.parameters()),
                "lr": lr_fusion,
                "weight_decay": weight_decay,
            },
            {"name": "fusion_gate", "params": gate_like, "lr": lr_gate, "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    @torch.no_grad()
    def state_summary(self) -> dict:
        """α (mean, and per class for a per-class gate), logit scale and bias, for the per-epoch log.

        The keys (``alpha_mean``, ``alpha``, ``scale``, ``bias``) are the history keys the reports read.
        """
        alpha = self.alpha().detach().float().cpu()
        summary = {
            "alpha_mean": float(alpha.mean()),
            "alpha": alpha.tolist() if alpha.ndim else float(alpha),
            "scale": float(self.logit_scale()),
            "bias": float(self.bias) if self.bias is not None else None,
        }
        return summary


#: The schema parameters the fusion is built from: the constructor's arguments after ``hidden_dim`` and
#: ``text_embeddings`` (``fusion``, ``fusion_hidden``, ``dropout``, ``logit_scale``, ..., ``gate_tanh``).
FUSION_PARAMS: tuple[str, ...] = tuple(inspect.signature(ResidualTextFusion).parameters)[2:]


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

    for key, teacher in (
        ("aux_outputs", result["pred_logits"]),
        ("dn_outputs", result["dn_outputs"][-1]["pred_logits"] if result.get("dn_outputs") else None),
    ):
        for entry in result.get(key, []):
            if "teacher_logits" in entry:
                entry["teacher_logits"] = teacher
    return result


def _fuse_entry(fusion: ResidualTextFusion, entry: dict, where: str) -> dict:
    if "hidden" not in entry:
        raise TfgError(
            f"Output entry {where} has decoder logits but no 'hidden' state, so it cannot be fused. "
            "Fix: build the outputs with tfg_mm.detector.outputs.official_outputs, which adds each layer's hidden state."
        )
    fused = dict(entry)
    fused["pred_logits"] = fusion(entry["pred_logits"], entry["hidden"])
    return fused
