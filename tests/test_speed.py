"""The speed options of the training step (issue 10, item 4) change no number, or only within a stated tolerance.

scripts/bench_step.py measures them; these tests pin what each one does to the results.
"""

from __future__ import annotations

import pytest
import torch
from test_loss import LOSS_CASES, _criterion_from_json, _load
from transformers.loss.loss_for_object_detection import box_iou, generalized_box_iou

from tfg_mm import detector
from tfg_mm import loss as tfg_loss
from tfg_mm.config import load_params
from tfg_mm.data import CocoDetection, collate
from tfg_mm.train import build_optimizer, optimizer_kernel_kwargs


def _batch(root, n: int = 4) -> tuple[dict, int]:
    ds = CocoDetection(root, "instances_train.json", "images", image_size=160, train=True, augment=False)
    return collate([ds[i] for i in range(n)]), len(ds.categories)


def test_optimizer_impl_maps_to_torch_switches():
    assert optimizer_kernel_kwargs("for-loop") == {"foreach": False}
    assert optimizer_kernel_kwargs("foreach") == {"foreach": True}
    assert optimizer_kernel_kwargs("fused") == {"fused": True}
    assert optimizer_kernel_kwargs("auto") == {"foreach": True}
    with pytest.raises(ValueError):
        load_params({"optimizer_impl": "turbo"})


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["AdamW", "SGD"])
def test_foreach_optimizer_is_bit_identical_to_the_for_loop(tiny_dataset, optimizer):
    """`optimizer_impl: foreach` (the default) gives the same weights as torch's one-tensor-at-a-time loop, bit
    for bit, after two real DEIMv2 training steps: so it changes no number of any run."""
    batch, num_classes = _batch(tiny_dataset)
    weights = {}
    for impl in ("for-loop", "foreach"):
        torch.manual_seed(0)
        model = detector.build("atto", num_classes, image_size=160, seed=0)
        model.train()
        params = load_params({"optimizer": optimizer, "optimizer_impl": impl, "lr": 1e-3})
        groups = [{"params": list(model.parameters()), "lr": 1e-3}]
        opt = build_optimizer(groups, params)
        assert opt.defaults["foreach"] is (impl == "foreach")
        torch.manual_seed(1)
        for _ in range(2):
            out = model(batch["pixel_values"], labels=batch["labels"], epoch=1)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
        weights[impl] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    different = [k for k in weights["for-loop"] if not torch.equal(weights["for-loop"][k], weights["foreach"][k])]
    assert different == []


# ----------------------------------------------------------------------------------------------
# The loss: paired IoU / GIoU instead of the diagonal of an N x N matrix
# ----------------------------------------------------------------------------------------------
def _matrix_diag_iou(boxes1, boxes2):
    """The loss before the change: the diagonal of transformers' N x N matrix."""
    iou, union = box_iou(boxes1, boxes2)
    return torch.diag(iou), torch.diag(union)


def _matrix_diag_giou(boxes1, boxes2):
    return torch.diag(generalized_box_iou(boxes1, boxes2))


def _with_leaves(tree, leaves: dict):
    """The output dict with every floating tensor replaced by a leaf that requires grad (shared ones stay shared)."""
    if isinstance(tree, dict):
        return {k: _with_leaves(v, leaves) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_with_leaves(v, leaves) for v in tree]
    if isinstance(tree, torch.Tensor) and tree.is_floating_point():
        if id(tree) not in leaves:
            leaves[id(tree)] = tree.detach().clone().requires_grad_(True)
        return leaves[id(tree)]
    return tree


def _terms_and_grads(case: str):
    outputs, targets, settings, _, _ = _load(case)
    leaves: dict = {}
    outputs = _with_leaves(outputs, leaves)
    terms = _criterion_from_json(settings)(outputs, targets, epoch=settings["epoch"])
    grads = torch.autograd.grad(sum(terms.values()), list(leaves.values()), allow_unused=True)
    return terms, grads


@pytest.mark.parametrize("case", LOSS_CASES)
def test_paired_iou_loss_is_bit_identical_to_the_matrix_diagonal(case, monkeypatch):
    """Every term and the gradient of the total w.r.t. every output tensor are bit-identical to the loss before
    the change (``diag`` of transformers' N x N ``box_iou`` / ``generalized_box_iou``), on the official fixtures
    of atto, n and s with and without denoising (n and s have the FGL / DDF terms, which use the IoU too)."""
    new_terms, new_grads = _terms_and_grads(case)
    monkeypatch.setattr(tfg_loss, "paired_box_iou", _matrix_diag_iou)
    monkeypatch.setattr(tfg_loss, "paired_generalized_box_iou", _matrix_diag_giou)
    old_terms, old_grads = _terms_and_grads(case)
    assert list(new_terms) == list(old_terms)
    assert [k for k in new_terms if not torch.equal(new_terms[k], old_terms[k])] == []
    assert len(new_grads) == len(old_grads) > 0
    for new, old in zip(new_grads, old_grads):
        assert (new is None) == (old is None)
        if new is not None:
            assert torch.equal(new, old)


def test_paired_iou_is_the_diagonal_on_hand_made_boxes():
    """Known answers: identical boxes IoU 1, disjoint 0, half overlap 1/3; GIoU of disjoint boxes below 0."""
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 1.0]])
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0], [1.0, 0.0, 3.0, 1.0]])
    iou, union = tfg_loss.paired_box_iou(a, b)
    assert iou.tolist() == pytest.approx([1.0, 0.0, 1.0 / 3.0])
    assert union.tolist() == pytest.approx([1.0, 2.0, 3.0])
    giou = tfg_loss.paired_generalized_box_iou(a, b)
    assert giou.tolist() == pytest.approx([1.0, -1.0 / 3.0, 1.0 / 3.0])
    assert torch.equal(iou, _matrix_diag_iou(a, b)[0])
    assert torch.equal(giou, _matrix_diag_giou(a, b))


@pytest.mark.slow
def test_eager_and_sdpa_attention_give_the_same_loss_and_gradients_to_rounding(tiny_dataset, tiny_params):
    """`attn_implementation`: both run the same attention; the train-mode loss agrees to 1e-5 (relative) and so do
    the gradients (1e-4 of the largest); the parameter reaches the built model through the run's overrides."""
    batch, num_classes = _batch(tiny_dataset)
    results = {}
    for impl in ("sdpa", "eager"):
        params = tiny_params(attn_implementation=impl)
        overrides = detector.run_config_overrides(params)
        model = detector.build("atto", num_classes, image_size=160, seed=0, **overrides)
        assert model.config._attn_implementation == impl
        model.train()
        torch.manual_seed(1)
        out = model(batch["pixel_values"], labels=batch["labels"], epoch=1)
        out.loss.backward()
        results[impl] = (
            float(out.loss),
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]),
        )
    (loss_a, grad_a), (loss_b, grad_b) = results["sdpa"], results["eager"]
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert (grad_a - grad_b).abs().max() <= 1e-4 * grad_a.abs().max()
