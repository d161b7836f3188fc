"""Version guard: the corrections in tfg_mm.detector assume transformers behaves as 5.24 does.

If transformers changes one of the patched behaviours (e.g. an upgrade fixes it upstream), these tests fail
with the list of corrections to re-check, so the correction is retired instead of silently doubled.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import Deimv2ForObjectDetection

from tfg_mm.detector import CORRECTIONS, build
from tfg_mm.detector.official import CORRECTION_DOCS

RECHECK = (
    "transformers changed a behaviour that tfg_mm.detector corrects. Re-check these corrections in "
    f"tfg_mm/detector/official.py and retire the ones fixed upstream: {CORRECTIONS}"
)


def _pin() -> tuple[Version, Version]:
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    spec = next(d for d in pyproject["project"]["dependencies"] if d.startswith("transformers"))
    low, high = re.findall(r">=([\d.]+),<([\d.]+)", spec)[0]
    return Version(low), Version(high)


def test_installed_transformers_is_in_the_supported_range():
    low, high = _pin()
    assert low <= Version(transformers.__version__) < high, RECHECK


def test_every_correction_is_documented():
    assert CORRECTIONS == list(CORRECTION_DOCS) and len(CORRECTIONS) == len(set(CORRECTIONS))


@pytest.fixture(scope="module")
def upstream_atto():
    return build("atto", 3, image_size=320, seed=0, fidelity="transformers").eval()


def test_upstream_still_has_enc_output_layernorm(upstream_atto):
    assert isinstance(upstream_atto.model.enc_output[1], torch.nn.LayerNorm), RECHECK


def test_upstream_box_and_lqe_mlps_still_default_to_relu(upstream_atto):
    decoder = upstream_atto.model.decoder
    for mlp in [
        upstream_atto.model.enc_bbox_head,
        decoder.pre_bbox_head,
        decoder.bbox_embed[0],
        decoder.lqe_layers[0].reg_conf,
    ]:
        assert isinstance(mlp.act, torch.nn.ReLU), RECHECK


def test_upstream_still_recomputes_query_pos_every_layer(upstream_atto):
    calls = []
    handle = upstream_atto.model.decoder.query_pos_head.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        upstream_atto(torch.rand(1, 3, 320, 320))
    handle.remove()
    assert len(calls) == upstream_atto.config.decoder_layers, RECHECK


def test_upstream_aifi_still_skips_pos_embed_when_eval_size_is_set():
    plain = build("n", 2, image_size=320, seed=0, fidelity="transformers").eval()
    sizes = []
    layer = plain.model.encoder.aifi[0].layers[0]
    handle = layer.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(kwargs.get("spatial_position_embeddings")), with_kwargs=True
    )
    plain.model.encoder.aifi[0].eval_size = [320, 320]
    with torch.no_grad():
        plain(torch.rand(1, 3, 320, 320))
    handle.remove()
    assert sizes == [None], RECHECK


def test_upstream_dinov3_backbone_still_normalises_last_stage():
    plain = build("s", 2, image_size=320, seed=0, fidelity="transformers").eval()
    backbone = plain.model.conv_encoder.backbone
    assert not backbone.config.apply_layernorm and isinstance(backbone.norm, torch.nn.LayerNorm), RECHECK
    assert isinstance(backbone.model.layer[0].layer_scale1.lambda1, torch.nn.Parameter), RECHECK
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, 64, 64)).feature_maps[-1]
    channel_mean = features.mean(dim=1)  # LayerNorm output: zero mean over channels (weight 1, bias 0)
    assert channel_mean.abs().max() < 1e-4, RECHECK


def test_upstream_eval_still_uses_precomputed_anchors(upstream_atto):
    # the 500 anchors of 320 px against the 2000 tokens of a 640 px input
    with pytest.raises(RuntimeError, match=r"size of tensor a \(500\) must match the size of tensor b \(2000\)"):
        with torch.no_grad():
            upstream_atto(torch.rand(1, 3, 640, 640))


def test_upstream_still_loses_the_shared_box_head(tmp_path, upstream_atto):
    with torch.no_grad():
        upstream_atto.model.decoder.bbox_embed[0].layers[-1].weight.fill_(0.5)
    upstream_atto.save_pretrained(tmp_path)
    reloaded = Deimv2ForObjectDetection.from_pretrained(tmp_path)
    assert reloaded.model.decoder.bbox_embed[0].layers[-1].weight.abs().sum() == 0, RECHECK


def test_upstream_score_head_rule_still_overridden(upstream_atto):
    keys = Deimv2ForObjectDetection._tied_weights_keys.fget(upstream_atto)
    assert r"class_embed.(?![0])\d+" in keys, RECHECK  # the rule our tied keys leave out
    heads = upstream_atto.model.decoder.class_embed
    assert heads[1].weight is not heads[0].weight, RECHECK
