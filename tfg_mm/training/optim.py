"""The optimisation a run trains with: parameter groups (no weight decay on norms, biases and scalar gates),
AdamW / SGD with torch's fused or foreach kernels, the learning-rate schedule (warm-up, then flat-cosine / cosine /
constant), the no-augmentation tail, and the EMA of the weights (``torch.optim.swa_utils.AveragedModel`` with DEIM's
warm-up of the decay)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases and scalar gates / scales are kept out of weight decay."""
    lname = name.lower()
    return param.ndim <= 1 or "norm" in lname or lname.endswith(".bias") or ".bn." in lname


def split_decay(named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float, tag: str) -> list[dict]:
    """Two parameter groups (decay / no decay) at one learning rate, trainable parameters only."""
    decay = [p for n, p in named if p.requires_grad and not no_decay(n, p)]
    nodecay = [p for n, p in named if p.requires_grad and no_decay(n, p)]
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": f"{tag}"})
    if nodecay:
        groups.append({"params": nodecay, "lr": lr, "weight_decay": 0.0, "name": f"{tag}_no_decay"})
    return groups


#: What ``optimizer_impl: auto`` means: torch's fused kernel (scripts/bench_step.py --components: the AdamW update
#: of atto 8.9 ms with ``foreach``, 2.9 ms fused on 2 CPU cores; equal to ``for-loop`` to float rounding,
#: tests/test_speed.py).
AUTO_OPTIMIZER_IMPL = "fused"


def optimizer_kernel_kwargs(impl: str) -> dict:
    """torch's ``foreach`` / ``fused`` switches of an optimiser for ``optimizer_impl`` (``auto`` resolved)."""
    impl = AUTO_OPTIMIZER_IMPL if impl == "auto" else impl
    if impl == "fused":
        return {"fused": True}
    return {"foreach": impl == "foreach"}


def build_optimizer(groups: list[dict], params) -> torch.optim.Optimizer:
    for g in groups:
        g["initial_lr"] = g["lr"]
    kernel = optimizer_kernel_kwargs(params.optimizer_impl)
    if params.optimizer == "AdamW":
        return torch.optim.AdamW(groups, lr=params.lr, betas=(0.9, 0.999), weight_decay=params.weight_decay, **kernel)
    return torch.optim.SGD(groups, lr=params.lr, momentum=0.9, weight_decay=params.weight_decay, **kernel)


def lr_factor(
    step: int,
    total_steps: int,
    warmup: int,
    kind: str,
    flat_fraction: float,
    min_ratio: float,
    warmup_power: int = 1,
    decay_end: float = 1.0,
) -> float:
    """Multiplier of each group's initial lr: warm-up, then constant / cosine / flat-cosine.

    Warm-up: ``((step + 1) / warmup) ** warmup_power`` (1 linear; 2 the official DEIM quadratic one).
    Flat-cosine (DEIM): hold the lr flat for ``flat_fraction`` of the steps, then cosine-decay to
    ``min_ratio`` of the initial value, reached at ``decay_end`` of the steps (1 = the last step; the
    official recipe ends the decay where its no-augmentation tail starts and keeps ``min_ratio`` there).
    """
    if warmup > 0 and step < warmup:
        return ((step + 1) / warmup) ** warmup_power
    if kind == "constant" or total_steps <= 0:
        return 1.0
    start = warmup if kind == "cosine" else max(warmup, int(flat_fraction * total_steps))
    if step < start:
        return 1.0
    end = total_steps if decay_end >= 1.0 else int(decay_end * total_steps)
    if decay_end < 1.0 and step >= end:
        return min_ratio
    span = max(1, end - start)
    progress = min(1.0, (step - start) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_augment_tail(loader: DataLoader, epoch: int, epochs: int, no_aug_epochs: int) -> bool:
    """Switch the training set of ``loader`` to its no-augmentation tail in the last ``no_aug_epochs`` epochs.

    The official ``stop_epoch`` policy: epochs ``epochs - no_aug_epochs + 1 .. epochs`` (1-based, as the history
    counts) train without the random augmentation (``tfg_mm.data.CocoDetection.no_aug``). Called before every
    epoch, also after a resume; DataLoader workers are not persistent, so the next epoch's workers see it.
    Returns whether ``epoch`` is in the tail.
    """
    tail = no_aug_epochs > 0 and epoch > epochs - no_aug_epochs
    dataset = getattr(loader, "dataset", None)
    if hasattr(dataset, "no_aug") and dataset.no_aug != tail:
        dataset.no_aug = tail
        log.info("epoch %d: training augmentation %s", epoch, "off (no-augmentation tail)" if tail else "on")
    return tail


def ema_multi_avg_fn(decay: float, warmup: int) -> Callable:
    """EMA update for ``AveragedModel`` with DEIM's warm-up of the decay.

    Floating tensors are lerped towards the model; integer buffers (BatchNorm counters) copied.
    """

    def update(ema_params, model_params, num_averaged):
        d = decay * (1.0 - math.exp(-float(num_averaged) / max(1, warmup)))
        floats_e = [e for e in ema_params if e.is_floating_point()]
        floats_m = [m for e, m in zip(ema_params, model_params) if e.is_floating_point()]
        if floats_e:
            torch._foreach_lerp_(floats_e, floats_m, 1.0 - d)
        for e, m in zip(ema_params, model_params):
            if not e.is_floating_point():
                e.copy_(m)

    return update


class EMA(AveragedModel):
    """``torch.optim.swa_utils.AveragedModel`` over parameters and buffers with a leaner update.

    torch's ``update_parameters`` detaches, moves and regroups every parameter and buffer (about 1,500 calls for
    atto) before calling ``multi_avg_fn`` once per dtype; here the averaged and live tensors go to
    :func:`ema_multi_avg_fn` as they are, under ``no_grad`` (2 ms less per step on 2 CPU cores; bit-identical
    weights, tests/test_speed.py). Anything else (no ``multi_avg_fn``, tensors on two devices) is torch's update.
    """

    def update_parameters(self, model: nn.Module) -> None:
        ema = [*self.module.parameters(), *self.module.buffers()]
        live = [*model.parameters(), *model.buffers()]
        if self.multi_avg_fn is None or not self.use_buffers or len(ema) != len(live):
            return super().update_parameters(model)
        if any(e.device != q.device for e, q in zip(ema[:1] + ema[-1:], live[:1] + live[-1:])):
            return super().update_parameters(model)
        with torch.no_grad():
            if int(self.n_averaged) == 0:
                for e, q in zip(ema, live):
                    e.copy_(q)
            else:
                self.multi_avg_fn(ema, live, self.n_averaged)
            self.n_averaged += 1
