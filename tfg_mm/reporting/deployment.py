"""How big and how fast a run's model is (``{run_dir}/deploy.json``, :mod:`tfg_mm.deploy.benchmark`): the
"Deployment" section of reports 01 / 02 and the baseline-vs-phase-2 comparison of the index (the text branch's
inference cost).

Only draws the record it is given: a run that was never benchmarked gets a note with the command that measures it.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from IPython.display import Markdown, display

from tfg_mm.paths import resolve_path

#: The measurement rows of the tables: (runtime prefix, scope, which batch: "one" = batch 1, "many" = the largest).
_COLUMNS = (
    ("PyTorch", "model", "one", "PyTorch ms/image"),
    ("ONNX Runtime", "model", "one", "ONNX Runtime ms/image"),
    ("PyTorch", "end to end", "one", "PyTorch end to end ms/image"),
    ("ONNX Runtime", "end to end", "one", "ONNX Runtime end to end ms/image"),
    ("PyTorch", "model", "many", "PyTorch images/s"),
    ("ONNX Runtime", "model", "many", "ONNX Runtime images/s"),
)


def no_deploy_note(run_dir: str) -> str:
    return (
        f"*Not benchmarked yet. Measure with `python -m tfg_mm benchmark {run_dir}` (parameters, GFLOPs, latency per "
        "runtime; it writes deploy.json) and rerun this report.*"
    )


def _row(record: Mapping[str, Any], runtime: str, scope: str, which: str) -> dict | None:
    rows = [r for r in record.get("rows") or [] if r["runtime"].startswith(runtime) and r["scope"] == scope]
    if not rows:
        return None
    batch = 1 if which == "one" else max(r["batch"] for r in rows)
    return next((r for r in rows if r["batch"] == batch), None)


def _figures(record: Mapping[str, Any]) -> dict[str, tuple[float, float | None, str]]:
    """One run's figures as numbers: ``label -> (value, p90 or None, kind)``; kind ``count`` / ``number`` /
    ``ms`` / ``rate`` says how a figure is written and how two runs' figures compare."""
    p = record.get("params") or {}
    out: dict[str, tuple[float, float | None, str]] = {
        "parameters (M)": (p.get("total", 0) / 1e6, None, "number"),
        "text branch (parameters)": (p.get("text_branch", 0), None, "count"),
        "GFLOPs": (record.get("gflops", float("nan")), None, "number"),
        "checkpoint (MB)": (record.get("checkpoint_mb", float("nan")), None, "number"),
    }
    branch = record.get("text_branch_ms")
    if branch:
        out["text branch alone, PyTorch ms/image"] = (branch["median_ms"], branch["p90_ms"], "branch")
    for runtime, scope, which, label in _COLUMNS:
        row = _row(record, runtime, scope, which)
        if row is None:
            continue
        if which == "one":
            out[label] = (row["ms_per_image"], row["p90_ms"] / row["batch"], "ms")
        else:
            out[f"{label} (batch {row['batch']})"] = (row["images_per_s"], None, "rate")
    return out


#: How each kind of figure is written (value, p90).
_WRITE = {
    "number": lambda v, _: round(v, 3) if v < 1 else round(v, 2) if v < 10 else round(v, 1),
    "count": lambda v, _: f"{int(v):,}",
    "branch": lambda v, p90: f"{v:.3f} (p90 {p90:.3f})",
    "ms": lambda v, p90: f"{v:.1f} (p90 {p90:.1f})",
    "rate": lambda v, _: round(v, 1),
}


def deployment_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """One run's figures as one table column: size, GFLOPs, ms/image at batch 1 and images/s at the largest batch."""
    return {label: _WRITE[kind](value, p90) for label, (value, p90, kind) in _figures(record).items()}


def conditions(record: Mapping[str, Any]) -> str:
    """Where and how the figures were measured (a sentence under the table)."""
    device = record.get("gpu") or record.get("cpu") or record.get("device")
    runtimes = sorted({r["runtime"] for r in record.get("rows") or []})
    return (
        f"{record.get('preset')} at {record.get('image_size')} px; {', '.join(runtimes)} on {device}, "
        f"{record.get('threads')} thread(s); median (p90) of {record.get('runs')} timed runs after "
        f"{record.get('warmup')} warm-up, measured {record.get('measured_at', '?')[:10]}. *model*: the network and the "
        "top-k post-processing on a resized tensor; *end to end*: from the image file (decode, resize, model, "
        "per-class thresholds). GFLOPs: " + str(record.get("flop_counter", "")) + "." + onnx_check_sentence(record)
    )


def onnx_check_sentence(record: Mapping[str, Any]) -> str:
    """What the export check of the timed ONNX file found (`` ONNX export check PASSED: ...``), or nothing."""
    check = record.get("onnx_check") or {}
    diff, m = check.get("max_abs_diff") or {}, check.get("map") or {}
    if not check:
        return ""
    text = f" The ONNX file's export check: {check.get('status')}"
    if diff:
        text += (
            f" (ONNX Runtime vs PyTorch, largest differences: scores {diff['scores']:.1e}, boxes "
            f"{diff['boxes_normalised']:.1e} of the image size"
        )
        if m.get("pytorch"):
            text += f"; validation mAP {m['onnx']['map']:.4f} vs {m['pytorch']['map']:.4f}"
        text += ")"
    return text + "."


def deployment_table(record: Mapping[str, Any]) -> pd.DataFrame:
    """The "Deployment" table of one run: its figures as rows (a vertical table reads better in a report)."""
    return pd.DataFrame({record.get("model", "model"): deployment_summary(record)})


def show_deployment(record: Mapping[str, Any] | None, run_dir: str = "RUN") -> pd.DataFrame | None:
    """Notebook 01 / 02: the run's deployment table and the conditions it was measured under (or how to measure)."""
    if not record:
        display(Markdown(no_deploy_note(run_dir)))
        return None
    table = deployment_table(record)
    display(table)
    display(Markdown(conditions(record)))
    return table


def deployment_comparison(baseline: Mapping[str, Any] | None, phase2: Mapping[str, Any] | None) -> pd.DataFrame | None:
    """The index's table: baseline vs phase 2 side by side, and what the text branch costs at inference (phase 2 −
    baseline, in % for the timings). None unless both were benchmarked."""
    if not baseline or not phase2:
        return None
    a, b = _figures(baseline), _figures(phase2)
    frame = pd.DataFrame(
        {
            "baseline (detector alone)": deployment_summary(baseline),
            "phase 2 (detector + text branch)": deployment_summary(phase2),
        }
    )
    model_ms = b.get("PyTorch ms/image", (None,))[0]
    cost = {}
    for key, (y, _, kind) in b.items():
        x = a[key][0] if key in a else None
        if kind == "branch":
            cost[key] = f"+{y:.3f} ms" + (f" ({100.0 * y / model_ms:.1f} % of the model)" if model_ms else "")
        elif x is None:
            cost[key] = ""
        elif kind in ("ms", "rate"):
            cost[key] = f"{100.0 * (y - x) / x:+.1f} %" if x else ""
        elif kind == "count":
            cost[key] = f"{int(y - x):+,}"
        else:
            cost[key] = f"{y - x:+.3f}".rstrip("0").rstrip(".")
    frame["text branch cost"] = pd.Series(cost)
    return frame.astype(object).where(frame.notna(), "")


def read_deployments(phase2_dir: str | Path) -> tuple[dict | None, dict | None]:
    """``(baseline's deploy.json, phase 2's deploy.json)`` of a phase-2 run folder (its baseline is the run its
    params name); None for a record that is absent."""
    phase2 = Path(resolve_path(phase2_dir))
    record = _read(phase2 / "deploy.json")
    baseline = None
    try:
        params = json.loads((phase2 / "metrics.json").read_text(encoding="utf-8")).get("params") or {}
        base = Path(resolve_path(params.get("baseline") or ""))
        base_run = base if (base / "metrics.json").is_file() else base.parents[1] if len(base.parents) > 1 else base
        baseline = _read(base_run / "deploy.json")
    except (OSError, ValueError):
        pass
    return baseline, record


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def deployment_html(baseline: Mapping[str, Any] | None, phase2: Mapping[str, Any] | None) -> str:
    """The index's "Deployment" section (empty when the two runs were not both benchmarked)."""
    table = deployment_comparison(baseline, phase2)
    if table is None:
        return ""
    return (
        "<h2>Deployment: what the text branch costs at inference</h2>"
        + table.to_html(escape=True)
        + f"<p class='note'>{html.escape(conditions(phase2).replace('*', ''))} Both runs were measured by "
        "<code>python -m tfg_mm benchmark</code> (reports 01 and 02), minutes apart: a difference between their "
        "whole-model timings of a few tens of per cent is the machine's noise at a few milliseconds, not the text "
        "branch. Its cost is the row <em>text branch alone</em>, measured directly (the fusion on the detector's "
        "outputs).</p>"
    )
