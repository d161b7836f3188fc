"""ONNX export (tfg_mm.deploy.export): ONNX Runtime matches PyTorch + postprocess for the detector and the fused
model at two batch sizes, the exported model is left as it was, and a tampered file fails the check."""

from __future__ import annotations

import copy
import sys

import onnx
import pytest
import torch
from onnx import numpy_helper

from tfg_mm import detector as det
from tfg_mm.deploy.export import (
    TOLERANCES,
    _match_image,
    compare_outputs,
    export_onnx,
    ort_predict_fn,
    ort_session,
)
from tfg_mm.errors import ConfigError, TfgError
from tfg_mm.multimodal.fusion import ResidualTextFusion
from tfg_mm.multimodal.model import MultimodalDetector

SIZE, CLASSES, TOP_K = 160, 6, 50


def _inputs(batch: int, seed: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=generator)
    heights = torch.randint(100, 800, (batch,), generator=generator)
    widths = torch.randint(100, 800, (batch,), generator=generator)
    return images, torch.stack([heights, widths], dim=1)


def _measured_batch_norm(model: torch.nn.Module, size: int = SIZE) -> torch.nn.Module:
    """A random detector's features are about 1e-12 after the backbone, so every encoder token scores the prior bias
    and the query selection is a float-noise tie. BatchNorm statistics measured on one batch give it real scores."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: exactly this batch's statistics
        norm.train()
    with torch.no_grad():
        model(_inputs(4, seed=100, size=size)[0])
    return model.eval()


@pytest.fixture(scope="module")
def detector():
    return _measured_batch_norm(det.build("atto", CLASSES, image_size=SIZE, seed=0))


@pytest.fixture(scope="module")
def fused(detector):
    generator = torch.Generator().manual_seed(1)
    fusion = ResidualTextFusion(detector.config.d_model, torch.randn(CLASSES, 12, generator=generator), alpha=0.5)
    return MultimodalDetector(copy.deepcopy(detector), fusion).eval()


@pytest.fixture(scope="module")
def detector_onnx(detector, tmp_path_factory):
    return export_onnx(detector, tmp_path_factory.mktemp("onnx") / "detector.onnx", SIZE, top_k=TOP_K)


def _assert_close(report: dict) -> None:
    diff = report["max_abs_diff"]
    assert report["passed"], report
    assert diff["labels_mismatch"] == 0 and report["tied_at_cutoff"] == 0
    assert diff["boxes_normalised"] <= TOLERANCES["boxes_normalised"] and diff["scores"] <= TOLERANCES["scores"]


def test_detector_matches_pytorch_at_two_batch_sizes(detector, detector_onnx):
    for batch, seed in ((2, 0), (3, 1)):  # exported with a dynamic batch axis
        images, sizes = _inputs(batch, seed)
        report = compare_outputs(detector_onnx, detector, images, sizes, top_k=TOP_K)
        _assert_close(report)
        assert report["images"] == batch and report["top_k"] == TOP_K
    boxes, scores, labels = ort_predict_fn(ort_session(detector_onnx))(images, sizes)
    assert boxes.shape == (3, TOP_K, 4) and scores.shape == labels.shape == (3, TOP_K)
    assert labels.dtype == torch.int64 and 0 <= int(labels.min()) and int(labels.max()) < CLASSES
    assert torch.all(scores[:, :-1] >= scores[:, 1:])  # sorted by decreasing score
    # boxes are in each image's own pixels: the (h, w) input reaches the graph
    assert torch.all(boxes[..., 2] <= sizes[:, 1, None] + 1e-3) and torch.all(boxes[..., 3] <= sizes[:, 0, None] + 1e-3)


def test_fused_model_matches_pytorch_and_folds_the_text_branch(fused, detector, detector_onnx, tmp_path):
    path = export_onnx(fused, tmp_path / "fused.onnx", SIZE, top_k=1000)  # capped at Q * C = 600, as postprocess
    for batch, seed in ((2, 2), (1, 3)):
        images, sizes = _inputs(batch, seed)
        report = compare_outputs(path, fused, images, sizes, top_k=1000)
        _assert_close(report)
        assert report["top_k"] == fused.config.num_queries * CLASSES
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["images", "orig_sizes"]  # no text input: embeddings are constants
    fused_scores = ort_predict_fn(ort_session(path))(images, sizes)[1][:, :TOP_K]
    plain_scores = ort_predict_fn(ort_session(detector_onnx))(images, sizes)[1]
    assert (fused_scores - plain_scores).abs().max() > 1e-2  # the text term is in the graph


def test_export_leaves_the_model_as_it_was(detector, tmp_path):
    model = copy.deepcopy(detector)
    det.set_attn_implementation(model, "eager")
    model.train()
    model.model.conv_encoder.eval()  # mixed flags, as a frozen backbone under training
    flags = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    anchors, valid, anchors_hw = model.model.anchors, model.model.valid_mask, model._anchors_hw
    reference = copy.deepcopy(model)

    other = 192  # another size than the model's: the export recomputes the anchors for it, then puts them back
    path = export_onnx(model, tmp_path / "other.onnx", other, top_k=TOP_K)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert model.config._attn_implementation == "eager"
    assert model.model.anchors is anchors and model.model.valid_mask is valid and model._anchors_hw == anchors_hw
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    images = _inputs(2, seed=4)[0]
    with torch.no_grad():
        after, before = model.eval()(images), reference.eval()(images)
    assert torch.equal(after.logits, before.logits) and torch.equal(after.pred_boxes, before.pred_boxes)

    images, sizes = _inputs(2, seed=5, size=other)
    _assert_close(compare_outputs(path, model, images, sizes, top_k=TOP_K))
    assert model.model.anchors is anchors  # the check puts them back too
    with pytest.raises(ConfigError, match="resize"):
        ort_predict_fn(ort_session(path))(*_inputs(1, seed=6))  # 160 px into a 192 px graph


def test_a_tampered_file_fails_the_check(detector, detector_onnx, tmp_path):
    model = onnx.load(str(detector_onnx))
    name = "model.model.decoder.class_embed.2.bias"  # the final score head's bias (the exporter may alias it)
    aliases = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    while name in aliases:
        name = aliases[name]
    (head,) = [t for t in model.graph.initializer if t.name == name]
    values = numpy_helper.to_array(head).copy()
    values[0] += 0.5  # one class of one initializer
    head.CopyFrom(numpy_helper.from_array(values, head.name))
    onnx.save(model, str(tmp_path / "tampered.onnx"))
    images, sizes = _inputs(2, seed=0)
    report = compare_outputs(tmp_path / "tampered.onnx", detector, images, sizes, top_k=TOP_K)
    assert not report["passed"] and report["max_abs_diff"]["scores"] > TOLERANCES["scores"]
    with pytest.raises(ConfigError, match="top_k"):
        compare_outputs(detector_onnx, detector, images, sizes, top_k=TOP_K + 1)


def test_fixed_batch_and_bad_arguments(detector, tmp_path):
    path = export_onnx(detector, tmp_path / "fixed.onnx", SIZE, batch=1, top_k=TOP_K)
    dims = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, SIZE, SIZE]
    _assert_close(compare_outputs(path, detector, *_inputs(1, seed=7), top_k=TOP_K))
    with pytest.raises(ConfigError, match="batch"):
        ort_predict_fn(ort_session(path))(*_inputs(2, seed=7))
    for kwargs, word in (({"batch": "two"}, "batch"), ({"top_k": 0}, "top_k"), ({"opset": 13}, "opset")):
        with pytest.raises(ConfigError, match=word):
            export_onnx(detector, tmp_path / "bad.onnx", SIZE, **kwargs)
    assert not (tmp_path / "bad.onnx").exists()


def test_missing_backend_names_the_install(detector_onnx, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(TfgError, match="pip install onnx onnxruntime"):
        ort_session(detector_onnx)


def test_matching_forgives_tie_order_but_not_real_differences():
    scale = torch.tensor([100.0, 50.0, 100.0, 50.0], dtype=torch.float64)
    boxes = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [40, 5, 60, 25]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.5, 0.5 - 1e-6])
    labels = torch.tensor([1, 2, 0])
    order = torch.tensor([0, 2, 1])  # the two (nearly) tied detections in the other order
    result = _match_image((boxes, scores, labels), (boxes[order], scores, labels[order]), scale, 1e-4)
    assert result["labels"] == 0 and result["boxes_normalised"] == 0.0
    changed = labels.clone()
    changed[0] = 3
    result = _match_image((boxes, scores, labels), (boxes, scores, changed), scale, 1e-4)
    assert result["labels"] == 1  # same score, another class: a real difference
    moved = boxes.clone()
    moved[1, 0] += 5.0
    result = _match_image((boxes, scores, labels), (moved, scores, labels), scale, 1e-4)
    assert result["boxes_normalised"] == pytest.approx(0.05) and result["boxes_px"] == pytest.approx(5.0)
    other = labels.clone()
    other[2] = 5  # the last kept detection, tied with another: either runtime may keep either
    result = _match_image((boxes, scores, labels), (boxes, scores, other), scale, 1e-4)
    assert result["labels"] == 0 and result["tied"] == 1
