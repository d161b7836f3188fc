"""Experiment tracking (tfg_mm.training.tracking): what a run logs to MLflow and TensorBoard is what its
metrics.json holds, read back with MLflow's client and TensorBoard's EventAccumulator; tracking
changes no number and no run id; a store that is down costs one warning, never the run."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest

from tests.conftest import tiny
from tfg_mm.config import load_params
from tfg_mm.paths import project_root
from tfg_mm.training import identity, tracking
from tfg_mm.training.baseline import BaselineTask, run_baseline

#: 2 epochs of 2 steps: epochs 0 (the starting point), 1 and 2 are evaluated and logged. Augmentation
#: and EMA on: a tracking call that drew a random number would change the history.
RUN = {"epochs": 2, "max_steps_per_epoch": 2, "augment": True, "ema": True, "ema_warmup": 5}


def _client(store: Path):
    from mlflow import MlflowClient

    uri, _ = tracking.store_location(str(store))
    return MlflowClient(uri)


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / tracking.TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def _without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in history]


# --------------------------------------------------------------------------------------------
# Fast: what is logged, where, and that it is no part of a run's identity
# --------------------------------------------------------------------------------------------


def test_a_history_entry_flattens_to_its_numbers_only():
    entry = {
        "epoch": 3,
        "map": 0.25,
        "map_large": None,  # no large objects: skipped
        "map_small": float("nan"),  # skipped
        "per_class": {"hole": {"ap": 0.5, "ap50": 0.75}, "oil spot": {"ap": 0.0, "ap50": None}},
        "losses": {"loss_mal": 1.5},
        "lr": {"detector": 1e-4, "backbone": 0.0},
        "stage": "A",  # a string: skipped
        "alpha": [0.1, 0.2],  # one value per class: named by class
        "scale": 10,
        "ema": True,  # a boolean: skipped
    }
    assert tracking.flatten_metrics(entry) == {
        "map": 0.25,
        "per_class/hole/ap": 0.5,
        "per_class/hole/ap50": 0.75,
        "per_class/oil spot/ap": 0.0,
        "losses/loss_mal": 1.5,
        "lr/detector": 1e-4,
        "lr/backbone": 0.0,
        "alpha/hole": 0.1,
        "alpha/oil spot": 0.2,
        "scale": 10.0,
    }
    # a list that is not one value per class is indexed; characters MLflow refuses become "_"
    assert tracking.flatten_metrics({"x": [1, 2, 3], "a+b": 1}) == {"x/0": 1.0, "x/1": 2.0, "x/2": 3.0, "a_b": 1.0}


def test_store_locations(monkeypatch, tmp_path):
    monkeypatch.setenv("TFG_MM_TRACKING_DIR", str(tmp_path / "store"))
    assert tracking.store_location("") == (
        f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}",
        (tmp_path / "store" / "artifacts").as_uri(),
    )
    monkeypatch.delenv("TFG_MM_TRACKING_DIR")
    root = project_root()
    assert tracking.store_location("") == (
        f"sqlite:///{root / 'runs/mlruns/mlflow.db'}",
        (root / "runs/mlruns/artifacts").as_uri(),
    )
    assert tracking.store_location("elsewhere/mlruns")[0] == f"sqlite:///{root / 'elsewhere/mlruns/mlflow.db'}"
    assert tracking.store_location("sqlite:///x/t.db") == (
        f"sqlite:///{root / 'x/t.db'}",
        (root / "x/artifacts").as_uri(),
    )
    assert tracking.store_location("sqlite:////abs/t.db")[0] == "sqlite:////abs/t.db"
    assert tracking.store_location("http://mlflow.lab:5000") == ("http://mlflow.lab:5000", None)
    params = load_params({})
    assert params.tracking == "all" and tracking.experiment_of(params, "phase2") == "tfg_mm-phase2"
    assert tracking.experiment_of(load_params({"experiment_name": "thesis"}), "phase2") == "thesis"


def test_tracking_params_are_no_part_of_the_run_id():
    code = identity.code_version()
    ids = {
        identity.run_id(load_params(values), "d" * 64, code)
        for values in ({}, {"tracking": "none"}, {"tracking_uri": "http://h:5000", "experiment_name": "x"})
    }
    assert len(ids) == 1
    assert {"tracking", "tracking_uri", "experiment_name"} <= identity.RESUME_MAY_CHANGE
    assert identity.run_id(load_params({"epochs": 3}), "d" * 64, code) not in ids  # the hash does see params


# --------------------------------------------------------------------------------------------
# Slow: real tiny runs
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tracked_run_reads_back_as_its_contract_and_tracking_changes_no_number(tiny_params, tmp_path, capfd):
    store = tmp_path / "store"
    params = tiny_params(**RUN, tracking="all", tracking_uri=str(store))
    metrics = run_baseline(params, progress=False)
    run_dir = Path(params.run_dir)
    # quiet: no MLflow / alembic log line, warning or print on the terminal (a notebook's stderr block)
    out, err = capfd.readouterr()
    assert "mlflow" not in (out + err).lower() and "alembic" not in (out + err).lower(), out + err

    record = metrics["tracking"]
    assert record["backends"] == ["mlflow", "tensorboard"] and record["errors"] == []
    assert record["tensorboard"] == "tensorboard" and record["mlflow"]["experiment"] == "tfg_mm-baseline"
    client = _client(store)
    run = client.get_run(record["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == str(run_dir)
    assert run.data.tags["tfg_mm.run_id"] == metrics["run_id"] and run.data.tags["tfg_mm.status"] == "finished"
    assert run.data.tags["tfg_mm.phase"] == "baseline"
    # every param, as metrics.json holds it
    assert run.data.params == tracking.param_values(metrics["params"])
    assert run.data.params["lr"] == "0.001" and run.data.params["tracking"] == "all"
    # every number of every epoch, at step = epoch, exactly (MLflow stores doubles)
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    expected: dict[str, list[tuple[int, float]]] = {}
    for entry in history:
        for key, value in tracking.flatten_metrics(entry).items():
            expected.setdefault(key, []).append((entry["epoch"], value))
    assert {"map", "map50", "lr", "loss", "losses/loss_mal", "per_class/perforation/ap", "seconds"} <= set(expected)
    for key, points in expected.items():
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert logged == points, key
    final = metrics["final"]
    logged_final = client.get_metric_history(run.info.run_id, "final/map")
    assert [(m.step, m.value) for m in logged_final] == [(final["epoch"], final["map"])]
    # the contract as an artefact, byte for byte
    names = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert names == ["metrics.json"]
    downloaded = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path / "dl"))
    assert Path(downloaded).read_bytes() == (run_dir / "metrics.json").read_bytes()

    # TensorBoard holds the same scalars (float32)
    scalars, _ = _scalars(run_dir)
    assert set(scalars) >= set(expected) | {"final/map"}
    for key, points in expected.items():
        assert [s for s, _ in scalars[key]] == [s for s, _ in points], key
        assert [v for _, v in scalars[key]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-7), key

    # the report figures, added after the run by the notebook; a second call logs nothing new
    from matplotlib.figure import Figure

    from tfg_mm.reporting.figures import save_figure

    figures = tmp_path / "figures"
    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [0, 1])
    save_figure(fig, "01_baseline_test", figures)
    save_figure(fig, "99_other", figures)
    assert tracking.log_figures(metrics, "01_baseline", folder=figures) == ["01_baseline_test.png"]
    assert tracking.log_figures(metrics, "01_baseline", folder=figures) == []
    assert tracking.log_figures(metrics, "01_baseline", params=load_params({"tracking": "none"}), folder=figures) == []
    figure_names = [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
    assert figure_names == ["figures/01_baseline_test.png"]
    _, acc = _scalars(run_dir)
    assert acc.Tags()["images"] == ["figures/01_baseline_test"]

    # the same run without tracking: the same numbers and run id, and nothing written anywhere
    store_none = tmp_path / "store_none"
    plain = tiny_params(**RUN, tracking="none", tracking_uri=str(store_none), run_dir=str(tmp_path / "plain"))
    untracked = run_baseline(plain, progress=False)
    assert untracked["run_id"] == metrics["run_id"]
    assert _without_seconds(untracked["history"]) == _without_seconds(history)
    assert "tracking" not in untracked
    assert not store_none.exists()
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == sorted(
        p.name for p in run_dir.iterdir() if p.name not in (tracking.TENSORBOARD_DIR, tracking.FIGURES_RECORD)
    )
    # a finished run is reused whatever the tracking settings
    again = run_baseline(tiny_params(**RUN, tracking="none", run_dir=str(run_dir)), progress=False)
    assert again["updated"] == metrics["updated"]


@pytest.mark.slow
def test_a_store_that_is_down_costs_one_warning_never_the_run(tiny_params, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = tiny_params(**RUN, tracking="all", tracking_uri=f"http://127.0.0.1:{port}")
    with caplog.at_level(logging.WARNING, logger="tfg_mm.training.tracking"):
        metrics = run_baseline(params, progress=False)
    warnings = [r for r in caplog.records if r.name == "tfg_mm.training.tracking"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "mlflow: starting the run failed" in warnings[0].getMessage()
    assert metrics["status"] == "finished" and [h["epoch"] for h in metrics["history"]] == [0, 1, 2]
    # the contract says so; TensorBoard went on
    assert metrics["tracking"]["errors"] == [warnings[0].getMessage()]
    assert "mlflow" not in metrics["tracking"] and metrics["tracking"]["tensorboard"] == "tensorboard"
    scalars, _ = _scalars(Path(params.run_dir))
    assert [s for s, _ in scalars["map"]] == [0, 1, 2]


@pytest.mark.slow
def test_a_resumed_run_continues_its_mlflow_run(tiny_params, tmp_path, monkeypatch):
    store = tmp_path / "store"
    params = tiny_params(**RUN, tracking="all", tracking_uri=str(store))
    real_loss = BaselineTask.loss
    calls = {"n": 0}

    def interrupted(self, model, batch, epoch):
        calls["n"] += 1
        if calls["n"] == 3:  # the first step of epoch 2: epochs 0 and 1 are logged and saved
            raise KeyboardInterrupt
        return real_loss(self, model, batch, epoch)

    monkeypatch.setattr(BaselineTask, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_baseline(params, progress=False)
    first = json.loads((Path(params.run_dir) / "metrics.json").read_text())
    run_id = first["tracking"]["mlflow"]["run_id"]
    client = _client(store)
    assert first["status"] == "failed" and client.get_run(run_id).info.status == "KILLED"
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["metrics.json", "traceback.txt"]

    monkeypatch.setattr(BaselineTask, "loss", real_loss)
    metrics = run_baseline(params, progress=False)
    assert metrics["status"] == "finished" and metrics["tracking"]["mlflow"]["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    # every epoch once, with the contract's values
    for key in ("map", "map50", "per_class/perforation/ap"):
        logged = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        assert sorted(logged) == [(h["epoch"], tracking.flatten_metrics(h)[key]) for h in metrics["history"]], key
    scalars, _ = _scalars(Path(params.run_dir))
    assert [s for s, _ in scalars["map"]] == [0, 1, 2]


@pytest.mark.slow
def test_a_notebook_run_is_tracked_without_a_line_in_its_outputs(tiny_dataset, tmp_path):
    """Notebook 01 in a papermill kernel: the run is in MLflow and TensorBoard, the report shows none of it."""
    from tfg_mm.workflow.notebooks import NOTEBOOKS, execute

    store = tmp_path / "store"
    params = tiny(tiny_dataset, epochs=1, run_dir=str(tmp_path / "run"), tracking="all", tracking_uri=str(store))
    executed = execute(NOTEBOOKS / "01_baseline.ipynb", tmp_path / "01.ipynb", params, progress=False)
    cells = json.loads(Path(executed).read_text())["cells"]
    streams = ["".join(o["text"]) for c in cells for o in c.get("outputs", []) if o.get("output_type") == "stream"]
    noise = [s for s in streams if any(w in s.lower() for w in ("mlflow", "alembic", "sqlalchemy", "tensorboard"))]
    assert noise == [], noise
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    run = _client(store).get_run(metrics["tracking"]["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["final/map"] == metrics["final"]["map"]
    scalars, _ = _scalars(tmp_path / "run")
    assert [s for s, _ in scalars["map"]] == [h["epoch"] for h in metrics["history"]]


@pytest.mark.slow
def test_a_store_lost_mid_run_is_switched_off_after_one_warning(tiny_params, tmp_path, monkeypatch, caplog):
    """The store answers at the start, then fails on epoch 1: one warning, the run and TensorBoard go on."""
    store = tmp_path / "store"
    real = tracking._MlflowBackend.metrics
    calls = {"n": 0}

    def flaky(self, values, step):
        calls["n"] += 1
        if step >= 1:
            raise OSError("database is locked")
        return real(self, values, step)

    monkeypatch.setattr(tracking._MlflowBackend, "metrics", flaky)
    params = tiny_params(**RUN, tracking="all", tracking_uri=str(store))
    with caplog.at_level(logging.WARNING, logger="tfg_mm.training.tracking"):
        metrics = run_baseline(params, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.name == "tfg_mm.training.tracking"]
    assert len(warnings) == 1 and "mlflow: logging epoch 1 failed (OSError: database is locked)" in warnings[0]
    assert calls["n"] == 2  # epoch 0, then the failing epoch 1; never again
    assert metrics["status"] == "finished" and metrics["tracking"]["errors"] == warnings
    client = _client(store)
    run_id = client.search_runs([client.get_experiment_by_name("tfg_mm-baseline").experiment_id])[0].info.run_id
    assert metrics["tracking"]["mlflow"]["run_id"] == run_id  # what was logged stays findable
    assert [m.step for m in client.get_metric_history(run_id, "map")] == [0]
    scalars, _ = _scalars(Path(params.run_dir))
    assert [s for s, _ in scalars["map"]] == [0, 1, 2]
