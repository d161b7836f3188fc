"""Run folders: reuse a finished run, refuse a folder that holds another run, resume only the same run.

A run folder holds one run (its contract, :mod:`tfg_mm.training.contract`; its checkpoints, state and files,
:class:`tfg_mm.paths.RunPaths`). A folder that holds a finished run is never replaced unless ``overwrite`` is asked
for, and an interrupted run is only resumed by the very same run (same :func:`~tfg_mm.training.identity.run_id`):
:func:`check_run_dir` refuses any other before work starts, listing what differs. Only folders that tfg_mm made
are ever emptied (:func:`prepare_run_dir`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tfg_mm
from tfg_mm.config import Params
from tfg_mm.errors import ConfigError, DataError, RunLocked
from tfg_mm.io import atomic_write_json, probe_writable
from tfg_mm.paths import RunPaths, resolve_path
from tfg_mm.training.contract import is_finished, raw_contract, read_metrics
from tfg_mm.training.identity import RESUME_MAY_CHANGE, RUN_ID_EXCLUDED, run_id, world_size_of


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

    Interrupted: the resumable state (:attr:`tfg_mm.paths.RunPaths.state`) exists, or ``metrics.json`` says
    ``running`` / ``failed`` with at least one evaluated epoch. A state file whose contract is missing
    or unreadable gives ``{}`` (a run of unknown identity).
    """
    files = RunPaths.at(run_dir)
    record = raw_contract(files.run_dir)
    has_state = files.state.exists()
    if record is not None and record.get("status") in ("running", "failed", "interrupted"):
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
        old = raw_contract(path) or {}
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
            raise unwritable(run_dir, exc) from None
        return path

    return wrapper


def unwritable(run_dir: str | Path, exc: PermissionError) -> ConfigError:
    """The project's error for a refused write (a read-only ``run_dir`` or parent), naming the folder and the fix."""
    # what was refused is an entry (created, renamed or removed) in this folder
    folder = Path(exc.filename).parent if exc.filename else resolve_path(run_dir).parent
    return ConfigError(
        f"run_dir `{run_dir}` ({resolve_path(run_dir)}): the folder {folder} cannot be written "
        f"({exc.strerror}: {exc.filename}). Nothing was trained and nothing already written was changed. "
        f"Fix: make it writable for this user (`chmod u+w {folder}`, or ask its owner), or set `run_dir` "
        "to a folder you can write to (e.g. runs/<name> inside your clone)."
    )


@_writable_run_dir
def prepare_run_dir(run_dir: str | Path, overwrite: bool = False, resume: bool = True) -> Path:
    """Create (or check) the run folder before any work, and return its absolute path.

    * A folder holding a *finished* run is refused unless ``overwrite`` (nothing is touched).
    * ``overwrite``, or ``resume=False`` on an interrupted run, empties the folder first: only a
      folder that tfg_mm made (it holds ``metrics.json`` or the marker file) is ever emptied.
    * Otherwise (``resume``) the folder is kept as is, so training can pick up its last checkpoint.
    """
    files = RunPaths.at(run_dir)
    path = files.run_dir
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
        if not (files.metrics.exists() or files.marker.exists()):
            raise ConfigError(
                f"run_dir `{run_dir}` ({path}) is not empty and was not made by tfg_mm (no {files.metrics.name} or "
                f"{files.marker.name}); refusing to empty it for `overwrite` / `resume: false`. Choose a new `run_dir`."
            )
        _clear(path)
    path.mkdir(parents=True, exist_ok=True)
    if not files.marker.exists():
        atomic_write_json(
            files.marker,
            {"created": datetime.now(UTC).isoformat(timespec="seconds"), "package": tfg_mm.__version__},
        )
    return path


# --------------------------------------------------------------------------------------------
# One writer per run folder
# --------------------------------------------------------------------------------------------
def lock_path(run_dir: str | Path) -> Path:
    """The lock of a run folder: a sibling file (``runs/.baseline.lock``), so that taking it touches nothing in the
    folder itself, which may hold another run or not exist yet."""
    path = resolve_path(run_dir)
    return path.with_name(f".{path.name}.lock")


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "a process that left no record"
    return (
        f"process {info.get('pid', '?')} on host {info.get('host', '?')} since {info.get('since', '?')}"
        f" ({info.get('command', '?')})"
    )


@contextlib.contextmanager
def hold_run_dir(run_dir: str | Path) -> Iterator[Path]:
    """The run folder's lock, held for the block: an OS-level lock (``fcntl.flock`` on :func:`lock_path`), so a
    second process — another terminal, a notebook beside the CLI, a grid relaunched while the first still runs —
    gets the project's error (:class:`~tfg_mm.errors.RunLocked`) naming the folder and the holder, and changes
    nothing. A lock whose holder is gone (killed, crashed) is released by the kernel and simply taken over.
    Where ``fcntl`` does not exist (Windows) the block runs without a lock."""
    path = lock_path(run_dir)
    try:
        import fcntl  # Unix only: an optional back-end of this one function
    except ImportError:
        yield path
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError as exc:  # a read-only parent: the run could not write either
        raise unwritable(run_dir, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(
                f"run_dir `{run_dir}` ({resolve_path(run_dir)}) is in use by {_holder(path)}; nothing was changed. "
                "Two processes must not write one run folder. Fix: wait for that run to end (or stop it: it can be "
                "resumed by rerunning its command), or choose another `run_dir`."
            ) from None
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:300],
        }
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(record) + "\n").encode())
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (the next holder rewrites it)
