"""Nothing lost: a training process killed after epoch k resumes and ends with the same metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, TINY
from tfg_mm.baseline import run_baseline
from tfg_mm.errors import ConfigError

pytestmark = pytest.mark.slow


def _params_file(tmp_path: Path, dataset: Path, run_dir: Path) -> Path:
    values = {
        **TINY,
        "dataset": str(dataset),
        "run_dir": str(run_dir),
        "epochs": 4,
        "ema": True,
        "augment": True,
        "ema_warmup": 5,
    }
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _train(params_file: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tfg_mm", "train", "--params", str(params_file)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _history(run_dir: Path) -> list[dict]:
    try:
        return json.loads((run_dir / "metrics.json").read_text())["history"]
    except (OSError, ValueError, KeyError):
        return []


def test_killed_run_resumes_to_the_same_metrics(tiny_dataset, tmp_path):
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    proc = _train(_params_file(tmp_path, tiny_dataset, killed_dir))
    deadline = time.time() + 300
    while len(_history(killed_dir)) < 3:  # epochs 0, 1, 2 evaluated
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "training too slow to reach epoch 2"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((killed_dir / "metrics.json").read_text())["status"] == "running"

    resumed = _train(_params_file(tmp_path, tiny_dataset, killed_dir))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    clean = _train(_params_file(tmp_path, tiny_dataset, clean_dir))
    assert clean.wait(timeout=300) == 0, clean.stderr.read()[-3000:]

    a = json.loads((killed_dir / "metrics.json").read_text())
    b = json.loads((clean_dir / "metrics.json").read_text())
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert a["status"] == b["status"] == "finished"
    assert strip(a["history"]) == strip(b["history"])
    assert a["final"]["map"] == b["final"]["map"]


def test_finished_run_is_not_overwritten(tiny_params):
    params = tiny_params(epochs=1)
    run_baseline(params, progress=False)
    before = (Path(params.run_dir) / "metrics.json").read_bytes()
    with pytest.raises(ConfigError) as err:
        run_baseline(tiny_params(epochs=1, lr=5e-4), progress=False)
    assert "overwrite" in str(err.value)
    assert (Path(params.run_dir) / "metrics.json").read_bytes() == before
