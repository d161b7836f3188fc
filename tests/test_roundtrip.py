"""Lossless checkpoints: every tensor of a perturbed (not fresh) model survives save -> load, for atto, n, s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForObjectDetection

import tfg_mm  # noqa: F401  (registers the Auto classes)
from tfg_mm.detector import TfgDeimv2ForObjectDetection, build, load, read_metadata, save
from tfg_mm.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every parameter and BatchNorm statistic away from its initial value (zero last layers included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tensors = list(model.parameters()) + [
            b for n, b in model.named_buffers() if b.is_floating_point() and "running_" in n
        ]
        for tensor in tensors:
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.02 + 0.01)


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module, pixels: torch.Tensor) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    changed = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert changed == []
    with torch.no_grad():
        out_a, out_b = a.eval()(pixels), b.eval()(pixels)
    assert torch.equal(out_a.logits, out_b.logits)
    assert torch.equal(out_a.pred_boxes, out_b.pred_boxes)


@pytest.mark.parametrize("preset", ["atto", "n", "s"])
def test_perturbed_model_round_trip_is_exact(preset, tmp_path):
    model = build(preset, 5, image_size=320, seed=0)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    perturb(model)
    trainable = [n for n, p in model.named_parameters() if p.numel() > 0]
    assert all(not torch.equal(fresh[n], model.state_dict()[n]) for n in trainable)
    folder = save(model, tmp_path / "ckpt", metadata={"seed": 0, "preset": preset})
    pixels = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(2))

    assert_same_model(model, load(folder), pixels)
    auto = AutoModelForObjectDetection.from_pretrained(folder)
    assert type(auto) is TfgDeimv2ForObjectDetection
    assert_same_model(model, auto, pixels)
    assert read_metadata(folder) == {"seed": 0, "preset": preset}
    assert json.loads((folder / "config.json").read_text())["model_type"] == "tfg_deimv2"


def test_shared_box_head_and_score_heads_are_restored(tmp_path):
    model = build("atto", 3, image_size=320, seed=0)
    perturb(model)
    decoder = model.model.decoder
    assert decoder.bbox_embed[1] is decoder.bbox_embed[0]  # atto shares one box head
    assert not torch.equal(decoder.class_embed[0].weight, decoder.class_embed[1].weight)
    loaded = load(save(model, tmp_path / "ckpt"))
    head = loaded.model.decoder
    assert head.bbox_embed[2] is head.bbox_embed[0]
    assert torch.equal(head.bbox_embed[0].layers[-1].weight, decoder.bbox_embed[0].layers[-1].weight)
    assert head.bbox_embed[0].layers[-1].weight.abs().sum() > 0  # not the zero re-initialisation
    for i in range(3):  # one score head per layer, not tied to class_embed.0
        assert torch.equal(head.class_embed[i].weight, decoder.class_embed[i].weight)
        assert loaded.class_embed[i].weight is head.class_embed[i].weight  # top-level alias = head in use


def test_save_is_atomic_and_keeps_old_checkpoint(tmp_path):
    model = build("atto", 2, image_size=320, seed=0)
    folder = save(model, tmp_path / "ckpt", metadata={"v": 1})
    with pytest.raises(CheckpointError):
        save(torch.nn.Linear(2, 2), folder)  # not our model: nothing is written
    assert read_metadata(folder) == {"v": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_class_count_change_needs_explicit_reinit(tmp_path, caplog):
    model = build("atto", 7, image_size=320, seed=0)
    perturb(model)
    folder = save(model, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="checkpoint has 7 classes, the dataset has 5"):
        load(folder, num_classes=5)
    with caplog.at_level("WARNING"):
        reloaded = load(folder, num_classes=5, reinit_class_heads=True, id2label={i: f"d{i}" for i in range(5)})
    assert reloaded.config.num_labels == 5 and reloaded.config.id2label[4] == "d4"
    assert "model.enc_score_head.weight" in caplog.text and "denoising_class_embed" in caplog.text
    old, new = model.state_dict(), reloaded.state_dict()
    class_tensors = [k for k in new if old[k].shape != new[k].shape]
    assert class_tensors and all("class_embed" in k or "enc_score_head" in k for k in class_tensors)
    for name in new:  # every other tensor is kept exactly
        if name not in class_tensors:
            assert torch.equal(old[name], new[name]), name


def test_mismatched_checkpoint_lists_tensors_and_cause(tmp_path):
    folder = save(build("atto", 7, image_size=320, seed=0), tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["num_labels"] = 5  # a config that no longer matches its tensors
    config["id2label"] = {str(i): f"c{i}" for i in range(5)}
    config["label2id"] = {f"c{i}": i for i in range(5)}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        load(folder)
    text = str(error.value)
    assert "checkpoint has 7 classes, the dataset has 5" in text
    assert "model.enc_score_head.weight: (5, 64) vs (7, 64)" in text
    with pytest.raises(CheckpointError, match=r"decoder width 64 = preset 'atto', params say 'n' \(128\)"):
        load(folder, preset="n")


def test_loading_without_tfg_mm_never_builds_the_uncorrected_class(tmp_path):
    folder = save(build("atto", 2, image_size=320, seed=0), tmp_path / "ckpt")
    script = (
        "import sys\n"
        "sys.modules['tfg_mm'] = None  # an environment without the package (it is installed here)\n"
        "from transformers import AutoModelForObjectDetection\n"
        "try:\n"
        f"    AutoModelForObjectDetection.from_pretrained({str(folder)!r})\n"
        "except Exception as error:\n"
        "    print('REFUSED', type(error).__name__, error)\n"
        "else:\n"
        "    print('LOADED')\n"
        "try:\n"
        f"    AutoModelForObjectDetection.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        "except Exception as error:\n"
        "    print('REMOTE', type(error).__name__, error)\n"
    )
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "mods")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "LOADED" not in result.stdout, result.stdout + result.stderr
    assert "REFUSED" in result.stdout
    assert "REMOTE" in result.stdout and "tfg_mm" in result.stdout, result.stdout + result.stderr
