"""Speed and accuracy figures of the project, printed and written to ``reports/benchmark.json``.

    python scripts/benchmark.py                      # everything below except the pipeline
    python scripts/benchmark.py --only data,phase2   # a subset
    python scripts/benchmark.py --only pipeline      # times `python -m tfg_mm pipeline` twice (fresh, then reuse)

Sections:
- data: generation time of the embedded default set and its byte-identical regeneration.
- baseline: the embedded default baseline (params/baseline.yaml) with the project's corrected
  DEIMv2 architecture and official loss vs transformers' uncorrected model and loss, same data and
  seed, in the same run: mAP50, mAP50:95, per-class AP50, wall time.
- phase2: inference latency of the multimodal model vs the detector alone (target <= 5 %
  overhead); stage-A warm-up epoch time from the cache vs with full forward passes (target >= 10x),
  and the difference between the two fusions after training (augmentation off: equal results).
- bootstrap: paired-bootstrap resamples per second, COCOeval rerun per draw (before) vs COCOeval's
  matches once per image re-accumulated per draw (after), side by side on data of the embedded
  default's size (scripts/bench_bootstrap.py; target >= 20x), and that both give the same interval.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from bench_bootstrap import bench_bootstrap  # scripts/, this script's folder

from tfg_mm.config import load_params
from tfg_mm.data.loaders import make_data
from tfg_mm.data.synthetic import generate
from tfg_mm.io import atomic_write_json
from tfg_mm.paths import project_root
from tfg_mm.training.baseline import run_baseline
from tfg_mm.training.loop import Trainer
from tfg_mm.training.phase2 import Phase2Task, build_multimodal, ensure_baseline
from tfg_mm.training.seeding import seed_everything

REPO = project_root()


def _hash_tree(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def bench_data() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        generate(Path(tmp) / "a", seed=0, progress=False)
        seconds = time.perf_counter() - t0
        generate(Path(tmp) / "b", seed=0, progress=False)
        identical = _hash_tree(Path(tmp) / "a") == _hash_tree(Path(tmp) / "b")
    out = {"generate_default_seconds": round(seconds, 2), "byte_identical_same_seed": identical}
    print(f"[data] default set generated in {seconds:.1f} s (target < 30 s); byte-identical: {identical}")
    return out


def bench_baseline(workdir: Path) -> dict:
    out = {}
    for fidelity in ("official", "transformers"):
        params = load_params(
            REPO / "params" / "baseline.yaml",
            {
                "run_dir": str(workdir / f"baseline_{fidelity}"),
                "fidelity": fidelity,
                "overwrite": True,
                "resume": False,
            },
        )
        t0 = time.perf_counter()
        m = run_baseline(params, progress=False)
        seconds = time.perf_counter() - t0
        f = m["final"]
        out[fidelity] = {
            "map50": f["map50"],
            "map": f["map"],
            "seconds": round(seconds, 1),
            "per_class_ap50": {k: v["ap50"] for k, v in f["per_class"].items()},
            "epoch": f["epoch"],
        }
        print(
            f"[baseline/{fidelity}] mAP50 {f['map50']:.4f}  mAP50:95 {f['map']:.4f}  {seconds:.0f} s  "
            f"per-class AP50 { {k: round(v['ap50'], 3) for k, v in f['per_class'].items()} }"
        )
    return out


def _median_latency(fn, x, repeats: int = 30) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_phase2(workdir: Path) -> dict:
    base_dir = workdir / "baseline_official"
    params = load_params(
        REPO / "params" / "phase2.yaml",
        {
            "baseline": str(base_dir),
            "augment": False,
            "run_dir": str(workdir / "phase2_bench"),
            "overwrite": True,
            "resume": False,
        },
    )
    ensure_baseline(params)
    gen = seed_everything(params.seed)
    data = make_data(params, gen, progress=False)
    model, _, _ = build_multimodal(params, data.class_names)
    model.eval()
    det = model.detector
    x = torch.rand(1, 3, params.image_size, params.image_size)
    torch.set_num_threads(torch.get_num_threads())
    t_det = _median_latency(lambda v: det(v), x)
    t_mm = _median_latency(lambda v: model.predict(v), x)
    overhead = (t_mm / t_det - 1) * 100
    print(
        f"[phase2] latency batch 1 @ {params.image_size}px: detector {t_det * 1e3:.2f} ms, multimodal "
        f"{t_mm * 1e3:.2f} ms, overhead {overhead:+.1f} % (target <= 5 %)"
    )

    # stage-A warm-up epoch: from the cache vs full forward passes (same cached-mode definition), at
    # the embedded default's 160 px and at atto's official input size 320 px (images upsampled)
    warmup = {}
    for size in (params.image_size, 320):
        sized = load_params(params, {"image_size": size})
        results = {}
        for use_cache in (True, False):
            gen = seed_everything(sized.seed)
            data = make_data(sized, gen, progress=False)
            model, _, _ = build_multimodal(sized, data.class_names)
            task = Phase2Task(model, data.class_names, sized, data.train)
            task.use_cache = use_cache
            trainer = Trainer(
                sized,
                task,
                data.train_loader,
                data.val_loader,
                data.val.coco,
                data.cat_ids,
                Path(tempfile.mkdtemp()),
                gen,
                lambda *a: None,
                progress=False,
            )
            task.on_epoch_start(1, trainer)
            trainer.rebuild_optimizer()
            model.to(trainer.accelerator.device)
            times = []
            for epoch in (1, 2):
                t0 = time.perf_counter()
                trainer._train_one_epoch(epoch)
                times.append(time.perf_counter() - t0)
            results[use_cache] = {"epoch_seconds": times, "fusion": copy.deepcopy(model.fusion.state_dict())}
        cached, full = results[True], results[False]
        diff = max(
            (cached["fusion"][k].float() - full["fusion"][k].float()).abs().max().item() for k in cached["fusion"]
        )
        speedup = full["epoch_seconds"][1] / cached["epoch_seconds"][1]
        print(
            f"[phase2] warm-up epoch @ {size}px: full forward {full['epoch_seconds'][1]:.2f} s, from cache "
            f"{cached['epoch_seconds'][1]:.2f} s (first, cache-building epoch {cached['epoch_seconds'][0]:.2f} s): "
            f"{speedup:.1f}x (target >= 10x); max |fusion param diff| after 2 epochs = {diff:.2e}"
        )
        warmup[str(size)] = {
            "full_forward_seconds": full["epoch_seconds"],
            "cached_seconds": cached["epoch_seconds"],
            "speedup": speedup,
            "cached_vs_full_max_param_diff": diff,
        }
    return {
        "latency_ms": {"detector": t_det * 1e3, "multimodal": t_mm * 1e3, "overhead_percent": overhead},
        "warmup": warmup,
    }


def bench_pipeline() -> dict:
    out = {}
    for label in ("first", "second (reuse)"):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tfg_mm", "pipeline"], cwd=REPO, check=True)
        out[label] = round(time.perf_counter() - t0, 1)
        print(f"[pipeline] {label} run: {out[label]:.0f} s")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="data,baseline,phase2,bootstrap")
    ap.add_argument("--workdir", default=str(REPO / "runs" / "benchmark"))
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    report = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        }
    }
    if "data" in only:
        report["data"] = bench_data()
    if "baseline" in only:
        report["baseline"] = bench_baseline(workdir)
    if "phase2" in only:
        report["phase2"] = bench_phase2(workdir)
    if "bootstrap" in only:
        report["bootstrap"] = bench_bootstrap()
    if "pipeline" in only:
        report["pipeline"] = bench_pipeline()
    out = REPO / "reports" / "benchmark.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    previous.update(report)
    atomic_write_json(out, previous)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
