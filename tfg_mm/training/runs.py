"""The run contract: every notebook run writes ``{run_dir}/metrics.json``, and reports read only that.

``metrics.json`` holds:

* ``status`` — ``running`` (rewritten after each evaluated epoch), ``finished`` or ``failed``; a
  failed run also has ``failure`` = {``type``, ``message``, ``epoch``, ``step``, ``stage``,
  ``traceback`` (a file in the run folder), ``time``} (:func:`mark_failed`);
* ``run_id`` — hash of (params that affect the result, dataset content hash, code version): the
  ablation runner reuses a finished run with the same id instead of re-running it;
* ``params`` — all of them, defaults filled in; ``params_changed`` — those that differ from the default;
* ``dataset`` — paths and a content hash (:func:`tfg_mm.data.loaders.dataset_record`);
* ``code_version`` — package version, git commit and dirty flag, hash of the package sources;
* ``environment`` — what else decides a number (:func:`environment`): versions of python and of the
  numeric libraries, the CPU model and torch's CPU kernel capability, the GPU and CUDA / cuDNN
  versions, torch's thread count and its deterministic-algorithms flag (schema version 2; a
  version-1 file without it still reads);
* ``history`` — one entry per evaluated epoch with at least ``epoch``, ``map``, ``map50``, ``map75``,
  ``per_class`` = {class name: {``ap``, ``ap50``}}, ``lr``, ``losses`` = {term: value}, ``seconds``;
* ``final`` — the selected checkpoint's metrics (``map``, ``map50``, ``map75``, ``per_class``, ...);
  from schema version 3 a finished run's ``final`` also carries the error analysis of its
  detections (:mod:`tfg_mm.evaluation.analysis`): ``operating_points`` = {class name: {``threshold``,
  ``precision``, ``recall``, ``f1``}} and ``errors`` = {class name: {error type: ΔAP50}}, with the
  curves and the confusion matrix in the side file :data:`ANALYSIS_FILE`. They are checked when
  present; a file without them (older schema, a run whose detections were not kept) still reads;
* any ``extra`` top-level entries the phase adds (e.g. the fusion's α trajectory).

The file is written atomically (a crash leaves the previous version, never half a file), with
non-finite numbers stored as ``null`` so that every JSON reader accepts it. A run folder that holds
a finished run is never replaced unless ``overwrite`` is asked for, and an interrupted run is only
resumed by the very same run (:func:`check_run_dir`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch

import tfg_mm
from tfg_mm.config import EXECUTOR_KEYS, Params, diff_from_default, load_params
from tfg_mm.errors import ConfigError, DataError
from tfg_mm.io import atomic_write_json, json_safe, probe_writable
from tfg_mm.paths import resolve_path

METRICS_FILE = "metrics.json"
#: Written by :func:`prepare_run_dir`: only folders carrying it (or a metrics.json) are ever cleared.
MARKER_FILE = ".tfg_mm_run"
#: 2 added ``environment``; a version-1 file (written before it) still reads without it.
#: 3 added ``final.operating_points`` and ``final.errors`` (optional: checked when present).
SCHEMA_VERSION = 3
STATUSES = ("running", "finished", "failed")
#: ``final.operating_points[class]`` keys, and the error types of ``final.errors[class]`` (tfg_mm.evaluation.analysis)
OPERATING_POINT_KEYS = ("threshold", "precision", "recall", "f1")
ERROR_TYPES = ("classification", "localisation", "both", "duplicate", "background", "missed")
HISTORY_KEYS = ("epoch", "map", "map50", "map75", "per_class", "lr", "losses", "seconds")
FINAL_KEYS = ("map", "map50", "map75", "per_class")
CONTRACT_KEYS = (
    "schema_version",
    "status",
    "run_id",
    "updated",
    "params",
    "params_changed",
    "dataset",
    "code_version",
    "environment",
    "history",
    "final",
)
#: Contract keys a file of an older schema version may lack: {key: first schema version that has it}.
ADDED_KEYS = {"environment": 2}
#: Distributions whose versions decide a number (the ones not installed are recorded as None).
ENVIRONMENT_PACKAGES = (
    "torch",
    "torchvision",
    "transformers",
    "numpy",
    "pycocotools",
    "faster-coco-eval",
    "open_clip_torch",
    "accelerate",
)

#: Parameters that cannot change a run's result, so two runs differing only in them share a run id.
RUN_ID_EXCLUDED = frozenset(
    {
        # where and how the run is stored and executed (the brief's list)
        "run_dir",
        "overwrite",
        "resume",
        "device",
        "num_workers",
        "pin_memory",
        # how the optimiser update / the attention are computed: `foreach` (the default) is bit-identical to
        # `for-loop`; `fused`, the attention kinds, `compile` and `memory_format` differ by float rounding only, like
        # another `device`
        # (tests/test_speed.py)
        "optimizer_impl",
        "attn_implementation",
        "compile",
        "memory_format",
        # checkpoint frequency and the embedding cache location change no number
        "save_every",
        "text_cache_dir",
        # grid-level settings of the ablation runner: adding a seed to `seeds` must not invalidate
        # the finished runs of the other seeds
        "grid",
        "seeds",
        "workers",
        "reuse",
        "bootstrap_resamples",
        "confidence",
        *EXECUTOR_KEYS,  # where a grid run executes (local, SLURM) changes none of its numbers
        # where the run is also logged (MLflow / TensorBoard): a copy of what metrics.json holds
        "tracking",
        "tracking_uri",
        "experiment_name",
    }
)
#: Parameters that may change when an interrupted run resumes: exactly those that cannot change its
#: result (:data:`RUN_ID_EXCLUDED`), so that a resumed run is the same run (same ``run_id``). The
#: contract records their latest values. Any other difference is refused (:func:`check_run_dir`).
RESUME_MAY_CHANGE = RUN_ID_EXCLUDED
#: The resumable state the trainer writes (:meth:`tfg_mm.training.loop.Trainer.save_state`), relative to the run folder.
STATE_FILE = Path("state") / "last.pt"
#: The traceback of a failed run, relative to the run folder (named in ``failure.traceback``).
TRACEBACK_FILE = "traceback.txt"
#: What the provenance's ``git_dirty`` flag looks at, relative to the repository root: the sources,
#: notebooks, params and scripts (not ``reports/``, ``runs/`` or ``data/``, which runs write).
DIRTY_PATHS = ("tfg_mm", "notebooks", "params", "scripts", "pyproject.toml")
#: The selected checkpoint's validation detections (COCO results list), written by the trainer.
DETECTIONS_FILE = "detections_val.json"
#: The error analysis of those detections (:mod:`tfg_mm.evaluation.analysis`): curves and confusion matrix the reports draw.
ANALYSIS_FILE = "analysis.json"


# --------------------------------------------------------------------------------------------
# Code and run identity
# --------------------------------------------------------------------------------------------


def _git(args: Sequence[str], cwd: Path) -> str | None:
    """Output of a read-only git command, or None outside a repository / without git."""
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def _code_version() -> tuple[tuple[str, Any], ...]:
    package_dir = Path(tfg_mm.__file__).resolve().parent
    digest = hashlib.sha256()
    for source in sorted(package_dir.rglob("*.py")):
        digest.update(source.relative_to(package_dir).as_posix().encode() + b"\0")
        digest.update(source.read_bytes() + b"\0")
    commit, dirty = git_state(package_dir)
    return (
        ("package", tfg_mm.__version__),
        ("git_commit", commit),
        ("git_dirty", dirty),
        ("source_sha256", digest.hexdigest()),
    )


def git_state(folder: Path) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the checkout that holds ``folder``; ``(None, None)`` outside git.

    ``dirty`` looks only at what decides a run's numbers (:data:`DIRTY_PATHS`, tracked changes and
    untracked files alike), relative to the repository root: the reports, runs and data that
    ``make all`` itself writes do not make a fresh clone "dirty".
    """
    commit = _git(["rev-parse", "HEAD"], folder)
    top = _git(["rev-parse", "--show-toplevel"], folder) if commit else None
    if not commit or not top:
        return None, None
    status = _git(["status", "--porcelain", "--", *DIRTY_PATHS], Path(top.strip()))
    return commit.strip(), bool(status.strip()) if status is not None else None


def code_version() -> dict:
    """``{"package", "git_commit", "git_dirty", "source_sha256"}`` of the code this process runs.

    ``git_commit`` / ``git_dirty`` are None outside a git checkout (or before the first commit);
    ``source_sha256`` hashes the package's ``.py`` files, so uncommitted edits are still told
    apart. Computed once per process: the code that was imported is the code that ran.
    """
    return dict(_code_version())


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """What besides params, data and code decides a run's numbers, for ``metrics.json``.

    Float results depend on the kernels that ran: the libraries' versions, the CPU's vector
    capability that torch dispatches to (``AVX512`` / ``AVX2`` / ``DEFAULT``, settable with
    ``ATEN_CPU_CAPABILITY``), the number of threads a reduction is split over, and on a GPU its
    model and the CUDA / cuDNN versions. Two runs that differ here can differ in their numbers by
    more than the digits quoted, so quote seed spread, not digits. Read when the contract is
    written: the thread count and deterministic flag are those in force during the run.
    """
    cuda = torch.cuda.is_available()
    deterministic = "off"
    if torch.are_deterministic_algorithms_enabled():
        deterministic = "warn only" if torch.is_deterministic_algorithms_warn_only_enabled() else "on"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        # torch.__version__ carries the build (e.g. "+cu130" / "+cpu"), the distribution version does not
        "packages": {name: torch.__version__ if name == "torch" else _version(name) for name in ENVIRONMENT_PACKAGES},
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": deterministic,
        "gpu": torch.cuda.get_device_name(torch.cuda.current_device()) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": str(torch.backends.cudnn.version()) if cuda and torch.backends.cudnn.is_available() else None,
    }


def with_world_size(depends_on: str, world_size: int) -> str:
    """What a run depends on, with its number of processes when there are several (data parallelism).

    The global batch is ``batch_size`` x processes, so a run of 2 processes is another run than one of
    1 process with the same params: another run id. A one-process run's ``depends_on`` (and id) is unchanged.
    """
    return depends_on if world_size == 1 else f"{depends_on};world_size={world_size}"


def world_size_of(depends_on: str) -> int:
    """The number of processes :func:`with_world_size` folded into ``depends_on`` (1 when none)."""
    for part in depends_on.split(";"):
        if part.startswith("world_size="):
            return int(part.split("=", 1)[1])
    return 1


def run_id(params: Params | Mapping[str, Any], dataset_hash: str, code: Mapping[str, Any], depends_on: str = "") -> str:
    """Stable 16-hex-digit id of what determines a run's result.

    Hashes the params minus :data:`RUN_ID_EXCLUDED`, the dataset hash, and the code version minus
    ``git_dirty`` (a report written into the checkout makes it dirty without changing any code;
    ``source_sha256`` already tells edited code apart).
    """
    if not isinstance(params, Params):
        params = load_params(params, source_names=["run_id(params=...)"])
    payload = {
        "params": {k: v for k, v in params.model_dump(mode="json").items() if k not in RUN_ID_EXCLUDED},
        "dataset": dataset_hash,
        "code": {k: v for k, v in code.items() if k != "git_dirty"},
    }
    if depends_on:
        payload["depends_on"] = depends_on
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Run folders
# --------------------------------------------------------------------------------------------


def _metrics_path(run_dir: str | Path) -> Path:
    path = resolve_path(run_dir)
    return path if path.suffix == ".json" else path / METRICS_FILE


def is_finished(run_dir: str | Path) -> bool:
    """True when ``run_dir/metrics.json`` exists, parses and says ``status: finished``."""
    path = _metrics_path(run_dir)
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("status") == "finished"
    except (OSError, ValueError, AttributeError):
        return False


def finished_run(run_dir: str | Path, run_id: str) -> dict | None:
    """The contract of the finished run in ``run_dir`` when it is this very run (same ``run_id``), else None.

    A run is the same when its params, dataset content hash and code version (and what it depends
    on, :func:`run_id`) match, so re-running a notebook or the pipeline reuses it instead of
    training again. A finished run with another id is refused by :func:`prepare_run_dir` unless
    ``overwrite``.
    """
    if not is_finished(run_dir):
        return None
    existing = read_metrics(run_dir)
    return existing if existing.get("run_id") == run_id else None


def _raw_contract(run_dir: str | Path) -> dict | None:
    """``metrics.json`` as written (not checked against the contract), or None when absent / unreadable."""
    try:
        record = json.loads(_metrics_path(run_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def run_differences(
    old: Mapping[str, Any], params: Params, dataset_hash: str, code: Mapping[str, Any], depends_on: str = ""
) -> list[str]:
    """What makes the run recorded in ``old`` (a run contract) another run than this one, one
    ``key: old -> new`` line each: the params that take part in the run id, the dataset hash, the code."""
    out = []
    old_params = old.get("params") if isinstance(old.get("params"), Mapping) else {}
    new_params = params.model_dump(mode="json")
    for key, value in new_params.items():
        if key in RUN_ID_EXCLUDED:
            continue
        before = old_params.get(key, "<not recorded>")
        if before != value:
            out.append(f"`{key}`: {_short(before)} -> {_short(value)}")
    old_hash = (old.get("dataset") or {}).get("hash") if isinstance(old.get("dataset"), Mapping) else None
    if old_hash != dataset_hash:
        out.append(f"dataset content hash: {str(old_hash)[:16]} -> {dataset_hash[:16]} (other images or annotations)")
    old_code = old.get("code_version") if isinstance(old.get("code_version"), Mapping) else {}
    for key in ("package", "git_commit", "source_sha256"):
        if old_code.get(key) != code.get(key):
            out.append(f"code `{key}`: {_short(old_code.get(key))} -> {_short(code.get(key))}")
    old_training = old.get("training") if isinstance(old.get("training"), Mapping) else {}
    old_world, new_world = old_training.get("world_size", 1), world_size_of(depends_on)
    if old_world != new_world:
        out.append(f"processes (world size): {old_world} -> {new_world} (the global batch is batch_size x processes)")
    if not out and old.get("run_id") != run_id(params, dataset_hash, code, depends_on):
        out.append("what the run depends on (phase 2: the baseline run it starts from) changed")
    return out


def interrupted_run(run_dir: str | Path) -> dict | None:
    """The contract of an interrupted run in ``run_dir`` that a new run would continue, else None.

    Interrupted: the resumable state (:data:`STATE_FILE`) exists, or ``metrics.json`` says
    ``running`` / ``failed`` with at least one evaluated epoch. A state file whose contract is missing
    or unreadable gives ``{}`` (a run of unknown identity).
    """
    path = resolve_path(run_dir)
    record = _raw_contract(path)
    has_state = (path / STATE_FILE).exists()
    if record is not None and record.get("status") in ("running", "failed"):
        if has_state or record.get("history"):
            return record
        return None
    if has_state and (record is None or record.get("status") != "finished"):
        return {}
    return None


def check_run_dir(
    run_dir: str | Path,
    params: Params,
    dataset_hash: str,
    code: Mapping[str, Any],
    depends_on: str = "",
) -> None:
    """Refuse, before any work, a run folder holding *another* run: a ConfigError lists what differs.

    * a finished run with another run id (unless ``overwrite``): the run that is there stays;
    * with ``resume`` (and without ``overwrite``), an interrupted run (:func:`interrupted_run`) with
      another run id: resuming it would continue the old run's weights, optimiser and schedule while
      the contract recorded the new params. Only :data:`RESUME_MAY_CHANGE` may differ on resume.

    ``resume: false`` and ``overwrite: true`` start the folder over (:func:`prepare_run_dir`).
    """
    if params.overwrite:
        return
    path = resolve_path(run_dir)
    rid = run_id(params, dataset_hash, code, depends_on)
    fixes_new = "choose another `run_dir`"
    if is_finished(path):
        old = _raw_contract(path) or {}
        if old.get("run_id") == rid:
            return
        diff = run_differences(old, params, dataset_hash, code, depends_on)
        raise ConfigError(
            f"run_dir `{params.run_dir}` ({path}) already holds a finished run that is another run than this one; "
            "nothing was changed. It differs in:\n"
            + "\n".join(f"  - {d}" for d in diff or ["its run id (see its metrics.json)"])
            + "\nFix: give the same params to reuse it, or set `overwrite: true` (papermill: `-p overwrite True`) "
            f"to replace it, or {fixes_new}."
        )
    if not params.resume:
        return
    old = interrupted_run(path)
    if old is None or old.get("run_id") == rid:
        return
    diff = run_differences(old, params, dataset_hash, code, depends_on) if old else []
    status = old.get("status", "unknown") if old else "unknown (its metrics.json is missing or unreadable)"
    epochs = [h.get("epoch") for h in old.get("history", []) if isinstance(h, Mapping)] if old else []
    raise ConfigError(
        f"run_dir `{params.run_dir}` ({path}) holds an interrupted run (status {status}, evaluated epochs "
        f"{epochs or 'none'}) that is another run than this one, so it was not resumed and nothing was changed. "
        "It differs in:\n"
        + "\n".join(f"  - {d}" for d in diff or ["its identity cannot be read"])
        + "\nA resumed run continues the old run's weights, optimiser and schedule; only "
        f"{', '.join(f'`{k}`' for k in sorted(RESUME_MAY_CHANGE))} may change on resume. "
        "Fix: rerun with the old values to resume it, or set `overwrite: true` (or `resume: false`) to start "
        f"this run_dir over, or {fixes_new}."
    )


def mark_failed(run_dir: str | Path, failure: Mapping[str, Any]) -> Path | None:
    """Mark the run in ``run_dir`` failed: its ``metrics.json`` keeps everything it holds (history,
    params, ...) and gets ``status: failed`` and ``failure``. Returns the path, or None when there is
    no readable ``metrics.json`` yet (the caller writes a new one with :func:`write_metrics`)."""
    record = _raw_contract(run_dir)
    if record is None:
        return None
    record["status"] = "failed"
    record["failure"] = json_safe(dict(failure))
    record["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
    return atomic_write_json(_metrics_path(run_dir), record)


def _clear(path: Path) -> None:
    """Empty a run folder: move it aside first so a crash never leaves a half-deleted run behind."""
    aside = path.with_name(f".{path.name}.replaced-{os.getpid()}-{time.time_ns()}")
    os.replace(path, aside)
    path.mkdir()
    shutil.rmtree(aside, ignore_errors=True)


def _writable_run_dir(prepare):
    """``prepare_run_dir`` that ends with a write probe and turns a refused write (``PermissionError``:
    a read-only ``run_dir`` or parent) into a ``ConfigError`` naming the folder and the fix, before any work."""

    @functools.wraps(prepare)
    def wrapper(run_dir: str | Path, *args: Any, **kwargs: Any) -> Path:
        try:
            path = prepare(run_dir, *args, **kwargs)
            probe_writable(path)
        except PermissionError as exc:
            # what was refused is an entry (created, renamed or removed) in this folder
            folder = Path(exc.filename).parent if exc.filename else resolve_path(run_dir).parent
            raise ConfigError(
                f"run_dir `{run_dir}` ({resolve_path(run_dir)}): the folder {folder} cannot be written "
                f"({exc.strerror}: {exc.filename}). Nothing was trained and nothing already written was changed. "
                f"Fix: make it writable for this user (`chmod u+w {folder}`, or ask its owner), or set `run_dir` "
                "to a folder you can write to (e.g. runs/<name> inside your clone)."
            ) from None
        return path

    return wrapper


@_writable_run_dir
def prepare_run_dir(run_dir: str | Path, overwrite: bool = False, resume: bool = True) -> Path:
    """Create (or check) the run folder before any work, and return its absolute path.

    * A folder holding a *finished* run is refused unless ``overwrite`` (nothing is touched).
    * ``overwrite``, or ``resume=False`` on an interrupted run, empties the folder first: only a
      folder that tfg_mm made (it holds ``metrics.json`` or the marker file) is ever emptied.
    * Otherwise (``resume``) the folder is kept as is, so training can pick up its last checkpoint.
    """
    path = resolve_path(run_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run_dir `{run_dir}` ({path}) is a file, not a folder; choose another `run_dir`")
    if is_finished(path) and not overwrite:
        try:
            final = read_metrics(path).get("final") or {}
        except DataError:  # finished but damaged: still refuse, just without the summary
            final = {}
        summary = ", ".join(f"{k} {final[k]:.4f}" for k in ("map", "map50") if isinstance(final.get(k), float))
        raise ConfigError(
            f"run_dir `{run_dir}` ({path}) already holds a finished run ({summary or 'see its metrics.json'}); "
            "nothing was changed. To replace it set `overwrite: true` (papermill: `-p overwrite True`; "
            "load_params(..., overwrite=True)), or choose another `run_dir`."
        )
    if path.is_dir() and any(path.iterdir()) and (overwrite or not resume):
        if not ((path / METRICS_FILE).exists() or (path / MARKER_FILE).exists()):
            raise ConfigError(
                f"run_dir `{run_dir}` ({path}) is not empty and was not made by tfg_mm (no {METRICS_FILE} or "
                f"{MARKER_FILE}); refusing to empty it for `overwrite` / `resume: false`. Choose a new `run_dir`."
            )
        _clear(path)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARKER_FILE).exists():
        atomic_write_json(
            path / MARKER_FILE,
            {"created": datetime.now(UTC).isoformat(timespec="seconds"), "package": tfg_mm.__version__},
        )
    return path


# --------------------------------------------------------------------------------------------
# metrics.json
# --------------------------------------------------------------------------------------------




def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _per_class_problems(per_class: Any, where: str) -> list[str]:
    if not isinstance(per_class, Mapping):
        return [f"{where}: `per_class` must be a mapping {{class name: {{ap, ap50}}}}"]
    problems = []
    for name, values in per_class.items():
        if not isinstance(values, Mapping) or not {"ap", "ap50"} <= set(values):
            problems.append(f"{where}: per_class[{name!r}] must have `ap` and `ap50`")
        elif not (_is_number(values["ap"]) and _is_number(values["ap50"])):
            problems.append(f"{where}: per_class[{name!r}] `ap` / `ap50` must be numbers or null")
    return problems


def _contract_problems(history: Any, final: Any, status: Any) -> list[str]:
    """Everything that breaks the contract, listed (reports must be able to trust every entry)."""
    problems: list[str] = []
    if status not in STATUSES:
        problems.append(f"`status` is {status!r}; allowed: {', '.join(STATUSES)}")
    if not isinstance(history, list):
        return problems + ["`history` must be a list of per-epoch entries"]
    previous = -1
    for index, entry in enumerate(history):
        where = f"history[{index}]"
        if not isinstance(entry, Mapping):
            problems.append(f"{where}: must be a mapping")
            continue
        missing = [k for k in HISTORY_KEYS if k not in entry]
        if missing:
            problems.append(f"{where}: missing {', '.join(missing)} (required: {', '.join(HISTORY_KEYS)})")
            continue
        if not isinstance(entry["epoch"], int) or entry["epoch"] <= previous:
            problems.append(f"{where}: `epoch` must be an integer greater than the previous entry's ({previous})")
        else:
            previous = entry["epoch"]
        for key in ("map", "map50", "map75", "seconds"):
            if not _is_number(entry[key]):
                problems.append(f"{where}: `{key}` must be a number or null, got {entry[key]!r}")
        if not (_is_number(entry["lr"]) or isinstance(entry["lr"], Mapping)):
            problems.append(f"{where}: `lr` must be a number or a mapping {{param group: lr}}")
        if not isinstance(entry["losses"], Mapping):
            problems.append(f"{where}: `losses` must be a mapping {{loss term: value}}")
        problems += _per_class_problems(entry["per_class"], where)
    if final is None:
        if status == "finished":
            problems.append("`final` is required when status is finished (the selected checkpoint's metrics)")
    elif not isinstance(final, Mapping):
        problems.append("`final` must be a mapping of metrics or null")
    else:
        missing = [k for k in FINAL_KEYS if k not in final]
        if missing:
            problems.append(f"final: missing {', '.join(missing)} (required: {', '.join(FINAL_KEYS)})")
        elif not all(_is_number(final[k]) for k in ("map", "map50", "map75")):
            problems.append("final: `map` / `map50` / `map75` must be numbers or null")
        else:
            problems += _per_class_problems(final["per_class"], "final")
        problems += _analysis_problems(final)
    return problems


def _analysis_problems(final: Mapping[str, Any]) -> list[str]:
    """``final.operating_points`` / ``final.errors`` (schema 3), when present: one entry per class, all numbers."""
    problems = []
    for key, fields in (("operating_points", OPERATING_POINT_KEYS), ("errors", ERROR_TYPES)):
        if key not in final:
            continue
        entries = final[key]
        if not isinstance(entries, Mapping):
            problems.append(f"final: `{key}` must be a mapping {{class name: {{{', '.join(fields)}}}}}")
            continue
        classes = set(final.get("per_class") or {})
        if classes and set(entries) != classes:
            problems.append(f"final: `{key}` must have one entry per class of `per_class` ({sorted(classes)})")
        for name, values in entries.items():
            if not isinstance(values, Mapping) or set(values) != set(fields):
                problems.append(f"final: {key}[{name!r}] must have exactly {', '.join(fields)}")
            elif not all(_is_number(v) for v in values.values()):
                problems.append(f"final: {key}[{name!r}] values must be numbers or null")
    return problems


def write_metrics(
    run_dir: str | Path,
    *,
    params: Params | Mapping[str, Any],
    dataset: Mapping[str, Any],
    history: list[dict],
    final: dict | None,
    extra: Mapping[str, Any] | None = None,
    status: Literal["running", "finished", "failed"] = "running",
    depends_on: str = "",
) -> Path:
    """Write ``run_dir/metrics.json`` atomically and return its path.

    ``depends_on`` names what else the result depends on (phase 2: its baseline run's id); it is
    folded into the ``run_id`` (:func:`run_id`).

    ``params`` (a mapping is validated through the schema) are stored in full; ``dataset`` is a
    :func:`dataset_record`; ``extra`` entries become top-level keys (they may not shadow the
    contract's). A ``DataError`` lists every entry that breaks the contract; nothing is written then.
    """
    path = _metrics_path(run_dir)
    if not isinstance(params, Params):
        params = load_params(params, source_names=["write_metrics(params=...)"])
    history = json_safe(list(history))
    final = json_safe(final)
    problems = _contract_problems(history, final, status)
    if not isinstance(dataset, Mapping) or not isinstance(dataset.get("hash"), str):
        problems.append("`dataset` must be a dataset_record(...) with a `hash`")
    clashes = sorted(set(extra or {}) & set(CONTRACT_KEYS))
    if clashes:
        problems.append(f"`extra` may not replace contract keys: {', '.join(clashes)}")
    if problems:
        raise DataError(f"{path}: not written, the run contract is broken:\n" + "\n".join(f"  - {p}" for p in problems))
    code = code_version()
    record = {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "run_id": run_id(params, dataset["hash"], code, depends_on),
        "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": params.model_dump(mode="json"),
        "params_changed": json_safe(diff_from_default(params)),
        "dataset": json_safe(dict(dataset)),
        "code_version": code,
        "environment": environment(),
        "history": history,
        "final": final,
        **json_safe(dict(extra or {})),
    }
    return atomic_write_json(path, record)


def read_metrics(run_dir: str | Path) -> dict:
    """The run contract of ``run_dir`` (or of a metrics.json path), checked.

    A missing file is a ``ConfigError`` (the folder given is not a run: check the parameter that
    named it); an unparsable or incomplete one is a ``DataError`` that lists what is wrong.
    """
    path = _metrics_path(run_dir)
    if not path.is_file():
        raise ConfigError(
            f"{path}: no {METRICS_FILE}; `{run_dir}` is not a run folder, or its run has not evaluated an epoch "
            "yet. Check the `run_dir` / `baseline` parameter, or run the notebook that writes it."
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a JSON object with {', '.join(CONTRACT_KEYS)}")
    version = record.get("schema_version")
    schema = version if isinstance(version, int) else SCHEMA_VERSION
    missing = [k for k in CONTRACT_KEYS if k not in record and ADDED_KEYS.get(k, 0) <= schema]
    problems = [f"missing {', '.join(missing)}"] if missing else []
    problems += _contract_problems(record.get("history"), record.get("final"), record.get("status"))
    if problems:
        raise DataError(
            f"{path}: does not follow the run contract:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nRe-run the notebook with `overwrite: true` to rewrite it."
        )
    return record


# --------------------------------------------------------------------------------------------
# Progress of a running run (for the terminal, never for a report)
# --------------------------------------------------------------------------------------------
#: The trainer's progress log in the run folder: one JSON object a line, appended every few seconds
#: of training and after every evaluation. ``make all`` prints it in the terminal
#: (:class:`tfg_mm.workflow.notebooks.ProgressWatcher`); ``tail -f`` works too. Never read by a report.
PROGRESS_FILE = "progress.jsonl"


def append_progress(run_dir: str | Path, entry: Mapping[str, Any]) -> None:
    """Append ``entry`` (plus its UTC ``time``) as one line of ``{run_dir}/progress.jsonl``.

    Best effort: the progress log is a convenience, so a write that fails never stops a run.
    """
    line = json.dumps({"time": datetime.now(UTC).isoformat(timespec="seconds"), **entry}, default=str)
    try:
        with open(Path(run_dir) / PROGRESS_FILE, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    except OSError:
        pass


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def format_progress(entry: Mapping[str, Any]) -> str:
    """One terminal line of a progress entry (:func:`append_progress`): run, epoch, step, loss, mAP, time left."""
    parts = [f"[{entry.get('run', '?')}]"]
    event = entry.get("event")
    epoch = f"epoch {entry.get('epoch', '?')}/{entry.get('epochs', '?')}"
    if entry.get("stage"):
        epoch += f" (stage {entry['stage']})"
    if event == "train":
        parts.append(f"{epoch} step {entry.get('step', '?')}/{entry.get('steps', '?')}")
        if isinstance(entry.get("loss"), (int, float)):
            parts.append(f"loss {entry['loss']:.4f}")
    elif event == "eval":
        parts.append(f"{epoch} evaluated")
    elif event == "finish":
        parts.append(f"finished: best epoch {entry.get('best_epoch', '?')}, mAP {_fmt(entry.get('best_map'))}")
        entry = {k: v for k, v in entry.items() if k != "map"}
    else:
        parts.append(str(event))
    if isinstance(entry.get("map"), (int, float)):
        parts.append(f"mAP {entry['map']:.4f} / mAP50 {_fmt(entry.get('map50'))} (epoch {entry.get('map_epoch', '?')})")
    if isinstance(entry.get("eta_s"), (int, float)) and event != "finish":
        parts.append(f"~{_duration(entry['eta_s'])} left")
    if isinstance(entry.get("elapsed_s"), (int, float)):
        parts.append(f"{_duration(entry['elapsed_s'])} elapsed")
    return f"{parts[0]} {' · '.join(parts[1:])}"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "?"
