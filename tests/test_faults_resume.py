"""Process faults, with real subprocesses: a run killed anywhere resumes to the same history; a
resume with other params is refused; a crash is recorded as ``status: failed``.

Faults are injected by ``tests/fault_inject.py`` (it patches one library function in the child
process, then runs the real command line); the library carries no test hooks.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from tests import cli_runs
from tests.conftest import TINY
from tfg_mm.ablations import run_grid
from tfg_mm.config import load_params
from tfg_mm.data.synthetic import generate
from tfg_mm.errors import ConfigError
from tfg_mm.training.baseline import run_baseline
from tfg_mm.training.phase2 import run_phase2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory) -> dict:
    """The uninterrupted run every resumed run must reproduce."""
    return cli_runs.reference_run(tiny_dataset, tmp_path_factory.mktemp("reference"))


@pytest.mark.parametrize(
    ("fault", "n", "last_saved"),
    [
        ("step", 4, 1),  # the second step of epoch 2 (loss calls 1-2: epoch 1, 3-4: epoch 2)
        ("save", 2, 1),  # writing the state of epoch 2: its temporary file is complete, not yet renamed
        ("eval", 6, 1),  # the second validation batch of epoch 2's evaluation (calls 1-2: epoch 0)
    ],
)
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_history(
    reference, tiny_dataset, tmp_path, fault, n, last_saved
):
    run_dir = tmp_path / f"killed_{fault}"
    params_file = cli_runs.params_file(tmp_path, tiny_dataset, run_dir)
    killed = cli_runs.cli(["train", "--params", str(params_file)], fault=(fault, n))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert cli_runs.contract(run_dir)["status"] == "running"
    state = torch.load(run_dir / "state" / "last.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == last_saved  # the fault hit epoch 2: the state of epoch 1 is what is left
    if fault == "save":  # killed inside the atomic write: the new state exists only as a temporary file
        assert list((run_dir / "state").glob(".last.pt.*.tmp"))

    resumed = cli_runs.cli(["train", "--params", str(params_file)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    contract = cli_runs.contract(run_dir)
    assert contract["status"] == "finished"
    assert [e["epoch"] for e in contract["history"]] == [0, 1, 2, 3]
    assert cli_runs.without_seconds(contract["history"]) == cli_runs.without_seconds(
        reference["history"]
    )  # metrics, losses, lr
    assert contract["final"] == reference["final"] | {"checkpoint": contract["final"]["checkpoint"]}
    assert contract["run_id"] == reference["run_id"]
    assert not list((run_dir / "state").glob(".last.pt.*.tmp"))  # the killed write's leftover is gone


def test_resume_with_other_params_or_data_is_refused_before_any_work(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    params_file = cli_runs.params_file(tmp_path, tiny_dataset, run_dir)
    killed = cli_runs.cli(["train", "--params", str(params_file)], fault=("step", 3))  # first step of epoch 2
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    before = {p: p.read_bytes() for p in (run_dir / "metrics.json", run_dir / "state" / "last.pt")}

    refused = cli_runs.cli(["train", "--params", str(params_file), "lr=0.0001", "seed=7"])
    assert refused.returncode == 2, refused.stderr[-3000:]
    message = refused.stderr
    assert "`lr`: 0.001 -> 0.0001" in message and "`seed`: 0 -> 7" in message, message
    assert "overwrite: true" in message and "run_dir" in message and str(run_dir) in message
    assert {p: p.read_bytes() for p in before} == before  # nothing was touched

    # another dataset (here: other images, and one class fewer) is refused by the same check, not by
    # a size mismatch when the state is loaded
    other = generate(tmp_path / "other", seed=5, n_train=12, n_val=6, image_size=160, progress=False)
    for split in ("train", "val"):
        path = other / f"instances_{split}.json"
        coco = json.loads(path.read_text())
        dropped = coco["categories"][-1]["id"]
        coco["categories"] = coco["categories"][:-1]
        coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] != dropped]
        path.write_text(json.dumps(coco))
    values = {**cli_runs.RUN, "dataset": str(other), "run_dir": str(run_dir)}
    with pytest.raises(ConfigError) as err:
        run_baseline(load_params(values), progress=False)
    assert "`dataset`" in str(err.value) and "dataset content hash" in str(err.value)
    assert {p: p.read_bytes() for p in before} == before

    # the same params resume it
    resumed = cli_runs.cli(["train", "--params", str(params_file)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert cli_runs.contract(run_dir)["params"]["lr"] == 0.001


def test_a_crash_is_recorded_as_failed_and_an_unfinished_baseline_is_refused(tiny_dataset, tmp_path):
    run_dir = tmp_path / "baseline"
    params_file = cli_runs.params_file(tmp_path, tiny_dataset, run_dir)
    crashed = cli_runs.cli(["train", "--params", str(params_file)], fault=("raise", 3))  # first step of epoch 2
    assert crashed.returncode != 0
    assert "injected fault" in crashed.stderr
    contract = cli_runs.contract(run_dir)
    assert contract["status"] == "failed"
    failure = contract["failure"]
    assert failure["type"] == "RuntimeError" and "injected fault" in failure["message"]
    assert (failure["epoch"], failure["step"], failure["stage"]) == (2, 0, "train")
    assert [e["epoch"] for e in contract["history"]] == [0, 1]  # nothing already written is lost
    assert "injected fault" in (run_dir / failure["traceback"]).read_text()
    state = torch.load(run_dir / "state" / "last.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 1  # the last good checkpoint stays loadable
    assert (run_dir / "checkpoints" / "best").is_dir()

    # phase 2 and the grid refuse it, naming the run and the fix; nothing runs
    base = {"dataset": str(tiny_dataset), "baseline": str(run_dir), "text_encoder": "none", "epochs": 1}
    with pytest.raises(ConfigError) as err:
        run_phase2(load_params({**TINY, **base, "run_dir": str(tmp_path / "p2")}), progress=False)
    assert str(run_dir) in str(err.value) and "status failed" in str(err.value) and "Fix:" in str(err.value)
    assert not (tmp_path / "p2").exists()
    grid = tmp_path / "grid.yaml"
    grid.write_text("description: t\nbase: {}\nseeds: [0]\nvariants:\n  - name: none\n    overrides: {}\n")
    calls = []
    with pytest.raises(ConfigError) as err:
        run_grid(grid, tmp_path / "ablations", params_file=None, explicit=base, run_variant=lambda *a: calls.append(a))
    assert "not finished" in str(err.value) and not calls

    # rerunning the same command resumes the failed run from its last good epoch and finishes it
    resumed = cli_runs.cli(["train", "--params", str(params_file)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    contract = cli_runs.contract(run_dir)
    assert contract["status"] == "finished" and "failure" not in contract


def test_a_finished_run_is_not_overwritten_and_the_refusal_lists_what_differs(tiny_params):
    params = tiny_params(epochs=1)
    run_baseline(params, progress=False)
    before = (Path(params.run_dir) / "metrics.json").read_bytes()
    with pytest.raises(ConfigError) as err:
        run_baseline(tiny_params(epochs=1, lr=5e-4), progress=False)
    assert "overwrite: true" in str(err.value) and "`lr`: 0.001 -> 0.0005" in str(err.value)
    assert (Path(params.run_dir) / "metrics.json").read_bytes() == before


def test_a_state_of_another_run_is_never_loaded(tiny_params):
    """The trainer's own check, behind the experiment's: a state file carries its run id."""
    params = tiny_params(epochs=2, max_steps_per_epoch=1)
    run_dir = Path(params.run_dir)
    run_baseline(params, progress=False)
    contract = cli_runs.contract(run_dir)
    (run_dir / "metrics.json").write_text(json.dumps({**contract, "status": "running", "final": None}))
    state_file = run_dir / "state" / "last.pt"
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    assert state["run_id"] == contract["run_id"]
    torch.save({**state, "run_id": "0" * 16}, state_file)  # e.g. copied over from another run folder
    with pytest.raises(ConfigError, match="belongs to another run"):
        run_baseline(params, progress=False)
    assert torch.load(state_file, map_location="cpu", weights_only=False)["run_id"] == "0" * 16  # untouched
