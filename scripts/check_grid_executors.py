"""Issue 10's acceptance check of the grid executors: the small grid (``params/ablations/small.yaml``,
notebook 02 through papermill for every run, as ``make all``) through ``executor: local`` and
through submitit's local executor (``executor: submitit-local``: the SLURM path, one job per run)
gives the same table.

Tiny runs so that it takes minutes: a generated 12 / 6-image set at 160 px, a baseline of one
epoch, every variant one epoch of ``max_steps_per_epoch`` steps. Prints both tables, whether they
are equal, and the seconds of each executor.

    python scripts/check_grid_executors.py [--out runs/check_executors] [--steps 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from tfg_mm import ablations, reporting
from tfg_mm.config import load_params
from tfg_mm.data.synthetic import generate
from tfg_mm.paths import project_root
from tfg_mm.training import contract
from tfg_mm.training.baseline import run_baseline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="work folder (default: a new temporary folder)")
    parser.add_argument("--steps", type=int, default=1, help="training steps per epoch of every run")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="check_executors_")).resolve()
    data = out / "data"
    if not (data / "instances_val.json").exists():
        generate(data, seed=3, n_train=12, n_val=6, image_size=160, defect_free_fraction=0.0, progress=False)
    tiny = {
        "dataset": str(data),
        "image_size": 160,
        "batch_size": 4,
        "max_steps_per_epoch": args.steps,
        "num_workers": 0,
        "generate_if_missing": False,
        "tracking": "none",
        "device": "cpu",
    }
    run_baseline(
        load_params(project_root() / "params" / "baseline.yaml", tiny, {"run_dir": str(out / "baseline"), "epochs": 1})
    )
    explicit = {**tiny, "baseline": str(out / "baseline"), "epochs": 1, "warmup_epochs": 0}
    executors = {
        "local": None,
        "submitit-local": {
            "executor": "submitit-local",
            "slurm_log_dir": str(out / "slurm"),
            # the same thread count as the local runs (their kernels inherit this process's): a run's float
            # arithmetic, hence its numbers, depends on how many threads split each reduction
            "slurm_cpus_per_run": torch.get_num_threads(),
            "slurm_array_parallelism": 2,
        },
    }
    tables, seconds = {}, {}
    for name, executor in executors.items():
        t0 = time.perf_counter()
        ablations.run_grid(
            project_root() / "params" / "ablations" / "small.yaml",
            out / name,
            params_file=project_root() / "params" / "phase2.yaml",
            explicit=explicit,
            bootstrap_resamples=200,
            executor=executor,
        )
        seconds[name] = round(time.perf_counter() - t0, 1)
        tables[name] = reporting.ablation_table(ablations.summarize(out / name, progress=False))
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        for name, table in tables.items():
            print(f"\n== executor: {name} ({seconds[name]} s) ==\n{table.to_string(index=False)}")
    equal = tables["local"].equals(tables["submitit-local"])
    # the runs themselves, number by number: every epoch's losses and mAP, the selected checkpoint's mAP
    same_runs = True
    for variant_dir in sorted(p for p in (out / "local").iterdir() if (p / "seed0" / "metrics.json").exists()):
        a, b = (contract.read_metrics(out / name / variant_dir.name / "seed0") for name in executors)
        numbers = [[{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]] for r in (a, b)]
        same = a["run_id"] == b["run_id"] and numbers[0] == numbers[1] and a["final"]["map"] == b["final"]["map"]
        same_runs &= same
        losses = [h["loss"] for h in a["history"]]
        print(f"{variant_dir.name}: losses {losses}, final mAP {a['final']['map']:.6f}; identical runs: {same}")
    print(f"\nsame table: {equal}; identical runs: {same_runs}; seconds: {seconds}; work folder: {out}")
    return 0 if equal and same_runs else 1


if __name__ == "__main__":
    sys.exit(main())
