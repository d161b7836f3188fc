"""The ablation grid (notebook 03): every variant × seed as a papermill run of notebook 02, then statistics.

Grid files (``params/ablations/*.yaml``) are flat::

    description: ...
    base: {flat params shared by every variant}
    seeds: [0, 1]
    hard_classes: [perforation, break]          # optional (this default)
    wise: {variant: name, lambdas: [0, 0.5, 1]}  # optional WiSE-FT curve of one variant
    variants:
      - name: minilm
        overrides: {text_encoder: minilm}

**Parameters of one run**, later wins: the phase-2 params file (``params_file``), the grid's
``base``, the variant's ``overrides``, the values given explicitly to notebook 03 (``-p epochs 1``
shortens every run: the command line wins, as in nanoGPT), then the run's own ``seed``,
``run_dir`` = ``<ablations_dir>/<variant>/seed<k>``, ``overwrite`` and ``resume``.

**Execution** (:func:`run_grid`): each run executes notebook 02 into its own folder (the
executed notebook, its HTML and the run contract ``metrics.json``). A run that raises is recorded
(variant, seed, failing cell, error) in ``failure.json`` and in ``grid.json`` and the grid goes on.
A finished run whose ``run_id`` (params, dataset hash, code version: :func:`tfg_mm.runs.run_id`)
equals the planned one is reused, not re-run (``reuse: false`` re-runs it). ``workers > 1`` runs
several notebooks at once in separate processes (each papermill execution has its own kernel),
each limited to ``cpu_count // workers`` threads.
The unit of work is injectable (``run_variant(parameters, run_dir)``) so that the orchestration is
tested without training.

**Statistics** (:func:`summarize`): each variant's selected checkpoint is compared with the
baseline on the validation images with :func:`tfg_mm.stats.paired_bootstrap` (ΔmAP and Δ AP of
each hard class). The detections come from ``{run_dir}/detections_val.json`` when the run wrote
it, otherwise they are re-predicted from the checkpoint (:func:`predict_run_detections`) and the
recomputed mAP is checked against the contract's. With several seeds the table shows mean ± sd
over seeds, and the Δ interval is the seed mean of the per-seed percentile bounds: every seed uses
the same bootstrap draws (same bootstrap seed), for which averaging the bounds is conservative (at
least as wide as the interval of the seed-averaged Δ). A Δ whose interval contains 0 is "within
noise". Detections, bootstrap results and WiSE-FT curves are cached per run, keyed by everything
they depend on, so rebuilding the report (``python -m tfg_mm report``) is cheap.

**WiSE-FT** (:func:`wise_curve`): θ = (1−λ)·θ_baseline + λ·θ_finetuned on the detector weights
(every floating-point tensor; integer buffers from the fine-tuned model). The baseline has no text
branch, i.e. an effective gate α = 0, so the fusion's effective gate is scaled by λ too (the
projection, scale and bias are kept): λ = 0 is the baseline exactly, λ = 1 the fine-tuned model.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import hashlib
import json
import logging
import math
import multiprocessing
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tfg_mm.errors import ConfigError, DataError
from tfg_mm.io import atomic_write_json

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The hard classes of the embedded synthetic default (the thesis's perforations and breaks).
DEFAULT_HARD_CLASSES: tuple[str, ...] = ("perforation", "break")
GRID_RECORD = "grid.json"
SUMMARY_FILE = "summary.json"
FAILURE_FILE = "failure.json"
DETECTIONS_FILE = "detections_val.json"
#: Grid keys read here, not by ``tfg_mm.config.load_grid`` (which validates the params parts).
_ABLATION_KEYS = ("wise", "hard_classes")
#: Keys that configure the grid itself and are never passed on to a notebook-02 run.
_GRID_LEVEL_KEYS = frozenset({"grid", "seeds", "workers", "reuse", "bootstrap_resamples", "confidence",
                              "wise_lambdas", "run_dir", "params_file", "overwrite", "resume"})

RunVariant = Callable[[dict, Path], None]


# --------------------------------------------------------------------------------------------
# Grid files
# --------------------------------------------------------------------------------------------
def load_ablation_grid(path: str | Path) -> dict:
    """A grid file: :func:`tfg_mm.config.load_grid` (base / seeds / variants, validated through the
    schema) plus the ablation-only keys ``hard_classes`` and ``wise``.

    ``load_grid`` only knows its own keys, so they are validated here and the rest is handed to it
    as a copy without them; its messages still name the original file.
    """
    from tfg_mm.config import load_grid, read_yaml, resolve_path

    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = resolve_path(path)
    raw = read_yaml(path)
    own = {key: raw.pop(key) for key in _ABLATION_KEYS if key in raw}
    with tempfile.TemporaryDirectory(prefix="tfg_grid_") as tmp:
        stripped = Path(tmp) / path.name
        stripped.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
        try:
            grid = load_grid(stripped)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(str(stripped), str(path))) from None
    grid["path"] = str(path)
    names = [v["name"] for v in grid["variants"]]

    hard = own.get("hard_classes", list(DEFAULT_HARD_CLASSES))
    if not isinstance(hard, list) or not all(isinstance(h, str) and h for h in hard):
        raise ConfigError(f"{path}: `hard_classes` must be a list of class names, e.g. [perforation, break]; "
                          f"got {hard!r}")
    grid["hard_classes"] = hard

    wise = own.get("wise")
    if wise is not None:
        if not isinstance(wise, dict) or set(wise) - {"variant", "lambdas"} or "variant" not in wise:
            raise ConfigError(f"{path}: `wise` must be `{{variant: <variant name>, lambdas: [0, 0.5, 1]}}` "
                              f"(lambdas optional); got {wise!r}")
        if wise["variant"] not in names:
            raise ConfigError(f"{path}: `wise.variant: {wise['variant']}` is not a variant of this grid "
                              f"({', '.join(names)}); name the fine-tuned variant to interpolate towards.")
        lambdas = wise.get("lambdas")
        if lambdas is not None and (not isinstance(lambdas, list) or not lambdas or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1 for x in lambdas)):
            raise ConfigError(f"{path}: `wise.lambdas` must be a non-empty list of numbers in [0, 1]; got {lambdas!r}")
        wise = {"variant": str(wise["variant"]),
                "lambdas": [float(x) for x in lambdas] if lambdas is not None else None}
    grid["wise"] = wise
    return grid


def explicit_parameters(namespace: Mapping[str, Any]) -> dict:
    """The parameters a notebook was given explicitly: schema keys whose value is not ``None``.

    Notebook 03's parameters cell leaves every name at ``None`` ("not given here"), so what remains
    after papermill's injected cell is exactly what the caller asked for.
    """
    from tfg_mm.config import Params

    return {k: v for k, v in namespace.items() if k in Params.model_fields and v is not None}


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------
def _dataset_hash(params, cache: dict) -> str | None:
    """The dataset's content hash (cached per grid), or None when the dataset does not exist yet."""
    from tfg_mm import runs

    key = (params.dataset, params.train_json, params.val_json)
    if key not in cache:
        try:
            cache[key] = runs.dataset_record(params.dataset, params.train_json, params.val_json)["hash"]
        except DataError:
            cache[key] = None
    return cache[key]


def plan_runs(grid: Mapping[str, Any], ablations_dir: str | Path, params_file: str | Path | None = None,
              explicit: Mapping[str, Any] | None = None, seeds: Sequence[int] | None = None,
              reuse: bool = True) -> list[dict]:
    """One entry per (variant, seed): its resolved params, the notebook parameters, and whether a
    finished run with the same ``run_id`` can be reused. See the module docstring for the layering."""
    from tfg_mm import runs
    from tfg_mm.config import load_params

    ablations_dir = Path(ablations_dir).resolve()
    given = {k: v for k, v in (explicit or {}).items() if k not in _GRID_LEVEL_KEYS}
    sources = [params_file] if params_file else []
    names = ([str(params_file)] if params_file else []) + [f"{grid['path']}: base"]
    code = runs.code_version()
    hashes: dict = {}
    planned = []
    for variant in grid["variants"]:
        for seed in (seeds if seeds is not None else grid["seeds"]):
            run_dir = ablations_dir / variant["name"] / f"seed{seed}"
            params = load_params(*sources, grid["base"], variant["overrides"], given,
                                 {"seed": int(seed), "run_dir": str(run_dir)},
                                 source_names=names + [f"{grid['path']}: variant {variant['name']!r}",
                                                       "notebook 03 parameter", "grid runner"])
            dataset_hash = _dataset_hash(params, hashes)
            expected = runs.run_id(params, dataset_hash, code, _baseline_id(params)) if dataset_hash else None
            existing = _existing(run_dir)
            reusable = bool(reuse and expected and existing.get("status") == "finished"
                            and existing.get("run_id") == expected)
            # A stale finished run (other params / data / code) is replaced; an interrupted run of the
            # same id resumes from its last checkpoint; anything else starts from scratch.
            same = existing.get("run_id") == expected and expected is not None
            params = load_params(params, {"overwrite": existing.get("status") == "finished",
                                          "resume": same or not existing})
            planned.append({"variant": variant["name"], "seed": int(seed), "run_dir": str(run_dir),
                            "run_id": expected, "reuse": reusable, "params": params})
    return planned


def _baseline_id(params) -> str:
    """The phase-2 ``run_id`` includes its baseline's (:func:`tfg_mm.phase2.depends_on_baseline`)."""
    from tfg_mm.phase2 import depends_on_baseline

    try:
        return depends_on_baseline(params)
    except Exception:  # no baseline (yet): the run builds it or fails with the reason itself
        return ""


def _existing(run_dir: Path) -> dict:
    """``status`` and ``run_id`` of a run folder's metrics.json ({} when there is none or it is unreadable)."""
    try:
        record = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {"status": record.get("status"), "run_id": record.get("run_id")} if isinstance(record, dict) else {}


def notebook_parameters(params) -> dict:
    """What papermill injects into notebook 02: every parameter that differs from its default.

    ``params_file`` is emptied so that the run's params are exactly these (the kernel rebuilds the
    same :class:`~tfg_mm.config.Params`, hence the same ``run_id``).
    """
    from tfg_mm.config import diff_from_default

    dumped = params.model_dump(mode="json")
    return {"params_file": "", **{k: dumped[k] for k in diff_from_default(params)}}


# --------------------------------------------------------------------------------------------
# The unit of work and its failure record
# --------------------------------------------------------------------------------------------
def run_notebook02(parameters: dict, run_dir: Path) -> None:
    """Execute ``notebooks/02_phase2.ipynb`` into ``run_dir`` (executed notebook + standalone HTML).

    Notebook 02's figures go to ``run_dir/figures`` (``TFG_MM_FIGURES_DIR``), not over the main
    run's ``reports/figures``. The executed notebook is written even when a cell fails.
    """
    from tfg_mm.notebooks import NOTEBOOKS, execute, render_html

    run_dir = Path(run_dir)
    previous = os.environ.get("TFG_MM_FIGURES_DIR")
    os.environ["TFG_MM_FIGURES_DIR"] = str(run_dir / "figures")
    try:
        executed = execute(NOTEBOOKS / "02_phase2.ipynb", run_dir / "02_phase2.ipynb", parameters, progress=False)
    finally:
        if previous is None:
            os.environ.pop("TFG_MM_FIGURES_DIR", None)
        else:
            os.environ["TFG_MM_FIGURES_DIR"] = previous
    render_html(executed, run_dir / "02_phase2.html")


def failure_record(exc: BaseException) -> dict:
    """``{"error", "cell", "traceback"}`` of an exception; the failing cell for papermill errors.

    ``PapermillExecutionError`` carries the cell's index, execution count and source, and the
    kernel's exception name and value (e.g. ``OfflineError: ...``).
    """
    cell = None
    if hasattr(exc, "ename") and hasattr(exc, "cell_index"):
        error = f"{exc.ename}: {exc.evalue}"
        source = str(getattr(exc, "source", "") or "").strip().splitlines()
        cell = {"index": exc.cell_index, "execution_count": getattr(exc, "exec_count", None),
                "source": "\n".join(source[:6])}
        tb = "\n".join(getattr(exc, "traceback", []) or [])[-4000:]
    else:
        error = f"{type(exc).__name__}: {exc}"
        tb = "".join(traceback.format_exception(exc))[-4000:]
    return {"error": error[:2000], "cell": cell, "traceback": tb}


def _execute_run(entry: dict, run_variant: RunVariant) -> dict:
    """Run one planned entry; never raises (a failure is part of the result)."""
    from tfg_mm import runs

    run_dir = Path(entry["run_dir"])
    result = {"variant": entry["variant"], "seed": entry["seed"], "run_dir": str(run_dir), "run_id": entry["run_id"]}
    if entry["reuse"]:
        return {**result, "status": "reused", "seconds": 0.0}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILURE_FILE).unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        run_variant(notebook_parameters(entry["params"]), run_dir)
        if not runs.is_finished(run_dir):
            raise DataError(f"{run_dir}: the run ended without a finished metrics.json (run contract); "
                            "see its executed notebook")
    except Exception as exc:  # noqa: BLE001  (any failure of one run is recorded; the grid goes on)
        record = {**result, "status": "failed", "seconds": round(time.perf_counter() - t0, 1), **failure_record(exc)}
        atomic_write_json(run_dir / FAILURE_FILE, record)
        return record
    return {**result, "status": "finished", "seconds": round(time.perf_counter() - t0, 1)}


def _worker_init(threads: int) -> None:
    """Share the CPU between parallel runs: each kernel inherits this process's thread limits."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------
def run_grid(grid: Mapping[str, Any] | str | Path, ablations_dir: str | Path, *,
             params_file: str | Path | None = "params/phase2.yaml", explicit: Mapping[str, Any] | None = None,
             seeds: Sequence[int] | None = None, workers: int = 1, reuse: bool = True,
             bootstrap_resamples: int = 500, confidence: float = 0.95, wise_lambdas: Sequence[float] | None = None,
             run_variant: RunVariant = run_notebook02, progress: bool = True) -> dict:
    """Run every variant × seed (see the module docstring) and write ``<ablations_dir>/grid.json``.

    Returns the grid record: the grid, the settings the statistics need (baseline, bootstrap
    resamples, confidence, hard classes, WiSE-FT), and one entry per run with ``status`` finished /
    reused / failed, ``seconds`` and, for a failure, ``error`` and ``cell``.
    """
    from tfg_mm.config import resolve_path

    if not isinstance(grid, Mapping):
        grid = load_ablation_grid(grid)
    ablations_dir = resolve_path(ablations_dir)
    if params_file and not Path(params_file).is_absolute() and not Path(params_file).exists():
        params_file = resolve_path(params_file)
    planned = plan_runs(grid, ablations_dir, params_file, explicit, seeds, reuse)
    wise = dict(grid.get("wise") or {}) or None
    if wise is not None:
        wise["lambdas"] = list((explicit or {}).get("wise_lambdas") or wise.get("lambdas") or wise_lambdas
                               or [0.0, 0.25, 0.5, 0.75, 1.0])
    record = {
        "grid": {k: grid[k] for k in ("path", "description", "base", "seeds", "variants")},
        "settings": {
            "baseline": planned[0]["params"].baseline if planned else "",
            "bootstrap_resamples": int(bootstrap_resamples), "confidence": float(confidence),
            "hard_classes": list(grid.get("hard_classes", DEFAULT_HARD_CLASSES)), "wise": wise,
            "params_file": str(params_file or ""), "explicit": dict(explicit or {}), "workers": workers,
            "reuse": reuse,
        },
        "runs": [],
    }
    ablations_dir.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, int], dict] = {}

    def done(result: dict) -> None:
        results[(result["variant"], result["seed"])] = result
        record["runs"] = [results[(e["variant"], e["seed"])] for e in planned if (e["variant"], e["seed"]) in results]
        atomic_write_json(ablations_dir / GRID_RECORD, record)
        if progress:
            extra = f" ({result['error']})" if result["status"] == "failed" else ""
            print(f"[ablations] {result['variant']} seed {result['seed']}: {result['status']} "
                  f"in {result['seconds']:.0f} s{extra}", flush=True)

    to_run = [e for e in planned if not e["reuse"]]
    for entry in planned:
        if entry["reuse"]:
            done(_execute_run(entry, run_variant))
    if workers <= 1 or len(to_run) <= 1:
        for entry in to_run:
            done(_execute_run(entry, run_variant))
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        # fork: a worker starts in milliseconds instead of re-importing torch / transformers. A worker
        # runs no torch op itself (the default unit launches a fresh papermill kernel), so the fork
        # caveat of OpenMP thread pools does not apply to it.
        context = multiprocessing.get_context("fork")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init,
                                    initargs=(threads,)) as pool:
            futures = {pool.submit(_execute_run, entry, run_variant): entry for entry in to_run}
            for future in cf.as_completed(futures):
                entry = futures[future]
                try:
                    done(future.result())
                except Exception as exc:  # noqa: BLE001  (the worker process itself died)
                    done({"variant": entry["variant"], "seed": entry["seed"], "run_dir": entry["run_dir"],
                          "run_id": entry["run_id"], "status": "failed", "seconds": 0.0, **failure_record(exc)})
    if not planned:
        atomic_write_json(ablations_dir / GRID_RECORD, record)
    return record


def run_from_notebook(namespace: Mapping[str, Any], run_variant: RunVariant = run_notebook02,
                      progress: bool = True) -> dict:
    """Notebook 03's work: validate its parameters, run the grid, return the summary.

    ``namespace`` is the notebook's ``globals()`` right after the parameters cell.
    """
    from tfg_mm.notebooks import notebook_params

    p = notebook_params(namespace)  # every value validated before any work
    explicit = explicit_parameters(namespace)
    run_grid(p.grid, p.run_dir, params_file=namespace.get("params_file") or None, explicit=explicit,
             seeds=explicit.get("seeds"), workers=p.workers, reuse=p.reuse,
             bootstrap_resamples=p.bootstrap_resamples, confidence=p.confidence, wise_lambdas=p.wise_lambdas,
             run_variant=run_variant, progress=progress)
    return summarize(p.run_dir, progress=progress)


# --------------------------------------------------------------------------------------------
# Detections of a run's selected checkpoint
# --------------------------------------------------------------------------------------------
def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(path: Path, key: str) -> Any:
    try:
        blob = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return blob.get("value") if isinstance(blob, dict) and blob.get("key") == key else None


def _val_data(params):
    from tfg_mm.train import make_data, seed_everything

    return make_data(params, seed_everything(params.seed, params.deterministic), progress=False, need_train=False)


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_fusion(folder: Path):
    """The fusion saved next to a phase-2 checkpoint's detector (None for ``text_encoder: none``)."""
    import torch

    from tfg_mm.phase2 import build_fusion_from_config

    path = folder / "fusion.pt"
    if not path.exists():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=False)
    fusion = build_fusion_from_config(blob["config"], blob["state_dict"]["text_embeddings"])
    fusion.load_state_dict(blob["state_dict"])
    return fusion


def _detect(model_fn, params, data) -> tuple[dict, list[dict]]:
    from tfg_mm.evaluate import evaluate

    return evaluate(model_fn, data.val_loader, data.val.coco, data.class_names, data.cat_ids,
                    top_k=params.top_k, device=_device())


def predict_run_detections(metrics: Mapping[str, Any]) -> tuple[list[dict], dict]:
    """Re-predict the validation detections of a run's selected checkpoint (``final.checkpoint``).

    For a run that did not save ``detections_val.json``. A phase-2 checkpoint (``detector/`` +
    ``fusion.pt``) runs through :class:`~tfg_mm.model.MultimodalDetector`, a baseline checkpoint
    through the detector alone, exactly as the training loop evaluated them. Returns
    ``(detections, metrics)`` so the caller can check the recomputed mAP against the contract's.
    """
    from tfg_mm import detector as det
    from tfg_mm.config import load_params
    from tfg_mm.model import MultimodalDetector
    from tfg_mm.train import BaselineTask

    params = load_params(metrics["params"], source_names=["metrics.json params"])
    folder = Path(metrics["final"]["checkpoint"])
    data = _val_data(params)
    if (folder / "detector").is_dir():
        model = MultimodalDetector(det.load(folder / "detector"), _load_fusion(folder), params.detector_mode)
        model.to(_device()).eval()
        model_fn = model.predict
    else:
        detector = det.load(folder).to(_device()).eval()
        model_fn = BaselineTask(detector, data.class_names).predict_fn(detector)
    evaluated, detections = _detect(model_fn, params, data)
    return detections, evaluated


def run_detections(run_dir: str | Path, metrics: Mapping[str, Any], cache_path: Path | None = None) -> tuple[
        list[dict], str]:
    """The selected checkpoint's validation detections and a note on where they came from.

    ``{run_dir}/detections_val.json`` (written by the run) is used as is; otherwise they are
    re-predicted once and cached in ``cache_path`` (default ``{run_dir}/detections_val.cache.json``)
    keyed by the run id and checkpoint.
    """
    run_dir = Path(run_dir)
    saved = run_dir / DETECTIONS_FILE
    if saved.exists():
        return json.loads(saved.read_text(encoding="utf-8")), "saved by the run"
    cache_path = cache_path or run_dir / "detections_val.cache.json"
    key = _key(metrics.get("run_id"), metrics["final"].get("checkpoint"), metrics["final"].get("epoch"))
    cached = _cached(cache_path, key)
    if cached is not None:
        return cached["detections"], cached["note"]
    detections, evaluated = predict_run_detections(metrics)
    recorded = metrics["final"].get("map")
    note = f"re-predicted from {metrics['final']['checkpoint']}: mAP {evaluated['map']:.4f}"
    if recorded is not None and not math.isclose(evaluated["map"], recorded, abs_tol=1e-4):
        note += f" (the contract says {recorded:.4f}: the checkpoint does not reproduce its own number)"
        log.warning("%s: %s", run_dir, note)
    atomic_write_json(cache_path, {"key": key, "value": {"detections": detections, "note": note}})
    return detections, note


# --------------------------------------------------------------------------------------------
# WiSE-FT
# --------------------------------------------------------------------------------------------
def interpolate_state(base: Mapping[str, Any], finetuned: Mapping[str, Any], lam: float) -> dict:
    """θ = (1−λ)·θ_base + λ·θ_finetuned for floating tensors; other buffers from the fine-tuned model."""
    if set(base) != set(finetuned):
        raise DataError(f"WiSE-FT needs two checkpoints of one architecture; keys differ: "
                        f"{sorted(set(base) ^ set(finetuned))[:5]}")
    out = {}
    for name, tensor in finetuned.items():
        if tensor.is_floating_point():
            out[name] = base[name].to(tensor.dtype) * (1.0 - lam) + tensor * lam
        else:
            out[name] = tensor.clone()
    return out


def scale_gate(fusion, lam: float) -> None:
    """Multiply the fusion's *effective* gate α by λ (through atanh when the gate is tanh-bounded)."""
    import torch

    with torch.no_grad():
        if fusion.gate_tanh:
            fusion.gate.copy_(torch.atanh(torch.tanh(fusion.gate) * lam))
        else:
            fusion.gate.mul_(lam)


def wise_curve(metrics: Mapping[str, Any], baseline_checkpoint: str | Path, lambdas: Sequence[float]) -> list[dict]:
    """mAP, mAP50 and per-class AP of the WiSE-FT interpolation for each λ (see the module docstring)."""
    from tfg_mm import detector as det
    from tfg_mm.config import load_params
    from tfg_mm.model import MultimodalDetector

    params = load_params(metrics["params"], source_names=["metrics.json params"])
    folder = Path(metrics["final"]["checkpoint"])
    data = _val_data(params)
    base_state = det.load(baseline_checkpoint).state_dict()
    finetuned = det.load(folder / "detector")
    tuned_state = copy.deepcopy(finetuned.state_dict())
    fusion_state = _load_fusion(folder)
    points = []
    for lam in lambdas:
        finetuned.load_state_dict(interpolate_state(base_state, tuned_state, float(lam)))
        fusion = copy.deepcopy(fusion_state)
        if fusion is not None:
            scale_gate(fusion, float(lam))
        model = MultimodalDetector(finetuned, fusion, params.detector_mode).to(_device()).eval()
        evaluated, _ = _detect(model.predict, params, data)
        points.append({"lambda": float(lam), "map": evaluated["map"], "map50": evaluated["map50"],
                       "per_class": evaluated["per_class"]})
    return points


# --------------------------------------------------------------------------------------------
# Statistics and the summary
# --------------------------------------------------------------------------------------------
def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _bootstrap(run_dir: Path, metrics: dict, base_dets: list[dict], base_key: str, settings: dict,
               classes: list[str], progress: bool) -> dict:
    """Paired bootstrap of the run against the baseline, cached in ``{run_dir}/bootstrap.json``."""
    from tfg_mm.stats import paired_bootstrap

    key = _key(metrics.get("run_id"), metrics["final"].get("checkpoint"), base_key, settings["bootstrap_resamples"],
               settings["confidence"], classes)
    cached = _cached(run_dir / "bootstrap.json", key)
    if cached is not None:
        return cached
    dets, note = run_detections(run_dir, metrics)
    result = paired_bootstrap(metrics["dataset"]["val_json"], base_dets, dets,
                              n_resamples=settings["bootstrap_resamples"], confidence=settings["confidence"],
                              classes=classes, progress=progress)
    result["detections"] = note
    atomic_write_json(run_dir / "bootstrap.json", {"key": key, "value": result})
    return result


def _mean_interval(entries: list[dict]) -> dict:
    """Seed mean of Δ and of the interval bounds (conservative for shared draws), with its verdict."""
    from tfg_mm.stats import verdict

    lo = sum(e["lo"] for e in entries) / len(entries)
    hi = sum(e["hi"] for e in entries) / len(entries)
    return {"delta": sum(e["delta"] for e in entries) / len(entries), "lo": lo, "hi": hi,
            "verdict": verdict(lo, hi), "n_seeds": len(entries),
            "per_seed": [{k: e[k] for k in ("delta", "lo", "hi", "verdict")} for e in entries]}


def summarize(ablations_dir: str | Path, progress: bool = False) -> dict:
    """The statistics of a grid from its run folders; writes and returns ``<ablations_dir>/summary.json``.

    Per variant: status (finished / reused / failed per seed), mean ± sd over seeds of mAP, mAP50
    and each hard class's AP, the Δ against the baseline with its paired-bootstrap interval and
    verdict, the per-class Δ AP (mean over seeds), the histories (for the overlaid trajectories)
    and the recorded errors. Plus the baseline and the WiSE-FT curve when the grid asks for one.
    """
    from tfg_mm import runs
    from tfg_mm.config import resolve_path
    from tfg_mm.phase2 import baseline_folder
    from tfg_mm.stats import summarize_seeds

    ablations_dir = resolve_path(ablations_dir)
    path = ablations_dir / GRID_RECORD
    if not path.exists():
        raise ConfigError(f"{path}: no grid record; run the grid first (notebook 03, `make all`) or check "
                          f"`run_dir` / `--ablations-dir` ({ablations_dir}).")
    record = json.loads(path.read_text(encoding="utf-8"))
    settings = record["settings"]
    grid = record["grid"]
    summary: dict[str, Any] = {
        "grid": grid["path"], "description": grid.get("description", ""),
        "bootstrap_resamples": settings["bootstrap_resamples"], "confidence": settings["confidence"],
        "baseline_run": settings["baseline"], "variants": [], "notes": [],
        "interval_note": "With several seeds, the Δ interval is the seed mean of the per-seed bounds "
                         "(same bootstrap draws for every seed: conservative).",
    }

    baseline_metrics, base_ckpt = None, None
    try:
        base_ckpt, baseline_metrics = baseline_folder(settings["baseline"])
    except ConfigError as exc:
        summary["notes"].append(f"baseline unavailable: {exc}")
    summary["baseline"] = {"checkpoint": str(base_ckpt) if base_ckpt else None,
                           "final": (baseline_metrics or {}).get("final")}
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
        out: dict[str, Any] = {"name": name, "overrides": variant["overrides"], "runs": [], "errors": [],
                               "seeds_finished": [], "stats": {}, "delta": {}, "per_class_delta": {}}
        intervals: list[dict] = []
        finals: list[dict] = []
        for entry in sorted(entries, key=lambda r: r["seed"]):
            run_dir = Path(entry["run_dir"])
            run_out = {"seed": entry["seed"], "status": entry["status"], "run_dir": str(run_dir),
                       "report": str(run_dir / "02_phase2.html") if (run_dir / "02_phase2.html").exists() else None}
            if entry["status"] == "failed" or not runs.is_finished(run_dir):
                error = entry.get("error") or "no finished metrics.json"
                out["errors"].append({"seed": entry["seed"], "error": error, "cell": entry.get("cell"),
                                      "run_dir": str(run_dir)})
                run_out["status"] = "failed"
                out["runs"].append(run_out)
                continue
            metrics = runs.read_metrics(run_dir)
            run_out["history"] = [{k: h.get(k) for k in ("epoch", "map", "map50", "alpha_mean", "stage")}
                                  for h in metrics["history"]]
            run_out["final"] = {k: metrics["final"].get(k) for k in ("map", "map50", "map75", "per_class", "epoch")}
            out["runs"].append(run_out)
            out["seeds_finished"].append(entry["seed"])
            finals.append(metrics["final"])
            if baseline_metrics is None:
                continue
            try:
                if base_dets is None:
                    cache = ablations_dir / "baseline_detections_val.cache.json"
                    base_dets, _ = run_detections(resolve_path(settings["baseline"]), baseline_metrics,
                                                  cache_path=cache)
                    base_key = _key(baseline_metrics.get("run_id"), str(base_ckpt))
                intervals.append(_bootstrap(run_dir, metrics, base_dets, base_key, settings, hard, progress))
            except Exception as exc:  # noqa: BLE001  (statistics of one run must not hide the others)
                summary["notes"].append(f"{name} seed {entry['seed']}: no bootstrap interval ({type(exc).__name__}: "
                                        f"{exc})")
        failed = len(out["errors"])
        out["status"] = ("finished" if not failed else "failed" if not finals
                         else f"partial ({failed} of {failed + len(finals)} seeds failed)")
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
                    deltas = [f["per_class"][cls]["ap"] - base_values["ap"] for f in finals
                              if _finite(f["per_class"].get(cls, {}).get("ap")) is not None
                              and _finite(base_values.get("ap")) is not None]
                    out["per_class_delta"][cls] = sum(deltas) / len(deltas) if deltas else None
        if intervals:
            out["delta"]["map"] = _mean_interval(intervals)
            out["delta"]["per_class"] = {cls: _mean_interval([i["per_class"][cls] for i in intervals])
                                         for cls in hard}
            out["delta"]["detections"] = sorted({i.get("detections", "") for i in intervals})
        summary["variants"].append(out)

    summary["wise"] = _wise_summary(settings.get("wise"), summary, base_ckpt, progress)
    atomic_write_json(ablations_dir / SUMMARY_FILE, summary)
    return summary


def _wise_summary(wise: Mapping[str, Any] | None, summary: dict, base_ckpt: Path | None, progress: bool) -> dict:
    """The WiSE-FT curves of the grid's ``wise.variant`` (one per finished seed), cached per run."""
    from tfg_mm import runs

    if not wise:
        return {"note": "this grid asks for no WiSE-FT curve (grid key `wise`)"}
    note = (f"WiSE-FT between the baseline and `{wise['variant']}`: detector weights "
            "θ = (1−λ)·θ_baseline + λ·θ_finetuned; the fusion's effective gate α is scaled by λ too, "
            "since the baseline has no text branch (gate 0). λ = 0 is the baseline, λ = 1 the fine-tuned model.")
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
        key = _key(metrics.get("run_id"), metrics["final"].get("checkpoint"), str(base_ckpt), wise["lambdas"])
        points = _cached(run_dir / "wise.json", key)
        if points is None:
            if progress:
                print(f"[ablations] WiSE-FT curve of {wise['variant']} seed {run['seed']}", flush=True)
            points = wise_curve(metrics, base_ckpt, wise["lambdas"])
            atomic_write_json(run_dir / "wise.json", {"key": key, "value": points})
        out["curves"].append({"seed": run["seed"], "points": points})
    return out
