"""Experiment tracking: every run's params, per-epoch metrics and artefacts in MLflow and TensorBoard.

The run contract (``metrics.json``, :mod:`tfg_mm.training.runs`) stays the one source of truth; tracking is a
copy of it, in the two places the field looks for runs. :func:`start` is called by
:func:`tfg_mm.training.experiment.run_experiment` once the run folder is prepared, and the returned
:class:`Tracker` receives every contract the run writes, so every phase (baseline, phase 2, each
ablation variant) is tracked the same way and what MLflow / TensorBoard hold is exactly what
``metrics.json`` holds:

* **params**: all of them (lists and mappings as JSON), plus tags: tfg_mm's run id, phase, run
  folder, dataset hash, git commit and source hash;
* **per-epoch metrics** at step = epoch: every number of a history entry, flattened with ``/``
  (``map``, ``map50``, ``per_class/<class>/ap``, ``losses/loss_mal``, ``lr``, ``seconds``, phase 2's
  ``alpha_mean`` / ``alpha/<class>``, ``scale``, ``bias``); null / non-finite values are skipped;
* **at the end**: ``final/<metric>`` at step = the selected epoch, the artefacts ``metrics.json``
  (and ``traceback.txt`` of a failed run, any PNG / SVG in the run folder), and the run's status
  (FINISHED, FAILED, or KILLED for an interrupt). The report figures are drawn by the notebooks
  after the run; :func:`log_figures` adds them to the run (one notebook cell).

Backends (parameter ``tracking``: ``all`` | ``mlflow`` | ``tensorboard`` | ``none``):

* **MLflow** through ``MlflowClient`` (no global active run). MLflow 3 refuses its plain file store
  (``./mlruns``) by default, so the default store is SQLite: ``runs/mlruns/mlflow.db`` with the
  artefacts in ``runs/mlruns/artifacts`` (``TFG_MM_TRACKING_DIR`` moves that folder; the tests use
  it). ``tracking_uri`` names another folder, or any MLflow URI (a server: ``http://host:5000``).
  The MLflow run id is stored in the contract (``tracking.mlflow.run_id``): a resumed run continues
  the same MLflow run (epochs already logged with the same values are not logged again).
* **TensorBoard** through ``torch.utils.tensorboard.SummaryWriter`` into ``{run_dir}/tensorboard``
  (``tensorboard --logdir runs`` shows every run); a resumed run purges the events from its first
  re-logged epoch on. (accelerate's trackers were not used: ``accelerator.log`` stops at the first
  tracker that raises, so a server that is down would fail the training run, and its MLflow tracker
  keeps a process-global active run.)

Quiet and harmless: MLflow is imported only when a run tracks to it (~1-3 s); its log lines,
warnings and prints are kept out of notebook outputs (sent to this module's logger at debug level);
telemetry is off and HTTP retries are bounded (``MLFLOW_DISABLE_TELEMETRY``,
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``_TIMEOUT``: defaults set here only when unset). A backend
that fails (server down, store locked) is logged once as a warning, switched off for the rest of
the run and named in the contract (``tracking.errors``); the run and everything it wrote go on.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tfg_mm.io import atomic_write_json
from tfg_mm.paths import figures_dir, portable_text, project_root, resolve_path

log = logging.getLogger(__name__)

#: What each value of the ``tracking`` parameter switches on.
BACKENDS: dict[str, tuple[str, ...]] = {
    "all": ("mlflow", "tensorboard"),
    "mlflow": ("mlflow",),
    "tensorboard": ("tensorboard",),
    "none": (),
}
#: The default MLflow store folder, relative to the project root (``TFG_MM_TRACKING_DIR`` overrides it).
DEFAULT_STORE = "runs/mlruns"
STORE_DB = "mlflow.db"
STORE_ARTIFACTS = "artifacts"
#: TensorBoard's event files, relative to the run folder.
TENSORBOARD_DIR = "tensorboard"
#: The figures :func:`log_figures` has logged (name -> sha256), relative to the run folder.
FIGURES_RECORD = ".tracking_figures.json"
#: The run contract's key of the tracking record.
CONTRACT_KEY = "tracking"
#: MLflow's run status per contract status.
MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED", "running": "RUNNING"}
#: Environment defaults applied before MLflow is imported (a user's own values win).
MLFLOW_ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
#: Loggers silenced during tracking calls (their records would land in notebook outputs).
_NOISY_LOGGERS = ("mlflow", "alembic", "sqlalchemy", "urllib3", "huey", "git")
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")


# --------------------------------------------------------------------------------------------
# What is logged
# --------------------------------------------------------------------------------------------


def metric_key(*parts: Any) -> str:
    """``part/part/...`` with characters MLflow refuses in a metric name replaced by ``_``."""
    return "/".join(_KEY_CHARS.sub("_", str(p)) for p in parts)


def flatten_metrics(entry: Mapping[str, Any], skip: Iterable[str] = ("epoch",)) -> dict[str, float]:
    """Every finite number of a history / final entry, keyed by its path joined with ``/``.

    Nested mappings give ``per_class/<class>/ap`` and ``losses/<term>``; a list with one value per
    class (a per-class gate's ``alpha``) gives ``alpha/<class>`` (the classes of ``per_class``),
    any other list ``key/<index>``. Strings, booleans, null and non-finite numbers are skipped.
    """
    classes = list(entry.get("per_class") or {}) if isinstance(entry.get("per_class"), Mapping) else []
    skip = set(skip)
    out: dict[str, float] = {}

    def put(path: tuple, value: Any) -> None:
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, Mapping):
            for k, v in value.items():
                put((*path, k), v)
        elif isinstance(value, (list, tuple)):
            names = classes if classes and len(value) == len(classes) else range(len(value))
            for name, v in zip(names, value):
                put((*path, name), v)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[metric_key(*path)] = float(value)

    for key, value in entry.items():
        if key not in skip:
            put((key,), value)
    return out


def param_values(params: Mapping[str, Any], limit: int = 6000) -> dict[str, str]:
    """Params as MLflow stores them: strings; lists and mappings as JSON; cut to ``limit`` characters."""
    out = {}
    for key, value in params.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        out[key] = text if len(text) <= limit else text[: limit - 3] + "..."
    return out


# --------------------------------------------------------------------------------------------
# Where it goes
# --------------------------------------------------------------------------------------------


def default_store() -> Path:
    """``<project root>/runs/mlruns`` unless ``TFG_MM_TRACKING_DIR`` redirects it."""
    override = os.environ.get("TFG_MM_TRACKING_DIR")
    return Path(override) if override else project_root() / DEFAULT_STORE


def store_location(tracking_uri: str = "") -> tuple[str, str | None]:
    """``(tracking URI, artefact root URI or None)`` of the ``tracking_uri`` parameter.

    Empty: the SQLite store in :func:`default_store`; a plain path: a folder holding such a store
    (relative to the project root); ``sqlite:///relative.db``: relative to the project root, its
    artefacts in an ``artifacts`` folder next to it; any other URI (a server) as it is, the
    artefact root being the server's.
    """
    uri = tracking_uri.strip()
    if not uri or "://" not in uri:
        folder = resolve_path(uri) if uri else default_store()
        return f"sqlite:///{folder / STORE_DB}", (folder / STORE_ARTIFACTS).as_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db = db if db.is_absolute() else resolve_path(db)
        return f"sqlite:///{db}", (db.parent / STORE_ARTIFACTS).as_uri()
    return uri, None


def experiment_of(params, phase: str) -> str:
    """The MLflow experiment of a run: ``experiment_name``, else ``tfg_mm-<phase>``."""
    return params.experiment_name or f"tfg_mm-{phase}"


@contextlib.contextmanager
def _quiet():
    """No log line, warning or print of the tracking libraries reaches the notebook: debug log instead."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    out = io.StringIO()
    try:
        with (
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(out),
        ):
            warnings.simplefilter("always")
            try:
                yield
            finally:
                for warning in caught:
                    log.debug("tracking library warning: %s", warning.message)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if out.getvalue().strip():
            log.debug("tracking library output: %s", out.getvalue().strip())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


class _MlflowBackend:
    name = "mlflow"

    def __init__(self, uri: str, artifact_root: str | None, experiment: str) -> None:
        for key, value in MLFLOW_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient

        self.uri = uri
        self.store = portable_text(uri)
        self.experiment = experiment
        with _store_lock(uri):
            self.client = MlflowClient(uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                try:
                    self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_root)
                except Exception:  # created meanwhile by another process (a parallel grid variant)
                    found = self.client.get_experiment_by_name(experiment)
                    if found is None:
                        raise
            if found is not None:
                if found.lifecycle_stage == "deleted":
                    self.client.restore_experiment(found.experiment_id)
                self.experiment_id = found.experiment_id
        self.run_id = ""

    def open(self, run_name: str, tags: Mapping[str, str], params: Mapping[str, str], previous: str = "") -> bool:
        """Create the run, or continue ``previous`` (True when continued)."""
        continued = False
        if previous:
            try:
                run = self.client.get_run(previous)
                continued = run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active"
            except Exception:  # not in this store (another tracking_uri): a new run
                continued = False
        if continued:
            self.run_id = previous
            self.client.update_run(previous, status="RUNNING")
            logged = self.client.get_run(previous).data.params
            params = {k: v for k, v in params.items() if k not in logged}  # a param's value cannot change
            self._tags(tags)
        else:
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags)).info.run_id
        self._params(params)
        return continued

    def _params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def _tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i : i + 100])

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def artifacts(self, files: Sequence[Path], folder: str | None = None) -> None:
        for path in files:
            self.client.log_artifact(self.run_id, str(path), folder)

    def images(self, files: Sequence[Path], step: int) -> None:
        """Figures are logged as artefacts (:meth:`artifacts`); nothing else to do."""

    def end(self, status: str, tags: Mapping[str, str]) -> None:
        self._tags(tags)
        self.client.set_terminated(self.run_id, MLFLOW_STATUS[status])

    def close(self) -> None:
        """Nothing is held open between calls."""

    def record(self) -> dict:
        return {
            "run_id": self.run_id,
            "experiment": self.experiment,
            "experiment_id": self.experiment_id,
            "store": self.store,
        }


class _TensorBoardBackend:
    name = "tensorboard"

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.writer = None
        self.params_text = ""

    def open(self, run_name: str, tags: Mapping[str, str], params: Mapping[str, str], previous: str = "") -> bool:
        self.params_text = "\n".join(
            ["| param | value |", "| --- | --- |", *(f"| {k} | {v.replace('|', '/')} |" for k, v in params.items())]
        )
        return self._has_events()

    def _has_events(self) -> bool:
        return any(self.folder.glob("events.out.tfevents.*"))

    def _writer(self, step: int, purge: bool = True):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            existing = self._has_events()
            # a resumed run re-logs its metrics from `step` on: TensorBoard hides the older events from
            # there. The figures of a finished run are added without a purge (it would hide every
            # scalar from the selected epoch on).
            self.writer = SummaryWriter(str(self.folder), purge_step=step if existing and purge else None)
            if not existing:
                self.writer.add_text("params", self.params_text, 0)
        return self.writer

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        writer = self._writer(step)
        for key, value in values.items():
            writer.add_scalar(key, value, step)
        writer.flush()

    def artifacts(self, files: Sequence[Path], folder: str | None = None) -> None:
        """TensorBoard holds scalars and images, not files."""

    def images(self, files: Sequence[Path], step: int) -> None:
        writer = self._writer(step, purge=False)
        for path in files:
            with Image.open(path) as image:
                writer.add_image(f"figures/{path.stem}", np.asarray(image.convert("RGB")), step, dataformats="HWC")
        writer.flush()

    def end(self, status: str, tags: Mapping[str, str]) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def record(self) -> str:
        return TENSORBOARD_DIR


@contextlib.contextmanager
def _store_lock(uri: str):
    """Serialise the creation of a local SQLite store (parallel grid variants would race on its tables)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(db.parent / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# The tracker a run holds
# --------------------------------------------------------------------------------------------


class Tracker:
    """Fans a run's contracts out to its backends; a failing backend is switched off, never the run.

    ``Tracker()`` (no backends) is the ``tracking: none`` tracker: it does nothing and adds nothing
    to the contract.
    """

    def __init__(self, run_dir: Path | None = None, requested: Sequence[str] = ()) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.requested = tuple(requested)
        self.backends: list = []
        self.errors: list[str] = []
        #: per backend opened: where it logs (kept when it fails later: what it logged is still there)
        self.records: dict[str, Any] = {}
        #: per backend: {epoch: flattened metrics already logged}
        self._logged: dict[str, dict[int, dict[str, float]]] = {}
        self._final_logged: dict[str, dict[str, float]] = {}
        self.ended = False

    def _fail(self, backend_name: str, what: str, exc: BaseException) -> None:
        self.backends = [b for b in self.backends if b.name != backend_name]
        where = portable_text(str(self.run_dir)) if self.run_dir else "this run"
        message = (
            f"{backend_name}: {what} failed ({_first_line(exc)}); {backend_name} tracking is off for the rest of "
            f"run {where}. The run itself and everything it wrote are unaffected (metrics.json holds every number). "
            "Fix: check `tracking_uri` (a server must be reachable) or set `tracking: none`."
        )
        self.errors.append(message)
        log.warning(message)

    def _each(self, what: str, call) -> None:
        for backend in list(self.backends):
            try:
                with _quiet():
                    call(backend)
            except Exception as exc:  # any tracking failure: logged once, backend off
                self._fail(backend.name, what, exc)

    def contract_entry(self) -> dict:
        """``{"tracking": {...}}`` for the run contract, or ``{}`` when nothing is tracked."""
        if not self.requested:
            return {}
        record: dict[str, Any] = {"backends": list(self.requested), **self.records, "errors": list(self.errors)}
        return {CONTRACT_KEY: record}

    def log_contract(self, history: Sequence[Mapping], final: Mapping | None) -> None:
        """Log the epochs of ``history`` not yet logged (or logged with other values), then ``final``."""
        if not self.backends:
            return
        try:
            self._log_contract(history, final)
        except Exception as exc:  # a contract this module cannot read: tracking stops, the run goes on
            for backend in list(self.backends):
                self._fail(backend.name, "reading the run contract", exc)

    def _log_contract(self, history: Sequence[Mapping], final: Mapping | None) -> None:
        for entry in history:
            epoch = int(entry["epoch"])
            values = flatten_metrics(entry)

            def log_epoch(backend, epoch=epoch, values=values):
                if self._logged.setdefault(backend.name, {}).get(epoch) != values:
                    backend.metrics(values, epoch)
                    self._logged[backend.name][epoch] = values

            self._each(f"logging epoch {epoch}", log_epoch)
        if final:
            values = {metric_key("final", k): v for k, v in flatten_metrics(final).items()}
            step = int(final.get("epoch") or 0)

            def log_final(backend):
                if self._final_logged.get(backend.name) != values:
                    backend.metrics(values, step)
                    self._final_logged[backend.name] = values

            self._each("logging the final metrics", log_final)

    def end(self, status: str, artifacts: Sequence[Path] = (), tags: Mapping[str, str] | None = None) -> None:
        """Log the artefacts that exist, set the run's status (``finished``, ``failed``, ``killed``), close."""
        if self.ended:
            return
        self.ended = True
        files = [Path(p) for p in artifacts if Path(p).is_file()]
        self._each("logging the artefacts", lambda backend: backend.artifacts(files))
        self._each("ending the run", lambda backend: backend.end(status, {"tfg_mm.status": status, **(tags or {})}))


def start(
    params,
    run_dir: Path,
    *,
    phase: str,
    run_id: str,
    dataset: Mapping[str, Any],
    code: Mapping[str, Any],
    previous: Mapping[str, Any] | None = None,
) -> Tracker:
    """The tracker of a run about to start (``tracking: none``: one that does nothing). Never raises.

    ``previous`` is the contract of the interrupted run this run resumes (:func:`tfg_mm.training.runs.interrupted_run`):
    its MLflow run is continued and its logged epochs are not logged again.
    """
    tracker = Tracker(run_dir, BACKENDS[params.tracking])
    try:
        _open_backends(tracker, params, run_dir, phase, run_id, dataset, code, previous)
    except Exception as exc:  # a bug of this module must not cost the run either
        for name in tracker.requested:
            tracker._fail(name, "starting the run", exc)
    return tracker


def _open_backends(tracker: Tracker, params, run_dir, phase, run_id, dataset, code, previous) -> None:
    if not tracker.requested:
        return
    old = (previous or {}).get(CONTRACT_KEY) or {}
    old = old if isinstance(old, Mapping) else {}
    old_history = [h for h in (previous or {}).get("history") or [] if isinstance(h, Mapping) and "epoch" in h]
    name = portable_text(str(run_dir))
    tags = {
        "tfg_mm.run_id": run_id,
        "tfg_mm.phase": phase,
        "tfg_mm.run_dir": name,
        "tfg_mm.dataset_hash": str(dataset.get("hash", "")),
        "tfg_mm.source_sha256": str(code.get("source_sha256", "")),
        "mlflow.source.git.commit": str(code.get("git_commit") or ""),
    }
    values = param_values(params.model_dump(mode="json"))
    for backend_name in tracker.requested:
        try:
            with _quiet():
                if backend_name == "mlflow":
                    uri, artifact_root = store_location(params.tracking_uri)
                    backend = _MlflowBackend(uri, artifact_root, experiment_of(params, phase))
                    old_mlflow = old.get("mlflow") if isinstance(old.get("mlflow"), Mapping) else {}
                    same_store = old_mlflow.get("store") == backend.store
                    previous_run = str(old_mlflow.get("run_id") or "") if same_store else ""
                else:
                    backend = _TensorBoardBackend(Path(run_dir) / TENSORBOARD_DIR)
                    previous_run = ""
                continued = backend.open(name, tags, values, previous_run)
        except Exception as exc:
            tracker._fail(backend_name, "starting the run", exc)
            continue
        tracker.backends.append(backend)
        tracker.records[backend_name] = backend.record()
        if continued and backend_name in (old.get("backends") or []):
            # what the interrupted run logged: not logged again when the same values come back
            tracker._logged[backend_name] = {int(h["epoch"]): flatten_metrics(h) for h in old_history}


# --------------------------------------------------------------------------------------------
# The report figures of a run (drawn by the notebooks after the run)
# --------------------------------------------------------------------------------------------


def log_figures(metrics: Mapping[str, Any], prefix: str, params=None, folder: str | Path | None = None) -> list[str]:
    """Add the report figures ``<prefix>*.png`` (in :func:`tfg_mm.paths.figures_dir`) to the run.

    ``metrics`` is the run contract the notebook drew them from; its tracking record says where the
    run was logged (MLflow: artefacts under ``figures/``; TensorBoard: the PNGs as images at the
    selected epoch). ``params`` (the notebook's) can switch it off (``tracking: none``). Figures
    already logged with the same bytes are skipped, so re-rendering a reused run costs nothing.
    Returns the names logged; never raises (a failure is logged once as a warning).
    """
    try:
        return _log_figures(metrics, prefix, params, folder)
    except Exception as exc:  # the figures are in reports/ anyway; the notebook goes on
        log.warning(
            "tracking: logging the figures %s* failed (%s); they are in the reports only", prefix, _first_line(exc)
        )
        return []


def _log_figures(metrics: Mapping[str, Any], prefix: str, params, folder: str | Path | None) -> list[str]:
    record = metrics.get(CONTRACT_KEY)
    run_params = metrics.get("params") or {}
    if not isinstance(record, Mapping) or (params is not None and params.tracking == "none"):
        return []
    run_dir = resolve_path(str(run_params.get("run_dir", "")))
    folder = Path(folder) if folder is not None else figures_dir()
    # PNG only: the SVGs (for the thesis) carry their render date, so they would be new bytes on every render
    files = sorted(p for p in folder.glob(f"{prefix}*.png") if p.is_file())
    if not files or not run_dir.is_dir():
        return []
    done_path = run_dir / FIGURES_RECORD
    try:
        done = json.loads(done_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        done = {}
    done = done if isinstance(done, dict) else {}
    mlflow_record = record.get("mlflow") if isinstance(record.get("mlflow"), Mapping) else {}
    key = str(mlflow_record.get("run_id", ""))
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    new = [p for p in files if done.get(key, {}).get(p.name) != digests[p.name]]
    if not new:
        return []
    tracker = Tracker(run_dir, record.get("backends") or ())
    step = int((metrics.get("final") or {}).get("epoch") or 0)
    for backend_name in tracker.requested:
        try:
            with _quiet():
                if backend_name == "mlflow" and mlflow_record.get("run_id"):
                    uri, artifact_root = store_location(str(run_params.get("tracking_uri", "")))
                    backend = _MlflowBackend(uri, artifact_root, str(mlflow_record.get("experiment")))
                    backend.run_id = str(mlflow_record["run_id"])
                elif backend_name == "tensorboard" and record.get("tensorboard"):
                    backend = _TensorBoardBackend(run_dir / str(record["tensorboard"]))
                else:
                    continue
        except Exception as exc:
            tracker._fail(backend_name, "opening the run for its figures", exc)
            continue
        tracker.backends.append(backend)
    tracker._each("logging the figures", lambda backend: backend.artifacts(new, "figures"))
    tracker._each("logging the figures", lambda backend: backend.images(new, step))
    tracker._each("closing", lambda backend: backend.close())
    if tracker.errors:
        return []
    done[key] = {**done.get(key, {}), **{p.name: digests[p.name] for p in new}}
    atomic_write_json(done_path, done)
    return [p.name for p in new]
