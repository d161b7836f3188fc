"""The main job (``make all`` / ``python -m tfg_mm pipeline``): every notebook in order.

data (00) -> DEIMv2 baseline (01) -> phase 2 (02) -> ablation grid (03) -> ``reports/index.html``.
Each step is a papermill execution of the real notebook with a flat params file, rendered to
``reports/<name>.html``. Finished runs are reused (same params, dataset and code), so a second
run of the pipeline only re-renders the reports.
"""

from __future__ import annotations

import time
from pathlib import Path

from tfg_mm.io import atomic_write_json
from tfg_mm.notebooks import REPO_ROOT, REPORTS, run_and_render


def pipeline_steps(params_dir: Path, grid: str | None) -> list[tuple[str, dict]]:
    rel = lambda name: str(Path(params_dir) / name)  # noqa: E731
    return [
        ("00_data", {"params_file": rel("default.yaml"), "run_dir": "runs/data"}),
        ("01_baseline", {"params_file": rel("baseline.yaml"), "run_dir": "runs/baseline"}),
        ("02_phase2", {"params_file": rel("phase2.yaml"), "baseline": "runs/baseline", "run_dir": "runs/phase2"}),
        ("03_ablations", {"params_file": rel("phase2.yaml"), "baseline": "runs/baseline",
                          "grid": grid or rel("ablations/small.yaml"), "run_dir": "runs/ablations"}),
    ]


def run_pipeline(grid: str | None = None, skip_ablations: bool = False, params_dir: str | Path | None = None,
                 progress: bool = True) -> dict:
    params_dir = Path(params_dir or REPO_ROOT / "params")
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    for name, parameters in pipeline_steps(params_dir, grid):
        if skip_ablations and name == "03_ablations":
            continue
        t0 = time.perf_counter()
        html = run_and_render(name, parameters, progress=progress)
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"[pipeline] {name}: {timings[name]:.1f} s -> {html}", flush=True)
    timings["total"] = round(time.perf_counter() - t_all, 1)
    atomic_write_json(REPORTS / "pipeline_timing.json", timings)
    print(f"[pipeline] done in {timings['total']:.1f} s; open {REPORTS / 'index.html'}", flush=True)
    return timings
