"""Run ``python -m tfg_mm`` in a form whose 1-process and N-process runs can be compared step by step.

Used by ``tests/test_distributed.py`` through real subprocesses (plain ``python`` and ``torchrun``);
the library has no test hooks. ``python tests/ddp_driver.py STEPS_FILE [nan:RANK:STEP] -- ARGS``:

* the two sources of difference between one process with batch 2b and two with b each that are
  not about data parallelism are switched off: denoising queries (random noise drawn per process)
  and BatchNorm batch statistics (a forward pass normalises over its own b images; the running
  statistics are used instead, as in eval mode);
* every training step's loss and terms are appended to ``STEPS_FILE.<rank>`` (one JSON line a step);
* ``nan:RANK:STEP`` makes the loss of that rank's STEP-th step (1-based) NaN; ``nanout:RANK:STEP`` its
  input pixels (so the model's outputs are NaN and the criterion's guard fires on that rank only);
  ``batchnorm`` keeps BatchNorm's batch statistics (to measure their effect).
"""

from __future__ import annotations

import json
import os
import sys


def install(
    steps_file: str, nan: tuple[int, int] | None, nan_out: tuple[int, int] | None, batchnorm: bool = False
) -> None:
    import torch
    from torch import nn

    from tfg_mm.training import baseline

    rank = int(os.environ.get("RANK", "0"))

    def set_train_mode(self, model):
        model.train()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

    if not batchnorm:
        baseline.BaselineTask.set_train_mode = set_train_mode
    real_loss = baseline.BaselineTask.loss
    calls = {"n": 0}

    def loss(self, model, batch, epoch):
        calls["n"] += 1
        denoising, model.config.num_denoising = model.config.num_denoising, 0  # for the step only (saving checks it)
        if nan_out is not None and nan_out == (rank, calls["n"]):
            batch = {**batch, "pixel_values": batch["pixel_values"] * float("nan")}
        try:
            value, terms = real_loss(self, model, batch, epoch)
        finally:
            model.config.num_denoising = denoising
        if nan is not None and nan == (rank, calls["n"]):
            value = value * torch.tensor(float("nan"))
        with open(f"{steps_file}.{rank}", "a", encoding="utf-8") as handle:
            record = {"loss": float(value.detach()), "terms": terms, "images": len(batch["labels"])}
            handle.write(json.dumps(record) + "\n")
        return value, terms

    baseline.BaselineTask.loss = loss


def main(argv: list[str]) -> int:
    split = argv.index("--")
    steps_file, options = argv[0], argv[1:split]
    faults: dict[str, tuple[int, int]] = {}
    for option in options:
        if option == "batchnorm":
            continue
        kind, r, s = option.split(":")
        faults[kind] = (int(r), int(s))
    install(steps_file, faults.get("nan"), faults.get("nanout"), "batchnorm" in options)
    from tfg_mm.cli import main as cli_main

    return cli_main(argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
