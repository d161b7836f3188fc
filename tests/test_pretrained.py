"""`pretrained:` from every source a user has, adapted to the dataset's class count (issue 11, item 1).

The sources are built here with 80 classes (COCO's count) and random weights: a transformers
``Deimv2ForObjectDetection`` folder (``save_pretrained``, model type ``deimv2``) and an official-layout
``.pth`` (the atto reference fixture made by the official code, its class-dependent tensors widened to
80 / 81 rows). The embedded synthetic set has 6 classes.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import huggingface_hub
import pytest
import torch
from official import official_fixture

from tfg_mm.data.synthetic import DEFAULT_CLASSES
from tfg_mm.detector import build, load, save
from tfg_mm.detector.official import OFFICIAL_PRIOR_PROB
from tfg_mm.detector.pretrained import load_pretrained, source_kind
from tfg_mm.errors import CheckpointError, OfflineError
from tfg_mm.training.baseline import run_baseline

HEADS = [
    "model.decoder.class_embed.0.bias",
    "model.decoder.class_embed.0.weight",
    "model.decoder.class_embed.1.bias",
    "model.decoder.class_embed.1.weight",
    "model.decoder.class_embed.2.bias",
    "model.decoder.class_embed.2.weight",
    "model.denoising_class_embed.weight",
    "model.enc_score_head.bias",
    "model.enc_score_head.weight",
]
PRIOR_BIAS = -math.log((1 - OFFICIAL_PRIOR_PROB) / OFFICIAL_PRIOR_PROB)
N = len(DEFAULT_CLASSES)
LABELS = dict(enumerate(DEFAULT_CLASSES))


@pytest.fixture(scope="module")
def transformers_folder(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """transformers' own DEIMv2 (atto architecture, 80 labels, random init) saved with save_pretrained."""
    plain = build("atto", 80, image_size=160, seed=0, fidelity="transformers")
    assert type(plain).__name__ == "Deimv2ForObjectDetection" and plain.config.model_type == "deimv2"
    folder = tmp_path_factory.mktemp("hf_deimv2_80")
    plain.save_pretrained(folder)
    return folder, {k: v.clone() for k, v in plain.state_dict().items()}


@pytest.fixture(scope="module")
def official_pth(tmp_path_factory) -> Path:
    """The official atto reference checkpoint with 80 classes: score heads and denoising embedding widened."""
    checkpoint = torch.load(official_fixture("atto_calibrated") / "checkpoint.pth", weights_only=True)
    state = dict(checkpoint["ema"]["module"])
    generator = torch.Generator().manual_seed(0)
    for key, tensor in list(state.items()):
        if re.match(r"^decoder\.(enc_score_head|dec_score_head\.\d+|denoising_class_embed)\.", key):
            rows = 81 if "denoising" in key else 80
            state[key] = torch.randn((rows, *tensor.shape[1:]), generator=generator)
    path = tmp_path_factory.mktemp("official_80") / "deimv2_atto_coco80.pth"
    torch.save({"model": state}, path)
    return path


def _check_adapted(model, table, source_state: dict[str, torch.Tensor]) -> None:
    assert model.config.num_labels == N and model.config.id2label == LABELS
    assert table["source_classes"] == 80 and table["classes"] == N and not table["class_names_replaced"]
    assert table["reinitialised"] == HEADS
    assert table["loaded"] == len(source_state)
    state = model.state_dict()
    for name, tensor in source_state.items():
        assert torch.equal(state[name], tensor), name
    for name in HEADS:
        assert state[name].shape[0] == (N + 1 if "denoising" in name else N), name
        if name.endswith(".bias"):
            assert torch.allclose(state[name], torch.full_like(state[name], PRIOR_BIAS)), name
    # the tied top-level aliases are the heads in use
    assert model.class_embed[1].weight is model.model.decoder.class_embed[1].weight


def test_a_transformers_folder_with_80_classes_loads_for_6(transformers_folder, caplog):
    folder, plain = transformers_folder
    assert source_kind(str(folder)) == ("deimv2", folder)
    with caplog.at_level(logging.INFO, logger="tfg_mm.detector.pretrained"):
        model, table = load_pretrained(str(folder), N, LABELS, seed=0)
    own = {k for k in model.state_dict() if k not in model.all_tied_weights_keys}
    expected = {k: plain[k] for k in own if k not in HEADS}
    _check_adapted(model, table, expected)
    assert table["kind"] == "deimv2" and table["preset"] == "atto"
    assert table["dropped"] == [f"model.enc_output.{i}.{p}" for i in (0, 1) for p in ("bias", "weight")]
    tables = [r.getMessage() for r in caplog.records if r.name == "tfg_mm.detector.pretrained"]
    # one table, no second account of the same facts (transformers' load report, the enc_output warning)
    assert [r.getMessage()[:60] for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert len(tables) == 1 and "80 classes -> 6" in tables[0] and "model.enc_score_head.weight" in tables[0]


def test_an_official_pth_with_80_classes_loads_for_6(official_pth, capsys):
    model, table = load_pretrained(str(official_pth), N, LABELS, seed=0)
    assert capsys.readouterr().out == ""  # the converter's report is in the table, not printed as well
    # the same .pth converted with the project's converter at its own 80 classes: everything but the heads
    from tfg_mm.detector.convert import convert_checkpoint

    reference = load(convert_checkpoint(official_pth, official_pth.parent / "converted"))
    own = {k for k in model.state_dict() if k not in model.all_tied_weights_keys}
    expected = {k: v for k, v in reference.state_dict().items() if k in own and k not in HEADS}
    _check_adapted(model, table, expected)
    assert table["kind"] == "official_pth"
    assert table["dropped"] == ["decoder.anchors", "decoder.reg_scale", "decoder.up", "decoder.valid_mask"]


def test_the_same_class_count_keeps_every_tensor_and_takes_the_dataset_names(tmp_path):
    source = build("atto", N, image_size=160, seed=5)
    save(source, tmp_path / "ckpt")
    model, table = load_pretrained(str(tmp_path / "ckpt"), N, LABELS, adapt_classes=False)
    assert table["reinitialised"] == [] and table["dropped"] == [] and table["kind"] == "tfg_deimv2"
    assert table["class_names_replaced"]  # class_0.. -> the dataset's names
    assert model.config.id2label == LABELS
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_a_class_mismatch_without_adaptation_names_the_parameter_and_the_fix(transformers_folder):
    folder, _ = transformers_folder
    with pytest.raises(CheckpointError, match=r"`checkpoint: .*80 classes, the dataset has 6.*reinit_class_heads"):
        load_pretrained(str(folder), N, LABELS, adapt_classes=False, what="checkpoint")


def test_sources_that_do_not_exist_or_are_not_detectors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="does not exist"):
        source_kind(str(tmp_path / "coco.pth"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="without config.json"):
        source_kind(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"\.pth"):
        source_kind(str(tmp_path / "notes.txt"))
    # a hub id without network: the error says how to use a downloaded folder instead
    assert source_kind("Intellindust/DEIMv2_HGNetv2_ATTO_COCO_not_cached") == (
        "hub",
        "Intellindust/DEIMv2_HGNetv2_ATTO_COCO_not_cached",
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineError, match="folder"):
        load_pretrained("Intellindust/DEIMv2_HGNetv2_ATTO_COCO_not_cached", N, LABELS)


def _trained_from(tiny_params, tmp_path, source: str) -> dict:
    params = tiny_params(pretrained=source, epochs=1, max_steps_per_epoch=2, run_dir=str(tmp_path / "run"))
    metrics = run_baseline(params, progress=False)
    assert metrics["status"] == "finished"
    record = metrics["model"]["pretrained"]
    assert record["reinitialised"] == HEADS and record["reinitialised_count"] == len(HEADS)
    assert record["source_classes"] == 80 and record["classes"] == N
    losses = metrics["history"][-1]["losses"]
    assert losses and all(math.isfinite(v) for v in losses.values())
    trained = load(tmp_path / "run" / "checkpoints" / "best")
    assert trained.config.num_labels == N and trained.model.enc_score_head.weight.shape[0] == N
    assert trained.config.id2label == LABELS
    return metrics


@pytest.mark.slow
def test_fine_tuning_from_a_transformers_folder_with_80_classes(transformers_folder, tiny_params, tmp_path):
    metrics = _trained_from(tiny_params, tmp_path, str(transformers_folder[0]))
    assert metrics["model"]["pretrained"]["kind"] == "deimv2"


@pytest.mark.slow
def test_fine_tuning_from_an_official_pth_with_80_classes(official_pth, tiny_params, tmp_path):
    metrics = _trained_from(tiny_params, tmp_path, str(official_pth))
    assert metrics["model"]["pretrained"]["kind"] == "official_pth"


@pytest.mark.slow
def test_evaluating_a_checkpoint_of_another_class_count_is_refused(transformers_folder, tiny_params, tmp_path):
    params = tiny_params(checkpoint=str(transformers_folder[0]), run_dir=str(tmp_path / "eval"))
    with pytest.raises(CheckpointError, match="80 classes, the dataset has 6"):
        run_baseline(params, progress=False)


def test_phase2_baseline_must_be_a_baseline_of_this_dataset(transformers_folder, official_pth):
    from tfg_mm.training.phase2 import baseline_folder

    with pytest.raises(CheckpointError, match=r"deimv2 checkpoint, not a baseline.*`pretrained: "):
        baseline_folder(str(transformers_folder[0]))
    with pytest.raises(CheckpointError, match=r"official \.pth is not a baseline.*`pretrained: "):
        baseline_folder(str(official_pth))


def test_the_run_card_shows_the_initial_weights_in_one_line():
    from tfg_mm import reporting

    table = {
        "source": "coco80.pth",
        "kind": "official_pth",
        "source_classes": 80,
        "classes": 6,
        "loaded": 486,
        "reinitialised": HEADS,
        "dropped": ["decoder.anchors"],
    }
    metrics = {"status": "finished", "params": {}, "model": {"source": "coco80.pth", "pretrained": table}}
    text = reporting.provenance_markdown(metrics)
    assert (
        "| **initial weights** | coco80.pth (official_pth, 80 classes -> 6): 486 tensors loaded, 9 re-initialised "
        "(the class heads), 1 dropped |" in text
    )
    assert "model.enc_score_head" not in text  # the names stay in metrics.json


@pytest.mark.slow
def test_fine_tuning_at_another_size_saves_the_size_it_trained_at(transformers_folder, tiny_params, tmp_path, caplog):
    """A 160-px source fine-tuned at 192 px (DeepPCB: the embedded baseline at 320): the checkpoint says 192, so
    phase 2, evaluation and export use 192-px anchors without recomputing them."""
    params = tiny_params(
        pretrained=str(transformers_folder[0]),
        image_size=192,
        epochs=1,
        max_steps_per_epoch=2,
        run_dir=str(tmp_path / "r"),
    )
    with caplog.at_level(logging.WARNING):
        metrics = run_baseline(params, progress=False)
    assert metrics["status"] == "finished"
    assert list(load(tmp_path / "r" / "checkpoints" / "best").config.anchor_image_size) == [192, 192]
    assert "anchors recomputed" not in caplog.text
