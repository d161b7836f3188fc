"""Grid executors: `local` (worker processes) and `slurm` / `submitit-local` through submitit.

The SLURM path is tested with submitit's own ``LocalExecutor`` (real submitit, real subprocesses):
the same jobs as on a cluster, one subprocess each. The SLURM side itself (sbatch options, the job
array) is checked against a stand-in ``sbatch`` / ``srun`` that records what submitit submits.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import cloudpickle
import pandas as pd
import pytest

from tests.conftest import tiny
from tests.test_ablations import FAILING, GOOD, _calls, _grid_file, fake_run, grid_setup
from tfg_mm import ablations, reporting
from tfg_mm.config import load_params
from tfg_mm.errors import ConfigError
from tfg_mm.training import contract, identity
from tfg_mm.training.baseline import run_baseline
from tfg_mm.training.phase2 import run_phase2
from tfg_mm.workflow.parameters import notebook_params

# The units below run inside submitit's job processes: pickled by value (this test module is not
# importable there); `fake_run` comes by reference from tests.test_ablations.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture()
def setup(tmp_path):  # the grid fixture of tests/test_ablations.py (a tiny COCO set, a stand-in baseline)
    return grid_setup(tmp_path)


MINILM = GOOD.split("  - name: noisy")[0]
DIES = "  - name: killed\n    overrides: {lr_fusion: 0.003}\n"


def dying_run(parameters: dict, run_dir: Path) -> None:
    """fake_run, except that variant `killed` takes its job's process down (like a node failure or
    the OOM killer): no result, no failure record from inside the job."""
    if parameters.get("lr_fusion") == 0.003:
        os._exit(9)
    fake_run(parameters, run_dir)


def _fake_slurm(bin_dir: Path, record: Path) -> None:
    """Stand-ins for SLURM's client commands: ``sbatch`` keeps the script it is given and answers
    like SLURM; ``srun`` exists (submitit looks for it to detect a cluster)."""
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f'#!/bin/sh\ncp "$1" "{record}"\necho "Submitted batch job 4242"\n')
    srun = bin_dir / "srun"
    srun.write_text("#!/bin/sh\nexit 0\n")
    for exe in (sbatch, srun):
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


def test_slurm_parameters_reach_submitit_and_the_sbatch_script(tmp_path, monkeypatch):
    script = tmp_path / "submitted.sh"
    _fake_slurm(tmp_path / "bin", script)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    settings = ablations.executor_settings(
        {
            "executor": "slurm",
            "slurm_partition": "gpu",
            "slurm_gpus_per_run": 2,
            "slurm_cpus_per_run": 8,
            "slurm_mem_gb": 64,
            "slurm_time_min": 600,
            "slurm_array_parallelism": 3,
            "slurm_sbatch": {"account": "mylab", "qos": "high"},
            "slurm_log_dir": str(tmp_path / "logs"),
        }
    )
    executor = ablations.make_executor(settings)
    assert executor.cluster == "slurm"
    parameters = executor._executor.parameters  # what submitit will write into the sbatch script
    assert parameters["partition"] == "gpu" and parameters["gpus_per_node"] == 2
    assert parameters["cpus_per_task"] == 8 and parameters["mem"] == "64GB" and parameters["time"] == 600
    assert parameters["array_parallelism"] == 3
    assert parameters["additional_parameters"] == {"account": "mylab", "qos": "high"}
    # a real submission of a 5-run array to the stand-in sbatch: the script SLURM would get
    jobs = executor.map_array(len, [[0]] * 5)
    assert [j.job_id for j in jobs] == [f"4242_{k}" for k in range(5)]
    text = script.read_text()
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB",
        "#SBATCH --time=600",
        "#SBATCH --array=0-4%3",
        "#SBATCH --account=mylab",
        "#SBATCH --qos=high",
    ):
        assert line in text, line
    assert str(tmp_path / "logs") in text  # the logs go to slurm_log_dir/<job id>/


def test_slurm_without_a_partition_or_sbatch_is_refused_before_any_run(setup, monkeypatch):
    tmp_path, params_file = setup
    grid = _grid_file(tmp_path, GOOD)
    out = tmp_path / "ablations"
    kwargs = dict(params_file=params_file, run_variant=fake_run, progress=False)
    with pytest.raises(ConfigError) as err:
        ablations.run_grid(grid, out, executor={"executor": "slurm"}, **kwargs)
    assert "`slurm_partition`" in str(err.value) and "sinfo" in str(err.value) and "grid.yaml" in str(err.value)
    monkeypatch.setenv("PATH", str(tmp_path / "no_slurm_here"))  # no sbatch / srun on PATH
    with pytest.raises(ConfigError) as err:
        ablations.run_grid(grid, out, executor={"executor": "slurm", "slurm_partition": "gpu"}, **kwargs)
    message = str(err.value)
    assert "sbatch" in message and "login node" in message and "executor: local" in message
    assert _calls(out, "minilm") == 0 and not (out / "grid.json").exists()


def test_notebook03_parameters_reach_the_executor(setup):
    """`papermill notebooks/03_ablations.ipynb -p executor slurm ...` injects names the parameters
    cell does not list: run_from_notebook passes them on (here: refused for the missing partition)."""
    tmp_path, params_file = setup
    namespace = {
        "params_file": str(params_file),
        "grid": str(_grid_file(tmp_path, GOOD)),
        "baseline": str(tmp_path / "baseline"),
        "run_dir": str(tmp_path / "ablations"),
        "executor": "slurm",
        "slurm_time_min": 30,
    }
    with pytest.raises(ConfigError, match="`slurm_partition`"):
        ablations.run_from_notebook(namespace, run_variant=fake_run, progress=False)
    namespace["executor"] = "submitit_local"
    with pytest.raises(ConfigError, match='did you mean "submitit-local"'):
        ablations.run_from_notebook(namespace, run_variant=fake_run, progress=False)
    assert _calls(tmp_path / "ablations", "minilm") == 0


def test_executor_keys_in_a_grid_file_are_validated_and_explicit_values_win(setup):
    tmp_path, params_file = setup
    path = _grid_file(tmp_path, GOOD)
    path.write_text("executor: slrum\n" + path.read_text())
    with pytest.raises(ConfigError) as err:
        ablations.load_ablation_grid(path)
    assert str(path) in str(err.value) and 'did you mean "slurm"' in str(err.value)
    path.write_text(path.read_text().replace("slrum", "slurm\nslurm_sbatch: {account: [a, b]}"))
    with pytest.raises(
        ConfigError, match=r"grid\.yaml: `slurm_sbatch` = .*each sbatch option takes one value.*`account`"
    ):
        ablations.load_ablation_grid(path)
    path.write_text(
        path.read_text().replace("slurm_sbatch: {account: [a, b]}", "slurm_partition: gpu\nslurm_time_min: 30")
    )
    grid = ablations.load_ablation_grid(path)
    assert grid["executor_settings"] == {"executor": "slurm", "slurm_partition": "gpu", "slurm_time_min": 30}
    settings = ablations.executor_settings(grid["executor_settings"], {"executor": "local"})
    assert settings["executor"] == "local" and settings["slurm_time_min"] == 30  # notebook 03's value wins
    # local runs exactly as before: the record says where the runs executed; no job, no submitit folder
    record = ablations.run_grid(
        grid, tmp_path / "ablations", params_file=params_file, run_variant=fake_run, progress=False,
        executor={"executor": "local"},
    )  # fmt: skip
    assert record["settings"]["executor"]["executor"] == "local"
    assert {r["status"] for r in record["runs"]} == {"finished"} and not any("job" in r for r in record["runs"])
    # where a run executes is not part of its id: the same run, reused whatever the executor
    p = load_params(params_file, {"executor": "slurm", "slurm_partition": "gpu", "slurm_sbatch": {"qos": "x"}})
    code = identity.code_version()
    assert identity.run_id(p, "data", code) == identity.run_id(load_params(params_file), "data", code)


@pytest.mark.slow
def test_submitit_local_jobs_give_the_same_table_as_local_and_record_dead_jobs(setup, capsys):
    """The acceptance check with a stand-in unit: the same grid through `local` and through submitit's
    LocalExecutor (a subprocess per run) gives the same table; a failing run is recorded the same way,
    a job whose process died is recorded with submitit's error and its logs, and a rerun reuses."""
    tmp_path, params_file = setup
    kwargs = dict(params_file=params_file, bootstrap_resamples=40)
    local = ablations.run_grid(
        _grid_file(tmp_path, MINILM + FAILING), tmp_path / "local", run_variant=fake_run, **kwargs
    )
    logs = tmp_path / "runs" / "slurm"
    submitit_local = {"executor": "submitit-local", "slurm_log_dir": str(logs), "slurm_cpus_per_run": 1}
    grid = _grid_file(tmp_path, MINILM + FAILING + DIES, name="dies.yaml")  # + a run whose job dies
    capsys.readouterr()
    jobs = ablations.run_grid(grid, tmp_path / "jobs", run_variant=dying_run, executor=submitit_local, **kwargs)
    printed = capsys.readouterr().out
    assert "[ablations] submitted 3 run(s) to submitit-local" in printed
    assert "[ablations] no_text seed 0: failed in" in printed and "RuntimeError: boom" in printed

    def strip(record):
        return [{k: r[k] for k in ("variant", "seed", "status", "run_id")} | {"error": r.get("error")} for r in record]

    assert strip(jobs["runs"][:2]) == strip(local["runs"])  # same plan, same run ids, same failure
    for run in jobs["runs"]:
        assert Path(run["job"]["stdout"]).is_file() and Path(run["job"]["stdout"]).is_relative_to(logs)
    table = {name: reporting.ablation_table(ablations.summarize(tmp_path / name), "val") for name in ("local", "jobs")}
    shared = table["jobs"][table["jobs"]["variant"] != "killed"].reset_index(drop=True)
    pd.testing.assert_frame_equal(table["local"], shared)
    assert table["local"].loc[table["local"]["variant"] == "minilm", "mAP"].notna().all()

    # the job that died (node failure, OOM kill: its process ended without a result) is recorded failed
    killed = jobs["runs"][2]
    assert (killed["variant"], killed["status"]) == ("killed", "failed") and killed["job"]["died"] is True
    assert killed["error"].startswith("UncompletedJobError") and Path(killed["job"]["stderr"]).is_file()
    failure = json.loads((tmp_path / "jobs" / "killed" / "seed0" / "failure.json").read_text())
    assert failure["job"] == killed["job"] and "UncompletedJobError" in failure["error"]
    assert "killed seed 0: failed in 0 s (job " in printed and "log: " in printed

    # a rerun (here by the local executor: where a run executed is not part of its run id) reuses
    # every finished run and runs the failed ones again
    again = ablations.run_grid(grid, tmp_path / "jobs", run_variant=fake_run, progress=False, **kwargs)
    assert {r["variant"]: r["status"] for r in again["runs"]} == {
        "minilm": "reused",
        "no_text": "failed",
        "killed": "finished",
    }
    assert (_calls(tmp_path / "jobs", "minilm"), _calls(tmp_path / "jobs", "no_text")) == (1, 2)


def real_phase2_run(parameters: dict, run_dir: Path) -> None:
    """A real phase-2 training (run_phase2, one step) in place of notebook 02's papermill execution."""
    run_phase2(notebook_params(dict(parameters)), progress=False)


@pytest.mark.slow
def test_real_training_gives_the_same_numbers_through_submitit_local(tiny_dataset, tmp_path):
    """Same seeds -> same numbers: two one-step phase-2 variants of a real (untrained) atto baseline,
    trained in this process (`executor: local`) and in submitit job processes (`submitit-local`)."""
    common = tiny(tiny_dataset, max_steps_per_epoch=1, device="cpu", lr_warmup_steps=0)
    run_baseline(load_params(common, {"run_dir": str(tmp_path / "baseline"), "epochs": 0}), progress=False)
    params_file = tmp_path / "phase2.yaml"
    params_file.write_text(
        "".join(f"{k}: {json.dumps(v)}\n" for k, v in common.items())
        + f"baseline: {tmp_path / 'baseline'}\nepochs: 1\nwarmup_epochs: 0\nunfreeze: heads\nlr_detector: 0.01\n"
    )
    grid = _grid_file(
        tmp_path,
        "  - name: random\n    overrides: {text_encoder: random, alpha: 0.5}\n"
        "  - name: none\n    overrides: {text_encoder: none}\n",
        hard="",
    )
    kwargs = dict(params_file=params_file, bootstrap_resamples=20, run_variant=real_phase2_run, progress=False)
    ablations.run_grid(grid, tmp_path / "local", **kwargs)
    jobs = ablations.run_grid(
        grid,
        tmp_path / "jobs",
        executor={"executor": "submitit-local", "slurm_log_dir": str(tmp_path / "logs"), "slurm_cpus_per_run": 1},
        **kwargs,
    )
    assert {r["status"] for r in jobs["runs"]} == {"finished"}
    for variant in ("random", "none"):
        a = contract.read_metrics(tmp_path / "local" / variant / "seed0")
        b = contract.read_metrics(tmp_path / "jobs" / variant / "seed0")
        assert isinstance(a["history"][-1]["loss"], float) and a["run_id"] == b["run_id"]
        numbers = [[{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]] for r in (a, b)]
        assert numbers[0] == numbers[1] and a["final"]["map"] == b["final"]["map"]  # every loss, every AP
    table = {name: reporting.ablation_table(ablations.summarize(tmp_path / name), "val") for name in ("local", "jobs")}
    pd.testing.assert_frame_equal(table["local"], table["jobs"])
