"""Phase 2: exact start at alpha = 0, a frozen detector stays bit-identical, the cached warm-up."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY
from tfg_mm import detector
from tfg_mm.config import load_params
from tfg_mm.data.loaders import make_data
from tfg_mm.training.baseline import run_baseline
from tfg_mm.training.loop import Trainer
from tfg_mm.training.phase2 import Phase2Task, build_multimodal, run_phase2
from tfg_mm.training.seeding import seed_everything

#: every test here trains a tiny baseline (module fixture) and phase-2 runs on top of it
pytestmark = pytest.mark.slow

PHASE2 = {
    "text_encoder": "minilm",
    "prompts": "ensemble",
    "alpha": 0.0,
    "alpha_learnable": True,
    "fusion": "linear",
    "warmup_epochs": 1,
    "epochs": 2,
    "unfreeze": "heads",
    "lr_fusion": 1e-3,
    "lr_gate": 1e-2,
    "lr_detector": 1e-5,
}


@pytest.fixture(scope="module")
def baseline_run(tiny_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("p2") / "baseline"
    params = load_params({**TINY, "dataset": str(tiny_dataset), "run_dir": str(run_dir), "epochs": 1})
    metrics = run_baseline(params, progress=False)
    return run_dir, metrics


@pytest.mark.parametrize("mode", ["train_frozen", "eval_shim"])
def test_exact_start_alpha_zero(baseline_run, tiny_params, tmp_path, mode):
    """alpha = 0: boxes and scores equal the baseline's; epoch-0 mAP equals the baseline's mAP exactly."""
    run_dir, base_metrics = baseline_run
    params = tiny_params(
        **{**PHASE2, "epochs": 1}, baseline=str(run_dir), detector_mode=mode, run_dir=str(tmp_path / mode)
    )
    data = make_data(params, seed_everything(0), progress=False, need_train=False)
    model, _, _ = build_multimodal(params, data.class_names)
    base = detector.load(run_dir / "checkpoints" / "best").eval()
    model.eval()
    batch = next(iter(data.val_loader))
    with torch.no_grad():
        logits, boxes = model.predict(batch["pixel_values"])
        ref = base(batch["pixel_values"])
    assert (logits - ref.logits).abs().max().item() <= 1e-6
    assert (boxes - ref.pred_boxes).abs().max().item() <= 1e-6
    metrics = run_phase2(params, progress=False)
    assert metrics["history"][0]["epoch"] == 0
    assert metrics["history"][0]["map"] == base_metrics["final"]["map"]
    assert metrics["history"][0]["map50"] == base_metrics["final"]["map50"]
    assert metrics["phase"] == "phase2" and metrics["cache_seconds"] >= 0.0  # recorded in the contract


def test_frozen_detector_is_bit_identical_after_training(baseline_run, tiny_params, tmp_path):
    run_dir, _ = baseline_run
    params = tiny_params(
        **{**PHASE2, "unfreeze": "none", "alpha": 0.05, "ema": False},
        baseline=str(run_dir),
        run_dir=str(tmp_path / "frozen"),
    )
    metrics = run_phase2(params, progress=False)
    before = detector.load(run_dir / "checkpoints" / "best").state_dict()
    after = detector.load(tmp_path / "frozen" / "checkpoints" / "last" / "detector").state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # ... while the fusion did train: its gate moved away from its initial value
    assert metrics["history"][-1]["alpha"] != pytest.approx(0.05, abs=1e-9)


def test_cached_warmup_reuses_the_cache(baseline_run, tiny_params, tmp_path):
    run_dir, _ = baseline_run
    params = tiny_params(
        **{**PHASE2, "warmup_epochs": 2, "epochs": 2},
        baseline=str(run_dir),
        run_dir=str(tmp_path / "cache"),
        augment=True,
    )
    gen = seed_everything(0)
    data = make_data(params, gen, progress=False)
    model, _, _ = build_multimodal(params, data.class_names)
    task = Phase2Task(model, data.class_names, params, data.train)
    trainer = Trainer(
        params,
        task,
        data.train_loader,
        data.val_loader,
        data.val.coco,
        data.cat_ids,
        tmp_path / "cache",
        gen,
        lambda *a: None,
        progress=False,
    )
    task.on_epoch_start(1, trainer)
    assert data.train.augment == "none"  # the cached mode is defined on un-augmented images
    trainer.rebuild_optimizer()
    trainer._train_one_epoch(1)
    assert set(task.cache) == set(data.train.image_ids)
    first = task.cache_seconds
    assert first > 0 and task.contract_extra() == {"cache_seconds": round(first, 2)}
    trainer._train_one_epoch(2)
    assert task.cache_seconds == first  # nothing recomputed in the second warm-up epoch
    assert data.train.load_images is False  # ... and no image decoded either
    task.on_epoch_start(3, trainer)
    assert data.train.augment == "light" and data.train.load_images is True  # stage B: images, `augment` as set


def test_no_text_branch_skips_stage_a(baseline_run, tiny_params, tmp_path):
    """`text_encoder: none` (the no-text control) has nothing to train in stage A: it starts in stage B."""
    run_dir, base_metrics = baseline_run
    params = tiny_params(**{**PHASE2, "text_encoder": "none"}, baseline=str(run_dir), run_dir=str(tmp_path / "none"))
    metrics = run_phase2(params, progress=False)
    assert [h["stage"] for h in metrics["history"]] == ["B", "B", "B"]
    assert metrics["cache_seconds"] == 0.0  # no stage A, no cache
    assert metrics["history"][0]["map"] == base_metrics["final"]["map"]


def test_fast_predict_path_equals_the_full_forward(baseline_run, tiny_params, tmp_path):
    """predict() (deployment path) fuses the same hidden state as the training layout does."""
    run_dir, _ = baseline_run
    params = tiny_params(**{**PHASE2, "alpha": 0.5}, baseline=str(run_dir), run_dir=str(tmp_path / "fast"))
    data = make_data(params, seed_everything(0), progress=False, need_train=False)
    model, _, _ = build_multimodal(params, data.class_names)
    model.eval()
    x = next(iter(data.val_loader))["pixel_values"]
    with torch.no_grad():
        fast_logits, fast_boxes = model.predict(x)
        full = model(x)
    assert (fast_logits - full["logits"]).abs().max().item() == 0.0
    assert torch.equal(fast_boxes, full["pred_boxes"])
    assert (fast_logits - model.detector(x).logits).abs().max().item() > 0  # the text term is there


def test_cached_outputs_follow_the_model_device():
    """The stage-A cache lives on the CPU; the stacked batch must go where the model is.

    On a GPU the cached hidden states once reached the fusion on the CPU ("mat1 is on cpu"); the meta
    device stands in for the accelerator here.
    """
    from tfg_mm.training.phase2 import _slice, _stack, _to

    out = {"pred_logits": torch.randn(2, 3, 4), "aux": [{"hidden": torch.randn(2, 3, 8)}], "n": 1}
    cached = [_slice(out, j) for j in range(2)]
    assert cached[0]["pred_logits"].device.type == "cpu"
    moved = _to(_stack(cached), torch.device("meta"))
    assert moved["pred_logits"].device.type == "meta" and moved["pred_logits"].shape == (2, 3, 4)
    assert moved["aux"][0]["hidden"].device.type == "meta" and moved["n"] == 1


def test_contract_records_prompts_and_descriptions_file_joins_run_id(baseline_run, tiny_params, tmp_path):
    """`metrics.json` → `text_encoder.prompts` holds the prompts used per class (descriptions from a
    file included); editing the file changes the phase-2 run id, so a stale run is not reused."""
    import json

    from tfg_mm.config import DEFAULT_TEMPLATES
    from tfg_mm.training.phase2 import depends_on_baseline

    run_dir, _ = baseline_run
    catalogue = tmp_path / "catalogue.yaml"
    catalogue.write_text("scratch: [a long thin bright line, a shallow groove]\n")
    params = tiny_params(
        **{**PHASE2, "text_encoder": "random", "epochs": 1, "warmup_epochs": 1},
        baseline=str(run_dir),
        run_dir=str(tmp_path / "desc"),
        class_descriptions=str(catalogue),
    )
    run_phase2(params, progress=False)
    contract = json.loads((tmp_path / "desc" / "metrics.json").read_text())
    prompts = contract["text_encoder"]["prompts"]
    assert list(prompts) == contract["classes"]
    assert prompts["scratch"] == [t.format("scratch") for t in DEFAULT_TEMPLATES] + [
        "a long thin bright line",
        "a shallow groove",
    ]
    assert prompts["dent"] == [t.format("dent") for t in DEFAULT_TEMPLATES]
    before = depends_on_baseline(params)
    catalogue.write_text("scratch: a long thin bright line\n")
    after = depends_on_baseline(params)
    assert before != after and before.startswith(after.split(";class_descriptions:")[0])
    plain = tiny_params(**PHASE2, baseline=str(run_dir))
    assert ";class_descriptions:" not in depends_on_baseline(plain)  # nothing added without a file
