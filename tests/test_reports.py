"""Report helpers of notebooks 01 / 02 and the reports index, rendered in a real headless Chromium."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from tfg_mm import reporting
from tfg_mm.config import load_params
from tfg_mm.paths import project_root
from tfg_mm.training import contract

#: Debian's package puts it on PATH (.ci/run installs it)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CLASSES = ("scratch", "perforation", "break")


def _per_class(shift: float) -> dict:
    return {name: {"ap": 0.5 + shift + 0.1 * i, "ap50": 0.7 + shift + 0.05 * i} for i, name in enumerate(CLASSES)}


def _metrics(per_class_gate: bool = False) -> dict:
    history = []
    for epoch in range(4):
        entry = {
            "epoch": epoch,
            "map": 0.60 + 0.01 * epoch,
            "map50": 0.80 + 0.01 * epoch,
            "map75": 0.6,
            "per_class": _per_class(0.01 * epoch),
            "lr": 1e-4,
            "losses": {} if epoch == 0 else {"loss_mal": 1.0 / epoch, "loss_bbox": 0.5 / epoch},
            "seconds": 1.0,
            "stage": "A" if epoch <= 2 else "B",
            "alpha_mean": 0.02 * epoch,
            "scale": 10.0,
            "bias": 0.0,
        }
        entry["alpha"] = [0.02 * epoch + 0.01 * c for c in range(3)] if per_class_gate else 0.02 * epoch
        history.append(entry)
    return {
        "status": "finished",
        "run_id": "abc123",
        "params": {"run_dir": "runs/phase2", "seed": 0, "alpha": 0.0, "epochs": 3, "detector_mode": "train_frozen"},
        "params_changed": {"epochs": 3},
        "dataset": {"root": "data/synthetic", "hash": "f" * 64, "hash_method": "tfg_mm.data.dataset_fingerprint"},
        "code_version": {"package": "0.1.0", "git_commit": "deadbeef", "git_dirty": True, "source_sha256": "1" * 64},
        "history": history,
        "final": {**history[-1], "checkpoint": "runs/phase2/checkpoints/best", "selected_by": "map"},
        "phase": "phase2",
        "classes": list(CLASSES),
        "detector_mode": "train_frozen",
        "text_encoder": {"kind": "minilm", "model": "all-MiniLM-L6-v2", "weights": "sha256:1234", "dim": 384},
        "baseline": {
            "checkpoint": "runs/baseline/checkpoints/best",
            "final": {"map": 0.62, "map50": 0.81, "map75": 0.6, "per_class": _per_class(0.0)},
        },
    }


@pytest.fixture(autouse=True)
def figures_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("TFG_MM_FIGURES_DIR", str(tmp_path / "figures"))
    yield
    plt.close("all")


def test_provenance_names_every_source():
    text = reporting.provenance_markdown(_metrics())
    for expected in (
        "phase2",
        "`epochs: 3`",
        "data/synthetic",
        "ffffffffffffffff",
        "deadbeef",
        "(dirty)",
        "minilm",
        "sha256:1234",
        "train_frozen",
        "runs/baseline/checkpoints/best",
        "epoch 3",
    ):
        assert expected in text, expected
    assert text.startswith("| | |\n|---|---|")


def test_a_written_contract_is_read_as_written(tmp_path):
    """The phase's extras are read where tfg_mm.training.contract.write_metrics puts them (top-level keys)."""
    metrics = _metrics()
    extra = {k: metrics[k] for k in ("phase", "classes", "detector_mode", "text_encoder", "baseline")}
    contract.write_metrics(
        tmp_path,
        params=load_params({"epochs": 3}),
        dataset=metrics["dataset"],
        history=metrics["history"],
        final=metrics["final"],
        extra=extra,
        status="finished",
    )
    written = contract.read_metrics(tmp_path)
    assert reporting.baseline_final_of(written)["map"] == 0.62
    assert reporting.contract_field(written, "classes") == list(CLASSES)
    local = {**written, "dataset": {**written["dataset"], "root": str(project_root() / "data" / "synthetic")}}
    assert "| data/synthetic (hash" in reporting.provenance_markdown(local)  # a thesis page shows no machine path
    text = reporting.provenance_markdown(written)
    env = written["environment"]
    for expected in (
        "phase2",
        "`epochs: 3`",
        "minilm",
        "train_frozen",
        "runs/baseline/checkpoints/best",
        f"torch {env['packages']['torch']}",
        f"torch kernels {env['cpu_capability']}",
        f"{env['torch_threads']} threads",
        env["cpu"],
    ):
        assert expected in text, expected
    assert "environment" not in reporting.provenance_markdown(_metrics())  # a schema-1 record: no row


def test_reports_imports_no_model_code():
    """reporting only draws: importing it loads neither the grid (which re-predicts) nor any model or training code."""
    probe = (
        "import sys, tfg_mm.reporting; print(sorted(m for m in sys.modules if m.startswith("
        "('tfg_mm.ablations', 'tfg_mm.multimodal.model', 'tfg_mm.training.loop', 'tfg_mm.training.phase2', 'tfg_mm.evaluation.coco'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("per_class_gate", [False, True])
def test_plots_return_figures_and_save_png_and_svg(tmp_path, per_class_gate):
    metrics = _metrics(per_class_gate)
    figures = {
        "traj": reporting.plot_trajectory(metrics, save="traj"),  # baseline taken from the contract
        "per_class": reporting.plot_per_class(metrics, save="per_class"),
        "delta": reporting.plot_per_class_delta(metrics, metrics["baseline"], save="delta"),
        "gate": reporting.plot_gate(metrics, save="gate"),
        "losses": reporting.plot_losses(metrics, save="losses"),
    }
    for stem, fig in figures.items():
        assert isinstance(fig, plt.Figure)
        assert (tmp_path / "figures" / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
        assert "<svg" in (tmp_path / "figures" / f"{stem}.svg").read_text()
    traj = figures["traj"].axes[0]
    assert [line.get_ydata()[0] for line in traj.get_lines() if line.get_linestyle() == "--"] == [0.62]
    assert {t.get_text() for t in traj.texts} == {"stage A", "stage B"}
    hard = [t.get_text() for t in figures["per_class"].axes[0].get_xticklabels() if t.get_fontweight() == "bold"]
    assert hard == ["perforation", "break"]
    gate_lines = figures["gate"].axes[0].get_lines()
    assert len(gate_lines) == (4 if per_class_gate else 1)


def test_gate_plot_tolerates_a_run_without_fusion():
    metrics = _metrics()
    for entry in metrics["history"]:
        for key in ("alpha_mean", "alpha", "scale", "bias"):
            entry.pop(key)
    fig = reporting.plot_gate(metrics)
    assert fig.axes[0].texts[0].get_text() == "no fusion gate in this run"


def test_final_table_with_and_without_baseline():
    metrics = _metrics()
    alone = reporting.final_table(metrics)
    assert list(alone.columns) == ["run"] and alone.loc["mAP", "run"] == pytest.approx(0.63)
    table = reporting.final_table(metrics, metrics["baseline"]["final"])
    assert table.loc["mAP", "Δ"] == pytest.approx(0.01)
    assert table.loc["AP break", "Δ"] == pytest.approx(0.03)
    assert {"AP perforation", "AP50 perforation"} <= set(table.index)


def _summary() -> dict:
    run_history = [
        {"epoch": e, "map": 0.6 + 0.01 * e, "map50": 0.8, "alpha_mean": 0.01 * e, "stage": "A"} for e in range(3)
    ]
    interval = {"delta": 0.01, "lo": -0.005, "hi": 0.02, "verdict": "within noise"}
    return {
        "grid": "params/ablations/small.yaml",
        "description": "test",
        "bootstrap_resamples": 50,
        "confidence": 0.95,
        "baseline_run": "runs/baseline",
        "hard_classes": ["perforation", "break"],
        "notes": [],
        "baseline": {"checkpoint": "x", "final": {"map": 0.62, "map50": 0.81, "per_class": _per_class(0.0)}},
        "variants": [
            {
                "name": "minilm",
                "status": "finished",
                "seeds_finished": [0, 1],
                "errors": [],
                "runs": [{"seed": 0, "status": "finished", "history": run_history, "report": None}],
                "deltas": {
                    "val": {
                        "stats": {
                            "map": {"mean": 0.63, "sd": 0.004, "n": 2},
                            "map50": {"mean": 0.82, "sd": 0.01, "n": 2},
                            "ap:perforation": {"mean": 0.6, "sd": 0.02, "n": 2},
                            "ap:break": {"mean": 0.7, "sd": 0.0, "n": 2},
                        },
                        "delta": {
                            "map": interval,
                            "per_class": {
                                "perforation": interval,
                                "break": {**interval, "lo": 0.001, "verdict": "improves"},
                            },
                        },
                    }
                },
                "per_class_delta": {"split": "val", "values": {"scratch": 0.01, "perforation": -0.02, "break": 0.03}},
            },
            {
                "name": "text_open_clip",
                "status": "failed",
                "seeds_finished": [],
                "deltas": {},
                "per_class_delta": {},
                "runs": [{"seed": 0, "status": "failed"}],
                "errors": [
                    {"seed": 0, "error": "OfflineError: open_clip weights need the network", "cell": {"index": 2}}
                ],
            },
        ],
        "wise": {
            "variant": "minilm",
            "lambdas": [0, 0.5, 1],
            "note": "WiSE-FT note",
            "curves": [
                {"seed": 0, "points": [{"lambda": lam, "map": 0.62 + 0.01 * lam, "map50": 0.8} for lam in (0, 0.5, 1)]}
            ],
        },
    }


def test_ablation_table_marks_noise_and_failures():
    table = reporting.ablation_table(_summary(), "val")
    assert isinstance(table, pd.DataFrame) and list(table["variant"]) == ["baseline", "minilm", "text_open_clip"]
    row = table.set_index("variant").loc["minilm"]
    assert row["mAP"] == "0.6300 ± 0.0040"
    assert row["ΔmAP [95% CI]"] == "+0.0100 [-0.0050, +0.0200]" and row["verdict"] == "within noise"
    assert row["verdict break"] == "improves"
    assert table.set_index("variant").loc["text_open_clip", "verdict"].startswith("failed: OfflineError")


def _build(tmp_path: Path) -> Path:
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "02_phase2.html").write_text("<html><body>phase 2</body></html>")
    return reporting.build_index(_summary(), reports_dir=tmp_path / "reports")


def test_index_is_standalone_and_writes_table_and_figures(tmp_path):
    index = _build(tmp_path)
    page = index.read_text()
    images = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert len(images) == 4 and all(src.startswith("data:image/png;base64,") for src in images)
    for src in images:
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    assert not re.search(r'(src|href)="(https?:|/)', page)  # nothing fetched from elsewhere
    assert 'href="02_phase2.html"' in page and "(not rendered yet)" in page
    assert "OfflineError" in page and "within noise" in page
    out = tmp_path / "reports"
    assert {p.name for p in (out / "figures").iterdir()} == {
        f"ablations_{s}.{e}" for s in ("trajectories", "per_class_delta", "alpha", "wise") for e in ("png", "svg")
    }
    assert pd.read_csv(out / "ablations_table.csv")["variant"].tolist() == ["baseline", "minilm", "text_open_clip"]
    assert "\\begin{tabular}" in (out / "ablations_table.tex").read_text()


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="needs a headless Chromium on PATH (apt-get install -y chromium)",
)
def test_index_renders_in_headless_chromium(tmp_path):
    index = _build(tmp_path)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    # The DOM after layout, with a script that reports every image the browser failed to decode.
    probe = index.with_name("probe.html")
    probe.write_text(
        index.read_text().replace(
            "</body>",
            "<script>window.addEventListener('load', () => { document.body.setAttribute('data-images', "
            "[...document.images].map(i => i.complete && i.naturalWidth > 0 ? 'ok' : 'broken').join(',')); "
            "});</script></body>",
        )
    )
    dom = subprocess.run(
        [CHROMIUM, *flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-images="ok,ok,ok,ok"' in dom.stdout
    assert dom.stdout.count("<tr>") >= 3 and "text_open_clip" in dom.stdout  # the table is in the DOM
    shot = tmp_path / "index.png"
    result = subprocess.run(
        [CHROMIUM, *flags, "--window-size=1200,2400", f"--screenshot={shot}", index.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000


def test_a_failed_run_is_marked_in_its_provenance():
    failed = {
        **_metrics(),
        "status": "failed",
        "final": None,
        "failure": {
            "type": "TrainingError",
            "message": "Non-finite loss\nmore",
            "epoch": 3,
            "step": 110,
            "stage": "train",
            "traceback": "traceback.txt",
        },
    }
    text = reporting.provenance_markdown(failed)
    assert "**FAILED** (stage train, epoch 3, step 110): TrainingError: Non-finite loss" in text
    assert "traceback.txt" in text and "not a result" in text
    assert "**RUNNING**" in reporting.provenance_markdown({**_metrics(), "status": "running"})


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("plot", ["per_class", "delta"])
def test_per_class_legend_covers_no_bar(plot):
    metrics = _metrics()
    for name in CLASSES:  # tall bars everywhere: an in-axes legend would cover one
        metrics["final"]["per_class"][name] = {"ap": 0.97, "ap50": 0.99}
    fig = (
        reporting.plot_per_class(metrics)
        if plot == "per_class"
        else reporting.plot_per_class_delta(metrics, {"per_class": _per_class(-0.5)})
    )
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    bars = [p.get_window_extent() for p in ax.patches if abs(p.get_height()) > 0]
    assert len(bars) == 2 * len(CLASSES)
    assert not any(_overlaps(legend, bar) for bar in bars)
    assert not _overlaps(legend, ax.get_window_extent())  # outside the axes altogether
    tight = fig.get_tightbbox(fig.canvas.get_renderer())  # what save_figure / the notebook write (bbox "tight")
    assert legend.x1 <= tight.x1 * fig.dpi + 1


def test_final_table_says_no_large_objects_instead_of_nan():
    metrics = _metrics()
    metrics["final"].update(map_small=0.4, map_medium=0.55, map_large=None)
    table = reporting.final_table(metrics, {**metrics["baseline"]["final"], "map_small": 0.3, "map_large": None})
    assert list(table.loc["mAP large"]) == ["no large objects"] * 3
    assert table.loc["mAP small", "Δ"] == pytest.approx(0.1)
    assert table.loc["mAP medium", "run"] == pytest.approx(0.55)
    assert table.loc["mAP medium", "baseline"] == "no medium objects"  # that contract has no medium value
    assert "NaN" not in table.to_html() and "nan" not in table.to_html()


def test_loss_panels_keep_the_stages_apart():
    metrics = _metrics()
    metrics["cached_warmup_mode"] = "detector_mode outputs on un-augmented images, no denoising queries"
    metrics["history"][3]["losses"] = {"loss_mal": 5.0, "loss_bbox": 2.0}  # stage B: more terms summed
    fig = reporting.plot_losses(metrics)
    axes = [ax for ax in fig.axes if ax.get_lines()]
    assert len(axes) == 2
    assert "stage A" in axes[0].get_title() and "no denoising" in axes[0].get_title()
    assert "stage B" in axes[1].get_title()
    assert {x for line in axes[0].get_lines() for x in line.get_xdata()} == {1, 2}  # no line into stage B
    assert {x for line in axes[1].get_lines() for x in line.get_xdata()} == {3}
    assert any("not comparable" in t.get_text() for t in fig.texts)
    baseline = {**_metrics(), "history": [{**h, "stage": None} for h in _metrics()["history"]]}
    single = reporting.plot_losses(baseline)
    assert len([ax for ax in single.axes if ax.get_lines()]) == 1 and not single.texts


def test_wise_curve_has_one_panel_per_metric_scaled_to_its_data():
    summary = _summary()
    points = [{"lambda": lam, "map": 0.620 + 0.003 * lam, "map50": 0.80 - 0.02 * lam} for lam in (0, 0.5, 1)]
    summary["wise"]["curves"] = [{"seed": 0, "points": points}]
    fig = reporting.plot_wise_curve(summary)
    ax_map, ax_map50 = fig.axes
    lo, hi = ax_map.get_ylim()
    assert lo > 0.615 and hi < 0.628  # the 0.003 change fills its panel
    assert ax_map50.get_ylim()[0] < 0.78 < 0.80 < ax_map50.get_ylim()[1]
    assert not ax_map.collections  # no interval in this summary, and the figure says so
    assert any("No bootstrap interval" in t.get_text() for t in fig.texts)
    for p in points:
        p.update(map_lo=p["map"] - 0.002, map_hi=p["map"] + 0.002, map50_interval={"lo": 0.7, "hi": 0.9})
    fig = reporting.plot_wise_curve(summary)
    assert all(len(ax.collections) == 1 for ax in fig.axes)  # one band per seed and metric
    assert fig.axes[1].get_ylim()[0] <= 0.7 and any("Bands" in t.get_text() for t in fig.texts)


def test_index_shows_no_machine_paths(tmp_path):
    root = str(project_root())
    summary = _summary()
    summary.update(
        ablations_dir=f"{root}/runs/ablations",
        grid=f"{root}/params/ablations/small.yaml",
        baseline_run=f"{root}/runs/baseline",
    )
    summary["variants"][1]["errors"][0]["error"] = f"DataError: {root}/runs/ablations/x/metrics.json is missing"
    (tmp_path / "reports").mkdir()
    page = reporting.build_index(summary, reports_dir=tmp_path / "reports").read_text()
    assert root not in page
    assert "from <code>runs/ablations</code>" in page and "<code>params/ablations/small.yaml</code>" in page
    assert "runs/ablations/x/metrics.json is missing" in page
    assert root not in (tmp_path / "reports" / "ablations_table.csv").read_text()
