"""Where the grid's runs execute: jobs through submitit (SLURM, or submitit's local executor).

``executor: local`` (the default) is :func:`tfg_mm.ablations.grid.run_grid`'s own worker processes.
``executor: slurm`` submits one SLURM job per run (one job array per wave: the baseline seeds, then
the variants) through submitit's ``AutoExecutor``; ``executor: submitit-local`` submits the same
jobs to submitit's ``LocalExecutor`` (a subprocess per run on this machine: how the SLURM path is
tested without a cluster). Either way a job runs the SAME unit as a local run (the grid's
``_execute_run``: the papermill execution of the notebook with that run's params, its failure
record), so reuse, failure recording and the statistics do not depend on the executor. The
submitting process waits for the jobs; a job that dies (time limit, preemption, node failure, out
of memory) is reported with submitit's error text and the job's log files.

Settings (schema keys, group Ablations; a grid file may set them at its top level, notebook 03's
explicit parameters win): ``executor``, ``slurm_partition``, ``slurm_gpus_per_run``,
``slurm_cpus_per_run``, ``slurm_mem_gb``, ``slurm_time_min``, ``slurm_array_parallelism``,
``slurm_sbatch`` (extra sbatch options) and ``slurm_log_dir`` (``<folder>/<job id>/``: the
submission script, pickles, ``*_log.out`` / ``*_log.err``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import submitit

from tfg_mm.config import EXECUTOR_KEYS, AblationParams, load_params
from tfg_mm.errors import ConfigError
from tfg_mm.paths import resolve_path

#: submitit's cluster name of each submitit executor.
SUBMITIT_CLUSTERS = {"slurm": "slurm", "submitit-local": "local"}
#: Seconds between two looks at the running jobs (SLURM's state comes from sacct, cached by submitit).
POLL_SECONDS = {"slurm": 15.0, "submitit-local": 0.5}
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def executor_settings(*layers: Mapping[str, Any], source_names: Sequence[str] = ()) -> dict:
    """The executor settings, later layers win over the schema's defaults (e.g. the grid file, then
    notebook 03's explicit parameters); validated through the schema (an unknown executor name gets
    a "did you mean"). Only :data:`EXECUTOR_KEYS` are taken from each layer."""
    picked = [{k: v for k, v in layer.items() if k in EXECUTOR_KEYS and v is not None} for layer in layers]
    params = load_params(*picked, source_names=list(source_names) or None)
    return {k: getattr(params, k) for k in EXECUTOR_KEYS}


def check_settings(settings: Mapping[str, Any], where: str = "notebook 03 / the grid file") -> None:
    """Refuse, before any run starts, settings that cannot submit: SLURM without a partition or
    without SLURM's commands on this machine."""
    if settings["executor"] != "slurm":
        return
    if not settings["slurm_partition"]:
        raise ConfigError(
            f"{where}: `executor: slurm` needs `slurm_partition` (the SLURM partition of the grid's jobs), "
            "which is empty. Fix: set `slurm_partition: <name>` (`sinfo -s` lists the partitions; the one "
            "marked * is the cluster's default)."
        )
    missing = [cmd for cmd in ("sbatch", "srun") if shutil.which(cmd) is None]
    if missing:
        raise ConfigError(
            f"{where}: `executor: slurm` submits with SLURM's `sbatch` / `srun`, but {', '.join(missing)} "
            "is not on PATH: this machine is not a SLURM login node. Fix: run the grid from the cluster's "
            "login node (with SLURM's client commands, e.g. `module load slurm`), or use `executor: local` "
            "on one machine (`executor: submitit-local` runs the same jobs through submitit locally)."
        )


def make_executor(settings: Mapping[str, Any]) -> submitit.AutoExecutor:
    """submitit's executor of these settings: ``AutoExecutor(cluster="slurm" | "local")`` with the
    resources of one grid run (the ``slurm_*`` keys; submitit ignores them on its local cluster,
    except the time limit, GPUs and CPUs)."""
    check_settings(settings)
    folder = resolve_path(settings["slurm_log_dir"]) / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster=SUBMITIT_CLUSTERS[settings["executor"]])
    executor.update_parameters(
        name="tfg-mm-grid",
        timeout_min=int(settings["slurm_time_min"]),
        mem_gb=float(settings["slurm_mem_gb"]),
        gpus_per_node=int(settings["slurm_gpus_per_run"]),
        cpus_per_task=int(settings["slurm_cpus_per_run"]),
        tasks_per_node=1,
        nodes=1,
        slurm_partition=str(settings["slurm_partition"]),
        slurm_array_parallelism=int(settings["slurm_array_parallelism"]),
        slurm_additional_parameters=dict(settings["slurm_sbatch"]),
    )
    return executor


class RunJob(submitit.helpers.Checkpointable):
    """The body of one job: the run's threads (its kernel inherits them), then the grid's own unit.

    Checkpointable (submitit's convention): when SLURM preempts the job or its time limit nears, submitit calls
    :meth:`checkpoint`, which requeues the same call; the requeued job reruns the unit, whose run resumes from its
    last saved epoch (the run folder keeps its state and its contract says ``interrupted`` or ``running``)."""

    def __call__(self, run_one: Callable[[dict], dict], entry: dict, threads: int) -> dict:
        for var in _THREAD_VARS:
            os.environ[var] = str(threads)
        return run_one(entry)


def job_logs(job: submitit.Job) -> dict:
    """The job's id and log files (stdout, stderr), as recorded for a run."""
    return {"id": str(job.job_id), "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}


def submit_and_wait(
    entries: Sequence[dict],
    run_one: Callable[[dict], dict],
    settings: Mapping[str, Any],
    report: Callable[[str], None] | None = None,
) -> Iterator[tuple[dict, dict | None, BaseException | None, dict]]:
    """Submit one job per entry (``run_one(entry)`` inside the job), wait, and yield each
    ``(entry, result, error, job)`` as its job ends: ``result`` is ``run_one``'s return value, or
    None with ``error`` the exception of a job that died; ``job`` is :func:`job_logs`.

    SLURM gets all entries as one job array (``slurm_array_parallelism`` at once); the local
    executor gets at most ``slurm_array_parallelism`` jobs at a time. An interrupt of the waiting
    process (Ctrl-C) cancels the jobs still queued or running. ``report`` gets one line per
    submitted wave.
    """
    if not entries:
        return
    executor = make_executor(settings)
    kind = settings["executor"]
    cap = len(entries) if kind == "slurm" else int(settings["slurm_array_parallelism"])
    threads = int(settings["slurm_cpus_per_run"])
    queue = list(entries)
    running: list[tuple[submitit.Job, dict]] = []
    try:
        while queue or running:
            free = cap - len(running)
            if queue and free > 0:
                wave, queue = queue[:free], queue[free:]
                jobs = executor.map_array(RunJob(), [run_one] * len(wave), wave, [threads] * len(wave))
                running += list(zip(jobs, wave, strict=True))
                if report is not None:
                    report(
                        f"submitted {len(wave)} run(s) to {kind} (job {jobs[0].job_id.split('_')[0]}, "
                        f"logs under {settings['slurm_log_dir']}/)"
                    )
            ended = [(job, entry) for job, entry in running if job.done()]
            for job, entry in ended:
                running.remove((job, entry))
                try:
                    yield entry, job.result(), None, job_logs(job)
                except Exception as exc:  # the job died (time limit, preemption, node failure, ...)
                    yield entry, None, exc, job_logs(job)
            if running and not ended:
                time.sleep(POLL_SECONDS[kind])
    except BaseException:
        for job, _ in running:
            job.cancel(check=False)
        raise
    finally:
        _remove_empty(resolve_path(settings["slurm_log_dir"]) / "%j")


def _remove_empty(folder) -> None:
    """submitit creates its folder pattern (``<log dir>/%j``) literally too, and leaves it empty."""
    try:
        folder.rmdir()
    except OSError:  # absent, or not empty
        pass


#: Schema defaults of the settings (what a run gets when neither the grid file nor notebook 03 sets one).
DEFAULTS = {k: getattr(AblationParams(), k) for k in EXECUTOR_KEYS}
