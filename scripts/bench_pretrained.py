"""Does pretraining matter here? Fine-tune from the embedded baseline vs train from scratch.

    python scripts/bench_pretrained.py                           # uses runs/baseline (trains it if missing)
    python scripts/bench_pretrained.py --baseline-epochs 12      # a shorter embedded baseline, if it must train
    python scripts/bench_pretrained.py --baseline runs/other_baseline --epochs 10 --at 2,5,10

1. The embedded baseline: ``--baseline`` (a finished run_dir, default ``runs/baseline``); when it is
   missing it is trained with ``params/baseline.yaml`` (``--baseline-epochs`` shortens it).
2. Another synthetic set (``data/bench_other``): another generator seed (``--other-seed``, default 1)
   and a class subset (``--classes``, default perforation,break,stain,dent: 4 of the 6 classes, both
   hard ones), so ``pretrained:`` re-initialises the class heads (6 -> 4 outputs).
3. Three runs on it with the same params, data, seed and epochs (``--epochs``, evaluated every epoch):
   ``pretrained: <baseline>`` with a lower backbone learning rate (``--pretrained-lr-backbone``, default
   a quarter of ``lr``, as a fine-tune uses), the same with ``params/baseline.yaml``'s rates
   (``pretrained_same_lr``: the weights alone, nothing else changed), and from scratch.

Prints validation mAP50 (and mAP50:95) of both at the epochs of ``--at`` and writes
``reports/bench_pretrained.json``. Finished runs are reused (the run contract's rules), so a rerun
only prints.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from tfg_mm.config import load_params
from tfg_mm.data.synthetic import generate
from tfg_mm.io import atomic_write_json
from tfg_mm.paths import project_root, resolve_path
from tfg_mm.training.baseline import run_baseline

REPO = project_root()


def _ensure_baseline(run_dir: Path, epochs: int | None) -> dict:
    """The embedded baseline's run contract; trains it (params/baseline.yaml) when it is not finished."""
    contract = run_dir / "metrics.json"
    if contract.exists():
        metrics = json.loads(contract.read_text())
        if metrics.get("status") == "finished":
            return metrics
    overrides = {"run_dir": str(run_dir)}
    if epochs:
        overrides["epochs"] = epochs
    print(f"training the embedded baseline in {run_dir} ({epochs or 'params/baseline.yaml'} epochs)", flush=True)
    return run_baseline(load_params(REPO / "params" / "baseline.yaml", overrides), progress=False)


def _at(metrics: dict, epochs: list[int]) -> dict:
    by_epoch = {h["epoch"]: h for h in metrics["history"]}
    return {
        str(e): {"map50": by_epoch[e]["map50"], "map": by_epoch[e]["map"]} if e in by_epoch else None for e in epochs
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="runs/baseline", help="finished run_dir of the embedded baseline")
    ap.add_argument("--baseline-epochs", type=int, default=None, help="epochs if the baseline must be trained")
    ap.add_argument("--other-seed", type=int, default=1)
    ap.add_argument("--classes", default="perforation,break,stain,dent")
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--data", default="data/bench_other")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--at", default="2,5,10", help="epochs whose mAP50 is reported")
    ap.add_argument("--pretrained-lr-backbone", type=float, default=None, help="default: lr / 4")
    ap.add_argument("--runs", default="runs/bench_pretrained")
    ap.add_argument("--out", default="reports/bench_pretrained.json")
    args = ap.parse_args(argv)
    at = [int(e) for e in args.at.split(",")]
    if max(at) > args.epochs:
        ap.error(f"--at {args.at}: epoch {max(at)} is past --epochs {args.epochs}")

    t_start = time.perf_counter()
    baseline_dir = resolve_path(args.baseline)
    base = _ensure_baseline(baseline_dir, args.baseline_epochs)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    data = generate(
        resolve_path(args.data),
        seed=args.other_seed,
        n_train=args.n_train,
        n_val=args.n_val,
        classes=classes,
        progress=False,
    )

    common = {
        "dataset": str(data),
        "generate_if_missing": False,
        "epochs": args.epochs,
        "eval_every": 1,  # every epoch, so each epoch of --at is evaluated
    }
    scratch_p = load_params(REPO / "params" / "baseline.yaml", common, run_dir=f"{args.runs}/scratch")
    lr_backbone = args.pretrained_lr_backbone or scratch_p.lr / 4
    pre_p = load_params(
        scratch_p, pretrained=str(baseline_dir), lr_backbone=lr_backbone, run_dir=f"{args.runs}/pretrained"
    )
    same_p = load_params(scratch_p, pretrained=str(baseline_dir), run_dir=f"{args.runs}/pretrained_same_lr")
    results = {}
    for name, p in (("pretrained", pre_p), ("pretrained_same_lr", same_p), ("scratch", scratch_p)):
        t0 = time.perf_counter()
        print(f"training {name} in {p.run_dir}", flush=True)
        m = run_baseline(p, progress=False)
        results[name] = {
            "run_dir": p.run_dir,
            "lr": p.lr,
            "lr_backbone": p.lr_backbone,
            "at": _at(m, at),
            "final": {"epoch": m["final"]["epoch"], "map50": m["final"]["map50"], "map": m["final"]["map"]},
            "initial_weights": (m.get("model") or {}).get("pretrained", {}).get("reinitialised_count"),
            "seconds": round(time.perf_counter() - t0, 1),
        }

    record = {
        "baseline": {
            "run_dir": str(args.baseline),
            "epochs": base["params"]["epochs"],
            "map50": base["final"]["map50"],
            "map": base["final"]["map"],
            "classes": base.get("classes"),
        },
        "other_set": {
            "seed": args.other_seed,
            "classes": classes,
            "n_train": args.n_train,
            "n_val": args.n_val,
        },
        "epochs": args.epochs,
        "seed": scratch_p.seed,
        "runs": results,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    out = resolve_path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, record)

    b = record["baseline"]
    print(
        f"\nembedded baseline {b['run_dir']} ({b['epochs']} epochs): mAP50 {b['map50']:.3f}\n"
        f"other set: seed {args.other_seed}, classes {', '.join(classes)}, {args.n_train} train / {args.n_val} val"
    )
    print(f"{'run':<20}{'lr_backbone':>12}" + "".join(f"{'mAP50 @' + str(e):>12}" for e in at))
    for name, r in results.items():
        cells = "".join(f"{r['at'][str(e)]['map50']:>12.3f}" if r["at"][str(e)] else f"{'-':>12}" for e in at)
        print(f"{name:<20}{r['lr_backbone']:>12g}{cells}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
