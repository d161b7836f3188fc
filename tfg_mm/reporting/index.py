"""``reports/index.html``: a standalone page (images embedded) that links every notebook report and shows the
ablation table, its figures, the error table and the flips; the table is also written as CSV and LaTeX. It only
draws what it is given, so ``python -m tfg_mm report`` can always rebuild it from the run folders."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from tfg_mm import paths
from tfg_mm.io import atomic_write_text
from tfg_mm.paths import portable_text, resolve_path
from tfg_mm.reporting.ablations import (
    COMPARISONS,
    ablation_table,
    baseline_spread_table,
    covers_once,
    has_comparison,
    plot_ablation_gates,
    plot_ablation_trajectories,
    plot_delta_heatmap,
    plot_wise_curve,
)
from tfg_mm.reporting.deployment import deployment_html
from tfg_mm.reporting.errors import error_table
from tfg_mm.reporting.figures import save_figure
from tfg_mm.reporting.lowshot import lowshot_table, lowshot_verdict, plot_lowshot

#: The notebook reports the pipeline renders, in reading order (linked from the index).
NOTEBOOK_REPORTS: tuple[tuple[str, str], ...] = (
    ("00_data", "Data: the dataset, its classes and boxes"),
    ("01_baseline", "Phase 1: the DEIMv2 baseline"),
    ("02_phase2", "Phase 2: text branch, residual fusion, progressive fine-tuning"),
    ("03_ablations", "Ablations: every hypothesis with seeds and bootstrap intervals"),
)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.5rem 0; } figcaption { font-size: 0.9rem; color: #555; }
img { max-width: 100%; }
.note { color: #555; font-size: 0.9rem; }
"""


def _embedded_png(fig: plt.Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _report_links(reports_dir: Path, summary: Mapping[str, Any] | None) -> str:
    items = []
    for stem, title in NOTEBOOK_REPORTS:
        path = reports_dir / f"{stem}.html"
        if path.exists() or stem == "03_ablations":  # notebook 03 renders itself right after building the index
            items.append(f'<li><a href="{stem}.html">{html.escape(stem)}</a>: {html.escape(title)}</li>')
        else:
            items.append(f"<li>{html.escape(stem)}: {html.escape(title)} <em>(not rendered yet)</em></li>")
    known = {f"{stem}.html" for stem, _ in NOTEBOOK_REPORTS} | {"index.html"}
    for path in sorted(reports_dir.glob("*.html")):
        if path.name not in known:
            items.append(f'<li><a href="{path.name}">{html.escape(path.stem)}</a></li>')
    runs = []
    for variant in (summary or {}).get("variants", []):
        for run in variant.get("runs", []):
            report = run.get("report")
            if report and Path(report).exists():
                rel = os.path.relpath(report, reports_dir)
                runs.append(
                    f'<li><a href="{html.escape(rel)}">{html.escape(variant["name"])} · seed {run["seed"]}'
                    f"</a> ({html.escape(run['status'])})</li>"
                )
    out = "<h2>Reports</h2><ul>" + "".join(items) + "</ul>"
    if runs:
        out += "<h3>Every ablation run (executed notebook 02)</h3><ul>" + "".join(runs) + "</ul>"
    return out


def _error_table_section(summary: Mapping[str, Any], reports_dir: Path) -> str:
    """The index's per-class error table (:func:`error_table`, hard classes), also written as CSV."""
    table = error_table(summary)
    if table.empty:
        return (
            "<h3>Errors per class</h3><p class='note'>No error analysis recorded in these runs "
            "(run contracts before schema version 3).</p>"
        )
    atomic_write_text(reports_dir / "ablations_errors.csv", table.to_csv())
    return (
        "<h3>Errors per class (hard classes)</h3><p class='note'>TIDE error breakdown of the selected "
        "checkpoint: ΔAP50 of each class when all errors of one type are fixed by an oracle (foreground IoU 0.5, "
        "background IoU 0.1; Bolya et al. 2020); variants: mean over finished seeds. cls + loc: wrong class "
        "and poorly localised; missed: boxes no detection came near.</p>"
        + table.to_html(escape=True, border=0, classes="errors", na_rep="")
    )


def _flips_html(flips: Mapping[str, Any]) -> str:
    """The index's flips table (:func:`flips_summary` / :func:`show_side_by_side` of the phase-2 run)."""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{f['miss_to_hit']} ({len(f['images_miss_to_hit'])} images)</td>"
        f"<td>{f['hit_to_miss']} ({len(f['images_hit_to_miss'])} images)</td>"
        f"<td>{f['miss_to_hit'] - f['hit_to_miss']:+d}</td></tr>"
        for name, f in (flips.get("classes") or {}).items()
    )
    by_run = flips.get("threshold_source") or {}
    distinct = set(by_run.values())
    sources = next(iter(distinct)) if len(distinct) == 1 else "; ".join(f"{k}: {v}" for k, v in by_run.items())
    return (
        "<h2>What the text branch changed on the hard classes</h2>"
        "<p class='note'>Validation ground-truth boxes of each hard class that the baseline missed and phase 2 "
        "found (miss → hit), and the reverse, matching at IoU 0.5 with each model at its own score thresholds "
        f"({html.escape(sources)}). The images are in the phase-2 report.</p>"
        "<table><tr><th>class</th><th>boxes miss → hit</th><th>boxes hit → miss</th><th>net</th></tr>"
        f"{rows}</table>"
    )


def phase2_run_of(summary: Mapping[str, Any], run_dir: str | Path = "runs/phase2") -> str | None:
    """``run_dir`` when it holds a phase-2 run that fine-tuned this grid's baseline (its flips and deployment
    belong in the grid's index), else None: another dataset's grid (``scripts/bench_real.py``) leaves them out."""
    try:
        params = json.loads((resolve_path(run_dir) / "metrics.json").read_text(encoding="utf-8")).get("params") or {}
    except (OSError, ValueError):
        return None
    baseline = summary.get("baseline_run")
    if not baseline or not params.get("baseline"):
        return None
    return str(run_dir) if resolve_path(params["baseline"]) == resolve_path(baseline) else None


def _baseline_ending(summary: Mapping[str, Any]) -> str:
    """The baseline's convergence at the end of its training (``final.convergence``), as a clause: the variants
    are compared with that checkpoint, and one still rising is an unfinished reference."""
    convergence = (((summary.get("baseline") or {}).get("final")) or {}).get("convergence") or {}
    sentence = convergence.get("sentence")
    if not sentence:
        return ""
    caveat = (
        " (the variants are compared with an unfinished baseline)"
        if convergence.get("verdict") == "still rising"
        else ""
    )
    return f"; its validation at the end of training: {sentence}{caveat}"


def _lowshot_section(lowshot: Mapping[str, Any], reports_dir: Path) -> str:
    """The low-data regime (notebook 04): its verdict in words, the Δ-vs-k figure and the table."""
    shots = lowshot.get("shots") or {}
    out = [
        "<h2>Low-data regime: the hard classes starved</h2>",
        f"<p class='note'>Grid <code>{html.escape(portable_text(str(lowshot.get('grid', ''))))}</code>: "
        f"{html.escape(', '.join(shots.get('classes') or []))} kept to k = {html.escape(str(shots.get('k')))} training "
        "images each (subset seed "
        f"{html.escape(str(shots.get('seed')))}); each k's baseline retrained on that set, every variant × seed "
        "fine-tuned on it; Δ against that k's baseline on the held-out test images (report 04).</p>",
    ]
    out += [f"<p>{html.escape(line)}</p>" for line in lowshot_verdict(lowshot).splitlines()]
    fig = plot_lowshot(lowshot)
    save_figure(fig, "lowshot_delta", reports_dir / "figures")
    out.append(
        f'<figure><img alt="lowshot_delta" src="data:image/png;base64,{_embedded_png(fig)}">'
        "<figcaption>Δ on test against k: one line per variant, bootstrap intervals as error bars.</figcaption></figure>"
    )
    plt.close(fig)
    out.append(lowshot_table(lowshot).to_html(index=False, escape=True, border=0, na_rep=""))
    return "".join(out)


def build_index(
    summary: Mapping[str, Any] | None = None,
    reports_dir: str | Path | None = None,
    flips: Mapping[str, Any] | None = None,
    deployment: tuple[Mapping[str, Any] | None, Mapping[str, Any] | None] | None = None,
    lowshot: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``reports/index.html`` (standalone: CSS inline, figures embedded) and return its path.

    ``summary`` is the ablation summary of :func:`tfg_mm.ablations.summarize` (None when no grid has
    run: the index then only links the reports). ``flips``: :func:`flips_summary` of the pipeline's
    phase-2 run, shown as a small table (left out when None). ``deployment``: the baseline's and the phase-2 run's
    ``deploy.json`` (:func:`tfg_mm.reporting.deployment.read_deployments`), compared when both are there. ``lowshot``:
    the low-data summary of notebook 04 (:func:`tfg_mm.reporting.lowshot.read_lowshot`), its verdict and Δ-vs-k
    figure (left out when None). Its figures are also saved as PNG + SVG under
    ``reports/figures/ablations_*``, and the table as ``reports/ablations_table.csv`` and ``.tex``.
    """
    if isinstance(summary, (str, Path)):
        raise TypeError(
            f"build_index draws an ablation summary, not a folder ({summary}); compute it first: "
            "`reporting.build_index(ablations.summarize_if_run(ablations_dir))`"
        )
    reports_dir = Path(reports_dir) if reports_dir is not None else paths.reports_dir()
    source = (summary or {}).get("ablations_dir")
    parts = [
        f"<h1>tfg-mm reports</h1><p class='note'>Built {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
        + (f" from <code>{html.escape(portable_text(str(source)))}</code>" if source else "")
        + ".</p>"
    ]
    parts.append(_report_links(reports_dir, summary))
    if flips:
        parts.append(_flips_html(flips))
    if deployment:
        parts.append(deployment_html(*deployment))
    if summary:
        level = round(100 * summary.get("confidence", 0.95))
        keys = [k for k in COMPARISONS if has_comparison(summary, k)] or ["val"]
        parts.append("<h2>Ablations</h2>")
        parts.append(
            f"<p class='note'>Grid <code>{html.escape(portable_text(str(summary.get('grid', ''))))}</code>; "
            f"{html.escape(summary.get('description', ''))}. Values are mean ± sd over seeds; "
            f"Δ is the seed mean of (variant − baseline) with a paired bootstrap {level}% interval "
            f"({summary.get('bootstrap_resamples')} resamples); an interval that contains 0 is "
            f"<em>within noise</em>. Each phase-2 run selects its checkpoint among its own epochs on the validation "
            f"images; the baseline (epoch 0) is the reference, never a candidate. Baseline: <code>"
            f"{html.escape(portable_text(str(summary.get('baseline_run', ''))))}</code>"
            f"{html.escape(_baseline_ending(summary))}. "
            f"{html.escape(summary.get('interval_note', ''))}</p>"
        )
        if "test" not in keys:
            parts.append(
                "<p class='note'><strong>No test split</strong>: these runs were judged on no held-out images, so the "
                "only table is on the validation images that chose their checkpoints (set <code>test_json</code>, "
                "or judge a finished run with <code>python -m tfg_mm evaluate RUN --split test</code>).</p>"
            )
        for key in keys:
            table = ablation_table(summary, key)
            shown, covers = covers_once(table)
            suffix = "" if key == keys[0] else f"_{key}"
            atomic_write_text(reports_dir / f"ablations_table{suffix}.csv", table.to_csv(index=False))
            atomic_write_text(
                reports_dir / f"ablations_table{suffix}.tex",
                shown.to_latex(
                    index=False,
                    escape=True,
                    caption=f"Ablations against the DEIMv2 baseline, {COMPARISONS[key][0].lower()}"
                    f"{COMPARISONS[key][1:]} (mean ± sd over seeds; paired bootstrap {level}% intervals over the "
                    "images, and over training seeds where there are several; "
                    + (
                        f"{covers[0].lower()}{covers[1:-1]})."
                        if covers
                        else "the column `interval covers` says which)."
                    ),
                    label=f"tab:ablations{suffix}",
                ),
            )
            parts.append(f"<h3>{html.escape(COMPARISONS[key])}</h3>")
            if key == "test":
                parts.append(
                    "<p class='note'>ΔmAP is measured on the held-out test images for each run's selected checkpoint; "
                    "<em>last epoch</em> is the same for its last checkpoint, which no selection chose.</p>"
                )
            parts.append(shown.to_html(index=False, escape=True, border=0, classes="ablations"))
            if covers:
                parts.append(f"<p class='note'>{html.escape(covers)}</p>")
        parts.append(_error_table_section(summary, reports_dir))
        spread = summary.get("baseline_seeds") or {}
        if spread.get("stats"):
            parts.append("<h3>Baseline seed spread</h3>")
            parts.append(f"<p class='note'>{html.escape(spread.get('note', ''))}</p>")
            parts.append(baseline_spread_table(summary).to_html(index=False, escape=True, border=0))
        figures = (
            (
                "ablations_trajectories",
                plot_ablation_trajectories,
                "Validation mAP of every run (a colour a variant, a dash pattern a seed); thick black: the baseline's final mAP.",
            ),
            ("ablations_per_class_delta", plot_delta_heatmap, "Per-class Δ AP50:95 against the baseline."),
            (
                "ablations_alpha",
                plot_ablation_gates,
                "Gate α of every run with a fusion (a colour a variant, a dash pattern a seed).",
            ),
            (
                "ablations_wise",
                plot_wise_curve,
                (summary.get("wise") or {}).get(
                    "note", "WiSE-FT weight interpolation between the baseline and a fine-tuned variant."
                ),
            ),
        )
        for stem, plot, caption in figures:
            fig = plot(summary)
            save_figure(fig, stem, reports_dir / "figures")
            parts.append(
                f'<figure><img alt="{stem}" src="data:image/png;base64,{_embedded_png(fig)}">'
                f"<figcaption>{html.escape(portable_text(caption))}</figcaption></figure>"
            )
            plt.close(fig)
        failed = [(v["name"], e) for v in summary.get("variants", []) for e in v.get("errors", [])]
        if failed:
            rows = "".join(
                f"<tr><td>{html.escape(name)}</td><td>{e.get('seed')}</td><td>{html.escape(str(e.get('cell')))}"
                f"</td><td>{html.escape(portable_text(str(e.get('error'))))}</td></tr>"
                for name, e in failed
            )
            parts.append(
                "<h3>Failed runs</h3><table><tr><th>variant</th><th>seed</th><th>failing cell</th>"
                f"<th>error</th></tr>{rows}</table>"
            )
    else:
        parts.append("<p class='note'>No ablation grid has run yet (notebook 03 / <code>make all</code>).</p>")
    if lowshot:
        parts.append(_lowshot_section(lowshot, reports_dir))
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>tfg-mm reports</title>"
        f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    return atomic_write_text(reports_dir / "index.html", page)
