"""The command line in a real subprocess, for the fault tests (``test_faults_resume``, ``test_faults_stop``): a
small resumable run's parameters, the command (optionally with a fault of ``tests/fault_inject.py``), its contract.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO_ROOT, TINY

#: 3 epochs of 2 steps (batch 4 of 12 images), 2 validation batches (6 images) per evaluation; EMA
#: and augmentation on, so that every RNG and the EMA must be restored for the histories to match.
RUN = {**TINY, "epochs": 3, "max_steps_per_epoch": 2, "ema": True, "ema_warmup": 5, "augment": True}


def params_file(tmp_path: Path, dataset: Path, run_dir: Path, **overrides) -> Path:
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump({**RUN, "dataset": str(dataset), "run_dir": str(run_dir), **overrides}))
    return path


def env(**extra: str) -> dict:
    """One thread (numbers independent of the machine's cores), offline, plus ``extra`` variables."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def argv(args: list[str], fault: tuple[str, int] | None = None) -> list[str]:
    prefix = ["-m", "tests.fault_inject", fault[0], str(fault[1]), "--"] if fault else ["-m", "tfg_mm"]
    return [sys.executable, *prefix, *args]


def cli(args: list[str], fault: tuple[str, int] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv(args, fault), cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def contract(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in history]


def reference_run(dataset: Path, tmp: Path) -> dict:
    """The uninterrupted run a stopped, killed or resumed run must reproduce: its contract."""
    done = cli(["train", "--params", str(params_file(tmp, dataset, tmp / "clean"))])
    assert done.returncode == 0, done.stderr[-3000:]
    return contract(tmp / "clean")
