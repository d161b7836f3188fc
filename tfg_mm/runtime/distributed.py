"""Data parallelism across processes: the few collective operations the training loop needs.

A run started by ``torchrun --nproc_per_node N`` or ``accelerate launch --multi_gpu --num_processes N``
has N processes (ranks); accelerate's ``Accelerator`` opens the process group (gloo on CPU, NCCL on
GPUs) and :mod:`tfg_mm.training.loop` uses these helpers on it. Every helper is a no-op (returns its input)
in a single process, so a one-process run executes exactly the code it always did.

What the loop does with them, and why not ``DistributedDataParallel``:

- **Gradients** are averaged over the ranks after every backward pass (:func:`average_gradients`:
  one flat all-reduce of every trainable parameter's gradient), before clipping and the optimiser
  step: the same average DDP computes, so every rank takes the same step. DDP is not used because
  phase 2 changes the trainable set between its stages (DDP fixes it when it wraps the model) and
  its cached stage A never calls the model's ``forward`` (DDP reduces through hooks set up there).
- **Buffers** (BatchNorm running statistics) are averaged after every step (:func:`average_buffers`;
  DDP would copy rank 0's): the running mean then equals the one-process run's, the EMA and the
  evaluated weights are identical on every rank.
- The **loss normaliser** (the number of target boxes) is averaged over the ranks inside the
  criterion (:mod:`tfg_mm.detector.loss`), as the official DEIM criterion does.
- A **non-finite** value on one rank is made known to every rank (:func:`any_rank`) so that all of
  them stop with the same error instead of waiting for each other in the next collective.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def initialized() -> bool:
    """True inside a process group of more than one process."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1


def world_size() -> int:
    """Number of processes of the run (1 without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``, set by torchrun and accelerate launch), before
    any process group exists."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _device_of(tensors: Iterable[torch.Tensor]) -> torch.device:
    for t in tensors:
        return t.device
    return torch.device("cpu")


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True when ``flag`` is true on any rank (a collective: every rank must call it)."""
    if not initialized():
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=device or _collective_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)


def _collective_device() -> torch.device:
    """The device collectives run on: the current CUDA device under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects; ``[obj]`` in one process)."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in one process)."""
    if not initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if initialized():
        torch.distributed.barrier()


def _flat_average(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The mean over the ranks of each tensor, through one all-reduce of their concatenation."""
    flat = _flatten_dense_tensors(tensors)
    torch.distributed.all_reduce(flat)
    flat /= world_size()
    return list(_unflatten_dense_tensors(flat, tensors))


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over the ranks (what DDP does after backward).

    A parameter that got no gradient on a rank contributes zeros there; one that got none on any rank
    keeps ``grad = None`` (the optimiser skips it, as it would in one process). Every rank must pass
    the same parameters in the same order (the optimiser's groups: built by the same code).
    """
    if not initialized():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=grads[0].device)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, g in enumerate(grads):
        by_dtype.setdefault(g.dtype, []).append(i)
    averaged: list[torch.Tensor | None] = [None] * len(grads)
    for indices in by_dtype.values():
        for i, g in zip(indices, _flat_average([grads[i] for i in indices])):
            averaged[i] = g
    torch.distributed.all_reduce(present)
    for p, g, seen in zip(params, averaged, present.tolist()):
        if seen > 0:
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        else:
            p.grad = None


def average_buffers(module: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) of ``module`` over the ranks."""
    if not initialized():
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in buffers:
        by_dtype.setdefault(b.dtype, []).append(b)
    for group in by_dtype.values():
        for b, mean in zip(group, _flat_average([b.data for b in group])):
            b.data.copy_(mean)


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Rank ``src``'s parameters and buffers on every rank (as DDP does when it wraps a model)."""
    if not initialized():
        return
    for t in [*module.parameters(), *module.buffers()]:
        torch.distributed.broadcast(t.data, src=src)


def merge_detection_shards(shards: list[list[tuple[int, list[dict]]]], num_images: int) -> list[dict]:
    """The detections of every validation image exactly once, in the dataset's order.

    ``shards``: per rank, ``(dataset index, detections of that image)`` for each image the rank predicted
    (a sampler that pads its last batch repeats images: those duplicates are dropped, the first kept).
    The result is the one-process detection list (images in dataset order). An image that no rank
    predicted, or an index outside ``0 .. num_images - 1``, is a ``ValueError`` naming it.
    """
    per_image: dict[int, list[dict]] = {}
    for shard in shards:
        for index, dets in shard:
            per_image.setdefault(int(index), dets)
    missing = [i for i in range(num_images) if i not in per_image]
    unknown = sorted(i for i in per_image if not 0 <= i < num_images)
    if missing or unknown:
        raise ValueError(
            f"merging the evaluation shards of {len(shards)} processes: validation images (dataset indices) not "
            f"predicted by any process {missing[:5]}, indices outside the {num_images} validation images {unknown[:5]}"
        )
    return [det for i in range(num_images) for det in per_image[i]]
