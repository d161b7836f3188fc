"""Import of official DEIMv2 checkpoints, and fidelity to the official implementation.

The fidelity tests read the reference fixtures made with the official code
(``<size>_calibrated/`` found by ``tests/official.py``: official-layout checkpoint, input, and the
official model's eval outputs). Rows are matched as that folder's README explains: each output row is
one selected query, and queries whose encoder scores are closer than the float32 noise may come out
in another order. So the rows are paired by a minimum-cost assignment (scipy's Hungarian solver on the
max-abs distance between rows), the leading ``order_stable_prefix`` rows of each image (``meta.json``)
must pair with themselves, and the max abs difference over all paired rows must be <= 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from official import official_fixture
from scipy.optimize import linear_sum_assignment

from tfg_mm.detector import TfgDeimv2ForObjectDetection, load, preset_config, read_metadata
from tfg_mm.detector.convert import (
    checkpoint_fingerprint,
    config_fingerprint,
    convert_checkpoint,
    convert_state_dict,
    infer_image_size,
    infer_num_classes,
    infer_size,
    load_official_state_dict,
    main,
)
from tfg_mm.errors import CheckpointError, ConfigError

TOLERANCE = 1e-4
FIXTURE_SIZES = ("atto", "n", "s")


def _fixture(size: str) -> Path:
    return official_fixture(f"{size}_calibrated")


def _official_outputs(folder: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    pixel_values = torch.load(folder / "input.pt", weights_only=True)
    expected = torch.load(folder / "expected.pt", weights_only=True)
    meta = json.loads((folder / "meta.json").read_text())
    return pixel_values, expected, meta


def _matched_max_diff(logits, boxes, expected, meta) -> tuple[float, float]:
    """Max abs differences (logits, boxes) after pairing rows; asserts the order-stable prefixes."""
    worst_logits = worst_boxes = 0.0
    for image in range(expected["pred_logits"].shape[0]):
        ours = torch.cat([logits[image], boxes[image]], dim=-1).double()
        theirs = torch.cat([expected["pred_logits"][image], expected["pred_boxes"][image]], dim=-1).double()
        rows, cols = linear_sum_assignment(torch.cdist(ours, theirs, p=float("inf")).numpy())
        prefix = meta["robustness"]["per_image"][image]["order_stable_prefix"]
        assert (rows[:prefix] == cols[:prefix]).all(), f"image {image}: order differs within the stable prefix"
        worst_logits = max(
            worst_logits, (logits[image][rows] - expected["pred_logits"][image][cols]).abs().max().item()
        )
        worst_boxes = max(worst_boxes, (boxes[image][rows] - expected["pred_boxes"][image][cols]).abs().max().item())
    return worst_logits, worst_boxes


def _converted_model(folder: Path) -> tuple[TfgDeimv2ForObjectDetection, list[str], list[str]]:
    official, source = load_official_state_dict(folder / "checkpoint.pth")
    assert source == "ema.module"
    size = infer_size(official)
    strides = preset_config(size, num_classes=1).feat_strides
    config = preset_config(
        size, num_classes=infer_num_classes(official), image_size=infer_image_size(official, strides)
    )
    mapped, unmapped, missing = convert_state_dict(official, config)
    model = TfgDeimv2ForObjectDetection(config)
    result = model.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys
    return model.eval(), unmapped, missing


@pytest.mark.parametrize("size", FIXTURE_SIZES)
def test_official_weights_reproduce_official_outputs(size, record_property):
    folder = _fixture(size)
    pixel_values, expected, meta = _official_outputs(folder)
    model, unmapped, missing = _converted_model(folder)

    assert unmapped == []
    # Only the masked-image-modelling token of the ViT has no official counterpart (unused in detection).
    assert all(k.endswith("embeddings.mask_token") for k in missing), missing
    assert infer_size(load_official_state_dict(folder / "checkpoint.pth")[0]) == size

    with torch.no_grad():
        outputs = model(pixel_values=pixel_values)
    assert outputs.logits.shape == expected["pred_logits"].shape
    logits_diff, boxes_diff = _matched_max_diff(outputs.logits, outputs.pred_boxes, expected, meta)
    record_property("max_abs_diff_logits", logits_diff)
    record_property("max_abs_diff_boxes", boxes_diff)
    print(f"\n{size}: max |logits - official| = {logits_diff:.3g}, max |boxes - official| = {boxes_diff:.3g}")
    assert logits_diff <= TOLERANCE
    assert boxes_diff <= TOLERANCE


def test_fixture_sizes_are_told_apart_and_wrong_size_is_refused(tmp_path):
    fingerprints = {
        s: checkpoint_fingerprint(load_official_state_dict(_fixture(s) / "checkpoint.pth")[0]) for s in FIXTURE_SIZES
    }
    assert fingerprints["atto"] == config_fingerprint(preset_config("atto", num_classes=5))
    assert fingerprints["s"]["backbone"] == "dinov3" and fingerprints["s"]["adapter"]
    assert fingerprints["atto"]["encoder_type"] == "lite" and fingerprints["n"]["encoder_type"] == "hybrid"

    with pytest.raises(CheckpointError, match="looks like 'atto'"):
        convert_checkpoint(_fixture("atto") / "checkpoint.pth", tmp_path / "out", size="n")
    with pytest.raises(ConfigError, match="not a DEIMv2 size"):
        convert_checkpoint(_fixture("atto") / "checkpoint.pth", tmp_path / "out", size="huge")
    assert not (tmp_path / "out").exists()
    assert main([str(_fixture("n") / "checkpoint.pth"), str(tmp_path / "out"), "--size", "s"]) == 2


def test_anchors_of_another_eval_size_are_refused(tmp_path):
    """The official anchors are dropped (recomputed) only after checking they equal the model's."""
    checkpoint = torch.load(_fixture("atto") / "checkpoint.pth", weights_only=True)
    state_dict = dict(checkpoint["ema"]["module"])
    state_dict["decoder.anchors"] = state_dict["decoder.anchors"] + 0.01
    torch.save({"model": state_dict}, tmp_path / "shifted.pth")
    with pytest.raises(CheckpointError, match="anchors"):
        convert_checkpoint(tmp_path / "shifted.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shared_box_head_must_really_be_shared():
    official, _ = load_official_state_dict(_fixture("atto") / "checkpoint.pth")
    config = preset_config("atto", num_classes=5, image_size=320)
    mapped, _, _ = convert_state_dict(official, config)
    head = official["decoder.dec_bbox_head.0.layers.2.weight"]
    for i in range(3):  # every layer's box head (both transformers copies) is the official shared head
        assert torch.equal(mapped[f"model.decoder.bbox_embed.{i}.layers.2.weight"], head)
        assert torch.equal(mapped[f"bbox_embed.{i}.layers.2.weight"], head)

    official["decoder.dec_bbox_head.1.layers.2.weight"] = head + 1.0
    with pytest.raises(CheckpointError, match="shares one box head"):
        convert_state_dict(official, config)


def test_fused_tensors_are_split_in_official_order():
    """in_proj is [q; k; v] and SwiGLU w12 is [gate; up] along the output dimension."""
    config = preset_config("atto", num_classes=5)
    d, hidden = config.d_model, config.decoder_ffn_dim // 2
    in_proj = torch.arange(3 * d * d, dtype=torch.float32).reshape(3 * d, d)
    w12 = torch.arange(2 * hidden * d, dtype=torch.float32).reshape(2 * hidden, d)
    official = {
        "decoder.decoder.layers.1.self_attn.in_proj_weight": in_proj,
        "decoder.decoder.layers.1.swish_ffn.w12.weight": w12,
        "decoder.decoder.layers.1.norm3.scale": torch.full((d,), 2.0),
        "decoder.anchors": torch.zeros(1, 500, 4),  # a documented drop: not reported as unmapped
        "decoder.something_new.weight": torch.zeros(2),
    }
    mapped, unmapped, missing = convert_state_dict(official, config)
    layer = "model.decoder.layers.1"
    assert torch.equal(mapped[f"{layer}.self_attn.q_proj.weight"], in_proj[:d])
    assert torch.equal(mapped[f"{layer}.self_attn.k_proj.weight"], in_proj[d : 2 * d])
    assert torch.equal(mapped[f"{layer}.self_attn.v_proj.weight"], in_proj[2 * d :])
    assert torch.equal(mapped[f"{layer}.mlp.gate_proj.weight"], w12[:hidden])
    assert torch.equal(mapped[f"{layer}.mlp.up_proj.weight"], w12[hidden:])
    assert torch.equal(mapped[f"{layer}.final_layer_norm.weight"], torch.full((d,), 2.0))
    assert unmapped == ["decoder.something_new.weight"]
    assert f"{layer}.self_attn.o_proj.weight" in missing and f"{layer}.self_attn.q_proj.weight" not in missing


def test_load_official_prefers_ema_and_rejects_bad_files(tmp_path):
    weights = {"decoder.enc_score_head.weight": torch.zeros(2, 3)}
    ema = {"decoder.enc_score_head.weight": torch.ones(2, 3)}
    both, model_only, junk, other = (tmp_path / n for n in ("both.pth", "model.pth", "junk.pth", "other.pth"))
    torch.save({"model": weights, "ema": {"module": ema, "updates": 3}, "last_epoch": 1}, both)
    torch.save({"model": weights}, model_only)
    junk.write_bytes(b"not a checkpoint")
    torch.save({"model": {"backbone.conv.weight": torch.zeros(1)}}, other)

    state_dict, source = load_official_state_dict(both)
    assert source == "ema.module" and torch.equal(state_dict["decoder.enc_score_head.weight"], ema[next(iter(ema))])
    assert load_official_state_dict(model_only)[1] == "model"
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_official_state_dict(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as refused:
        load_official_state_dict(junk)
    assert "weights_only=False" not in str(refused.value)  # never suggest unpickling an unknown file
    with pytest.raises(CheckpointError, match="not a DEIMv2 detector"):
        load_official_state_dict(other)


@pytest.mark.parametrize("size", ["atto", "s"])
def test_convert_checkpoint_writes_a_loadable_checkpoint(size, tmp_path, capsys):
    folder = _fixture(size)
    pixel_values, expected, meta = _official_outputs(folder)
    out = tmp_path / size
    assert main([str(folder / "checkpoint.pth"), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"size {size}" in printed and "unmapped official tensors: none" in printed

    model, report = load(out), read_metadata(out)["conversion"]
    assert report["size"] == size and report["source_entry"] == "ema.module" and report["image_size"] == 320
    assert report["unmapped_official"] == [] and report["reinitialised_class_heads"] == []
    assert set(report["missing_ours"]) == set(report["unused_ours"])  # only the ViT's mask token (s)
    with torch.no_grad():
        outputs = model.eval()(pixel_values=pixel_values)
    assert max(_matched_max_diff(outputs.logits, outputs.pred_boxes, expected, meta)) <= TOLERANCE

    with pytest.raises(CheckpointError, match="not empty"):
        convert_checkpoint(folder / "checkpoint.pth", out)


def test_other_number_of_classes_reinitialises_only_the_class_heads(tmp_path):
    folder = _fixture("atto")
    official, _ = load_official_state_dict(folder / "checkpoint.pth")
    out = convert_checkpoint(
        folder / "checkpoint.pth", tmp_path / "three", num_classes=3, id2label={0: "hole", 1: "crack", 2: "stain"}
    )
    model, report = load(out), read_metadata(out)["conversion"]
    assert report["num_classes"] == 3 and report["checkpoint_num_classes"] == 5
    assert "model.enc_score_head.weight" in report["reinitialised_class_heads"]
    assert model.config.id2label[1] == "crack"
    state = model.state_dict()
    assert state["model.enc_score_head.weight"].shape == (3, 64)
    assert torch.equal(
        state["model.decoder.pre_bbox_head.layers.0.weight"], official["decoder.pre_bbox_head.layers.0.weight"]
    )
