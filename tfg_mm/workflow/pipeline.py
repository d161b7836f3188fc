"""The main job (``make all`` / ``python -m tfg_mm pipeline``): every notebook in order.

data (00) -> DEIMv2 baseline (01) -> phase 2 (02) -> ablation grid (03) -> ``reports/index.html``.
Each step is a papermill execution of the real notebook with a flat params file, rendered to
``reports/<name>.html``. Finished runs are reused (same params, dataset and code), so a second
run of the pipeline only re-renders the reports. ``only`` runs some of the steps (``make baseline``,
``make phase2``, ``make ablations``): each step finds or trains what it needs first.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from tfg_mm.errors import ConfigError
from tfg_mm.io import atomic_write_json
from tfg_mm.paths import project_root
from tfg_mm.workflow.notebooks import REPORTS, run_and_render

#: The notebooks of the main job, in order.
STEPS = ("00_data", "01_baseline", "02_phase2", "03_ablations", "04_lowshot")
#: Steps that run only when named (``--only``): the low-data grid retrains a baseline per k (about 45 min here).
ON_REQUEST = ("04_lowshot",)


def pipeline_steps(params_dir: Path, grid: str | None) -> list[tuple[str, dict]]:
    def rel(name: str) -> str:
        return str(Path(params_dir) / name)

    return [
        ("00_data", {"params_file": rel("default.yaml"), "run_dir": "runs/data"}),
        ("01_baseline", {"params_file": rel("baseline.yaml"), "run_dir": "runs/baseline"}),
        ("02_phase2", {"params_file": rel("phase2.yaml"), "baseline": "runs/baseline", "run_dir": "runs/phase2"}),
        (
            "03_ablations",
            {
                "params_file": rel("phase2.yaml"),
                "baseline": "runs/baseline",
                "grid": grid or rel("ablations/small.yaml"),
                "run_dir": "runs/ablations",
            },
        ),
        (
            "04_lowshot",
            {"params_file": rel("phase2.yaml"), "grid": rel("ablations/lowshot.yaml"), "run_dir": "runs/lowshot"},
        ),
    ]


def run_pipeline(
    grid: str | None = None,
    skip_ablations: bool = False,
    params_dir: str | Path | None = None,
    progress: bool = True,
    only: Sequence[str] | None = None,
) -> dict:
    """Execute and render the notebooks (all, or the steps named in ``only``); returns seconds per step.

    ``reports/pipeline_timing.json`` records the timings of a whole run (not of ``only`` runs).
    """
    unknown = sorted(set(only or ()) - set(STEPS))
    if unknown:
        raise ConfigError(f"Unknown pipeline step(s) {', '.join(unknown)}; the steps are {', '.join(STEPS)}.")
    params_dir = Path(params_dir or project_root() / "params")
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    for name, parameters in pipeline_steps(params_dir, grid):
        if (skip_ablations and name == "03_ablations") or (only and name not in only):
            continue
        if name in ON_REQUEST and not only:
            continue
        t0 = time.perf_counter()
        html = run_and_render(name, parameters, progress=progress)
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"[pipeline] {name}: {timings[name]:.1f} s -> {html}", flush=True)
    timings["total"] = round(time.perf_counter() - t_all, 1)
    if not only:
        atomic_write_json(REPORTS / "pipeline_timing.json", timings)
    print(f"[pipeline] done in {timings['total']:.1f} s; open {REPORTS / 'index.html'}", flush=True)
    return timings
