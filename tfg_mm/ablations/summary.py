"""The statistics of a grid from its run folders: the summary dict that notebook 03 and the index draw.

Each variant is compared with the baseline with :func:`tfg_mm.evaluation.stats.hierarchical_bootstrap` (ΔmAP and
Δ AP of each hard class) on three sets of detections (:data:`SPLITS`): the held-out **test** images for its
selected checkpoint (the thesis's numbers) and for its last epoch (a column no selection can flatter), and the
**validation** images, the selection set, for its selected checkpoint (the detections of
:func:`tfg_mm.ablations.repredict.run_detections`). Runs without a test split (``test_json`` empty, or run before
it existed) have only the validation comparison, and the summary says so. With several seeds the table shows mean ± sd
over seeds, and the Δ interval comes from a hierarchical paired bootstrap: each resample draws the
variant's finished seeds with replacement, then the validation images (one draw for the variant and
the baseline), and averages Δ over the drawn seeds, so the interval holds training noise as well as
validation-set noise. Variant seed ``s`` is compared with the baseline of seed ``s`` when the grid
trained baseline seeds (grid key ``baseline_seeds``), else with the one baseline. With one seed the
interval is the plain paired bootstrap over images, and ``interval_note`` (shown by
:func:`tfg_mm.reporting.ablation_table` and the index) says in words that training noise is not in it.
A Δ whose interval contains 0 is "within noise". The baseline is always the reference: phase 2 never selects it
(``select``: epoch 0 is not a candidate unless a run asks for ``best_val_or_baseline``). Detections, bootstrap results and WiSE-FT curves
are cached, keyed by everything they depend on, so rebuilding the report
(``python -m tfg_mm report``) is cheap.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tfg_mm.ablations.grid import GRID_RECORD
from tfg_mm.ablations.repredict import cache_key, read_cache, run_detections, wise_curve, write_cache
from tfg_mm.errors import ConfigError
from tfg_mm.evaluation.stats import hierarchical_bootstrap, summarize_seeds
from tfg_mm.io import atomic_write_json
from tfg_mm.paths import RunPaths, resolve_path
from tfg_mm.training import contract
from tfg_mm.training.phase2 import baseline_folder

SUMMARY_FILE = "summary.json"

#: The comparisons of a variant with the baseline: ``{key: (split, which checkpoint of the variant, label)}``
#: (the baseline's selected checkpoint on the same split each time). Test first: the numbers a thesis quotes.
SPLITS: dict[str, tuple[str, str, str]] = {
    "test": ("test", "selected", "test images, selected checkpoint"),
    "test_last": ("test", "last", "test images, last epoch (no selection)"),
    "val": ("val", "selected", "validation images (the selection set), selected checkpoint"),
}


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _split_detections(run_dir: Path, metrics: Mapping[str, Any], split: str, which: str) -> tuple[list[dict], str]:
    """A run's detections on ``split`` (``val``: :func:`run_detections`, re-predicted when not kept; ``test``: what
    the run's judgement wrote) and a note on where they came from."""
    if split == "val":
        return run_detections(run_dir, metrics)
    path = RunPaths.at(run_dir).split_detections(split, which)
    if not path.is_file():
        raise ConfigError(
            f"{path}: no {split} detections of the {which} checkpoint (the run has no `final.{split}`). Fix: "
            f"`python -m tfg_mm evaluate {run_dir} --split {split}` judges a finished run."
        )
    return json.loads(path.read_text(encoding="utf-8")), f"judged on the {split} split"


def _ground_truth(metrics: Mapping[str, Any], split: str) -> str:
    """The annotation file a run's ``split`` detections are measured against."""
    dataset = metrics.get("dataset") or {}
    path = dataset.get(f"{split}_json") or ((metrics.get("final") or {}).get(split) or {}).get("annotations")
    if not path:
        raise ConfigError(f"the run {metrics.get('params', {}).get('run_dir')} has no {split} split")
    return path


def _bootstrap(
    variant_dir: Path,
    seeds: list[dict],
    settings: dict,
    classes: list[str],
    progress: bool,
    key_name: str = "val",
) -> dict:
    """Hierarchical paired bootstrap of a variant's finished seeds against their baselines on one comparison of
    :data:`SPLITS`.

    ``seeds``: one ``{"seed", "run_dir", "metrics", "baseline": {split: (detections, cache key)}}`` per finished
    seed. Cached in ``{variant_dir}/bootstrap_<key>.json`` under the key of every run, checkpoint and baseline it
    uses.
    """
    split, which, _ = SPLITS[key_name]
    key = cache_key(
        "hierarchical-v2",
        key_name,
        [
            (s["seed"], s["metrics"].get("run_id"), s["metrics"]["final"].get("checkpoint"), s["baseline"][split][1])
            for s in seeds
        ],
        settings["bootstrap_resamples"],
        settings["confidence"],
        classes,
    )
    cache_file = variant_dir / f"bootstrap_{key_name}.json"
    cached = read_cache(cache_file, key)
    if cached is not None:
        return cached
    pairs, notes = [], set()
    for s in seeds:
        dets, note = _split_detections(s["run_dir"], s["metrics"], split, which)
        pairs.append((s["baseline"][split][0], dets))
        notes.add(note)
    result = hierarchical_bootstrap(
        _ground_truth(seeds[0]["metrics"], split),
        pairs,
        n_resamples=settings["bootstrap_resamples"],
        confidence=settings["confidence"],
        classes=classes,
        progress=progress,
    )
    result["seeds"] = [s["seed"] for s in seeds]
    result["baseline_seeds"] = len({id(pair[0]) for pair in pairs})
    result["detections"] = sorted(notes)
    write_cache(cache_file, key, result)
    return result


def _extras(entry: Any, keys: tuple[str, ...]) -> dict:
    """A phase's per-epoch extras of a history entry (``alpha_mean``, ``stage``), None when absent."""
    extra = entry.model_extra or {}
    return {k: extra.get(k) for k in keys}


def _split_stats(finals: list[contract.Final], key: str, hard: list[str]) -> dict:
    """Mean ± sd over seeds of mAP, mAP50 and each hard class's AP, on one comparison of :data:`SPLITS`."""
    split, which, _ = SPLITS[key]
    blocks = []
    for final in finals:
        if split == "val":
            blocks.append(final)
        elif final.test is not None and getattr(final.test, which) is not None:
            blocks.append(getattr(final.test, which))
    stats = {}
    for name, get in [("map", lambda b: b.map), ("map50", lambda b: b.map50)] + [
        (f"ap:{cls}", lambda b, cls=cls: b.per_class[cls].ap if cls in b.per_class else None) for cls in hard
    ]:
        values = [v for v in (_finite(get(b)) for b in blocks) if v is not None]
        if values:
            stats[name] = summarize_seeds(values)
    return stats


def _per_class_delta(
    finals: list[contract.Final], seeds: list[int], summary: Mapping[str, Any], base_final: Mapping[str, Any]
) -> dict:
    """Per class, the seed mean of ΔAP against the baseline each seed is compared with (on test when every run has a
    test judgement, else on validation) -- the heat map's numbers."""
    on_test = all(f.test is not None for f in finals) and bool((base_final.get("test") or {}).get("selected"))
    base_seeds = {r["seed"]: r["per_class"] for r in summary["baseline_seeds"]["runs"] if r["status"] == "finished"}
    if on_test:
        main = {c: v.get("ap") for c, v in base_final["test"]["selected"]["per_class"].items()}
        base_seeds = {}  # the seed baselines' test numbers are not in the spread table
        blocks = [f.test.selected for f in finals]
    else:
        main = {c: v.get("ap") for c, v in base_final["per_class"].items()}
        blocks = finals
    out = {}
    for cls in main:
        pairs = [
            (b.per_class[cls].ap if cls in b.per_class else None, base_seeds.get(seed, main).get(cls))
            for seed, b in zip(seeds, blocks)
        ]
        deltas = [v - b for v, b in pairs if _finite(v) is not None and _finite(b) is not None]
        out[cls] = sum(deltas) / len(deltas) if deltas else None
    return {"split": "test" if on_test else "val", "values": out}


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


def _interval_entry(result: dict, n_baselines: int, images: str = "validation images") -> dict:
    """What the table shows of one interval, with the noise it covers in words."""
    return {
        **{k: result[k] for k in ("delta", "lo", "hi", "verdict", "n_valid")},
        "n_seeds": result["n_seeds"],
        "covers": covers(result["n_seeds"], n_baselines, images),
    }


def covers(n_seeds: int, n_baselines: int = 1, images: str = "validation images") -> str:
    """The noise a Δ interval covers, in words (a column of the ablation table)."""
    if n_seeds <= 1:
        return f"{images} only (1 seed: training noise not included)"
    if n_baselines <= 1:
        return (
            f"{n_seeds} variant seeds × {images} (baseline: 1 seed, its training noise not included; `make full-grid`)"
        )
    return f"{n_seeds} seeds (variant and baseline) × {images}"


def interval_note(variants: list[dict]) -> str:
    """The sentence under the ablation tables that says what the Δ intervals hold."""
    n_seeds = sorted(
        {
            entry["delta"]["map"]["n_seeds"]
            for v in variants
            for entry in (v.get("deltas") or {}).values()
            if (entry.get("delta") or {}).get("map")
        }
    )
    if not n_seeds:
        return ""
    if n_seeds == [1]:
        return (
            "One training seed per variant: each Δ interval is a paired bootstrap over the images only. Training "
            "noise (another seed of the same run) is NOT included, and here it is of the same order as the "
            "differences (see the baseline's seed spread with `make full-grid`), so an 'improves' on one seed is "
            "not yet a finding."
        )
    return (
        "Δ intervals: hierarchical paired bootstrap (each resample draws the variant's training seeds with "
        "replacement, then the images, the same for variant and baseline; the replica is the seed mean of Δ), so "
        "they include the variant's training noise (the line under each table, or its 'interval covers' column, says "
        "whose). The baseline's own "
        "seed noise needs its seeds trained too (`make full-grid`)."
        + (" Variants with one seed cover the images only." if 1 in n_seeds else "")
    )


def baseline_seed_spread(record: dict, baseline_metrics: dict | None) -> dict:
    """The baseline's seed spread: per seed mAP, mAP50 and each class's AP, and mean ± sd over seeds.

    The seeds are the grid's trained baseline seeds (``settings.baseline_runs``, grid key
    ``baseline_seeds``), else the one baseline. ``stats`` keys: ``map``, ``map50``, ``ap:<class>``.
    """
    settings = record["settings"]
    folders = {int(k): v for k, v in (settings.get("baseline_runs") or {}).items()}
    if not folders and baseline_metrics is not None:
        folders = {int(baseline_metrics.get("params", {}).get("seed", 0)): settings["baseline"]}
    out: dict[str, Any] = {"runs": [], "stats": {}}
    for entry in record.get("baseline_runs", []):
        if entry["status"] == "failed":
            out["runs"].append(
                {"seed": entry["seed"], "run_dir": entry["run_dir"], "status": "failed", "error": entry.get("error")}
            )
    finals = []
    for seed, folder in sorted(folders.items()):
        path = resolve_path(folder)
        if not contract.is_finished(path):
            out["runs"].append(
                {"seed": seed, "run_dir": str(path), "status": "failed", "error": "no finished metrics.json"}
            )
            continue
        final = contract.read_metrics(path)["final"]
        finals.append(final)
        out["runs"].append(
            {
                "seed": seed,
                "run_dir": str(path),
                "status": "finished",
                "map": final.get("map"),
                "map50": final.get("map50"),
                "per_class": {c: v.get("ap") for c, v in final.get("per_class", {}).items()},
            }
        )
    out["runs"].sort(key=lambda r: r["seed"])
    keys = [("map", lambda f: f.get("map")), ("map50", lambda f: f.get("map50"))]
    classes = list(finals[0].get("per_class", {})) if finals else []
    keys += [(f"ap:{c}", lambda f, c=c: f.get("per_class", {}).get(c, {}).get("ap")) for c in classes]
    for key, get in keys:
        values = [v for v in (_finite(get(f)) for f in finals) if v is not None]
        if values:
            out["stats"][key] = summarize_seeds(values)
    n = len(finals)
    out["note"] = (
        f"The baseline trained with {n} seeds (same params and data): mean ± sd (ddof 1) over seeds."
        if n > 1
        else "One baseline seed: its training noise is unmeasured here (`make full-grid` trains 3 seeds)."
    )
    return out


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
    summary["baseline_seeds"] = baseline_seed_spread(record, baseline_metrics)
    base_final = summary["baseline"]["final"]
    class_names = list((base_final or {}).get("per_class", {}))
    hard = [c for c in settings["hard_classes"] if not class_names or c in class_names]
    missing = sorted(set(settings["hard_classes"]) - set(hard))
    if missing:
        summary["notes"].append(f"hard classes {missing} are not classes of this dataset ({class_names}); left out")
    summary["hard_classes"] = hard

    baseline_runs = {int(k): v for k, v in (settings.get("baseline_runs") or {}).items()}
    base_cache: dict[tuple[str, str], tuple[list[dict], str]] = {}

    def baseline_detections(seed: int, split: str) -> tuple[list[dict], str]:
        """The detections (on ``split``) of the baseline that variant seed ``seed`` is compared with, and their key."""
        folder = str(resolve_path(baseline_runs.get(seed, settings["baseline"])))
        if (folder, split) not in base_cache:
            if folder == str(resolve_path(settings["baseline"])):
                ckpt, metrics, cache = base_ckpt, baseline_metrics, "baseline_detections_val.cache.json"
            else:
                ckpt, metrics = baseline_folder(folder)
                cache = f"baseline_seed{seed}_detections_val.cache.json"
            if split == "val":
                dets, _ = run_detections(Path(folder), metrics, cache_path=ablations_dir / cache)
            else:
                dets, _ = _split_detections(Path(folder), metrics, split, "selected")
            base_cache[(folder, split)] = (dets, cache_key(metrics.get("run_id"), str(ckpt), split))
        return base_cache[(folder, split)]

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
            "deltas": {},
            "per_class_delta": {},
        }
        finished: list[dict] = []
        finals: list[contract.Final] = []
        for entry in sorted(entries, key=lambda r: r["seed"]):
            run_dir = Path(entry["run_dir"])
            run_out = {
                "seed": entry["seed"],
                "status": entry["status"],
                "run_dir": str(run_dir),
                "report": str(run_dir / "02_phase2.html") if (run_dir / "02_phase2.html").exists() else None,
            }
            if entry["status"] in ("failed", "interrupted") or not contract.is_finished(run_dir):
                error = entry.get("error") or "no finished metrics.json"
                if entry["status"] == "interrupted":
                    error = f"interrupted (resumable: rerun the grid): {error}"
                out["errors"].append(
                    {"seed": entry["seed"], "error": error, "cell": entry.get("cell"), "run_dir": str(run_dir)}
                )
                run_out["status"] = "interrupted" if entry["status"] == "interrupted" else "failed"
                out["runs"].append(run_out)
                continue
            metrics = contract.read_metrics(run_dir)
            run = contract.as_contract(metrics)
            run_out["history"] = [
                {"epoch": h.epoch, "map": h.map, "map50": h.map50, **_extras(h, ("alpha_mean", "stage"))}
                for h in run.history
            ]
            run_out["final"] = {
                **{k: metrics["final"].get(k) for k in ("map", "map50", "map75", "per_class", "epoch")},
                **{k: metrics["final"].get(k) for k in ("operating_points", "errors", "selected_by", "fell_back")},
                "test": metrics["final"].get("test"),
            }
            out["runs"].append(run_out)
            out["seeds_finished"].append(entry["seed"])
            finals.append(run.final)
            if baseline_metrics is not None:
                finished.append({"seed": entry["seed"], "run_dir": run_dir, "metrics": metrics})
        failed = len(out["errors"])
        out["status"] = (
            "finished"
            if not failed
            else "failed"
            if not finals
            else f"partial ({failed} of {failed + len(finals)} seeds failed)"
        )
        for key in SPLITS:
            out["deltas"][key] = {"label": SPLITS[key][2], "stats": _split_stats(finals, key, hard)}
        if finals:
            if base_final:
                out["per_class_delta"] = _per_class_delta(finals, out["seeds_finished"], summary, base_final)
            out["error_analysis"] = {
                key: _mean_per_class(
                    [
                        {c: p.model_dump() for c, p in getattr(f, key).items()}
                        if key == "operating_points"
                        else getattr(f, key)
                        for f in finals
                        if isinstance(getattr(f, key), Mapping)
                    ]
                )
                for key in ("errors", "operating_points")
            }
        for key, (split, _, _label) in SPLITS.items():
            if not finished:
                break
            images = f"{split} images" if split == "test" else "validation images"
            try:
                for f in finished:
                    f.setdefault("baseline", {})[split] = baseline_detections(f["seed"], split)
                result = _bootstrap(ablations_dir / name, finished, settings, hard, progress, key)
            except (ConfigError, OSError, ValueError) as exc:  # one comparison must not hide the others'
                out["deltas"][key]["missing"] = f"{type(exc).__name__}: {exc}"
                continue
            n_base = result["baseline_seeds"]
            delta = {"map": _interval_entry(result, n_base, images)}
            delta["map"]["per_seed"] = [
                {"seed": seed, **entry} for seed, entry in zip(result["seeds"], result["per_seed"])
            ]
            delta["per_class"] = {
                cls: _interval_entry({**result["per_class"][cls], "n_seeds": result["n_seeds"]}, n_base, images)
                for cls in hard
            }
            delta["detections"] = result["detections"]
            out["deltas"][key]["delta"] = delta
        missing_test = [k for k in ("test", "test_last") if out["deltas"][k].get("missing")]
        if missing_test and finished:
            summary["notes"].append(f"{name}: no test comparison ({out['deltas'][missing_test[0]]['missing'][:300]})")
        summary["variants"].append(out)

    summary["interval_note"] = interval_note(summary["variants"])
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
        if run["status"] in ("failed", "interrupted"):
            continue
        run_dir = Path(run["run_dir"])
        metrics = contract.read_metrics(run_dir)
        key = cache_key(metrics.get("run_id"), metrics["final"].get("checkpoint"), str(base_ckpt), wise["lambdas"])
        points = read_cache(run_dir / "wise.json", key)
        if points is None:
            if progress:
                print(f"[ablations] WiSE-FT curve of {wise['variant']} seed {run['seed']}", flush=True)
            points = wise_curve(metrics, base_ckpt, wise["lambdas"])
            write_cache(run_dir / "wise.json", key, points)
        out["curves"].append({"seed": run["seed"], "points": points})
    return out
