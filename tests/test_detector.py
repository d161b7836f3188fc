"""The corrected DEIMv2: presets, each correction individually, forward contract, freezing, loading."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from tfg_mm.detector import (
    CORRECTIONS,
    TfgDeimv2ForObjectDetection,
    build,
    freeze,
    from_pretrained,
    preset_config,
    trainable_parameter_summary,
    unfreeze,
)
from tfg_mm.detector.loss import compute_loss
from tfg_mm.errors import CheckpointError, ConfigError, OfflineError
from tfg_mm.training.baseline import BaselineTask

PIXELS = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(0))


def test_preset_config_rejects_bad_input():
    with pytest.raises(ConfigError, match="unknown"):
        preset_config("tiny", 3)
    with pytest.raises(ConfigError, match="id2label"):
        preset_config("atto", 3, id2label={0: "a"})
    with pytest.raises(ConfigError, match="not TfgDeimv2Config fields"):
        preset_config("atto", 3, hidden_dimension=3)
    with pytest.raises(ConfigError, match="eval_size"):
        preset_config("atto", 3, eval_size=[320, 320])
    with pytest.raises(ConfigError, match="multiple of 32"):
        preset_config("atto", 3, image_size=300)


def _outputs(preset: str, disabled: list[str], pixels=PIXELS, **overrides):
    model = build(preset, 3, image_size=320, seed=0, disabled_corrections=disabled, **overrides).eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # perturb so that zero-initialised heads and gates matter
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        return model(pixels)


@pytest.mark.parametrize(
    "preset, correction",
    [
        ("atto", "enc_output_identity"),
        ("atto", "silu_box_and_lqe_mlps"),
        ("s", "dinov3_raw_last_stage"),
        ("s", "vit_tiny_no_layer_scale"),
    ],
)
def test_each_module_correction_changes_the_outputs(preset, correction):
    corrected = _outputs(preset, [])
    without = _outputs(preset, [correction])
    assert corrected.logits.shape == without.logits.shape
    assert not torch.allclose(corrected.logits, without.logits, atol=1e-5)


@pytest.mark.parametrize("disabled, expected_calls", [([], 1), (["query_pos_once"], 3)])
def test_query_position_embedding_is_computed_once_per_forward(disabled, expected_calls):
    model = build("atto", 3, image_size=320, seed=0, disabled_corrections=disabled).eval()
    calls = []
    model.model.decoder.query_pos_head.layers[0].register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model(PIXELS)
        assert len(calls) == expected_calls
        model(PIXELS)  # the cache is per forward, not kept across calls
    assert len(calls) == 2 * expected_calls
    assert model.model.decoder.query_pos_head.__dict__.get("_cached") is None


def test_aifi_correction_keeps_the_positional_embedding_in_eval():
    corrected = _outputs("n", [])
    with_eval_size = _outputs("n", ["aifi_pos_embed_in_eval"], eval_size=[320, 320])
    assert not torch.allclose(corrected.logits, with_eval_size.logits, atol=1e-5)


def test_anchors_follow_the_eval_input_size():
    model = build("atto", 3, image_size=320, seed=0).eval()
    big = torch.rand(1, 3, 384, 384)
    with torch.no_grad():
        out = model(big)
        model.train()
        reference = model.model(big)  # training recomputes anchors from the input size
        model.eval()
    assert out.logits.shape == (1, 100, 3)
    assert torch.equal(model.model.anchors, model.model.generate_anchors(((24, 24), (12, 12)))[0])
    assert reference.intermediate_logits.shape[-1] == 3
    with pytest.raises(ConfigError, match="multiples of 32"):
        model(torch.rand(1, 3, 330, 330))
    plain = build("atto", 3, image_size=320, seed=0, disabled_corrections=["anchors_at_input_size"]).eval()
    with pytest.raises(RuntimeError, match=r"size of tensor a \(500\) must match the size of tensor b \(720\)"):
        with torch.no_grad():  # 500 anchors of 320 px against the 720 tokens of a 384 px input
            plain(big)


def test_forward_builds_denoising_queries_and_computes_no_loss():
    """The detector is a model: its forward never computes a loss (the task does, with the criterion it is given)."""
    model = build("atto", 3, image_size=320, seed=0).train()
    labels = [
        {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]])}
    ]
    out = model(PIXELS, labels=labels)
    assert out.loss is None
    denoising, queries = out.denoising_meta_values["dn_num_split"]
    assert queries == 100 and denoising > 0
    assert out.intermediate_logits.shape[1] == model.config.decoder_layers + 1


def test_the_baseline_task_computes_the_official_criterion_it_was_built_with():
    """One route from a run's parameters to its loss: the task's criterion is built once from the model's config
    (the preset's criterion and the run's overrides), and its loss is compute_loss with it."""
    model = build("atto", 3, image_size=320, seed=0, matcher_change_epoch=2).train()
    task = BaselineTask(model, ["a", "b", "c"])
    assert task.criterion.losses == ["mal", "boxes"] and task.criterion.matcher.change_epoch == 2  # atto, override
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    torch.manual_seed(0)
    loss, terms = task.loss(model, {"pixel_values": PIXELS, "labels": labels}, epoch=3)
    torch.manual_seed(0)  # the same denoising queries
    expected, expected_terms = compute_loss(model(PIXELS, labels=labels), labels, model.config, task.criterion, 3)
    assert torch.equal(loss, expected) and terms == expected_terms
    assert "loss_mal_dn_0" in terms and not any("fgl" in name for name in terms)  # atto: mal + boxes only


def test_fidelity_transformers_is_the_plain_class():
    plain = build("atto", 3, image_size=320, fidelity="transformers")
    assert type(plain).__name__ == "Deimv2ForObjectDetection"
    assert not isinstance(plain, TfgDeimv2ForObjectDetection)
    assert set(CORRECTIONS) >= {"enc_output_identity", "lossless_shared_box_head"}


def test_freeze_groups_and_summary():
    model = build("atto", 3, image_size=320, seed=0)
    total = trainable_parameter_summary(model)
    assert total["total"] == sum(p.numel() for p in model.parameters())
    assert total["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    freeze(model, ["backbone", "encoder", "decoder"])
    summary = trainable_parameter_summary(model)
    assert summary["backbone"] == summary["encoder"] == summary["decoder"] == 0 and summary["heads"] > 0
    assert not any(p.requires_grad for p in model.model.conv_encoder.parameters())
    assert all(p.requires_grad for p in model.model.decoder.class_embed.parameters())
    assert all(p.requires_grad for p in model.class_embed.parameters())  # tied alias = head in forward
    freeze(model, ["heads"])
    assert not any(p.requires_grad for p in model.class_embed.parameters())
    assert not any(p.requires_grad for p in model.model.enc_score_head.parameters())
    unfreeze(model, ["all"])
    assert trainable_parameter_summary(model)["trainable"] == total["total"]  # up / reg_scale included
    with pytest.raises(ConfigError):
        freeze(model, ["neck"])


def test_from_pretrained_converts_a_transformers_checkpoint(tmp_path):
    plain = build("atto", 3, image_size=320, seed=0, fidelity="transformers")
    plain.config.eval_size = [320, 320]
    plain.save_pretrained(tmp_path)
    model = from_pretrained(str(tmp_path))
    assert type(model) is TfgDeimv2ForObjectDetection
    assert model.config.eval_size is None and model.config.anchor_image_size == [320, 320]
    assert isinstance(model.model.enc_output, torch.nn.Identity)
    assert torch.equal(model.model.enc_score_head.weight, plain.model.enc_score_head.weight)
    # the criterion of the size its architecture is (transformers' config has none of it, gamma 2.0)
    atto = preset_config("atto", 3)
    assert model.config.preset == "atto"
    for name in ("criterion_losses", "use_dense_one_to_one", "focal_loss_gamma", "matcher_change_epoch"):
        assert getattr(model.config, name) == getattr(atto, name), name


def test_from_pretrained_refuses_an_architecture_of_no_official_size(tmp_path):
    plain = build("atto", 3, image_size=320, seed=0, fidelity="transformers", decoder_layers=2)
    plain.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no official DEIMv2 size"):
        from_pretrained(str(tmp_path))


def test_from_pretrained_offline_says_how_to_use_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineError, match="folder") as info:
        from_pretrained("Intellindust/DEIMv2_HGNetv2_ATTO_COCO_not_cached")
    # the command named is the one huggingface_hub installs (`huggingface-cli` is gone since 1.0)
    assert "`hf download Intellindust/DEIMv2_HGNetv2_ATTO_COCO_not_cached --local-dir <folder>`" in str(info.value)
    with pytest.raises(CheckpointError):
        from_pretrained(str(Path(__file__).parent))  # a folder without config.json
