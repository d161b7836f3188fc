"""Which device a run uses, which mixed precision it can have there, and the DataLoader settings that suit it.

The parameters (``tfg_mm.config``): ``device`` (``auto`` / ``cpu`` / ``cuda`` / ``cuda:N``), ``amp``
(``no`` / ``bf16`` / ``fp16``), ``num_workers`` and ``pin_memory`` (``auto`` or a value). They are
resolved here, once per run, by pure functions that take the machine's facts as arguments (CUDA
visible, device count, CPU count), so the tests check every device without one.

``auto`` loader settings: on CPU exactly what the project always used (no worker process, no pinned
memory), so CPU results stay bit-identical; on CUDA ``min(8, CPUs)`` worker processes and pinned memory,
so that decoding and augmenting the next batches overlaps the GPU's step. Workers are not persistent:
phase 2 switches the training set's attributes between epochs (augmentation, image loading), and
workers forked at each epoch's start see them (persistent ones would keep the old values).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from tfg_mm.config import DEVICE_PATTERN
from tfg_mm.errors import ConfigError

#: the most ``auto`` worker processes per loader (more rarely helps: the GPU step, not decoding, then limits)
MAX_AUTO_WORKERS = 8


def resolve_device(spec: str, *, cuda_available: bool | None = None, cuda_count: int | None = None) -> torch.device:
    """The torch device of ``device: spec``; ``ConfigError`` naming the parameter when it is not there.

    ``auto`` is ``cuda`` (the current CUDA device) when one is visible, else ``cpu``. ``cuda_available`` /
    ``cuda_count`` default to what torch sees (the tests pass them).
    """
    if not DEVICE_PATTERN.fullmatch(spec):
        raise ConfigError(
            f"Parameter `device: {spec}` is not a device. Fix: `auto`, `cpu`, `cuda` or `cuda:N` (N = 0, 1, ...)."
        )
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if spec == "cpu" or (spec == "auto" and not cuda_available):
        return torch.device("cpu")
    if not cuda_available:
        raise ConfigError(
            f"Parameter `device: {spec}` but no CUDA device is visible (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none'}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). "
            "Fix: set `device: auto` or `cpu`, or run on a machine with a GPU and a CUDA build of torch."
        )
    if spec in ("auto", "cuda"):
        return torch.device("cuda")
    index = int(spec.split(":")[1])
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if index >= count:
        visible = ", ".join(f"cuda:{i}" for i in range(count))
        raise ConfigError(
            f"Parameter `device: {spec}` but only {count} CUDA device{'s are' if count != 1 else ' is'} visible "
            f"({visible}). Fix: choose one of them, or `device: cuda` (the current one)."
        )
    return torch.device("cuda", index)


def check_amp(amp: str, device: torch.device, *, bf16_supported: bool | None = None) -> None:
    """``ConfigError`` when mixed precision ``amp`` cannot run on ``device``.

    ``fp16`` needs CUDA: its gradient scaler exists only there, and on CPU accelerate would silently
    train in float32. ``bf16`` runs on CPU and on CUDA GPUs that support it (Ampere and later).
    """
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"Parameter `amp: fp16` needs a CUDA device; this run is on `{device}`. Fix: `amp: bf16` (CPU and "
            "recent GPUs) or `amp: no`, or `device: cuda`."
        )
    if amp == "bf16" and device.type == "cuda":
        supported = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
        if not supported:
            raise ConfigError(
                f"Parameter `amp: bf16` but the GPU on `{device}` has no bfloat16 support (it needs compute "
                "capability 8.0 or later). Fix: `amp: fp16` (with gradient scaling) or `amp: no`."
            )


@dataclass(frozen=True)
class LoaderSettings:
    """What :class:`torch.utils.data.DataLoader` gets for a run's loaders."""

    num_workers: int
    pin_memory: bool

    def as_kwargs(self) -> dict:
        return {"num_workers": self.num_workers, "pin_memory": self.pin_memory}


def cpu_count() -> int:
    """CPUs this process may use (its affinity mask, e.g. a SLURM allocation), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def loader_settings(
    num_workers: int | str, pin_memory: bool | str, device: torch.device | str, *, cpus: int | None = None
) -> LoaderSettings:
    """The DataLoader settings of ``num_workers`` / ``pin_memory`` (``auto`` or a value) on ``device``.

    ``auto`` workers: 0 on CPU (the project's CPU results), ``min(8, cpus)`` on CUDA. ``auto`` pinned memory:
    on CUDA only. Pinned memory asked for on a CPU run is dropped (it only speeds copies to a GPU).
    """
    kind = torch.device(device).type
    cuda = kind == "cuda"
    if num_workers == "auto":
        workers = min(MAX_AUTO_WORKERS, cpu_count() if cpus is None else cpus) if cuda else 0
    else:
        workers = int(num_workers)
    pin = cuda if pin_memory == "auto" else bool(pin_memory) and cuda
    return LoaderSettings(num_workers=workers, pin_memory=pin)
