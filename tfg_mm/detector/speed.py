"""Faster pieces of the detector's training step that compute the same numbers (issue 10, item 4).

Measured by scripts/bench_step.py on 2 CPU cores; tests/test_speed.py pins what each one changes.

1. ``attn_implementation: blocks`` (the default): the decoder's self-attention computed only where the denoising
   mask lets queries see. Equal to ``sdpa`` up to float rounding.
2. Max pooling in channels-last memory format on the CPU (the HGNetV2 stem's 2 x 2 / stride 1 pool: 8.1 -> 4.6 ms
   forward + backward for atto at 160 px, batch 8). Bit-identical values and gradients.
3. ``compile: backbone`` (not a default): :func:`compile_static_parts`.

**1. The attention.** In training, DEIMv2's decoder runs ``D`` denoising queries (``G`` groups of ``s``: a positive
and a negative copy of up to ``s / 2`` ground-truth boxes) before its ``Q`` matching queries, and the self-attention
mask built by transformers' ``get_contrastive_denoising_training_group`` lets

- a matching query see the ``Q`` matching queries only;
- a query of denoising group ``g`` see its own group and the ``Q`` matching queries.

With ``sdpa`` every query scores every key (``(D + Q)^2`` scores: 90,000 per head for atto's 200 + 100) and the mask
sets the invisible ones to ``-inf``, whose softmax weights are exactly 0. Here the same attention is computed block
by block: the matching queries over the matching keys (``sdpa``), and every denoising query, batched by group, over
its own group's keys followed by the matching keys (the keys in the mask's order, one softmax):
``Q^2 + D (s + Q)`` scores (34,000 for atto with 10 groups of 20). The softmax therefore sums the same non-zero
terms without the zeros, so the result equals ``sdpa`` up to float rounding.

Any other mask (none in evaluation and in the AIFI encoder; another layout; a boolean or per-batch mask) and any
attention dropout go to transformers' ``sdpa`` unchanged, so evaluation is bit-identical to ``sdpa``.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

#: The name under which :func:`denoising_block_attention` is registered with transformers.
BLOCKS = "tfg_blocks"


#: The last mask checked and its layout (every decoder layer of one forward gets the same mask tensor).
_last: tuple[weakref.ref, int, tuple[int, int] | None] | None = None


def denoising_layout(mask: torch.Tensor | None, length: int) -> tuple[int, int] | None:
    """``(D, s)`` if ``mask`` is exactly the denoising mask of ``length`` queries with ``D`` denoising queries in
    groups of ``s``; None for any other mask (which then goes to plain ``sdpa``)."""
    global _last
    if mask is None or mask.dim() != 2 or tuple(mask.shape) != (length, length) or not mask.is_floating_point():
        return None
    if _last is not None and _last[0]() is mask and _last[1] == mask._version:
        return _last[2]
    layout = _check_layout(mask, length)
    _last = (weakref.ref(mask), mask._version, layout)
    return layout


def _check_layout(mask: torch.Tensor, length: int) -> tuple[int, int] | None:
    hidden = torch.isneginf(mask)
    num_dn = int(hidden[-1].sum())  # a matching query's row hides exactly the denoising columns
    if num_dn <= 0 or num_dn >= length:
        return None
    group = int((~hidden[0, :num_dn]).sum())  # the first denoising query sees its own group
    if group <= 0 or num_dn % group:
        return None
    expected = torch.zeros(length, length, dtype=torch.bool, device=mask.device)
    group_of = torch.arange(num_dn, device=mask.device) // group
    expected[:num_dn, :num_dn] = group_of[:, None] != group_of[None, :]  # other groups are hidden
    expected[num_dn:, :num_dn] = True  # matching queries see no denoising query
    if not torch.equal(hidden, expected) or bool(mask.masked_fill(hidden, 0).any()):
        return None
    return num_dn, group


def denoising_block_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` / ``key`` / ``value`` ``(B, H, T, d)``; returns
    ``(B, T, H, d)`` and no weights, like ``sdpa_attention_forward``."""
    length = query.shape[2]
    layout = denoising_layout(attention_mask, length) if dropout == 0.0 else None
    if layout is None or key.shape[2] != length:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    num_dn, group = layout
    batch, heads, _, dim = query.shape
    groups, num_matching = num_dn // group, length - num_dn
    scale = dim**-0.5 if scaling is None else scaling
    dn_query, matching_q = query.split([num_dn, num_matching], dim=2)
    own_k, matching_k = key.split([num_dn, num_matching], dim=2)
    own_v, matching_v = value.split([num_dn, num_matching], dim=2)
    matching = torch.nn.functional.scaled_dot_product_attention(matching_q, matching_k, matching_v, scale=scale)
    # denoising queries: scores against their own group's keys and against the matching keys, one softmax over
    # both in the mask's key order; split, not sliced, so that the backward concatenates instead of zero-filling
    dn_query = dn_query * scale
    own_scores = torch.matmul(
        dn_query.reshape(batch, heads, groups, group, dim),
        own_k.reshape(batch, heads, groups, group, dim).transpose(-1, -2),
    )
    shared_scores = torch.matmul(dn_query, matching_k.transpose(-1, -2))
    own_weights, shared_weights = (
        torch.cat([own_scores, shared_scores.reshape(batch, heads, groups, group, num_matching)], dim=-1)
        .softmax(dim=-1)
        .split([group, num_matching], dim=-1)
    )
    denoising = torch.matmul(own_weights, own_v.reshape(batch, heads, groups, group, dim)).reshape(
        batch, heads, num_dn, dim
    ) + torch.matmul(shared_weights.reshape(batch, heads, num_dn, num_matching), matching_v)
    out = torch.cat([denoising, matching], dim=2)
    return out.transpose(1, 2).contiguous(), None


def register_block_attention() -> None:
    """Make :data:`BLOCKS` a name transformers' attention modules accept (``config._attn_implementation``);
    idempotent. Every project detector calls it when it is built (:func:`use_fast_modules`)."""
    AttentionInterface.register(BLOCKS, denoising_block_attention)


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools a CPU tensor in channels-last memory format and returns it in the input's format.

    torch's channels-last CPU kernel vectorises over channels; the values and the gradient (routed to the same
    first maximum of each window) are bit-identical to the contiguous kernel's (tests/test_speed.py). Other
    devices use ``nn.MaxPool2d`` unchanged. Same (empty) state dict.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4:
            return super().forward(x)
        keep = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous(memory_format=keep)


def use_fast_modules(model: nn.Module) -> None:
    """Give every ``nn.MaxPool2d`` of ``model`` the :class:`ChannelsLastMaxPool2d` forward (no parameter changes),
    and register the block attention (:func:`register_block_attention`) that ``attn_implementation`` may choose."""
    register_block_attention()
    for module in model.modules():
        if type(module) is nn.MaxPool2d:
            module.__class__ = ChannelsLastMaxPool2d


def compile_static_parts(model: nn.Module) -> int:
    """``torch.compile`` (in place: same module, same state-dict keys) the backbone and the hybrid encoder of every
    DEIMv2 detector inside ``model``; returns how many detectors were compiled.

    Those parts see the same shapes at every training step (the run's image size and batch), so they compile
    once. The decoder and the criterion are left eager: the number of denoising queries, and so the decoder's
    shapes, changes with each batch's box count, and the matcher runs scipy. Call it after the EMA copy is made
    (a deep copy of a compiled module would still run the original's compiled forward).
    """
    count = 0
    for module in model.modules():
        inner = getattr(module, "model", None)
        if hasattr(inner, "conv_encoder") and hasattr(inner, "encoder") and hasattr(inner, "decoder"):
            inner.conv_encoder.compile()
            inner.encoder.compile()
            count += 1
    return count
