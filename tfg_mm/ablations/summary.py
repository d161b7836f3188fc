"""The statistics of a grid from its run folders: the summary dict that notebook 03 and the index draw.

Each variant's selected checkpoint is compared with the baseline on the validation images with
:func:`tfg_mm.stats.paired_bootstrap` (ΔmAP and Δ AP of each hard class), on the detections of
:func:`tfg_mm.ablations.repredict.run_detections`. With several seeds the table shows mean ± sd
over seeds, and the Δ interval is the seed mean of the per-seed percentile bounds: every seed uses
the same bootstrap draws (same bootstrap seed), for which averaging the bounds is conservative (at
least as wide as the interval of the seed-averaged Δ). A Δ whose interval contains 0 is "within
noise". Detections, bootstrap results and WiSE-FT curves are cached per run, keyed by everything
they depend on, so rebuilding the report (``python -m tfg_mm report``) is cheap.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tfg_mm import runs
from tfg_mm.ablations.grid import GRID_RECORD
from tfg_mm.ablations.repredict import cache_key, read_cache, run_detections, wise_curve, write_cache
from tfg_mm.config import resolve_path
from tfg_mm.errors import ConfigError
from tfg_mm.io import atomic_write_json
from tfg_mm.phase2 import baseline_folder
from tfg_mm.stats import paired_bootstrap, summarize_seeds, verdict

SUMMARY_FILE = "summary.json"


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _bootstrap(
    run_dir: Path,
    metrics: dict,
    base_dets: list[dict],
    base_key: str,
    settings: dict,
    classes: list[str],
    progress: bool,
) -> dict:
    """Paired bootstrap of the run against the baseline, cached in ``{run_dir}/bootstrap.json``."""
    key = cache_key(
        metrics.get("run_id"),
        metrics["final"].get("checkpoint"),
        base_key,
        settings["bootstrap_resamples"],
        settings["confidence"],
        classes,
    )
    cached = read_cache(run_dir / "bootstrap.json", key)
    if cached is not None:
        return cached
    dets, note = run_detections(run_dir, metrics)
    result = paired_bootstrap(
        metrics["dataset"]["val_json"],
        base_dets,
        dets,
        n_resamples=settings["bootstrap_resamples"],
        confidence=settings["confidence"],
        classes=classes,
        progress=progress,
    )
    result["detections"] = note
    write_cache(run_dir / "bootstrap.json", key, result)
    return result


def _mean_per_class(entries: list[Mapping[str, Any]]) -> dict | None:
    """Seed mean of ``{class: {key: number}}`` entries (``final.errors`` / ``final.operating_points``);
    a value missing or null in a seed is left out of that mean (None when no seed has it)."""
    if not entries:
        return None
    out: dict[str, dict[str, float | None]] = {}
    for entry in entries:
        for cls, values in entry.items():
            for key in values or {}:
                finite = [v for v in (_finite((e.get(cls) or {}).get(key)) for e in entries) if v is not None]
                out.setdefault(cls, {})[key] = sum(finite) / len(finite) if finite else None
    return out


def _mean_interval(entries: list[dict]) -> dict:
    """Seed mean of Δ and of the interval bounds (conservative for shared draws), with its verdict."""
    lo = sum(e["lo"] for e in entries) / len(entries)
    hi = sum(e["hi"] for e in entries) / len(entries)
    return {
        "delta": sum(e["delta"] for e in entries) / len(entries),
        "lo": lo,
        "hi": hi,
        "verdict": verdict(lo, hi),
        "n_seeds": len(entries),
        "per_seed": [{k: e[k] for k in ("delta", "lo", "hi", "verdict")} for e in entries],
    }


def summarize(ablations_dir: str | Path, progress: bool = False) -> dict:
    """The statistics of a grid from its run folders; writes and returns ``<ablations_dir>/summary.json``.

    Per variant: status (finished / reused / failed per seed), mean ± sd over seeds of mAP, mAP50
    and each hard class's AP, the Δ against the baseline with its paired-bootstrap interval and
    verdict, the per-class Δ AP (mean over seeds), the histories (for the overlaid trajectories),
    the recorded failures (``errors``) and, as ``error_analysis``, the seed mean of each run's
    ``final.errors`` (TIDE ΔAP50 per class and error type) and ``final.operating_points``. Plus the baseline and the WiSE-FT curve when the grid asks for one.
    """
    ablations_dir = resolve_path(ablations_dir)
    path = ablations_dir / GRID_RECORD
    if not path.exists():
        raise ConfigError(
            f"{path}: no grid record; run the grid first (notebook 03, `make all`) or check "
            f"`run_dir` / `--ablations-dir` ({ablations_dir})."
        )
    record = json.loads(path.read_text(encoding="utf-8"))
    settings = record["settings"]
    grid = record["grid"]
    summary: dict[str, Any] = {
        "grid": grid["path"],
        "description": grid.get("description", ""),
        "ablations_dir": str(ablations_dir),
        "bootstrap_resamples": settings["bootstrap_resamples"],
        "confidence": settings["confidence"],
        "baseline_run": settings["baseline"],
        "variants": [],
        "notes": [],
        "interval_note": "With several seeds, the Δ interval is the seed mean of the per-seed bounds "
        "(same bootstrap draws for every seed: conservative).",
    }

    baseline_metrics, base_ckpt = None, None
    try:
        base_ckpt, baseline_metrics = baseline_folder(settings["baseline"])
    except ConfigError as exc:
        summary["notes"].append(f"baseline unavailable: {exc}")
    summary["baseline"] = {
        "checkpoint": str(base_ckpt) if base_ckpt else None,
        "final": (baseline_metrics or {}).get("final"),
    }
    base_final = summary["baseline"]["final"]
    class_names = list((base_final or {}).get("per_class", {}))
    hard = [c for c in settings["hard_classes"] if not class_names or c in class_names]
    missing = sorted(set(settings["hard_classes"]) - set(hard))
    if missing:
        summary["notes"].append(f"hard classes {missing} are not classes of this dataset ({class_names}); left out")
    summary["hard_classes"] = hard

    base_dets, base_key = None, ""
    by_run = {(r["variant"], r["seed"]): r for r in record["runs"]}
    for variant in grid["variants"]:
        name = variant["name"]
        entries = [r for (v, _), r in by_run.items() if v == name]
        out: dict[str, Any] = {
            "name": name,
            "overrides": variant["overrides"],
            "runs": [],
            "errors": [],
            "seeds_finished": [],
            "stats": {},
            "delta": {},
            "per_class_delta": {},
        }
        intervals: list[dict] = []
        finals: list[dict] = []
        for entry in sorted(entries, key=lambda r: r["seed"]):
            run_dir = Path(entry["run_dir"])
            run_out = {
                "seed": entry["seed"],
                "status": entry["status"],
                "run_dir": str(run_dir),
                "report": str(run_dir / "02_phase2.html") if (run_dir / "02_phase2.html").exists() else None,
            }
            if entry["status"] == "failed" or not runs.is_finished(run_dir):
                error = entry.get("error") or "no finished metrics.json"
                out["errors"].append(
                    {"seed": entry["seed"], "error": error, "cell": entry.get("cell"), "run_dir": str(run_dir)}
                )
                run_out["status"] = "failed"
                out["runs"].append(run_out)
                continue
            metrics = runs.read_metrics(run_dir)
            run_out["history"] = [
                {k: h.get(k) for k in ("epoch", "map", "map50", "alpha_mean", "stage")} for h in metrics["history"]
            ]
            run_out["final"] = {
                k: metrics["final"].get(k)
                for k in ("map", "map50", "map75", "per_class", "epoch", "operating_points", "errors")
            }
            out["runs"].append(run_out)
            out["seeds_finished"].append(entry["seed"])
            finals.append(metrics["final"])
            if baseline_metrics is None:
                continue
            try:
                if base_dets is None:
                    cache = ablations_dir / "baseline_detections_val.cache.json"
                    base_dets, _ = run_detections(
                        resolve_path(settings["baseline"]), baseline_metrics, cache_path=cache
                    )
                    base_key = cache_key(baseline_metrics.get("run_id"), str(base_ckpt))
                intervals.append(_bootstrap(run_dir, metrics, base_dets, base_key, settings, hard, progress))
            except Exception as exc:  # the statistics of one run must not hide the others'; the note says why
                summary["notes"].append(
                    f"{name} seed {entry['seed']}: no bootstrap interval ({type(exc).__name__}: {exc})"
                )
        failed = len(out["errors"])
        out["status"] = (
            "finished"
            if not failed
            else "failed"
            if not finals
            else f"partial ({failed} of {failed + len(finals)} seeds failed)"
        )
        if finals:
            for key in ("map", "map50"):
                values = [v for v in (_finite(f.get(key)) for f in finals) if v is not None]
                if values:
                    out["stats"][key] = summarize_seeds(values)
            for cls in hard:
                values = [v for v in (_finite(f["per_class"].get(cls, {}).get("ap")) for f in finals) if v is not None]
                if values:
                    out["stats"][f"ap:{cls}"] = summarize_seeds(values)
            if base_final:
                for cls, base_values in base_final["per_class"].items():
                    deltas = [
                        f["per_class"][cls]["ap"] - base_values["ap"]
                        for f in finals
                        if _finite(f["per_class"].get(cls, {}).get("ap")) is not None
                        and _finite(base_values.get("ap")) is not None
                    ]
                    out["per_class_delta"][cls] = sum(deltas) / len(deltas) if deltas else None
            out["error_analysis"] = {
                key: _mean_per_class([f[key] for f in finals if isinstance(f.get(key), Mapping)])
                for key in ("errors", "operating_points")
            }
        if intervals:
            out["delta"]["map"] = _mean_interval(intervals)
            out["delta"]["per_class"] = {cls: _mean_interval([i["per_class"][cls] for i in intervals]) for cls in hard}
            out["delta"]["detections"] = sorted({i.get("detections", "") for i in intervals})
        summary["variants"].append(out)

    summary["wise"] = _wise_summary(settings.get("wise"), summary, base_ckpt, progress)
    atomic_write_json(ablations_dir / SUMMARY_FILE, summary)
    return summary


def summarize_if_run(ablations_dir: str | Path, progress: bool = False) -> dict | None:
    """:func:`summarize` when a grid has run in ``ablations_dir`` (its ``grid.json`` exists), else None."""
    return summarize(ablations_dir, progress) if (resolve_path(ablations_dir) / GRID_RECORD).exists() else None


def _wise_summary(wise: Mapping[str, Any] | None, summary: dict, base_ckpt: Path | None, progress: bool) -> dict:
    """The WiSE-FT curves of the grid's ``wise.variant`` (one per finished seed), cached per run."""
    if not wise:
        return {"note": "this grid asks for no WiSE-FT curve (grid key `wise`)"}
    note = (
        f"WiSE-FT between the baseline and `{wise['variant']}`: detector weights "
        "θ = (1−λ)·θ_baseline + λ·θ_finetuned; the fusion's effective gate α is scaled by λ too, "
        "since the baseline has no text branch (gate 0). λ = 0 is the baseline, λ = 1 the fine-tuned model."
    )
    out = {"variant": wise["variant"], "lambdas": wise["lambdas"], "curves": [], "note": note}
    if base_ckpt is None:
        out["note"] += " Not computed: the baseline checkpoint is unavailable."
        return out
    variant = next(v for v in summary["variants"] if v["name"] == wise["variant"])
    for run in variant["runs"]:
        if run["status"] == "failed":
            continue
        run_dir = Path(run["run_dir"])
        metrics = runs.read_metrics(run_dir)
        key = cache_key(metrics.get("run_id"), metrics["final"].get("checkpoint"), str(base_ckpt), wise["lambdas"])
        points = read_cache(run_dir / "wise.json", key)
        if points is None:
            if progress:
                print(f"[ablations] WiSE-FT curve of {wise['variant']} seed {run['seed']}", flush=True)
            points = wise_curve(metrics, base_ckpt, wise["lambdas"])
            write_cache(run_dir / "wise.json", key, points)
        out["curves"].append({"seed": run["seed"], "points": points})
    return out
