"""The run contract: every run writes ``{run_dir}/metrics.json``, and reports read only that.

This module is the one place that writes and reads it; its pydantic models are the contract's schema:

* :class:`RunContract`: ``schema_version``, ``status`` (``running``, rewritten after each evaluated epoch;
  ``finished``; ``failed`` with a :class:`Failure`; ``interrupted``: stopped by a signal, with the same record
  naming the signal, resumable by the same command), ``run_id`` (:func:`tfg_mm.training.identity.run_id`),
  ``updated``, ``params`` (all of them, defaults filled in) and ``params_changed``, ``dataset`` (paths and a
  content hash), ``code_version``, ``environment`` (what else decides a number; from schema version 2),
  ``history`` and ``final``, plus the phase's extra top-level entries (the fusion's α trajectory, the baseline a
  phase-2 run started from, the text prompts, the training's world size, ...);
* :class:`HistoryEntry`: one evaluated epoch: ``epoch``, ``map``, ``map50``, ``map75``, ``per_class`` =
  {class name: :class:`ClassAP`}, ``lr``, ``losses``, ``seconds`` (and the phase's per-epoch extras);
* :class:`Final`: the selected checkpoint's metrics, and from schema version 3 its error analysis
  (``operating_points`` = {class: :class:`OperatingPoint`}, ``errors`` = {class: {error type: ΔAP50}}; the curves
  and the confusion matrix are the side file ``analysis.json``), checked when present.

A file of an older schema version still reads (what it lacks is optional there). The file is written atomically
(a crash leaves the previous version, never half a file), with non-finite numbers stored as ``null`` so that every
JSON reader accepts it; a contract that breaks the schema is never written (a ``DataError`` lists every problem).
:func:`read_metrics` returns the checked file as a plain dict (what notebooks and the reports draw from);
:func:`read_contract` the typed :class:`RunContract`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, PlainValidator, StrictInt, ValidationError

from tfg_mm.config import Params, diff_from_default, load_params
from tfg_mm.errors import ConfigError, DataError
from tfg_mm.evaluation import ERROR_TYPES, OPERATING_POINT_KEYS
from tfg_mm.io import atomic_write_json, json_safe
from tfg_mm.paths import METRICS_FILE, resolve_path
from tfg_mm.training.identity import code_version, environment, run_id

#: 2 added ``environment``; a version-1 file (written before it) still reads without it.
#: 3 added ``final.operating_points`` and ``final.errors`` (optional: checked when present).
#: 4 added ``final.test`` (the held-out judgement), ``final.selected_by`` / ``select`` / ``fell_back``
#: and the ``interrupted`` status with ``failure.signal`` (all optional: an older file still reads).
SCHEMA_VERSION = 4
Status = Literal["running", "finished", "failed", "interrupted"]
STATUSES: tuple[str, ...] = ("running", "finished", "failed", "interrupted")
#: Contract keys a file of an older schema version may lack: {key: first schema version that has it}.
ADDED_KEYS = {"environment": 2}


def _number(value: Any) -> int | float | None:
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise ValueError("must be a number or null")


#: A number of the contract: JSON's integer or float, or null (a NaN / inf, or not measurable).
Number = Annotated[int | float | None, PlainValidator(_number)]


class _Entry(BaseModel):
    """Known fields typed; the phase's own entries kept as they are (``extra="allow"``)."""

    model_config = ConfigDict(extra="allow")


class ClassAP(_Entry):
    ap: Number
    ap50: Number


class OperatingPoint(BaseModel):
    """The score threshold that maximises F1 at IoU 0.5, with its precision and recall (:mod:`tfg_mm.evaluation.analysis`)."""

    model_config = ConfigDict(extra="forbid")
    threshold: Number
    precision: Number
    recall: Number
    f1: Number


class Metrics(_Entry):
    """COCO metrics of one evaluation: the headline numbers and AP per class."""

    map: Number
    map50: Number
    map75: Number
    per_class: dict[str, ClassAP]
    map_small: Number = None
    map_medium: Number = None
    map_large: Number = None


class HistoryEntry(Metrics):
    """One evaluated epoch (epoch 0: before any step)."""

    epoch: StrictInt
    lr: Annotated[Any, PlainValidator(lambda v: v if isinstance(v, Mapping) else _number(v))]
    losses: dict[str, Any]
    seconds: Number
    loss: Number = None


class AppliedOperatingPoint(_Entry):
    """A validation operating point applied to another split: its precision, recall and F1 there, and the counts."""

    threshold: Number
    precision: Number
    recall: Number
    f1: Number
    tp: StrictInt | None = None
    fp: StrictInt | None = None
    instances: StrictInt | None = None


class SplitEvaluation(Metrics):
    """A checkpoint judged on a split it was not selected on (:mod:`tfg_mm.training.judge`)."""

    checkpoint: str | None = None
    epoch: StrictInt | None = None
    operating_points: dict[str, AppliedOperatingPoint] | None = None
    detections: str | None = None


class TestJudgement(_Entry):
    """``final.test``: the selected checkpoint and the last one on the held-out test split."""

    split: str
    annotations: str
    instances: dict[str, StrictInt]
    selected: SplitEvaluation
    last: SplitEvaluation | None = None


class Final(Metrics):
    """The selected checkpoint: its validation metrics, how it was selected, its error analysis and, with a test
    split, its judgement there (``test``)."""

    epoch: StrictInt | None = None
    selected_by: str | None = None
    select: str | None = None
    select_metric: str | None = None
    fell_back: bool = False
    checkpoint: str | None = None
    operating_points: dict[str, OperatingPoint] | None = None
    errors: dict[str, dict[Literal[ERROR_TYPES], Number]] | None = None  # type: ignore[valid-type]
    test: TestJudgement | None = None
    #: whether validation was still rising at the end (:func:`tfg_mm.evaluation.convergence.convergence`)
    convergence: dict[str, Any] | None = None


class Failure(_Entry):
    """Why a run failed (or which signal stopped it: ``signal``) and where: ``traceback`` names the file in the
    run folder."""

    type: str
    message: str
    signal: str | None = None
    epoch: int | None = None
    step: int | None = None
    stage: str | None = None
    traceback: str | None = None
    time: str | None = None


class RunContract(_Entry):
    """A run's ``metrics.json``."""

    schema_version: int
    status: Status
    run_id: str
    updated: str
    params: dict[str, Any]
    params_changed: dict[str, Any]
    dataset: dict[str, Any]
    code_version: dict[str, Any]
    environment: dict[str, Any] | None = None
    history: list[HistoryEntry]
    final: Final | None
    failure: Failure | None = None

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def class_names(self) -> list[str]:
        """The class names, in the dataset's order (the phase's ``classes`` entry, else the per-class keys)."""
        names = self.extra("classes")
        if names:
            return list(names)
        source = self.final or (self.history[-1] if self.history else None)
        return list(source.per_class) if source is not None else []

    def extra(self, key: str, default: Any = None) -> Any:
        """A phase's extra top-level entry (``phase``, ``baseline``, ``text_encoder``, ``training``, ...)."""
        return (self.model_extra or {}).get(key, default)

    def epoch(self, epoch: int) -> HistoryEntry | None:
        return next((h for h in self.history if h.epoch == epoch), None)


#: The contract's own top-level keys: a phase's extras may not replace them.
CONTRACT_KEYS: tuple[str, ...] = tuple(k for k in RunContract.model_fields if k != "failure")


# --------------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------------
def _where(loc: tuple) -> tuple[str, str]:
    """pydantic's location as the entry (``history[1]``, ``final``) and the field within it
    (``per_class['scratch'].ap``)."""
    parts = list(loc)
    head = str(parts.pop(0)) if parts else "contract"
    if head == "history" and parts and isinstance(parts[0], int):
        head = f"history[{parts.pop(0)}]"
    field, previous = "", ""
    for part in parts:
        if isinstance(part, int):
            field += f"[{part}]"
        elif previous in ("per_class", "operating_points", "errors"):
            field += f"[{part!r}]"
        else:
            field += f".{part}" if field else str(part)
        previous = str(part)
    return head, field


#: What each per-class entry must hold, as the messages name it.
_ENTRY_FIELDS = {
    "per_class": "`ap` and `ap50`",
    "operating_points": f"exactly {', '.join(OPERATING_POINT_KEYS)}",
}


def _schema_problems(record: Mapping[str, Any], schema: int) -> list[str]:
    """Every place ``record`` breaks the models, one line each (missing fields of an entry on one line)."""
    try:
        RunContract.model_validate(record)
        return []
    except ValidationError as exc:
        errors = exc.errors()
    missing: dict[str, list[str]] = {}
    problems: list[str] = []
    for error in errors:
        loc = error["loc"]
        if error["type"] == "missing":
            if len(loc) == 1:
                if ADDED_KEYS.get(str(loc[0]), 0) <= schema:
                    missing.setdefault("contract", []).append(str(loc[0]))
                continue
            head, field = _where(loc[:-1])
            for container, fields in _ENTRY_FIELDS.items():
                if container in field:
                    line = f"{head}: {field} must have {fields}"
                    if line not in problems:
                        problems.append(line)
                    break
            else:
                missing.setdefault(f"{head}{': ' + field if field else ''}", []).append(str(loc[-1]))
            continue
        head, field = _where(loc)
        value = error.get("input")
        shown = json.dumps(value) if not isinstance(value, (dict, list)) else type(value).__name__
        what = field or "the entry"
        if error["type"] == "literal_error" and loc == ("status",):
            problems.append(f"`status` is {value!r}; allowed: {', '.join(STATUSES)}")
        elif "per_class" in field and error["type"] in ("model_type", "dict_type"):
            problems.append(f"{head}: {field} must have `ap` and `ap50`")
        elif error["msg"].endswith("must be a number or null"):
            problems.append(f"{head}: `{what}` must be a number or null, got {shown}")
        elif error["type"] == "extra_forbidden":
            problems.append(f"{head}: {field.rsplit('.', 1)[0]} must have exactly {', '.join(OPERATING_POINT_KEYS)}")
        else:
            problems.append(f"{head}: `{what}` {error['msg'].lower()}, got {shown}")
    lines = [
        f"missing {', '.join(fields)}" if where == "contract" else f"{where}: missing {', '.join(fields)}"
        for where, fields in missing.items()
    ]
    return lines + problems


def _order_problems(record: Mapping[str, Any]) -> list[str]:
    """What no single entry shows: epochs in increasing order, ``final`` of a finished run, one analysis entry per
    class."""
    problems = []
    history = record.get("history")
    if not isinstance(history, list):
        return ["`history` must be a list of per-epoch entries"]
    previous = -1
    for index, entry in enumerate(history):
        epoch = entry.get("epoch") if isinstance(entry, Mapping) else None
        if isinstance(epoch, int) and not isinstance(epoch, bool):
            if epoch <= previous:
                problems.append(
                    f"history[{index}]: `epoch` must be an integer greater than the previous entry's ({previous})"
                )
            else:
                previous = epoch
    version = record.get("schema_version")
    if (
        "environment" not in record
        and (version if isinstance(version, int) else SCHEMA_VERSION) >= ADDED_KEYS["environment"]
    ):
        problems.append("missing environment")
    final = record.get("final")
    if final is None and record.get("status") == "finished":
        problems.append("`final` is required when status is finished (the selected checkpoint's metrics)")
    if isinstance(final, Mapping) and isinstance(final.get("per_class"), Mapping) and final["per_class"]:
        classes = set(final["per_class"])
        for key in ("operating_points", "errors"):
            if isinstance(final.get(key), Mapping) and set(final[key]) != classes:
                problems.append(f"final: `{key}` must have one entry per class of `per_class` ({sorted(classes)})")
    if isinstance(final, Mapping) and isinstance(final.get("errors"), Mapping):
        for name, values in final["errors"].items():
            if isinstance(values, Mapping) and set(values) != set(ERROR_TYPES):
                problems.append(f"final: errors[{name!r}] must have exactly {', '.join(ERROR_TYPES)}")
    return problems


def contract_problems(record: Mapping[str, Any]) -> list[str]:
    """Everything that breaks the contract, listed (reports must be able to trust every entry)."""
    version = record.get("schema_version")
    schema = version if isinstance(version, int) else SCHEMA_VERSION
    return _schema_problems(record, schema) + _order_problems(record)


# --------------------------------------------------------------------------------------------
# Writing and reading
# --------------------------------------------------------------------------------------------
def _metrics_path(run_dir: str | Path) -> Path:
    path = resolve_path(run_dir)
    return path if path.suffix == ".json" else path / METRICS_FILE


def write_metrics(
    run_dir: str | Path,
    *,
    params: Params | Mapping[str, Any],
    dataset: Mapping[str, Any],
    history: list[dict],
    final: dict | None,
    extra: Mapping[str, Any] | None = None,
    status: Status = "running",
    depends_on: str = "",
) -> Path:
    """Write ``run_dir/metrics.json`` atomically and return its path.

    ``depends_on`` names what else the result depends on (phase 2: its baseline run's id); it is
    folded into the ``run_id``. ``params`` (a mapping is validated through the schema) are stored in full;
    ``dataset`` is a :func:`tfg_mm.data.loaders.dataset_record`; ``extra`` entries become top-level keys (they
    may not shadow the contract's). A ``DataError`` lists every entry that breaks the contract; nothing is
    written then.
    """
    path = _metrics_path(run_dir)
    if not isinstance(params, Params):
        params = load_params(params, source_names=["write_metrics(params=...)"])
    if status not in STATUSES:
        raise ConfigError(f"write_metrics(status={status!r}): allowed: {', '.join(STATUSES)}")
    problems = []
    if not isinstance(dataset, Mapping) or not isinstance(dataset.get("hash"), str):
        problems.append("`dataset` must be a dataset_record(...) with a `hash`")
    clashes = sorted(set(extra or {}) & set(CONTRACT_KEYS))
    if clashes:
        problems.append(f"`extra` may not replace contract keys: {', '.join(clashes)}")
    code = code_version()
    record = {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "run_id": run_id(params, dataset["hash"], code, depends_on) if not problems else "",
        "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": params.model_dump(mode="json"),
        "params_changed": json_safe(diff_from_default(params)),
        "dataset": json_safe(dict(dataset)) if isinstance(dataset, Mapping) else {},
        "code_version": code,
        "environment": environment(),
        "history": json_safe(list(history)),
        "final": json_safe(final),
    }
    record.update({k: v for k, v in json_safe(dict(extra or {})).items() if k not in CONTRACT_KEYS})
    problems = contract_problems(record) + problems
    if problems:
        raise DataError(f"{path}: not written, the run contract is broken:\n" + "\n".join(f"  - {p}" for p in problems))
    return atomic_write_json(path, record)


def raw_contract(run_dir: str | Path) -> dict | None:
    """``metrics.json`` as written (not checked against the contract), or None when absent / unreadable."""
    try:
        record = json.loads(_metrics_path(run_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def read_metrics(run_dir: str | Path) -> dict:
    """The run contract of ``run_dir`` (or of a metrics.json path), checked, as a plain dict.

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
    problems = contract_problems(record)
    if problems:
        raise DataError(
            f"{path}: does not follow the run contract:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nRe-run the notebook with `overwrite: true` to rewrite it."
        )
    return record


def read_contract(run_dir: str | Path) -> RunContract:
    """The run contract of ``run_dir``, checked (:func:`read_metrics`), typed."""
    return RunContract.model_validate(read_metrics(run_dir))


def as_contract(metrics: RunContract | Mapping[str, Any]) -> RunContract:
    """A contract already read (the dict a phase returns, or a typed one) as a :class:`RunContract`."""
    return metrics if isinstance(metrics, RunContract) else RunContract.model_validate(dict(metrics))


def is_finished(run_dir: str | Path) -> bool:
    """True when ``run_dir/metrics.json`` exists, parses and says ``status: finished``."""
    record = raw_contract(run_dir)
    return record is not None and record.get("status") == "finished"


def mark_failed(run_dir: str | Path, failure: Mapping[str, Any], status: Status = "failed") -> Path | None:
    """Mark the run in ``run_dir`` failed (or ``interrupted``): its ``metrics.json`` keeps everything it holds
    (history, params, ...) and gets that ``status`` and ``failure``. Returns the path, or None when there is
    no readable ``metrics.json`` yet (the caller writes a new one with :func:`write_metrics`)."""
    record = raw_contract(run_dir)
    if record is None:
        return None
    record["status"] = status
    record["failure"] = json_safe(dict(failure))
    record["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
    return atomic_write_json(_metrics_path(run_dir), record)
