"""The ablation grid (notebook 03): grid files, the plan of every variant × seed, and its execution.

Grid files (``params/ablations/*.yaml``) are flat::

    description: ...
    base: {flat params shared by every variant}
    seeds: [0, 1]
    hard_classes: [perforation, break]          # optional (default: the embedded set's hard classes)
    wise: {variant: name, lambdas: [0, 0.5, 1]}  # optional WiSE-FT curve of one variant
    baseline_seeds: [0, 1, 2]                    # optional: train the baseline with these seeds too
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
A finished run whose ``run_id`` (params, dataset hash, code version and the baseline's run id:
:func:`tfg_mm.training.identity.run_id`) equals the planned one is reused, not re-run (``reuse: false`` re-runs
it). ``workers > 1`` runs several notebooks at once in separate processes (each papermill execution
has its own kernel), each limited to ``cpu_count // workers`` threads. ``executor: slurm`` (or
``submitit-local``) runs every run as one submitit job instead, the same unit inside the job
(:mod:`tfg_mm.ablations.executors`); a job that dies is recorded failed with its logs.
The unit of work is injectable (``run_variant(parameters, run_dir)``) so that the orchestration is
tested without training.

**Baseline seeds** (grid key ``baseline_seeds``, e.g. ``[0, 1, 2]`` in ``full.yaml``): before the
variants, the baseline (``baseline``, e.g. ``runs/baseline``, trained by notebook 01) is trained
again with each other seed ``k`` into ``<baseline>_seed<k>`` (e.g. ``runs/baseline_seed1``: the
baseline's own recorded params with ``seed: k``; notebook 01, reused when finished with the same
``run_id``), and variant seed ``k`` fine-tunes from and is compared with the baseline of seed
``k``, so that the Δ intervals (:mod:`tfg_mm.ablations.summary`) hold the training noise of both.
Without the key (``small.yaml``) the one baseline serves every seed.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import json
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tfg_mm.ablations.executors import check_settings, executor_settings, submit_and_wait
from tfg_mm.config import (
    EXECUTOR_KEYS,
    GRID_RUNNER_KEYS,
    AblationParams,
    Params,
    diff_from_default,
    load_grid,
    load_params,
)
from tfg_mm.data.loaders import record_of
from tfg_mm.data.synthetic import HARD_CLASSES
from tfg_mm.errors import CheckpointError, ConfigError, DataError
from tfg_mm.io import atomic_write_json
from tfg_mm.paths import resolve_path
from tfg_mm.training import contract, identity, runs
from tfg_mm.training.phase2 import depends_on_baseline, require_finished_baseline
from tfg_mm.training.progress import append_progress
from tfg_mm.workflow.notebooks import NOTEBOOKS, execute, render_html

GRID_RECORD = "grid.json"
FAILURE_FILE = "failure.json"
#: The schema's defaults of the grid runner's settings (bootstrap resamples, confidence, WiSE-FT λs, ...).
SCHEMA_DEFAULTS = AblationParams()
#: Keys that configure the grid itself and are never passed on to a notebook-02 run: the schema's
#: ablation group, plus the per-run keys the grid runner sets itself.
_GRID_LEVEL_KEYS = frozenset(AblationParams.model_fields) | {"run_dir", "params_file", "overwrite", "resume"}

RunVariant = Callable[[dict, Path], None]


# --------------------------------------------------------------------------------------------
# Grid files
# --------------------------------------------------------------------------------------------
def load_ablation_grid(path: str | Path) -> dict:
    """A grid file: :func:`tfg_mm.config.load_grid` (base / seeds / variants, validated through the
    schema; ``hard_classes`` and ``wise`` passed through as written) with those two checked here.

    Returns load_grid's dict with ``executor_settings`` (the executor keys the file sets at its top
    level, e.g. ``executor: slurm``, ``slurm_partition: gpu``: :mod:`tfg_mm.ablations.executors`),
    ``hard_classes`` (default :data:`tfg_mm.data.synthetic.HARD_CLASSES`)
    and ``wise`` (``{"variant", "lambdas"}`` with ``lambdas`` None when the file gives none, or None).
    """
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = resolve_path(path)
    grid = load_grid(path, extra_keys=(*GRID_RUNNER_KEYS, *EXECUTOR_KEYS))
    names = [v["name"] for v in grid["variants"]]
    # where the runs execute (executor: slurm, ...): schema keys, validated here, applied by run_grid
    grid["executor_settings"] = {k: grid.pop(k) for k in EXECUTOR_KEYS if k in grid}
    executor_settings(grid["executor_settings"], source_names=[str(path)])

    hard = grid.get("hard_classes", list(HARD_CLASSES))
    if not isinstance(hard, list) or not all(isinstance(h, str) and h for h in hard):
        raise ConfigError(
            f"{path}: `hard_classes` must be a list of class names, e.g. [perforation, break]; got {hard!r}"
        )
    grid["hard_classes"] = hard

    wise = grid.get("wise")
    if wise is not None:
        if not isinstance(wise, dict) or set(wise) - {"variant", "lambdas"} or "variant" not in wise:
            raise ConfigError(
                f"{path}: `wise` must be `{{variant: <variant name>, lambdas: [0, 0.5, 1]}}` "
                f"(lambdas optional); got {wise!r}"
            )
        if wise["variant"] not in names:
            raise ConfigError(
                f"{path}: `wise.variant: {wise['variant']}` is not a variant of this grid "
                f"({', '.join(names)}); name the fine-tuned variant to interpolate towards."
            )
        lambdas = wise.get("lambdas")
        if lambdas is not None:  # the schema's `wise_lambdas` says what a list of λs may hold
            lambdas = load_params({"wise_lambdas": lambdas}, source_names=[f"{path}: wise.lambdas"]).wise_lambdas
        wise = {"variant": str(wise["variant"]), "lambdas": lambdas}
    grid["wise"] = wise

    baseline_seeds = grid.get("baseline_seeds", [])
    if not isinstance(baseline_seeds, list) or not all(
        isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in baseline_seeds
    ):
        raise ConfigError(
            f"{path}: `baseline_seeds` must be a list of seeds (integers >= 0), e.g. [0, 1, 2]; got {baseline_seeds!r}"
        )
    grid["baseline_seeds"] = sorted(set(baseline_seeds))
    if grid.get("shots") is not None:
        grid["shots"] = _shots_setting(grid["shots"], path, hard)
    return grid


#: ``shots`` of a low-data grid (:mod:`tfg_mm.ablations.lowshot`): its keys and their defaults.
SHOTS_DEFAULTS = {"k": None, "classes": None, "seed": 0, "baseline_params": "params/baseline.yaml", "baseline": {}}


def _shots_setting(shots: Any, path: Path, hard: list[str]) -> dict:
    """A grid's ``shots`` block checked: ``k`` (images kept per starved class, a list), ``classes`` (default: the
    hard classes), ``seed`` (of the subset), ``baseline_params`` (the recipe of each k's baseline) and
    ``baseline`` (flat overrides of that recipe)."""
    example = "{k: [5, 10, 20], classes: [perforation, break], seed: 0, baseline_params: params/baseline.yaml}"
    if not isinstance(shots, dict) or set(shots) - set(SHOTS_DEFAULTS):
        unknown = sorted(set(shots) - set(SHOTS_DEFAULTS)) if isinstance(shots, dict) else []
        raise ConfigError(
            f"{path}: `shots` must be a mapping like {example}"
            + (f"; unknown key(s) {unknown}" if unknown else f"; got {shots!r}")
        )
    out = {**SHOTS_DEFAULTS, **shots}
    out["classes"] = out["classes"] if out["classes"] is not None else list(hard)
    ks = out["k"]
    if not isinstance(ks, list) or not ks or not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
        raise ConfigError(f"{path}: `shots.k` must be a non-empty list of image counts, e.g. [5, 10, 20]; got {ks!r}")
    out["k"] = sorted(set(ks))
    # the schema says what train_shots / shots_classes / shots_seed / the baseline overrides may hold
    load_params(
        {"train_shots": out["k"][0], "shots_classes": out["classes"], "shots_seed": out["seed"], **out["baseline"]},
        source_names=[f"{path}: shots"],
    )
    for k in out["k"]:
        load_params({"train_shots": k}, source_names=[f"{path}: shots.k"])
    return out


def explicit_parameters(namespace: Mapping[str, Any]) -> dict:
    """The parameters a notebook was given explicitly: schema keys whose value is not ``None``.

    Notebook 03's parameters cell leaves every name at ``None`` ("not given here"), so what remains
    after papermill's injected cell is exactly what the caller asked for.
    """
    return {k: v for k, v in namespace.items() if k in Params.model_fields and v is not None}


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------
def _dataset_hash(params, cache: dict) -> str | None:
    """The dataset's content hash (cached per grid), or None when the dataset does not exist yet."""
    key = (params.dataset, params.train_json, params.val_json, params.images_dir, params.test_json)
    if key not in cache:
        try:
            cache[key] = record_of(params)["hash"]
        except DataError:
            cache[key] = None
    return cache[key]


def plan_runs(
    grid: Mapping[str, Any],
    ablations_dir: str | Path,
    params_file: str | Path | None = None,
    explicit: Mapping[str, Any] | None = None,
    seeds: Sequence[int] | None = None,
    reuse: bool = True,
    baseline_runs: Mapping[int, str] | None = None,
) -> list[dict]:
    """One entry per (variant, seed): its resolved params, the notebook parameters, and whether a
    finished run with the same ``run_id`` can be reused. See the module docstring for the layering;
    ``baseline_runs[seed]`` (the trained baseline seeds) replaces ``baseline`` for that seed."""
    ablations_dir = Path(ablations_dir).resolve()
    given = {k: v for k, v in (explicit or {}).items() if k not in _GRID_LEVEL_KEYS}
    sources = [params_file] if params_file else []
    names = ([str(params_file)] if params_file else []) + [f"{grid['path']}: base"]
    code = identity.code_version()
    hashes: dict = {}
    planned = []
    for variant in grid["variants"]:
        for seed in seeds if seeds is not None else grid["seeds"]:
            run_dir = ablations_dir / variant["name"] / f"seed{seed}"
            params = load_params(
                *sources,
                grid["base"],
                variant["overrides"],
                given,
                {"seed": int(seed), "run_dir": str(run_dir)},
                {"baseline": str(baseline_runs[int(seed)])} if int(seed) in (baseline_runs or {}) else {},
                source_names=names
                + [
                    f"{grid['path']}: variant {variant['name']!r}",
                    "notebook 03 parameter",
                    "grid runner",
                    f"{grid['path']}: baseline_seeds",
                ],
            )
            dataset_hash = _dataset_hash(params, hashes)
            expected = identity.run_id(params, dataset_hash, code, _baseline_id(params)) if dataset_hash else None
            reusable, params = _reuse_or_restart(params, run_dir, expected, reuse)
            planned.append(
                {
                    "variant": variant["name"],
                    "seed": int(seed),
                    "run_dir": str(run_dir),
                    "run_id": expected,
                    "reuse": reusable,
                    "params": params,
                }
            )
    return planned


def _reuse_or_restart(params, run_dir: Path, expected: str | None, reuse: bool):
    """Whether the run in ``run_dir`` is reused (finished with the ``expected`` id and ``reuse`` on), and
    the params it runs with otherwise: a stale finished run (other params / data / code) is replaced, an
    interrupted run of the same id resumes from its last checkpoint, anything else starts from scratch."""
    existing = _existing(run_dir)
    reusable = bool(reuse and expected and existing.get("status") == "finished" and existing.get("run_id") == expected)
    same = existing.get("run_id") == expected and expected is not None
    params = load_params(params, {"overwrite": existing.get("status") == "finished", "resume": same or not existing})
    return reusable, params


def baseline_seed_dir(baseline: str | Path, seed: int) -> Path:
    """Where the grid trains the baseline with another seed: ``<baseline>_seed<k>`` next to it."""
    path = resolve_path(baseline)
    return path.parent / f"{path.name}_seed{seed}"


def plan_baseline_seeds(grid: Mapping[str, Any], baseline: str, reuse: bool = True) -> list[dict]:
    """One entry per seed of the grid's ``baseline_seeds``: run_dir, params, and whether it is reusable.

    The baseline run ``baseline`` (finished) is the entry of its own seed; every other seed gets the
    baseline's recorded params with that seed, in :func:`baseline_seed_dir`.
    """
    seeds = list(grid.get("baseline_seeds") or [])
    if not seeds or not baseline:
        return []
    main_dir = resolve_path(baseline)
    main = contract.read_metrics(main_dir)
    main_params = load_params(main["params"], source_names=[f"{main_dir / 'metrics.json'}: params"])
    code = identity.code_version()
    hashes: dict = {}
    planned = []
    for seed in seeds:
        if seed == main_params.seed:
            planned.append({"seed": seed, "run_dir": str(main_dir), "run_id": main.get("run_id"), "reuse": True})
            continue
        run_dir = baseline_seed_dir(baseline, seed)
        params = load_params(
            main_params,
            {"seed": int(seed), "run_dir": str(run_dir)},
            source_names=[f"{main_dir / 'metrics.json'}: params", f"{grid['path']}: baseline_seeds"],
        )
        dataset_hash = _dataset_hash(params, hashes)
        expected = identity.run_id(params, dataset_hash, code) if dataset_hash else None
        reusable, params = _reuse_or_restart(params, run_dir, expected, reuse)
        planned.append(
            {"seed": int(seed), "run_dir": str(run_dir), "run_id": expected, "reuse": reusable, "params": params}
        )
    return planned


def _baseline_id(params) -> str:
    """The baseline's part of a phase-2 ``run_id`` (:func:`tfg_mm.training.phase2.depends_on_baseline`).

    "" when there is no baseline yet (``baseline`` empty, or a folder without a finished
    checkpoint): the run trains it or fails with the reason itself. A baseline contract that exists
    but cannot be read is an error: without its run id no finished run could be told reusable.
    """
    try:
        return depends_on_baseline(params)
    except (ConfigError, CheckpointError):
        return ""
    except DataError as exc:
        raise DataError(
            f"{exc}\nThe ablation grid needs the run id of the baseline (parameter `baseline: "
            f"{params.baseline}`) to decide which finished runs it can reuse. Fix: re-run notebook 01 "
            "into that folder (`overwrite: true`) or point `baseline` at another baseline run."
        ) from None


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
    _run_notebook("02_phase2", parameters, run_dir)


def run_notebook01(parameters: dict, run_dir: Path) -> None:
    """Execute ``notebooks/01_baseline.ipynb`` into ``run_dir``: a baseline seed (see :func:`run_notebook02`)."""
    _run_notebook("01_baseline", parameters, run_dir)


def _run_notebook(name: str, parameters: dict, run_dir: Path) -> None:
    run_dir = Path(run_dir)
    previous = os.environ.get("TFG_MM_FIGURES_DIR")
    os.environ["TFG_MM_FIGURES_DIR"] = str(run_dir / "figures")
    try:
        executed = execute(NOTEBOOKS / f"{name}.ipynb", run_dir / f"{name}.ipynb", parameters, progress=False)
    finally:
        if previous is None:
            os.environ.pop("TFG_MM_FIGURES_DIR", None)
        else:
            os.environ["TFG_MM_FIGURES_DIR"] = previous
    render_html(executed, run_dir / f"{name}.html")


def failure_record(exc: BaseException) -> dict:
    """``{"error", "cell", "traceback"}`` of an exception; the failing cell for papermill errors.

    ``PapermillExecutionError`` carries the cell's index, execution count and source, and the
    kernel's exception name and value (e.g. ``OfflineError: ...``).
    """
    cell = None
    if hasattr(exc, "ename") and hasattr(exc, "cell_index"):
        error = f"{exc.ename}: {exc.evalue}"
        source = str(getattr(exc, "source", "") or "").strip().splitlines()
        cell = {
            "index": exc.cell_index,
            "execution_count": getattr(exc, "exec_count", None),
            "source": "\n".join(source[:6]),
        }
        tb = "\n".join(getattr(exc, "traceback", []) or [])[-4000:]
    else:
        error = f"{type(exc).__name__}: {exc}"
        tb = "".join(traceback.format_exception(exc))[-4000:]
    return {"error": error[:2000], "cell": cell, "traceback": tb}


def _execute_run(entry: dict, run_variant: RunVariant) -> dict:
    """Run one planned entry; never raises (a failure is part of the result)."""
    run_dir = Path(entry["run_dir"])
    result = {"variant": entry["variant"], "seed": entry["seed"], "run_dir": str(run_dir), "run_id": entry["run_id"]}
    if entry["reuse"]:
        return {**result, "status": "reused", "seconds": 0.0}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILURE_FILE).unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        run_variant(notebook_parameters(entry["params"]), run_dir)
        if not contract.is_finished(run_dir):
            raise DataError(
                f"{run_dir}: the run ended without a finished metrics.json (run contract); see its executed notebook"
            )
    except Exception as exc:  # any failure of one run is recorded; the grid goes on
        status = _stopped_or_failed(run_dir)
        record = {**result, "status": status, "seconds": round(time.perf_counter() - t0, 1), **failure_record(exc)}
        atomic_write_json(run_dir / FAILURE_FILE, record)
        _mark_contract_failed(run_dir, record)
        return record
    return {**result, "status": "finished", "seconds": round(time.perf_counter() - t0, 1)}


def _job_died(entry: dict, exc: BaseException, job: dict) -> dict:
    """The record of a run whose submitted job died before the unit could record anything (time
    limit, preemption, node failure, out of memory): submitit's error text and the job's log files,
    written like any failure (``failure.json``, the run contract marked failed)."""
    run_dir = Path(entry["run_dir"])
    record = {
        "variant": entry["variant"],
        "seed": entry["seed"],
        "run_dir": str(run_dir),
        "run_id": entry["run_id"],
        "status": _stopped_or_failed(run_dir),
        "seconds": 0.0,
        **failure_record(exc),
        "job": {**job, "died": True},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / FAILURE_FILE, record)
    _mark_contract_failed(run_dir, record)
    return record


def _execute_all(
    entries: Sequence[dict],
    run_variant: RunVariant,
    settings: Mapping[str, Any],
    workers: int,
    report: Callable[[str], None],
) -> Iterator[dict]:
    """The result of every entry, as each ends: reused ones first, then the others on the executor
    (local: in this process, or ``workers`` worker processes; slurm / submitit-local: one job each)."""
    for entry in entries:
        if entry["reuse"]:
            yield _execute_run(entry, run_variant)
    to_run = [e for e in entries if not e["reuse"]]
    if settings["executor"] != "local":
        run_one = functools.partial(_execute_run, run_variant=run_variant)
        for entry, result, error, job in submit_and_wait(to_run, run_one, settings, report):
            yield _job_died(entry, error, job) if result is None else {**result, "job": job}
    elif workers <= 1 or len(to_run) <= 1:
        for entry in to_run:
            yield _execute_run(entry, run_variant)
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        # fork: a worker starts in milliseconds instead of re-importing torch / transformers. A worker
        # runs no torch op itself (the default unit launches a fresh papermill kernel), so the fork
        # caveat of OpenMP thread pools does not apply to it.
        context = multiprocessing.get_context("fork")
        with cf.ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=_worker_init, initargs=(threads,)
        ) as pool:
            futures = {pool.submit(_execute_run, entry, run_variant): entry for entry in to_run}
            for future in cf.as_completed(futures):
                entry = futures[future]
                try:
                    yield future.result()
                except Exception as exc:  # the worker process itself died: recorded like a failed run
                    yield {
                        "variant": entry["variant"],
                        "seed": entry["seed"],
                        "run_dir": entry["run_dir"],
                        "run_id": entry["run_id"],
                        "status": "failed",
                        "seconds": 0.0,
                        **failure_record(exc),
                    }


def _stopped_or_failed(run_dir: Path) -> str:
    """``interrupted`` when the run recorded that a signal stopped it (a SLURM time limit or preemption, a
    ``kill``: resumable, a rerun of the grid continues it), else ``failed``."""
    record = contract.raw_contract(run_dir)
    return "interrupted" if record is not None and record.get("status") == "interrupted" else "failed"


def _mark_contract_failed(run_dir: Path, record: dict) -> None:
    """The run's own ``metrics.json`` says ``failed`` too, as after a failure of any entry point.

    A run that failed inside its notebook has marked itself already (with its traceback file); one
    whose kernel died, or that ended unfinished, still says ``running``: it is marked here, naming
    :data:`FAILURE_FILE`.
    """
    interrupted = runs.interrupted_run(run_dir)
    if interrupted and interrupted.get("status") == "running":
        error = str(record.get("error", ""))
        contract.mark_failed(
            run_dir,
            {
                "type": error.split(":", 1)[0] or "Error",
                "message": error,
                "epoch": None,
                "step": None,
                "stage": "ablation grid",
                "traceback": FAILURE_FILE,
                "time": None,
            },
        )


def _progress_line(label: str, result: dict) -> str:
    """One line per ended run: ``minilm seed 0: finished in 61 s (job 1234_0)``; a
    failure adds the first line of its error (and, for a job that died, its error log)."""
    job = result.get("job")
    notes = [f"job {job['id']}"] if job else []
    if result["status"] in ("failed", "interrupted"):
        notes.append(str(result.get("error", "")).strip().splitlines()[0] if result.get("error") else "error")
        if job and job.get("died"):
            notes.append(f"log: {job['stderr']}")
    if result["status"] == "interrupted":
        notes.append("resumable: rerun the grid")
    extra = f" ({'; '.join(notes)})" if notes else ""
    return f"{label}: {result['status']} in {result['seconds']:.0f} s{extra}"


def _worker_init(threads: int) -> None:
    """Share the CPU between parallel runs: each kernel inherits this process's thread limits."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------
def run_grid(
    grid: Mapping[str, Any] | str | Path,
    ablations_dir: str | Path,
    *,
    params_file: str | Path | None = "params/phase2.yaml",
    explicit: Mapping[str, Any] | None = None,
    seeds: Sequence[int] | None = None,
    workers: int = SCHEMA_DEFAULTS.workers,
    reuse: bool = SCHEMA_DEFAULTS.reuse,
    bootstrap_resamples: int = SCHEMA_DEFAULTS.bootstrap_resamples,
    confidence: float = SCHEMA_DEFAULTS.confidence,
    wise_lambdas: Sequence[float] | None = None,
    run_variant: RunVariant = run_notebook02,
    progress: bool = True,
    run_baseline_seed: RunVariant = run_notebook01,
    executor: Mapping[str, Any] | None = None,
) -> dict:
    """Run every variant × seed (see the module docstring) and write ``<ablations_dir>/grid.json``.

    Returns the grid record: the grid, the settings the statistics need (baseline, bootstrap
    resamples, confidence, hard classes, WiSE-FT), and one entry per run with ``status`` finished /
    reused / failed, ``seconds`` and, for a failure, ``error`` and ``cell``. The WiSE-FT λs are, first
    found: notebook 03's explicit ``wise_lambdas``, the grid's ``wise.lambdas``, ``wise_lambdas``,
    the schema's default. ``executor`` holds the executor settings given explicitly (notebook 03's
    ``executor``, ``slurm_*``: :mod:`tfg_mm.ablations.executors`), over the grid file's.
    """
    if not isinstance(grid, Mapping):
        grid = load_ablation_grid(grid)
    if grid.get("shots"):
        raise ConfigError(
            f"{grid.get('path', 'grid')}: a low-data grid (`shots`) trains one baseline per k: run it with notebook "
            "04 (`make lowshot`), not notebook 03."
        )
    settings = executor_settings(
        grid.get("executor_settings") or {},
        executor or {},
        source_names=[str(grid.get("path", "grid")), "notebook 03 parameter"],
    )
    check_settings(settings, f"{grid.get('path', 'grid')} / notebook 03")
    ablations_dir = resolve_path(ablations_dir)
    if params_file and not Path(params_file).is_absolute() and not Path(params_file).exists():
        params_file = resolve_path(params_file)
    planned = plan_runs(grid, ablations_dir, params_file, explicit, seeds, reuse)
    main_baseline = planned[0]["params"].baseline if planned else ""
    if main_baseline:
        # an unfinished baseline (interrupted or failed) would give every variant a wrong reference
        require_finished_baseline(main_baseline)
    ablations_dir.mkdir(parents=True, exist_ok=True)

    def report(line: str) -> None:
        """A line in the terminal (``progress``) and in ``<ablations_dir>/progress.jsonl``, which
        the pipeline's progress watcher prints while notebook 03 runs; the report never shows it."""
        append_progress(ablations_dir, {"run": "ablations", "event": line})
        if progress:
            print(f"[ablations] {line}", flush=True)

    baseline_plan = [{**entry, "variant": "baseline"} for entry in plan_baseline_seeds(grid, main_baseline, reuse)]
    baseline_results = []
    for result in _execute_all(baseline_plan, run_baseline_seed, settings, 1, report):
        baseline_results.append(result)
        report(_progress_line(f"baseline seed {result['seed']}", result))
    order = [e["seed"] for e in baseline_plan]
    baseline_results.sort(key=lambda r: order.index(r["seed"]))
    baseline_runs = {r["seed"]: r["run_dir"] for r in baseline_results if r["status"] in ("finished", "reused")}
    if baseline_runs:  # variant seed k fine-tunes from the baseline of seed k
        planned = plan_runs(grid, ablations_dir, params_file, explicit, seeds, reuse, baseline_runs)
    wise = dict(grid.get("wise") or {}) or None
    if wise is not None:
        wise["lambdas"] = list(
            (explicit or {}).get("wise_lambdas") or wise.get("lambdas") or wise_lambdas or SCHEMA_DEFAULTS.wise_lambdas
        )
    record = {
        "grid": {k: grid.get(k) for k in ("path", "description", "base", "seeds", "variants", "baseline_seeds")},
        "settings": {
            "baseline": main_baseline,
            "baseline_runs": {str(k): v for k, v in baseline_runs.items()},
            "bootstrap_resamples": int(bootstrap_resamples),
            "confidence": float(confidence),
            "hard_classes": list(grid.get("hard_classes", HARD_CLASSES)),
            "wise": wise,
            "params_file": str(params_file or ""),
            "explicit": dict(explicit or {}),
            "workers": workers,
            "executor": dict(settings),
            "reuse": reuse,
        },
        "runs": [],
        "baseline_runs": baseline_results,
    }
    results: dict[tuple[str, int], dict] = {}

    def done(result: dict) -> None:
        results[(result["variant"], result["seed"])] = result
        record["runs"] = [results[(e["variant"], e["seed"])] for e in planned if (e["variant"], e["seed"]) in results]
        atomic_write_json(ablations_dir / GRID_RECORD, record)
        report(_progress_line(f"{result['variant']} seed {result['seed']}", result))

    for result in _execute_all(planned, run_variant, settings, workers, report):
        done(result)
    if not planned:
        atomic_write_json(ablations_dir / GRID_RECORD, record)
    return record
