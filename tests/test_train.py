"""The training loop (phase 1): overfitting, freezing, determinism, NaN handling, the run contract."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from tfg_mm import detector, paths
from tfg_mm.config import load_params
from tfg_mm.data import CocoDetection, collate, loaders
from tfg_mm.data.synthetic import DEFAULT_CLASSES, generate
from tfg_mm.errors import TrainingError
from tfg_mm.training import contract
from tfg_mm.training.baseline import BaselineTask, run_baseline
from tfg_mm.training.optim import build_optimizer, lr_factor


def test_lr_schedule_shapes():
    # warm-up is linear, flat-cosine holds the lr then decays to min_ratio
    assert lr_factor(0, 100, 10, "flatcosine", 0.5, 0.05) == pytest.approx(0.1)
    assert lr_factor(30, 100, 10, "flatcosine", 0.5, 0.05) == 1.0
    assert lr_factor(99, 100, 10, "flatcosine", 0.5, 0.05) == pytest.approx(0.05, abs=2e-3)
    assert lr_factor(55, 100, 10, "cosine", 0.5, 0.05) < 1.0
    assert lr_factor(80, 100, 0, "constant", 0.5, 0.05) == 1.0


@pytest.mark.slow
def test_tiny_model_overfits_a_handful_of_images(tiny_dataset, tmp_path):
    """Train and validate on the same 4 images: the detector must learn them (mAP50 >= 0.9)."""
    root = generate(
        tmp_path / "four", seed=11, n_train=4, n_val=4, image_size=160, defect_free_fraction=0.0, progress=False
    )
    # validate on the training images themselves
    (root / "instances_val.json").write_text((root / "instances_train.json").read_text())
    params = load_params(
        {
            "preset": "atto",
            "image_size": 160,
            "batch_size": 4,
            "epochs": 150,
            "lr": 2e-3,
            "lr_backbone": 2e-3,
            "lr_warmup_steps": 5,
            "scheduler": "flatcosine",
            "ema": False,
            "augment": False,
            "eval_every": 75,
            "save_every": 75,
            "top_k": 50,
            "dataset": str(root),
            "run_dir": str(tmp_path / "run"),
            "generate_if_missing": False,
            "weight_decay": 0.0,
        }
    )
    metrics = run_baseline(params, progress=False)
    assert metrics["final"]["map50"] >= 0.9, metrics["final"]


@pytest.mark.slow
def test_frozen_parameters_unchanged_after_a_step(tiny_params):
    params = tiny_params()
    ds = CocoDetection(params.dataset, params.train_json, params.images_dir, image_size=160, train=True, augment=False)
    model = detector.build("atto", len(ds.categories), image_size=160, seed=0)
    detector.freeze(model, ["backbone"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and trainable
    task = BaselineTask(model, ds.categories)
    opt = build_optimizer(task.param_groups(params), params)
    batch = collate([ds[i] for i in range(4)])
    model.train()
    loss, _ = task.loss(model, batch, epoch=0)
    loss.backward()
    opt.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert any(not torch.equal(after[n], v) for n, v in trainable.items())
    assert not any(p.requires_grad for p in model.model.conv_encoder.parameters())


@pytest.mark.slow
def test_two_runs_same_seed_identical_history(tiny_params, tmp_path):
    a = run_baseline(tiny_params(run_dir=str(tmp_path / "a"), augment=True, ema=True), progress=False)
    b = run_baseline(tiny_params(run_dir=str(tmp_path / "b"), augment=True, ema=True), progress=False)
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    assert a["history"][-1]["losses"]


@pytest.mark.slow
def test_run_contract_keys(tiny_params):
    m = run_baseline(tiny_params(epochs=1), progress=False)
    for key in ("params", "dataset", "code_version", "history", "final"):
        assert key in m, key
    entry = m["history"][-1]
    for key in ("epoch", "map", "map50", "map75", "per_class", "lr", "losses", "seconds"):
        assert key in entry, key
    # one AP per class of the dataset (the tiny set has the generator's default classes)
    assert m["classes"] == list(DEFAULT_CLASSES)
    assert list(entry["per_class"]) == m["classes"] == list(m["final"]["per_class"])
    assert all({"ap", "ap50"} <= set(v) for v in entry["per_class"].values())
    # the dataset's content hash, as a fresh fingerprint of the same folder gives it
    p = tiny_params()
    assert m["dataset"]["hash"] == loaders.dataset_record(p.dataset, p.train_json, p.val_json, p.images_dir)["hash"]
    assert m["params"]["epochs"] == 1
    # one evaluated epoch: too short to say whether validation was still rising, and the contract says so
    assert m["final"]["convergence"]["verdict"] == "not assessed" and m["final"]["convergence"]["still_rising"] is None


@pytest.mark.slow
def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tiny_params, monkeypatch):
    params = tiny_params(epochs=3)
    original = BaselineTask.loss

    def poisoned(self, model, batch, epoch):
        loss, terms = original(self, model, batch, epoch)
        if epoch == 2:
            terms["loss_mal"] = float("nan")
            return loss * float("nan"), terms
        return loss, terms

    monkeypatch.setattr(BaselineTask, "loss", poisoned)
    with pytest.raises(TrainingError) as err:
        run_baseline(params, progress=False)
    msg = str(err.value)
    assert "epoch 2" in msg and "step 0" in msg and "loss_mal" in msg and "lr" in msg
    run_dir = params.run_dir
    assert (Path(run_dir) / "state" / "last.pt").exists()
    assert (Path(run_dir) / "checkpoints" / "last").exists()
    history = json.loads((Path(run_dir) / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1]


@pytest.mark.slow
def test_a_run_fingerprints_its_dataset_once_and_reuses_a_finished_run(tiny_params, monkeypatch):
    calls = []
    fingerprint = loaders.dataset_fingerprint

    def counted(*args, **kwargs):
        calls.append(args[0])
        return fingerprint(*args, **kwargs)

    monkeypatch.setattr(loaders, "dataset_fingerprint", counted)
    params = tiny_params(epochs=0)  # the epoch-0 evaluation only
    first = run_baseline(params, progress=False)
    assert len(calls) == 1  # one content hash per run: the reuse check and the contract share it
    written = (Path(params.run_dir) / "metrics.json").read_bytes()
    again = run_baseline(params, progress=False)
    assert len(calls) == 2 and again == first  # same params, dataset and code: reused, not rerun
    assert (Path(params.run_dir) / "metrics.json").read_bytes() == written


@pytest.mark.slow
def test_evaluation_only_of_a_checkpoint(tiny_params, tmp_path):
    base = run_baseline(tiny_params(epochs=0, run_dir=str(tmp_path / "base")), progress=False)
    m = run_baseline(tiny_params(checkpoint=str(tmp_path / "base"), run_dir=str(tmp_path / "eval")), progress=False)
    assert m["status"] == "finished" and [h["epoch"] for h in m["history"]] == [0]
    assert m["final"]["selected_by"] == "evaluation only"
    assert m["final"]["checkpoint"] == str(tmp_path / "base" / "checkpoints" / "best")  # a run_dir: its best
    assert m["model"]["source"] == m["final"]["checkpoint"] and m["phase"] == "baseline"
    assert {k: m["final"][k] for k in ("map", "map50", "per_class")} == {
        k: base["final"][k] for k in ("map", "map50", "per_class")
    }  # the same weights, the same numbers
    assert not (tmp_path / "eval" / "checkpoints").exists()  # nothing trained, nothing saved


@pytest.mark.slow
def test_the_trainer_writes_its_progress_log(tiny_params, monkeypatch):
    """One line per step here (PROGRESS_EVERY_S = 0; by default every 15 s and each epoch's last step),
    one per evaluation and one at the end; the terminal watcher formats every one."""
    from tfg_mm.training import loop as train
    from tfg_mm.workflow.notebooks import ProgressWatcher

    monkeypatch.setattr(train, "PROGRESS_EVERY_S", 0.0)
    params = tiny_params(epochs=2, max_steps_per_epoch=2)
    watcher = ProgressWatcher([params.run_dir], stream=io.StringIO())
    run_baseline(params, progress=False)
    entries = [json.loads(line) for line in (Path(params.run_dir) / paths.PROGRESS_FILE).read_text().splitlines()]
    assert [(e["event"], e["epoch"], e.get("step")) for e in entries] == [
        ("eval", 0, None),
        ("train", 1, 1),
        ("train", 1, 2),
        ("eval", 1, None),
        ("train", 2, 1),
        ("train", 2, 2),
        ("eval", 2, None),
        ("finish", 2, None),
    ]
    metrics = contract.read_metrics(params.run_dir)
    assert all(e["run"] == params.run_dir and e["epochs"] == 2 for e in entries)
    assert [e["map"] for e in entries if e["event"] == "eval"] == [h["map"] for h in metrics["history"]]
    assert entries[5]["map_epoch"] == 1 and entries[5]["steps"] == 2 and entries[5]["loss"] > 0
    assert entries[0]["eta_s"] is None and entries[1]["eta_s"] > 0  # no step timed yet / three steps + two evals
    assert entries[5]["eta_s"] > 0 and entries[6]["eta_s"] == 0  # one evaluation left / nothing left
    assert entries[-1]["best_epoch"] == metrics["final"]["epoch"]
    lines = watcher.poll()
    assert len(lines) == len(entries) and lines[2].startswith(f"[{params.run_dir}] epoch 1/2 step 2/2 · loss ")
