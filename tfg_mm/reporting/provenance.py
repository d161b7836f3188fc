"""Where a number came from: the run card of a run contract (params, seed, dataset, code, environment, status) and
the table of its selected checkpoint's metrics, plus the small readers of run contracts the other report modules
share. Everything here only reads what it is given (``metrics.json``, see :mod:`tfg_mm.training.runs`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd
from IPython.display import Markdown, display

from tfg_mm.config import Params
from tfg_mm.paths import portable_text

_SUMMARY_ROWS = (
    ("map", "mAP"),
    ("map50", "mAP50"),
    ("map75", "mAP75"),
    ("map_small", "mAP small"),
    ("map_medium", "mAP medium"),
    ("map_large", "mAP large"),
)


#: What a size row says when the validation set has no objects of that size (COCOeval's -1).
_NO_OBJECTS = {f"mAP {size}": f"no {size} objects" for size in ("small", "medium", "large")}


def contract_field(metrics: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """A phase's extra entry (``phase``, ``baseline``, ``text_encoder``, ...): ``tfg_mm.training.contract.write_metrics``
    writes a phase's extras as top-level keys of the contract."""
    return metrics.get(key, default)


def baseline_final_of(metrics: Mapping[str, Any]) -> dict | None:
    """The baseline's final metrics recorded in a phase-2 contract (None for a baseline run)."""
    baseline = contract_field(metrics, "baseline") or {}
    return baseline.get("final") if isinstance(baseline, Mapping) else None


def as_final(baseline: Mapping[str, Any] | None) -> dict | None:
    """Accept a whole contract (with ``final``) or a ``final`` dict."""
    if baseline is None:
        return None
    return dict(baseline["final"]) if isinstance(baseline.get("final"), Mapping) else dict(baseline)


def number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def history_frame(metrics: Mapping[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(
        [{k: v for k, v in h.items() if not isinstance(v, (dict, list))} for h in metrics.get("history", [])]
    )


def run_class_names(metrics: Mapping[str, Any]) -> list[str]:
    final = metrics.get("final") or (metrics.get("history") or [{}])[-1]
    return list((final or {}).get("per_class", {}))


def environment_summary(env: Mapping[str, Any]) -> str:
    """One line of a run's ``environment`` record (:func:`tfg_mm.training.identity.environment`)."""
    packages = env.get("packages") or {}
    versions = ", ".join(f"{k} {v}" for k, v in packages.items() if v)
    device = f"GPU {env['gpu']} (CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')})" if env.get("gpu") else "no GPU"
    return (
        f"CPU {env.get('cpu', '?')} (torch kernels {env.get('cpu_capability', '?')}, {env.get('torch_threads', '?')} "
        f"threads, deterministic algorithms {env.get('deterministic_algorithms', '?')}), {device}; "
        f"python {env.get('python', '?')}, {versions}"
    )


def provenance_markdown(metrics: Mapping[str, Any]) -> str:
    """ "Where this number came from" as a markdown table: phase, changed params, data, code, text, mode."""
    params = metrics.get("params", {})
    defaults = Params().model_dump(mode="json")
    changed = metrics.get("params_changed")
    if changed is None:
        changed = {k: v for k, v in params.items() if k in defaults and defaults[k] != v}
    dataset = metrics.get("dataset", {})
    code = metrics.get("code_version", {})
    text = contract_field(metrics, "text_encoder") or {}
    model = contract_field(metrics, "model") or {}
    baseline = contract_field(metrics, "baseline") or {}

    def cell(value: Any) -> str:
        return portable_text(str(value)).replace("|", "\\|").replace("\n", " ")

    rows = [
        ("phase", contract_field(metrics, "phase", "?")),
        ("status", _status_text(metrics)),
        ("run id", metrics.get("run_id", "?")),
        ("run_dir", params.get("run_dir", "?")),
        ("seed", params.get("seed", "?")),
        ("params that differ from the defaults", ", ".join(f"`{k}: {v}`" for k, v in changed.items()) or "none"),
        (
            "dataset",
            f"{dataset.get('root', '?')} (hash `{str(dataset.get('hash', '?'))[:16]}`, "
            f"{dataset.get('hash_method', '')})",
        ),
        (
            "code version",
            f"tfg_mm {code.get('package', '?')}, commit `{code.get('git_commit') or 'none'}`"
            f"{' (dirty)' if code.get('git_dirty') else ''}, sources "
            f"`{str(code.get('source_sha256', '?'))[:16]}`",
        ),
    ]
    shots = (metrics.get("training") or {}).get("train_shots")
    if isinstance(shots, Mapping):
        kept = ", ".join(f"{c} {v['kept']} of {v['of']}" for c, v in (shots.get("images") or {}).items())
        rows.append(
            (
                "low-data training set",
                f"`train_shots: {shots.get('k')}` (subset seed {shots.get('seed')}): {kept} images; "
                f"{shots.get('kept_images')} of {shots.get('of_images')} training images kept (validation and test "
                "untouched)",
            )
        )
    env = metrics.get("environment")
    if isinstance(env, Mapping):
        rows.append(("environment", environment_summary(env)))
    if model:
        skip = ("corrections", "pretrained")
        rows.append(("detector", ", ".join(f"{k}: {v}" for k, v in model.items() if k not in skip)))
    loaded = model.get("pretrained") if isinstance(model, Mapping) else None
    if isinstance(loaded, Mapping):
        rows.append(("initial weights", _pretrained_summary(loaded)))
    if text:
        rows.append(("text encoder", ", ".join(f"{k}: {v}" for k, v in text.items() if k != "prompts")))
    mode = contract_field(metrics, "detector_mode") or (params.get("detector_mode") if text else None)
    if mode:
        rows.append(("detector mode", mode))
    if isinstance(baseline, Mapping) and baseline.get("checkpoint"):
        rows.append(("baseline checkpoint", baseline["checkpoint"]))
    final = metrics.get("final") or {}
    if final:
        fell_back = (
            " — it fell back to the starting point (the baseline): no trained epoch beat it"
            if final.get("fell_back")
            else ""
        )
        rows.append(
            (
                "selected checkpoint",
                f"epoch {final.get('epoch', '?')} by {final.get('selected_by', '?')} on the validation images"
                f"{fell_back} ({final.get('checkpoint', '?')})",
            )
        )
        convergence = final.get("convergence")
        if isinstance(convergence, Mapping) and convergence.get("sentence"):
            rows.append(
                ("end of training", f"{params.get('epochs', '?')} epochs; validation {convergence['sentence']}")
            )
        test = final.get("test")
        rows.append(
            (
                "held-out test split",
                f"{test.get('annotations', '?')}: {sum((test.get('instances') or {}).values())} boxes, judged once "
                "after the selection (selected and last checkpoint); nothing was selected on it"
                if isinstance(test, Mapping)
                else f"none (no `test_json`); `python -m tfg_mm evaluate {params.get('run_dir', 'RUN')} --split "
                "test` judges the run on one",
            )
        )
    lines = ["| | |", "|---|---|"] + [f"| **{cell(k)}** | {cell(v)} |" for k, v in rows]
    return "\n".join(lines)


def _pretrained_summary(table: Mapping[str, Any]) -> str:
    """One line of ``model.pretrained`` (:func:`tfg_mm.detector.pretrained.load_pretrained`'s table) for the run card."""
    reinit = len(table.get("reinitialised") or [])
    return (
        f"{table.get('source', '?')} ({table.get('kind', '?')}, {table.get('source_classes', '?')} classes -> "
        f"{table.get('classes', '?')}): {table.get('loaded', '?')} tensors loaded, {reinit} re-initialised"
        f"{' (the class heads)' if reinit else ''}, {len(table.get('dropped') or [])} dropped"
    )


def _status_text(metrics: Mapping[str, Any]) -> str:
    """``finished``; otherwise a visible marker: a failed run names its error, epoch, step and traceback."""
    status = str(metrics.get("status", "?"))
    if status == "finished":
        return status
    failure = metrics.get("failure")
    if status == "failed" and isinstance(failure, Mapping):
        where = ", ".join(f"{k} {failure[k]}" for k in ("stage", "epoch", "step") if failure.get(k) is not None)
        message = str(failure.get("message", "")).splitlines()[0][:300] if failure.get("message") else ""
        return (
            f"**FAILED** ({where}): {failure.get('type', '?')}: {message} "
            f"(traceback: {failure.get('traceback', '?')} in the run folder); its numbers are not a result"
        )
    return f"**{status.upper()}**: not finished; its numbers are not a result"


def show_provenance(metrics: Mapping[str, Any]) -> None:
    """Display :func:`provenance_markdown` in the notebook (every number says where it came from)."""
    display(Markdown(provenance_markdown(metrics)))


def final_table(metrics: Mapping[str, Any], baseline_final: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The selected checkpoint's metrics, one row per metric (summary, then AP of each class).

    With ``baseline_final``: columns ``run``, ``baseline`` and ``Δ``. A size row of a validation set
    without objects of that size (COCO's -1, NaN in the contract) says so ("no large objects")
    instead of ``NaN``.
    """

    def rows(final: Mapping[str, Any]) -> dict[str, float]:
        out = {label: number(final.get(key)) for key, label in _SUMMARY_ROWS}
        for name, values in (final.get("per_class") or {}).items():
            out[f"AP {name}"] = number(values.get("ap"))
            out[f"AP50 {name}"] = number(values.get("ap50"))
        return out

    def notes(final: Mapping[str, Any]) -> dict[str, str]:
        """A class without validation instances: its AP rows say so instead of NaN."""
        return {
            f"{kind} {name}": values["note"]
            for name, values in (final.get("per_class") or {}).items()
            if values.get("note")
            for kind in ("AP", "AP50")
        }

    final = metrics.get("final") or {}
    table = pd.DataFrame({"run": rows(final)})
    base = as_final(baseline_final)
    if base:
        table["baseline"] = pd.Series(rows(base))
        table["Δ"] = table["run"] - table["baseline"]
    table.index.name = "metric"
    table = table.round(4).astype(object)
    for label, text in notes(final).items():
        table.loc[label] = [text if pd.isna(v) else v for v in table.loc[label]]
    for label, text in _NO_OBJECTS.items():
        if label in table.index:
            table.loc[label] = [text if pd.isna(v) else v for v in table.loc[label]]
    return table
