"""Run ``python -m tfg_mm`` with one process fault injected: ``python tests/fault_inject.py FAULT N -- ARGS``.

Used by ``tests/test_faults_resume.py`` through a real subprocess; the library has no test hooks.
This script patches one real function of the library before running the real command line, and
the fault fires on that function's N-th call (1-based, counted over the whole process):

* ``step``: SIGKILL during a training step (inside the task's loss: the forward pass of step N);
* ``save``: SIGKILL while the resumable state is written: inside the real atomic write of
  ``state/last.pt``, after its temporary file is complete and just before the rename (N-th state);
* ``eval``: SIGKILL during an evaluation (the N-th predicted validation batch);
* ``raise``: a ``RuntimeError`` raised from the loss of step N (an ordinary crash, not a kill);
* ``pause``: at training step N the process writes the file named by ``TFG_MM_PAUSE_MARKER`` and sleeps, so that
  a test can send it a signal (or a Ctrl-C, or start a second process) at a known point of the run;
* ``enospc``: the N-th checkpoint write finds the disk full (safetensors' own error text, as a full disk gives it).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

FAULTS = ("step", "save", "eval", "raise", "pause", "enospc")


def _kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(fault: str, n: int) -> None:
    from tfg_mm.training import baseline
    from tfg_mm.training import loop as train

    calls = {"n": 0}

    def due() -> bool:
        calls["n"] += 1
        return calls["n"] == n

    if fault in ("step", "raise", "pause"):
        real_loss = baseline.BaselineTask.loss

        def loss(self, model, batch, epoch):
            if due():
                if fault == "raise":
                    raise RuntimeError(f"injected fault at training step call {n}")
                if fault == "pause":
                    Path(os.environ["TFG_MM_PAUSE_MARKER"]).write_text(str(os.getpid()))
                    time.sleep(120)
                else:
                    _kill()
            return real_loss(self, model, batch, epoch)

        baseline.BaselineTask.loss = loss
    elif fault == "enospc":
        import transformers.modeling_utils as modeling_utils
        from safetensors import SafetensorError

        real_save = modeling_utils.safe_save_file

        def save_file(*args, **kwargs):
            if due():
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real_save(*args, **kwargs)

        modeling_utils.safe_save_file = save_file
    elif fault == "save":
        real_write = train.atomic_write_bytes  # the name save_state writes state/last.pt with

        def write(path, data):
            if not due():
                return real_write(path, data)
            real_replace = os.replace

            def replace(src, dst):  # the temporary file is complete: die before it replaces last.pt
                _kill()

            os.replace = replace
            try:
                return real_write(path, data)
            finally:
                os.replace = real_replace

        train.atomic_write_bytes = write
    elif fault == "eval":
        real_predict = baseline.BaselineTask.predict_fn

        def predict_fn(self, model):
            fn = real_predict(self, model)

            def wrapped(pixel_values):
                if due():
                    _kill()
                return fn(pixel_values)

            return wrapped

        baseline.BaselineTask.predict_fn = predict_fn
    else:
        raise SystemExit(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[2] != "--":
        raise SystemExit("usage: fault_inject.py FAULT N -- <python -m tfg_mm arguments>")
    install(argv[0], int(argv[1]))
    from tfg_mm.cli import main as cli_main

    return cli_main(argv[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
