"""The ablation grid of notebook 03: every variant × seed as a papermill run of notebook 02, then statistics.

* :mod:`tfg_mm.ablations.grid`: grid files, the plan of every run (params layering, reuse of
  finished runs), execution (one process per run when ``workers > 1``) and the failure record.
* :mod:`tfg_mm.ablations.executors`: ``executor: slurm`` / ``submitit-local``: one submitit job per
  run (SLURM job array, or submitit's local executor), waited for; a job that dies is recorded.
* :mod:`tfg_mm.ablations.repredict`: detections of a run's selected checkpoint (re-predicted when
  the run did not save them) and the WiSE-FT weight interpolation.
* :mod:`tfg_mm.ablations.summary`: the statistics summary (mean ± sd over seeds, paired-bootstrap
  intervals against the baseline, cached per run) that notebook 03 and ``reports.build_index`` draw.

The public entry points are re-exported here: ``from tfg_mm import ablations;
ablations.run_from_notebook(globals())``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tfg_mm.ablations.executors import executor_settings, make_executor
from tfg_mm.ablations.grid import (
    FAILURE_FILE,
    GRID_RECORD,
    RunVariant,
    baseline_seed_dir,
    explicit_parameters,
    failure_record,
    load_ablation_grid,
    notebook_parameters,
    plan_baseline_seeds,
    plan_runs,
    run_grid,
    run_notebook01,
    run_notebook02,
)
from tfg_mm.ablations.lowshot import LOWSHOT_RECORD, LOWSHOT_SUMMARY, level_dir, run_lowshot, summarize_lowshot
from tfg_mm.ablations.repredict import (
    interpolate_state,
    predict_run_detections,
    run_detections,
    scale_gate,
    wise_curve,
)
from tfg_mm.ablations.summary import SUMMARY_FILE, summarize, summarize_if_run
from tfg_mm.config import EXECUTOR_KEYS
from tfg_mm.paths import DETECTIONS_FILE
from tfg_mm.workflow.parameters import notebook_params

__all__ = [
    "DETECTIONS_FILE",
    "EXECUTOR_KEYS",
    "FAILURE_FILE",
    "GRID_RECORD",
    "LOWSHOT_RECORD",
    "LOWSHOT_SUMMARY",
    "SUMMARY_FILE",
    "RunVariant",
    "baseline_seed_dir",
    "executor_settings",
    "explicit_parameters",
    "failure_record",
    "interpolate_state",
    "level_dir",
    "load_ablation_grid",
    "make_executor",
    "notebook_parameters",
    "plan_baseline_seeds",
    "plan_runs",
    "predict_run_detections",
    "run_detections",
    "run_from_notebook",
    "run_grid",
    "run_lowshot",
    "run_lowshot_from_notebook",
    "run_notebook01",
    "run_notebook02",
    "scale_gate",
    "summarize",
    "summarize_if_run",
    "summarize_lowshot",
    "wise_curve",
]


def _notebook_run(namespace: Mapping[str, Any], run_variant: RunVariant, progress: bool) -> tuple[Any, dict]:
    """A grid notebook's validated params and the options every grid runner takes from them."""
    p = notebook_params(namespace)  # every value validated before any work
    explicit = explicit_parameters(namespace)
    return p, {
        "params_file": namespace.get("params_file") or None,
        "explicit": explicit,
        "seeds": explicit.get("seeds"),
        "reuse": p.reuse,
        "bootstrap_resamples": p.bootstrap_resamples,
        "confidence": p.confidence,
        "run_variant": run_variant,
        "progress": progress,
    }


def run_from_notebook(
    namespace: Mapping[str, Any], run_variant: RunVariant = run_notebook02, progress: bool = True
) -> dict:
    """Notebook 03's work: validate its parameters, run the grid, return its summary.

    ``namespace`` is the notebook's ``globals()`` right after the parameters cell.
    """
    p, options = _notebook_run(namespace, run_variant, progress)
    run_grid(
        p.grid,
        p.run_dir,
        workers=p.workers,
        wise_lambdas=p.wise_lambdas,
        executor={k: v for k, v in options["explicit"].items() if k in EXECUTOR_KEYS},
        **options,
    )
    return summarize(p.run_dir, progress=progress)


def run_lowshot_from_notebook(
    namespace: Mapping[str, Any], run_variant: RunVariant = run_notebook02, progress: bool = True
) -> dict:
    """Notebook 04's work: validate its parameters, run every k's baseline and grid, return the low-data summary."""
    p, options = _notebook_run(namespace, run_variant, progress)
    run_lowshot(p.grid, p.run_dir, **options)
    return summarize_lowshot(p.run_dir, progress=progress)
