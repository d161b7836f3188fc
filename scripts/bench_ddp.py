"""Training images/s of one process against two data-parallel processes on CPU (issue 10).

    python scripts/bench_ddp.py [--repeats 3] [--steps 6] [--batch 8] [--threads 1]

Runs a short phase-1 training (atto, 160 px, embedded-style synthetic data in a temporary folder,
no augmentation, no tracking) with the same global batch twice: one process (``python -m tfg_mm
train``, batch B) and two processes (``torchrun --standalone --nproc_per_node 2``, B/2 each),
interleaved, ``--repeats`` times, and prints the median images/s of each and their ratio. The time
is the main process's training time of the second epoch (steady state: no start-up, no
evaluation), read from each run's ``metrics.json``; the figures are only comparable on an otherwise
idle machine. ``--threads``: OMP threads per process (the default 1 gives 2 processes 2 cores).

Expectation on 2 cores: no speed-up. One process with 2 threads already uses both cores (``--threads 2``
for the one-process run is the fair baseline, printed too); two processes split the same arithmetic
and add a gradient all-reduce (gloo, ~1 MB for atto) and a BatchNorm-statistics average every step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], threads: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")


def images_per_s(run_dir: Path, global_batch: int, steps: int) -> float:
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    return global_batch * steps / history[-1]["seconds"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="training steps per epoch (2 epochs, the 2nd timed)")
    parser.add_argument("--batch", type=int, default=8, help="global batch (even)")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        run([sys.executable, "-m", "tfg_mm", "generate", "--out", str(data), "--n-train",
             str(args.batch * args.steps), "--n-val", "4"], 1)  # fmt: skip
        common = [
            f"dataset={data}", "generate_if_missing=false", "image_size=160", "preset=atto", "epochs=2",
            f"max_steps_per_epoch={args.steps}", "augment=false", "tracking=none", "ema=false", "top_k=50",
        ]  # fmt: skip
        variants = {
            f"1 process x batch {args.batch}, {args.threads} thread(s)": (
                [sys.executable, "-m", "tfg_mm", "train"], args.batch, args.threads),
            f"1 process x batch {args.batch}, {2 * args.threads} threads": (
                [sys.executable, "-m", "tfg_mm", "train"], args.batch, 2 * args.threads),
            f"2 processes x batch {args.batch // 2}, {args.threads} thread(s) each": (
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tfg_mm",
                 "train"], args.batch // 2, args.threads),
        }  # fmt: skip
        figures: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(args.repeats):  # interleaved: a load change hits every variant alike
            for i, (name, (cmd, batch, threads)) in enumerate(variants.items()):
                run_dir = tmp / f"run{r}_{i}"
                run([*cmd, *common, f"batch_size={batch}", f"run_dir={run_dir}"], threads)
                figures[name].append(images_per_s(run_dir, args.batch, args.steps))
                print(f"repeat {r + 1}: {name}: {figures[name][-1]:.2f} images/s", flush=True)
    medians = {name: statistics.median(values) for name, values in figures.items()}
    print(f"\nmedian training images/s over {args.repeats} repeats (global batch {args.batch}, atto, 160 px, CPU):")
    for name, value in medians.items():
        print(f"  {name}: {value:.2f}")
    names = list(medians)
    print(f"ratio 2 processes / 1 process ({args.threads} thread(s)): {medians[names[2]] / medians[names[0]]:.2f}")
    print(f"ratio 2 processes / 1 process ({2 * args.threads} threads): {medians[names[2]] / medians[names[1]]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
