"""Data parallelism (tfg_mm.runtime.distributed, the Trainer under torchrun): real processes, gloo on CPU.

The equivalence test runs the real command line through ``tests/ddp_driver.py`` twice: one process
with a batch of 4 (plain ``python``) and two processes with 2 each (``torchrun --standalone``),
same seed, no augmentation. The driver switches off the two differences that are not about data
parallelism (denoising noise drawn per process; BatchNorm batch statistics over 2 instead of 4
images, see README "Several processes / GPUs") and records every step's loss on every rank.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, TINY
from tfg_mm import paths
from tfg_mm.runtime import distributed
from tfg_mm.training import contract, identity, runs

#: Relative tolerance of a step's loss (1 process, batch 4) vs the mean over 2 processes (batch 2 each).
#: Measured: at most 4e-7 over 6 steps (float32 sums taken in another order); 1e-5 leaves room for
#: other CPUs' kernels while a real difference (a wrong shard, an unaveraged gradient) is > 1e-2.
LOSS_RTOL = 1e-5


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _overrides(dataset, run_dir, **values) -> list[str]:
    settings = {**TINY, "dataset": str(dataset), "run_dir": str(run_dir), "epochs": 2, "max_steps_per_epoch": 3}
    settings.update(values)
    return [f"{k}={v}" for k, v in settings.items()]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=240)


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]


def _accelerate_launch(n: int) -> list[str]:
    """``accelerate launch`` with the flags that start n CPU processes (``--cpu`` would start one: README)."""
    return [
        *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={n}"),
        *("--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=0"),
    ]


def _steps(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Fast: the pieces
# ----------------------------------------------------------------------------------------------
def test_merge_keeps_each_image_once_in_dataset_order():
    det = lambda i, s: {"image_id": 100 + i, "category_id": 1, "bbox": [0, 0, 1, 1], "score": s}  # noqa: E731
    rank0 = [(0, [det(0, 0.9), det(0, 0.1)]), (2, [det(2, 0.5)]), (4, [])]
    rank1 = [(1, [det(1, 0.7)]), (3, [det(3, 0.3)]), (0, [det(0, 0.2)])]  # (0, ...): a padding duplicate
    merged = distributed.merge_detection_shards([rank0, rank1], 5)
    assert [d["image_id"] for d in merged] == [100, 100, 101, 102, 103]
    assert [d["score"] for d in merged[:2]] == [0.9, 0.1]  # the first copy of image 0 kept, the duplicate dropped
    with pytest.raises(ValueError, match=r"not predicted by any process \[4\]"):
        distributed.merge_detection_shards([rank0[:2], rank1], 5)
    with pytest.raises(ValueError, match=r"outside the 3 validation images \[3, 4\]"):
        distributed.merge_detection_shards([rank0, rank1], 3)


def test_helpers_are_identities_in_one_process():
    import torch

    assert distributed.world_size() == 1 and distributed.rank() == 0 and not distributed.initialized()
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}] and distributed.broadcast_object(3) == 3
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    distributed.average_gradients([p])
    assert p.grad.tolist() == [3.0, 3.0]


def test_the_number_of_processes_is_part_of_the_run_identity():
    assert identity.with_world_size("base", 1) == "base"  # one process: the id of every existing run is unchanged
    assert identity.world_size_of(identity.with_world_size("base", 2)) == 2 and identity.world_size_of("base") == 1
    from tfg_mm.config import load_params

    params = load_params({})
    code = {"package": "x", "git_commit": "c", "source_sha256": "s"}
    old = {"params": params.model_dump(mode="json"), "dataset": {"hash": "h"}, "code_version": code}
    old["run_id"] = identity.run_id(params, "h", code)
    assert identity.run_id(params, "h", code, identity.with_world_size("", 2)) != old["run_id"]
    diff = runs.run_differences(old, params, "h", code, identity.with_world_size("", 2))
    assert diff == ["processes (world size): 1 -> 2 (the global batch is batch_size x processes)"]


# ----------------------------------------------------------------------------------------------
# Slow: real processes
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tiny_dataset, tmp_path):
    driver = str(REPO_ROOT / "tests" / "ddp_driver.py")
    one, two = tmp_path / "one", tmp_path / "two"
    single = _run(
        [sys.executable, driver, str(tmp_path / "s1"), "--", "train", *_overrides(tiny_dataset, one, batch_size=4)]
    )
    assert single.returncode == 0, single.stderr[-3000:]
    double = _run(
        [*_torchrun(2), driver, str(tmp_path / "s2"), "--", "train", *_overrides(tiny_dataset, two, batch_size=2)]
    )
    assert double.returncode == 0, double.stderr[-3000:]

    steps1 = _steps(tmp_path / "s1.0")
    rank0, rank1 = _steps(tmp_path / "s2.0"), _steps(tmp_path / "s2.1")
    assert len(steps1) == len(rank0) == len(rank1) == 6  # 2 epochs x 3 steps, on every rank
    assert {s["images"] for s in steps1} == {4} and {s["images"] for s in rank0 + rank1} == {2}
    for i, (a, b0, b1) in enumerate(zip(steps1, rank0, rank1)):
        mean = (b0["loss"] + b1["loss"]) / 2  # each rank's loss is its share over the mean box count
        assert math.isclose(a["loss"], mean, rel_tol=LOSS_RTOL), (i, a["loss"], mean)
        assert b0["loss"] != b1["loss"]  # the ranks did see different images

    m1, m2 = contract.read_metrics(one), contract.read_metrics(two)
    assert m1["training"] == {"world_size": 1, "batch_size_per_process": 4, "global_batch_size": 4}
    assert m2["training"] == {"world_size": 2, "batch_size_per_process": 2, "global_batch_size": 4}
    assert m1["run_id"] != m2["run_id"]
    for h1, h2 in zip(m1["history"][1:], m2["history"][1:]):  # the logged epoch losses are the global batch's
        assert math.isclose(h1["loss"], h2["loss"], rel_tol=LOSS_RTOL)
    d1 = json.loads((one / paths.DETECTIONS_FILE).read_text())
    d2 = json.loads((two / paths.DETECTIONS_FILE).read_text())
    assert len(d1) == len(d2) == 6 * TINY["top_k"]  # every validation image once (6 images, top_k each)
    assert [d["image_id"] for d in d1] == [d["image_id"] for d in d2]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(d1, d2)) < 1e-5
    # the main process alone wrote the run folder: one progress log, whole lines, a finish line
    progress = [json.loads(line) for line in (two / paths.PROGRESS_FILE).read_text().splitlines()]
    assert [p["event"] for p in progress].count("finish") == 1


@pytest.mark.slow
def test_a_nan_on_one_process_stops_every_process_with_the_same_error(tiny_dataset, tmp_path):
    driver = str(REPO_ROOT / "tests" / "ddp_driver.py")
    run_dir = tmp_path / "run"
    # rank 1's second step sees NaN pixels: its model outputs are NaN, the criterion's guard fires there.
    # Launched by `accelerate launch` (the equivalence test uses torchrun): both launchers are covered.
    cmd = [*_accelerate_launch(2), driver, str(tmp_path / "s"), "nanout:1:2", "--", "train"]
    done = _run([*cmd, *_overrides(tiny_dataset, run_dir, batch_size=2, epochs=1)])
    assert done.returncode != 0
    mark = "error: Training diverged"  # (a progress bar without its newline may stand before it)
    errors = [line[line.index(mark) :] for line in done.stderr.splitlines() if mark in line]
    assert len(errors) == 2 and errors[0] == errors[1], done.stderr[-3000:]  # both ranks, one message
    assert "epoch 1, step 1" in errors[0] and "process 1 of 2: non-finite model output" in errors[0]
    record = json.loads((run_dir / paths.METRICS_FILE).read_text())
    assert record["status"] == "failed" and record["failure"]["type"] == "TrainingError"
    assert record["failure"]["message"] == errors[0].removeprefix("error: ")
    assert [h["epoch"] for h in record["history"]] == [0]  # the epoch-0 evaluation stays
    assert record["training"]["world_size"] == 2  # two processes were started
    assert len(_steps(tmp_path / "s.0")) == len(_steps(tmp_path / "s.1")) == 1  # step 2 raised on both


@pytest.mark.slow
def test_phase2_trains_in_two_processes_with_its_cached_warm_up(tiny_dataset, tmp_path):
    from tfg_mm.config import load_params
    from tfg_mm.training.baseline import run_baseline

    base = tmp_path / "base"
    run_baseline(load_params({**TINY, "dataset": str(tiny_dataset), "run_dir": str(base), "epochs": 1,
                              "max_steps_per_epoch": 1}), progress=False)  # fmt: skip
    run_dir = tmp_path / "phase2"
    phase2 = {"baseline": base, "text_encoder": "minilm", "warmup_epochs": 1, "unfreeze": "heads", "batch_size": 2}
    done = _run([*_torchrun(2), "-m", "tfg_mm", "phase2", *_overrides(tiny_dataset, run_dir, **phase2)])
    assert done.returncode == 0, done.stderr[-3000:]
    record = contract.read_metrics(run_dir)
    assert record["status"] == "finished" and record["training"]["world_size"] == 2
    assert [(h["epoch"], h["stage"]) for h in record["history"]] == [(0, "A"), (1, "A"), (2, "B")]
    assert record["cache_seconds"] > 0  # stage A trained from the main process's feature cache
    assert len(json.loads((run_dir / paths.DETECTIONS_FILE).read_text())) == 6 * TINY["top_k"]
