"""What makes a run repeatable and where it computes: every random generator seeded (and their states saved
and restored on resume), and accelerate's ``Accelerator`` for the run's device and mixed precision."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from tfg_mm.runtime import distributed


def seed_everything(seed: int, deterministic: bool = True, rank: int = 0) -> torch.Generator:
    """Seed python, numpy and torch; return the generator that drives data shuffling.

    ``rank`` (several processes): the global generators (augmentation, denoising noise) get ``seed + rank``,
    the data-order generator ``seed`` on every rank, so that all ranks cut the same global batches.
    """
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def rng_state(loader_gen: torch.Generator) -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "loader": loader_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, loader_gen: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    loader_gen.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_accelerator(device: torch.device, amp: str) -> Accelerator:
    """accelerate's ``Accelerator`` on ``device`` (from :func:`tfg_mm.runtime.devices.resolve_device`) with mixed precision ``amp``.

    ``cuda:N`` becomes the current CUDA device (accelerate places a single process on the current one).
    accelerate keeps one state per process and refuses (or, for the device, ignores) another mixed precision
    or device in a later ``Accelerator``; in a single process (a notebook running phase 1 with ``amp: no``,
    then phase 2 with ``amp: bf16``) that state is reset first, so each run gets what its params say.
    """
    if device.type == "cuda" and device.index is not None and distributed.launched_world_size() == 1:
        torch.cuda.set_device(device)  # several processes: accelerate puts rank r on cuda:LOCAL_RANK
    state = AcceleratorState._shared_state
    if state and state.get("num_processes", 1) == 1:
        if state.get("_mixed_precision") != amp or getattr(state.get("device"), "type", None) != device.type:
            AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=device.type == "cpu", mixed_precision=amp)
