"""The ablation grid runner: failures recorded, finished runs reused, statistics, notebook 03.

The unit of work is injected: ``fake_run`` stands in for notebook 02. It writes a real run contract
(:func:`tfg_mm.training.contract.write_metrics`) and real COCO detections of a tiny ground truth, so the
statistics (pycocotools + the paired bootstrap) and the report run for real, without training.
"""

from __future__ import annotations

import html
import json
import os
import random
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import tiny
from tfg_mm import ablations, reporting
from tfg_mm.config import load_params
from tfg_mm.data.loaders import dataset_record
from tfg_mm.data.synthetic import HARD_CLASSES
from tfg_mm.errors import ConfigError, DataError
from tfg_mm.evaluation.coco import coco_evaluate
from tfg_mm.multimodal.fusion import ResidualTextFusion
from tfg_mm.paths import project_root
from tfg_mm.reporting import ablations as reporting_ablations
from tfg_mm.training import contract, runs
from tfg_mm.training.baseline import run_baseline
from tfg_mm.training.phase2 import depends_on_baseline, run_phase2
from tfg_mm.workflow.notebooks import execute, render_html
from tfg_mm.workflow.parameters import notebook_params

CLASSES = ["scratch", "perforation", "break", "stain"]
N_IMAGES = 12


# --------------------------------------------------------------------------------------------
# A tiny COCO dataset, a fake baseline run, and the fake unit of work
# --------------------------------------------------------------------------------------------
def _make_dataset(root: Path, test: bool = False) -> Path:
    (root / "images").mkdir(parents=True)
    for split in ("train", "val") + (("test",) if test else ()):
        _write_split(root, split, prefix="t" if split == "test" else "")
    return root


def _write_split(root: Path, split: str, prefix: str = "") -> None:
    """One annotation file of the tiny set (train and val share their images; the test images are their own)."""
    rng = random.Random(0 if not prefix else 1)
    images, annotations = [], []
    for i in range(1, N_IMAGES + 1):
        name = f"{prefix}{i}.png"
        Image.new("RGB", (64, 64), (i * 10, 0, 50 if prefix else 0)).save(root / "images" / name)
        images.append({"id": i, "file_name": name, "width": 64, "height": 64})
        for cat in range(1, len(CLASSES) + 1):
            x, y = rng.uniform(0, 30), rng.uniform(0, 30)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": cat,
                    "bbox": [x, y, 20.0, 20.0],
                    "area": 400.0,
                    "iscrowd": 0,
                }
            )
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)],
    }
    (root / f"instances_{split}.json").write_text(json.dumps(coco))


def _detections(val_json: str, noise: float, seed: int) -> list[dict]:
    """Every ground-truth box shifted by a random offset of size ~``noise`` pixels (more noise, lower AP)."""
    gt = json.loads(Path(val_json).read_text())
    rng = np.random.default_rng(seed)
    out = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        dx, dy = rng.normal(0, noise, 2)
        out.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": [x + dx, y + dy, w, h],
                "score": float(rng.uniform(0.3, 1.0)),
            }
        )
    return out


def _judged(test_json: str, noise: float, seed: int, run_dir: Path, which: str) -> dict:
    """A ``final.test`` block of the fake world: detections with ``noise`` on the test images, written beside it."""
    detections = _detections(test_json, noise, seed)
    name = "detections_test.json" if which == "selected" else "detections_test_last.json"
    (run_dir / name).write_text(json.dumps(detections))
    metrics = coco_evaluate(test_json, detections)
    counts = {c: N_IMAGES for c in CLASSES}
    return {
        **{k: metrics[k] for k in ("map", "map50", "map75")},
        "per_class": {c: {**v, "instances": counts[c]} for c, v in metrics["per_class"].items()},
        "checkpoint": str(run_dir / "checkpoints" / ("best" if which == "selected" else "last")),
        "epoch": 1 if which == "selected" else 2,
        "detections": name,
    }


def _write_run(params, run_dir: Path, noise: float, depends_on: str = "", last_noise: float | None = None) -> None:
    record = dataset_record(params.dataset, params.train_json, params.val_json, params.images_dir, params.test_json)
    detections = _detections(record["val_json"], noise, params.seed)
    metrics = coco_evaluate(record["val_json"], detections)
    (run_dir / "checkpoints" / "best").mkdir(parents=True, exist_ok=True)
    (run_dir / "detections_val.json").write_text(json.dumps(detections))
    history = []
    for epoch in range(3):
        history.append(
            {
                "epoch": epoch,
                **{k: metrics[k] for k in ("map", "map50", "map75")},
                "per_class": metrics["per_class"],
                "lr": 1e-4,
                "loss": None,
                "losses": {"loss_mal": 1.0 / (epoch + 1)},
                "seconds": 0.1,
                "stage": "A" if epoch < 2 else "B",
                "alpha_mean": params.alpha + 0.01 * epoch,
            }
        )
    final = {**history[-1], "checkpoint": str(run_dir / "checkpoints" / "best"), "selected_by": "map"}
    if params.test_json:  # judged on the held-out images: the selected checkpoint and a last epoch of `last_noise`
        final["test"] = {
            "split": "test",
            "annotations": record["test_json"],
            "instances": {c: N_IMAGES for c in CLASSES},
            "selected": _judged(record["test_json"], noise, params.seed, run_dir, "selected"),
            "last": _judged(
                record["test_json"], noise if last_noise is None else last_noise, params.seed, run_dir, "last"
            ),
        }
    contract.write_metrics(
        run_dir,
        params=params,
        dataset=record,
        history=history,
        final=final,
        extra={"phase": "phase2", "classes": CLASSES},
        status="finished",
        depends_on=depends_on,
    )


def fake_run(parameters: dict, run_dir: Path) -> None:
    """Stands in for notebook 02 (module level, so that spawned worker processes can import it)."""
    p = notebook_params(dict(parameters))
    with open(run_dir.parent / f"calls_{run_dir.name}.txt", "a") as fh:
        fh.write("call\n")
    if p.text_encoder == "none":
        raise RuntimeError("boom: this variant cannot run")
    run_dir = runs.prepare_run_dir(p.run_dir, overwrite=p.overwrite, resume=p.resume)
    # like a real phase-2 run, its run_id includes the baseline's; its last epoch drifts (more box noise)
    noise = 2.0 + 20 * p.alpha
    _write_run(p, run_dir, noise=noise, depends_on=depends_on_baseline(p), last_noise=noise + 6.0)


def _calls(ablations_dir: Path, variant: str, seed: int = 0) -> int:
    path = ablations_dir / variant / f"calls_seed{seed}.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def grid_setup(tmp_path: Path, test: bool = False) -> tuple[Path, Path]:
    """A tiny COCO set (with a held-out test split when ``test``), a phase-2 params file and a stand-in finished
    baseline under ``tmp_path``."""
    dataset = _make_dataset(tmp_path / "data", test=test)
    params_file = tmp_path / "phase2.yaml"
    params_file.write_text(
        f"dataset: {dataset}\nbaseline: {tmp_path / 'baseline'}\nepochs: 2\n"
        + ("test_json: instances_test.json\n" if test else "")
    )
    base = load_params(params_file, {"run_dir": str(tmp_path / "baseline"), "seed": 0})
    (tmp_path / "baseline").mkdir()
    _write_run(base, tmp_path / "baseline", noise=1.0)
    return tmp_path, params_file


@pytest.fixture()
def setup(tmp_path):
    return grid_setup(tmp_path)


def _grid_file(tmp_path: Path, variants: str, name: str = "grid.yaml", hard: str = "[perforation, break]") -> Path:
    path = tmp_path / name
    path.write_text(
        "description: test grid\nbase: {lr_fusion: 0.002}\nseeds: [0]\n"
        + (f"hard_classes: {hard}\n" if hard else "")
        + "variants:\n"
        + variants
    )
    return path


GOOD = "  - name: minilm\n    overrides: {text_encoder: minilm}\n  - name: noisy\n    overrides: {alpha: 0.5}\n"
FAILING = "  - name: no_text\n    overrides: {text_encoder: none}\n"


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
def test_shipped_grids_validate():
    small = ablations.load_ablation_grid(project_root() / "params/ablations/small.yaml")
    full = ablations.load_ablation_grid(project_root() / "params/ablations/full.yaml")
    assert {v["name"] for v in small["variants"]} == {"minilm", "random", "none", "thesis_original"}
    assert small["hard_classes"] == ["perforation", "break"]
    names = {v["name"] for v in full["variants"]}
    assert {"thesis_original", "text_open_clip", "text_random", "text_none", "fusion_mlp_dropout0.3"} <= names
    assert full["wise"] == {"variant": "minilm", "lambdas": [0.0, 0.25, 0.5, 0.75, 1.0]} and full["seeds"] == [0, 1, 2]
    assert full["baseline_seeds"] == [0, 1, 2] and small["baseline_seeds"] == []  # `make all`: one baseline


def test_grid_runner_keys_defaults_and_errors_name_file_and_key(tmp_path):
    plain = ablations.load_ablation_grid(_grid_file(tmp_path, GOOD, name="plain.yaml", hard=""))
    assert plain["hard_classes"] == list(HARD_CLASSES) and plain["wise"] is None  # the embedded set's fact
    path = _grid_file(tmp_path, GOOD)
    path.write_text(path.read_text() + "wise: {variant: missing}\n")
    with pytest.raises(ConfigError, match=r"grid\.yaml.*wise\.variant: missing"):
        ablations.load_ablation_grid(path)
    # λs are checked by the schema's `wise_lambdas` (numbers in [0, 1]); the message names the file's key
    path.write_text(path.read_text().replace("variant: missing", "variant: noisy, lambdas: [0, 1.5]"))
    with pytest.raises(ConfigError, match=r"grid\.yaml: wise\.lambdas:.*less than or equal to 1"):
        ablations.load_ablation_grid(path)
    path.write_text(path.read_text().replace("[0, 1.5]", "[0, 0.5]"))
    assert ablations.load_ablation_grid(path)["wise"] == {"variant": "noisy", "lambdas": [0.0, 0.5]}
    with pytest.raises(ConfigError, match="`hard_classes` must be a list of class names"):
        ablations.load_ablation_grid(_grid_file(tmp_path, GOOD, name="hard.yaml", hard="perforation"))
    bad = _grid_file(tmp_path, "  - name: typo\n    overrides: {lr_fuson: 0.1}\n", name="bad.yaml")
    with pytest.raises(ConfigError) as err:
        ablations.load_ablation_grid(bad)
    assert str(bad) in str(err.value) and "lr_fusion" in str(err.value)  # the file and the did-you-mean


def test_failing_variant_is_recorded_and_finished_runs_are_reused(setup):
    tmp_path, params_file = setup
    grid = _grid_file(tmp_path, GOOD + FAILING)
    out = tmp_path / "ablations"
    kwargs = dict(params_file=params_file, bootstrap_resamples=20, run_variant=fake_run, progress=False)

    record = ablations.run_grid(grid, out, **kwargs)
    status = {r["variant"]: r for r in record["runs"]}
    assert {k: v["status"] for k, v in status.items()} == {
        "minilm": "finished",
        "noisy": "finished",
        "no_text": "failed",
    }
    assert status["no_text"]["error"] == "RuntimeError: boom: this variant cannot run"
    failure = json.loads((out / "no_text" / "seed0" / "failure.json").read_text())
    assert failure["variant"] == "no_text" and failure["seed"] == 0 and "boom" in failure["traceback"]
    # layering: params file < grid base < variant overrides < grid runner
    written = contract.read_metrics(out / "noisy" / "seed0")["params"]
    assert (written["epochs"], written["lr_fusion"], written["alpha"]) == (2, 0.002, 0.5)
    assert written["run_dir"] == str(out / "noisy" / "seed0")

    summary = ablations.summarize(out)
    by_name = {v["name"]: v for v in summary["variants"]}
    assert by_name["no_text"]["status"] == "failed" and by_name["no_text"]["errors"][0]["error"].startswith("Runtime")
    noisy = by_name["noisy"]["deltas"]["val"]["delta"]["map"]
    assert noisy["lo"] <= noisy["delta"] <= noisy["hi"] and noisy["verdict"] == "worse"  # 10x the box noise
    assert set(by_name["minilm"]["deltas"]["val"]["delta"]["per_class"]) == {"perforation", "break"}
    table = reporting.ablation_table(summary, "val")
    assert list(table["variant"]) == ["baseline", "minilm", "noisy", "no_text"]
    assert table.loc[table["variant"] == "no_text", "verdict"].item().startswith("failed: RuntimeError")

    # second run: the finished runs are reused, the failed one is tried again
    record = ablations.run_grid(grid, out, **kwargs)
    assert {r["variant"]: r["status"] for r in record["runs"]} == {
        "minilm": "reused",
        "noisy": "reused",
        "no_text": "failed",
    }
    assert (_calls(out, "minilm"), _calls(out, "noisy"), _calls(out, "no_text")) == (1, 1, 2)
    # opt-out: reuse=False re-runs (overwriting the finished run)
    ablations.run_grid(_grid_file(tmp_path, GOOD), out, reuse=False, **kwargs)
    assert (_calls(out, "minilm"), _calls(out, "noisy")) == (2, 2)
    # a changed parameter changes the run id: that run is re-run, not reused
    _grid_file(tmp_path, GOOD.replace("alpha: 0.5", "alpha: 0.4"))
    record = ablations.run_grid(tmp_path / "grid.yaml", out, **kwargs)
    assert {r["variant"]: r["status"] for r in record["runs"]} == {"minilm": "reused", "noisy": "finished"}
    assert contract.read_metrics(out / "noisy" / "seed0")["params"]["alpha"] == 0.4


def test_parallel_workers_run_every_variant(setup):
    tmp_path, params_file = setup
    out = tmp_path / "ablations"
    record = ablations.run_grid(
        _grid_file(tmp_path, GOOD + FAILING),
        out,
        params_file=params_file,
        workers=2,
        seeds=[0, 1],
        run_variant=fake_run,
        progress=False,
    )
    assert sorted((r["variant"], r["seed"], r["status"]) for r in record["runs"]) == [
        ("minilm", 0, "finished"),
        ("minilm", 1, "finished"),
        ("no_text", 0, "failed"),
        ("no_text", 1, "failed"),
        ("noisy", 0, "finished"),
        ("noisy", 1, "finished"),
    ]
    assert json.loads((out / "grid.json").read_text())["runs"] == record["runs"]


def _failing_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("value = 1", metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell("ok = value + 1"),
            nbformat.v4.new_code_cell("raise ValueError(f'bad cell {ok}')"),
            nbformat.v4.new_code_cell("never = True"),
        ],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_papermill_failure_names_the_failing_cell(setup):
    tmp_path, params_file = setup
    notebook = _failing_notebook(tmp_path / "failing.ipynb")

    def run_failing_notebook(parameters: dict, run_dir: Path) -> None:
        execute(notebook, run_dir / "executed.ipynb", {"value": 41}, cwd=tmp_path, progress=False)

    out = tmp_path / "ablations"
    record = ablations.run_grid(
        _grid_file(tmp_path, "  - name: v\n    overrides: {}\n"),
        out,
        params_file=params_file,
        run_variant=run_failing_notebook,
        progress=False,
    )
    [result] = record["runs"]
    assert result["status"] == "failed"
    assert result["error"] == "ValueError: bad cell 42"
    assert result["cell"]["source"] == "raise ValueError(f'bad cell {ok}')"
    assert result["cell"]["index"] == 3  # papermill's injected-parameters cell comes first
    assert json.loads((out / "v" / "seed0" / "failure.json").read_text())["cell"] == result["cell"]
    executed = nbformat.read(out / "v" / "seed0" / "executed.ipynb", as_version=4)
    assert any(o.get("ename") == "ValueError" for c in executed.cells for o in c.get("outputs", []))


def test_a_corrupt_baseline_contract_stops_the_grid_a_missing_baseline_does_not(setup):
    tmp_path, params_file = setup
    grid = ablations.load_ablation_grid(_grid_file(tmp_path, GOOD))
    # no baseline yet: the runs are planned (each would train it or fail with the reason itself)
    missing = ablations.plan_runs(
        grid, tmp_path / "ablations", params_file, explicit={"baseline": str(tmp_path / "not_trained_yet")}
    )
    assert [e["variant"] for e in missing] == ["minilm", "noisy"] and not any(e["reuse"] for e in missing)
    # a baseline contract that cannot be read would change which runs are reused: it is an error
    metrics_file = tmp_path / "baseline" / "metrics.json"
    metrics_file.write_text(metrics_file.read_text()[:100])
    with pytest.raises(DataError) as err:
        ablations.plan_runs(grid, tmp_path / "ablations", params_file)
    assert (
        str(metrics_file) in str(err.value) and "overwrite: true" in str(err.value) and "`baseline:" in str(err.value)
    )


@pytest.mark.slow
def test_notebook03_reuses_the_grid_and_renders_a_standalone_report(setup, monkeypatch):
    tmp_path, params_file = setup
    grid = _grid_file(tmp_path, GOOD)
    out = tmp_path / "ablations"
    ablations.run_grid(grid, out, params_file=params_file, bootstrap_resamples=20, run_variant=fake_run, progress=False)
    reports_dir = tmp_path / "reports"
    monkeypatch.setenv("TFG_MM_REPORTS_DIR", str(reports_dir))  # the kernel inherits it: no write into reports/
    executed = execute(
        project_root() / "notebooks" / "03_ablations.ipynb",
        tmp_path / "03.ipynb",
        {
            "params_file": str(params_file),
            "grid": str(grid),
            "baseline": str(tmp_path / "baseline"),
            "run_dir": str(out),
            "bootstrap_resamples": 20,
        },
        progress=False,
    )
    record = json.loads((out / "grid.json").read_text())
    assert {r["status"] for r in record["runs"]} == {"reused"}  # nothing re-ran inside the notebook
    assert (_calls(out, "minilm"), _calls(out, "noisy")) == (1, 1)

    html = render_html(executed, reports_dir / "03_ablations.html").read_text()
    for code in ("run_from_notebook", "build_index", "plot_wise_curve", "params_file ="):  # no code cells
        assert code not in html
    n_code = sum(c["cell_type"] == "code" for c in json.loads(executed.read_text())["cells"])
    assert (
        n_code >= 10 and html.count("jp-mod-noInput") == n_code
    )  # every code cell (papermill's injected one too) is hidden
    assert html.count("data:image/png;base64") >= 4  # the figures are embedded
    assert "within noise" in html or "worse" in html
    index = (reports_dir / "index.html").read_text()
    assert index.count("data:image/png;base64,") == 4 and "noisy" in index and 'href="03_ablations.html"' in index
    for stem in ("ablations_trajectories", "ablations_per_class_delta", "ablations_alpha", "ablations_wise"):
        assert (reports_dir / "figures" / f"{stem}.png").stat().st_size > 0
        assert (reports_dir / "figures" / f"{stem}.svg").read_text().lstrip().startswith("<?xml")
    assert "\\begin{table}" in (reports_dir / "ablations_table.tex").read_text()
    assert "minilm" in (reports_dir / "ablations_table.csv").read_text()


def test_wise_interpolation_of_weights_and_gate():
    base = {"w": torch.zeros(3), "n": torch.tensor(1)}
    tuned = {"w": torch.ones(3) * 4, "n": torch.tensor(7)}
    half = ablations.interpolate_state(base, tuned, 0.25)
    assert torch.equal(half["w"], torch.ones(3)) and int(half["n"]) == 7
    assert torch.equal(ablations.interpolate_state(base, tuned, 0.0)["w"], base["w"])

    text = torch.randn(4, 8)
    for tanh in (False, True):
        fusion = ResidualTextFusion(16, text, gate="per_class", alpha=0.4, gate_tanh=tanh)
        ablations.scale_gate(fusion, 0.5)
        assert torch.allclose(fusion.alpha(), torch.full((4,), 0.2), atol=1e-6)
        ablations.scale_gate(fusion, 0.0)  # λ = 0: the baseline exactly
        hidden = torch.randn(2, 5, 16)
        base_logits = torch.randn(2, 5, 4)
        assert torch.equal(fusion(base_logits, hidden), base_logits)


def test_index_without_a_grid_still_links_reports(tmp_path):
    (tmp_path / "01_baseline.html").write_text("<html></html>")
    summary = ablations.summarize_if_run(tmp_path / "no_grid")  # what `python -m tfg_mm report` does
    assert summary is None
    index = reporting.build_index(summary, reports_dir=tmp_path).read_text()
    assert 'href="01_baseline.html"' in index and "No ablation grid has run yet" in index
    assert os.path.exists(tmp_path / "index.html")
    with pytest.raises(TypeError, match="summarize_if_run"):  # reports draws a summary; it never computes one
        reporting.build_index(tmp_path / "no_grid", reports_dir=tmp_path)


@pytest.mark.slow
def test_repredicted_detections_and_wise_endpoints_on_real_checkpoints(tmp_path):
    """Real atto checkpoints (a baseline and a one-step phase-2 run): the re-predicted detections are
    the checkpoints' own, WiSE-FT λ = 0 is the baseline exactly and λ = 1 the fine-tuned model."""
    dataset = _make_dataset(tmp_path / "data")
    common = tiny(dataset, max_steps_per_epoch=1, device="cpu", lr_warmup_steps=0)
    base = run_baseline(load_params(common, {"run_dir": str(tmp_path / "baseline"), "epochs": 0}), progress=False)
    tuned = run_phase2(
        load_params(
            common,
            {
                "run_dir": str(tmp_path / "p2"),
                "baseline": str(tmp_path / "baseline"),
                "epochs": 1,
                "text_encoder": "random",
                "warmup_epochs": 0,
                "unfreeze": "heads",
                "lr_detector": 1e-2,
                "alpha": 0.5,
            },
        ),
        progress=False,
    )
    base_dets, base_eval = ablations.predict_run_detections(base)
    assert base_eval["map"] == base["final"]["map"]
    # Untrained models score ~0 on the real boxes; score them against the baseline's own top boxes instead.
    val = dataset / "instances_val.json"
    gt = json.loads(val.read_text())
    gt["annotations"] = []
    for det in sorted(base_dets, key=lambda d: -d["score"]):
        x, y, w, h = det["bbox"]
        if sum(a["image_id"] == det["image_id"] for a in gt["annotations"]) < 3 and w > 2 and h > 2:
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": det["image_id"],
                    "category_id": det["category_id"],
                    "bbox": det["bbox"],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    val.write_text(json.dumps(gt))
    base_dets, base_eval = ablations.predict_run_detections(base)
    tuned_dets, tuned_eval = ablations.predict_run_detections(tuned)
    assert base_eval["map"] > 0.5 and tuned_dets != base_dets

    curve = ablations.wise_curve(tuned, base["final"]["checkpoint"], [0.0, 0.5, 1.0])
    assert [p["lambda"] for p in curve] == [0.0, 0.5, 1.0]
    assert curve[0]["map"] == base_eval["map"] and curve[0]["per_class"] == base_eval["per_class"]
    assert curve[2]["map"] == tuned_eval["map"]


def test_an_unfinished_baseline_stops_the_grid_before_any_run(setup):
    tmp_path, params_file = setup
    metrics_file = tmp_path / "baseline" / "metrics.json"
    for status in ("running", "failed"):
        record = json.loads(metrics_file.read_text())
        metrics_file.write_text(json.dumps({**record, "status": status, "final": None}))
        with pytest.raises(ConfigError) as err:
            ablations.run_grid(
                _grid_file(tmp_path, GOOD), tmp_path / "ablations", params_file=params_file, run_variant=fake_run
            )
        message = str(err.value)
        assert f"status {status}" in message and str(tmp_path / "baseline") in message and "Fix:" in message
        assert _calls(tmp_path / "ablations", "minilm") == 0 and not (tmp_path / "ablations" / "grid.json").exists()


def test_a_run_that_died_unmarked_is_marked_failed_by_the_grid(setup):
    tmp_path, params_file = setup

    def dies_running(parameters: dict, run_dir: Path) -> None:  # like a kernel killed mid-training
        p = notebook_params(dict(parameters))
        run_dir = runs.prepare_run_dir(p.run_dir, overwrite=p.overwrite, resume=p.resume)
        _write_run(p, run_dir, noise=2.0, depends_on=depends_on_baseline(p))
        record = json.loads((run_dir / "metrics.json").read_text())
        (run_dir / "metrics.json").write_text(json.dumps({**record, "status": "running", "final": None}))
        raise RuntimeError("kernel died")

    out = tmp_path / "ablations"
    record = ablations.run_grid(
        _grid_file(tmp_path, GOOD), out, params_file=params_file, run_variant=dies_running, progress=False
    )
    assert {r["status"] for r in record["runs"]} == {"failed"}
    contract = json.loads((out / "minilm" / "seed0" / "metrics.json").read_text())
    assert contract["status"] == "failed" and contract["failure"]["traceback"] == "failure.json"
    assert "kernel died" in contract["failure"]["message"] and len(contract["history"]) == 3


def test_interval_of_several_seeds_is_hierarchical_and_one_seed_says_training_noise_is_missing(setup):
    tmp_path, params_file = setup
    grid = _grid_file(tmp_path, GOOD)
    kwargs = dict(params_file=params_file, bootstrap_resamples=60, run_variant=fake_run, progress=False)

    one = tmp_path / "one_seed"
    ablations.run_grid(grid, one, **kwargs)
    summary = ablations.summarize(one)
    entry = {v["name"]: v for v in summary["variants"]}["noisy"]["deltas"]["val"]["delta"]["map"]
    assert entry["n_seeds"] == 1 and "training noise not included" in entry["covers"]
    assert "NOT included" in summary["interval_note"]
    table = reporting.ablation_table(summary, "val")
    assert "training noise not included" in table.loc[table["variant"] == "noisy", "interval covers"].item()
    index = reporting.build_index(summary, tmp_path / "reports").read_text()
    assert "Training noise (another seed of the same run) is NOT included" in index
    # every variant's interval covers the same noise: said once under the table, not in a column of each row
    shown, covers = reporting.covers_once(table)
    assert "interval covers" not in shown.columns and covers == f"Every Δ interval covers: {entry['covers']}."
    assert "<th>interval covers</th>" not in index and html.escape(covers) in index
    mixed = table.assign(**{"interval covers": [""] + ["a"] * (len(table) - 2) + ["b"]})
    assert reporting.covers_once(mixed) == (mixed, "")

    two = tmp_path / "two_seeds"
    ablations.run_grid(grid, two, seeds=[0, 1], **kwargs)
    summary = ablations.summarize(two)
    noisy = {v["name"]: v for v in summary["variants"]}["noisy"]["deltas"]["val"]["delta"]["map"]
    assert noisy["n_seeds"] == 2 and [p["seed"] for p in noisy["per_seed"]] == [0, 1]
    # Δ is the mean of the two seeds' full-set Δ; both seeds are compared with the one baseline
    assert noisy["delta"] == pytest.approx(sum(p["delta"] for p in noisy["per_seed"]) / 2)
    assert "baseline: 1 seed" in noisy["covers"] and "hierarchical" in summary["interval_note"]
    assert noisy["lo"] <= noisy["delta"] <= noisy["hi"] and noisy["verdict"] == "worse"
    # cached per variant: a second summary reads the same numbers without recomputing
    cached = json.loads((two / "noisy" / "bootstrap_val.json").read_text())
    assert cached["value"]["n_seeds"] == 2
    assert ablations.summarize(two)["variants"][1]["deltas"]["val"]["delta"]["map"] == noisy


def fake_baseline(parameters: dict, run_dir: Path) -> None:
    """Stands in for notebook 01 with another seed: a baseline whose box noise grows with the seed."""
    p = notebook_params(dict(parameters))
    with open(run_dir.parent / f"calls_{run_dir.name}.txt", "a") as fh:
        fh.write("call\n")
    run_dir = runs.prepare_run_dir(p.run_dir, overwrite=p.overwrite, resume=p.resume)
    _write_run(p, run_dir, noise=1.0 + 2.0 * p.seed)


def test_baseline_seeds_are_trained_paired_with_variant_seeds_and_their_spread_is_reported(setup):
    tmp_path, params_file = setup
    grid = _grid_file(tmp_path, GOOD)
    grid.write_text(grid.read_text() + "baseline_seeds: [0, 1]\n")
    out = tmp_path / "ablations"
    kwargs = dict(
        params_file=params_file,
        seeds=[0, 1],
        bootstrap_resamples=40,
        run_variant=fake_run,
        run_baseline_seed=fake_baseline,
        progress=False,
    )
    record = ablations.run_grid(grid, out, **kwargs)
    seed1 = tmp_path / "baseline_seed1"
    assert [(r["seed"], r["status"]) for r in record["baseline_runs"]] == [(0, "reused"), (1, "finished")]
    assert contract.read_metrics(seed1)["params"]["seed"] == 1
    assert record["settings"]["baseline_runs"] == {"0": str(tmp_path / "baseline"), "1": str(seed1)}
    # variant seed k fine-tunes from baseline seed k (and its run id depends on that baseline)
    assert contract.read_metrics(out / "minilm" / "seed1")["params"]["baseline"] == str(seed1)
    assert contract.read_metrics(out / "minilm" / "seed0")["params"]["baseline"] == str(tmp_path / "baseline")

    summary = ablations.summarize(out)
    spread = summary["baseline_seeds"]
    assert [r["seed"] for r in spread["runs"]] == [0, 1] and spread["stats"]["map"]["n"] == 2
    maps = [contract.read_metrics(d)["final"]["map"] for d in (tmp_path / "baseline", seed1)]
    assert spread["stats"]["map"]["mean"] == pytest.approx(np.mean(maps))
    assert spread["stats"]["map"]["sd"] == pytest.approx(np.std(maps, ddof=1))
    table = reporting.baseline_spread_table(summary)
    assert list(table["metric"]) == ["mAP", "mAP50", *(f"AP {c}" for c in CLASSES)]
    assert list(table.columns) == ["metric", "mean ± sd", "seeds", "seed 0", "seed 1"]
    assert table.loc[0, "seed 1"] == f"{maps[1]:.4f}"
    noisy = {v["name"]: v for v in summary["variants"]}["noisy"]["deltas"]["val"]["delta"]["map"]
    assert noisy["covers"] == "2 seeds (variant and baseline) × validation images"
    # each seed's Δ is against its own baseline
    assert [p["a"] for p in noisy["per_seed"]] == pytest.approx(maps)
    noisy_ap = [contract.read_metrics(out / "noisy" / f"seed{k}")["final"]["per_class"]["stain"]["ap"] for k in (0, 1)]
    base_ap = [contract.read_metrics(d)["final"]["per_class"]["stain"]["ap"] for d in (tmp_path / "baseline", seed1)]
    expected = np.mean([v - b for v, b in zip(noisy_ap, base_ap)])
    assert {v["name"]: v for v in summary["variants"]}["noisy"]["per_class_delta"]["values"]["stain"] == pytest.approx(
        expected
    )
    assert reporting.ablation_table(summary, "val").loc[0, "mAP"].count("±") == 1  # the baseline row: mean ± sd
    index = reporting.build_index(summary, tmp_path / "reports").read_text()
    assert "Baseline seed spread" in index and "trained with 2 seeds" in index

    # second run: the baseline seed is reused, not retrained
    record = ablations.run_grid(grid, out, **kwargs)
    assert [r["status"] for r in record["baseline_runs"]] == ["reused", "reused"]
    assert len((tmp_path / "calls_baseline_seed1.txt").read_text().splitlines()) == 1


def test_the_grid_is_judged_on_test_images_first_with_a_selection_free_last_epoch(tmp_path):
    """The thesis table is on the held-out test images: Δ of each variant's selected checkpoint, and of its last
    epoch (which no selection chose: here it drifted, so its Δ is negative); the validation table comes last."""
    tmp_path, params_file = grid_setup(tmp_path, test=True)
    grid = _grid_file(tmp_path, GOOD)
    out = tmp_path / "ablations"
    kwargs = dict(params_file=params_file, seeds=[0, 1], bootstrap_resamples=60, run_variant=fake_run, progress=False)
    ablations.run_grid(grid, out, **kwargs)
    summary = ablations.summarize(out)
    minilm = {v["name"]: v for v in summary["variants"]}["minilm"]["deltas"]
    selected, last = minilm["test"]["delta"]["map"], minilm["test_last"]["delta"]["map"]
    assert last["delta"] < selected["delta"] and last["verdict"] == "worse" and last["hi"] < 0
    assert selected["n_seeds"] == 2 and "test images" in selected["covers"]
    assert minilm["val"]["delta"]["map"]["n_seeds"] == 2  # the selection set is still compared, last
    assert minilm["test"]["stats"]["map"]["n"] == 2
    table = reporting.ablation_table(summary)  # the default: the test images
    assert "ΔmAP last epoch [95% CI]" in table.columns and table.loc[1, "verdict last epoch"] == "worse"
    assert table.loc[0, "variant"] == "baseline"
    base_test = contract.read_metrics(tmp_path / "baseline")["final"]["test"]["selected"]["map"]
    assert table.loc[0, "mAP"] == f"{base_test:.4f}"  # the baseline judged on the same test images
    reports = tmp_path / "reports"
    index = reporting.build_index(summary, reports).read_text()
    assert index.index("Test images (held out") < index.index("Validation images (the selection set")
    assert "ΔmAP last epoch" in (reports / "ablations_table.csv").read_text()
    assert (reports / "ablations_table_val.csv").exists() and (reports / "ablations_table_val.tex").exists()
    assert summary["variants"][0]["per_class_delta"]["split"] == "test"


def test_a_grid_without_a_test_split_says_so_and_shows_the_selection_set(setup):
    tmp_path, params_file = setup
    out = tmp_path / "ablations"
    ablations.run_grid(
        _grid_file(tmp_path, GOOD), out, params_file=params_file, bootstrap_resamples=20, run_variant=fake_run
    )
    summary = ablations.summarize(out)
    assert not reporting_ablations.has_comparison(summary, "test")
    index = reporting.build_index(summary, tmp_path / "reports").read_text()
    assert "No test split" in index and "Validation images (the selection set" in index
    assert "no test evaluation" in reporting.ablation_table(summary).loc[1, "verdict"]
