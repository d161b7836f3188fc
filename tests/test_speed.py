"""The speed options of the training step (issue 10, item 4) change no number, or only within a stated tolerance.

scripts/bench_step.py measures them; these tests pin what each one does to the results.
"""

from __future__ import annotations

import pytest
import torch
from test_loss import LOSS_CASES, _criterion_from_json, _load
from transformers.loss.loss_for_object_detection import box_iou, generalized_box_iou

from tfg_mm import detector
from tfg_mm.config import load_params
from tfg_mm.data import CocoDetection, collate
from tfg_mm.detector import loss as tfg_loss
from tfg_mm.detector import speed
from tfg_mm.training import loop as train_mod
from tfg_mm.training.baseline import BaselineTask
from tfg_mm.training.optim import EMA, build_optimizer, ema_multi_avg_fn, optimizer_kernel_kwargs


def _batch(root, n: int = 4) -> tuple[dict, int]:
    ds = CocoDetection(root, "instances_train.json", "images", image_size=160, train=True, augment=False)
    return collate([ds[i] for i in range(n)]), len(ds.categories)


def test_optimizer_impl_maps_to_torch_switches():
    assert optimizer_kernel_kwargs("for-loop") == {"foreach": False}
    assert optimizer_kernel_kwargs("foreach") == {"foreach": True}
    assert optimizer_kernel_kwargs("fused") == {"fused": True}
    assert optimizer_kernel_kwargs("auto") == {"fused": True}
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
            loss = _training_loss(model, batch["pixel_values"], batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        weights[impl] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    different = [k for k in weights["for-loop"] if not torch.equal(weights["for-loop"][k], weights["foreach"][k])]
    assert different == []


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["AdamW", "SGD"])
def test_fused_optimizer_equals_the_for_loop_to_rounding(tiny_dataset, optimizer):
    """`optimizer_impl: fused` (what `auto` means): the same update in one kernel. From the same real DEIMv2
    gradients every updated weight is within 1e-6 of torch's one-tensor-at-a-time loop (the arithmetic is only
    ordered differently). Over several steps the two drift apart like any rounding change: Adam turns a gradient
    that differs in its last bits near zero into a full step of either sign."""
    batch, num_classes = _batch(tiny_dataset)
    weights = {}
    for impl in ("for-loop", "auto"):
        model = detector.build("atto", num_classes, image_size=160, seed=0)
        model.train()
        params = load_params({"optimizer": optimizer, "optimizer_impl": impl, "lr": 1e-3})
        opt = build_optimizer([{"params": list(model.parameters()), "lr": 1e-3}], params)
        assert bool(opt.defaults["fused"]) is (impl == "auto")
        torch.manual_seed(1)
        loss = _training_loss(model, batch["pixel_values"], batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        weights[impl] = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    worst = max((weights["for-loop"][k] - weights["auto"][k]).abs().max().item() for k in weights["auto"])
    assert worst <= 1e-6


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
def test_every_attention_implementation_gives_the_same_loss_and_gradients_to_rounding(
    tiny_dataset, tiny_params, monkeypatch
):
    """`attn_implementation`: sdpa, eager and blocks run the same attention; the train-mode loss agrees to 1e-5
    (relative) and so do the gradients (1e-4 of the largest); the parameter reaches the built model through the
    run's overrides, and `blocks` really takes its block path on the real denoising mask."""
    batch, num_classes = _batch(tiny_dataset)
    results = {}
    layouts = []
    real_check = speed._check_layout
    monkeypatch.setattr(speed, "_check_layout", lambda mask, n: layouts.append(real_check(mask, n)) or layouts[-1])
    for impl in ("sdpa", "eager", "blocks"):
        params = tiny_params(attn_implementation=impl)
        overrides = detector.run_config_overrides(params)
        model = detector.build("atto", num_classes, image_size=160, seed=0, **overrides)
        assert model.config._attn_implementation == {"blocks": speed.BLOCKS}.get(impl, impl)
        model.train()
        torch.manual_seed(1)
        loss = _training_loss(model, batch["pixel_values"], batch["labels"])
        loss.backward()
        results[impl] = (
            loss.item(),
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]),
        )
    loss_a, grad_a = results["sdpa"]
    for impl in ("eager", "blocks"):
        loss_b, grad_b = results[impl]
        assert loss_b == pytest.approx(loss_a, rel=1e-5), impl
        assert (grad_a - grad_b).abs().max() <= 1e-4 * grad_a.abs().max(), impl
    # the blocks ran: one mask (checked once, then remembered for the other decoder layers), a denoising layout
    assert len(layouts) == 1 and layouts[0] is not None and layouts[0][0] % layouts[0][1] == 0


# ----------------------------------------------------------------------------------------------
# attn_implementation: blocks
# ----------------------------------------------------------------------------------------------
def _denoising_mask(boxes_per_image: list[int], num_queries: int = 30, num_denoising: int = 40):
    """The self-attention mask transformers builds for a training batch (its own function, random targets)."""
    from transformers.models.deimv2.modeling_deimv2 import get_contrastive_denoising_training_group

    torch.manual_seed(0)
    targets = [
        {"class_labels": torch.randint(0, 5, (n,)), "boxes": torch.rand(n, 4) * 0.5 + 0.25} for n in boxes_per_image
    ]
    embed = torch.nn.Embedding(6, 16, padding_idx=5)
    _, _, mask, meta = get_contrastive_denoising_training_group(targets, 5, num_queries, embed, num_denoising)
    return mask, meta


@pytest.mark.parametrize("boxes", [[1, 3, 2], [7], [2, 0, 5, 1]])
def test_denoising_layout_reads_transformers_masks(boxes):
    mask, meta = _denoising_mask(boxes)
    num_dn, num_queries = meta["dn_num_split"]
    layout = speed.denoising_layout(mask, num_dn + num_queries)
    assert layout == (num_dn, 2 * max(boxes))
    assert num_dn // layout[1] == meta["dn_num_group"]


def test_denoising_layout_refuses_every_other_mask():
    mask, meta = _denoising_mask([2, 3])
    length = mask.shape[0]
    assert speed.denoising_layout(None, length) is None
    assert speed.denoising_layout(mask, length + 1) is None  # not this attention's length
    assert speed.denoising_layout(torch.isneginf(mask), length) is None  # boolean
    assert speed.denoising_layout(mask[None, None], length) is None  # per-batch / per-head
    for i, j in [(0, length - 1), (length - 1, length - 1), (3, 0)]:
        other = mask.clone()
        other[i, j] = float("-inf") if other[i, j] == 0 else 0.0  # one key hidden or shown more
        assert speed.denoising_layout(other, length) is None, (i, j)
    biased = mask.clone()
    biased[0, 0] = 0.5  # an additive bias is not a visibility mask
    assert speed.denoising_layout(biased, length) is None
    assert speed.denoising_layout(torch.zeros(length, length), length) is None  # no denoising queries


def test_a_refused_mask_goes_to_sdpa_unchanged():
    mask, _ = _denoising_mask([2, 3])
    mask = mask.clone()
    mask[0, -1] = float("-inf")
    q, k, v = (torch.randn(2, 4, mask.shape[0], 8) for _ in range(3))
    out, weights = speed.denoising_block_attention(torch.nn.Module(), q, k, v, mask)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    assert weights is None and torch.equal(out, expected)


@pytest.mark.parametrize("boxes", [[1, 3, 2], [7], [2, 0, 5, 1]])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_block_attention_equals_masked_sdpa(boxes, dtype, tolerance):
    """Outputs and the gradients of query, key and value agree with torch's masked SDPA: to 1e-5 in float32,
    to 1e-12 in float64 (the same computation, summed in another order)."""
    mask, meta = _denoising_mask(boxes)
    mask = mask.to(dtype)
    length = mask.shape[0]
    torch.manual_seed(1)
    qkv = [torch.randn(3, 4, length, 8, dtype=dtype, requires_grad=True) for _ in range(3)]
    grad_out = torch.randn(3, length, 4, 8, dtype=dtype)
    out_blocks, _ = speed.denoising_block_attention(torch.nn.Module(), *qkv, mask, scaling=0.3)
    grads_blocks = torch.autograd.grad(out_blocks, qkv, grad_out)
    out_sdpa = torch.nn.functional.scaled_dot_product_attention(*qkv, attn_mask=mask, scale=0.3).transpose(1, 2)
    grads_sdpa = torch.autograd.grad(out_sdpa, qkv, grad_out)
    assert (out_blocks - out_sdpa).abs().max() < tolerance
    for a, b in zip(grads_blocks, grads_sdpa):
        assert (a - b).abs().max() < tolerance


# ----------------------------------------------------------------------------------------------
# the stem's max pooling, the EMA update, compile
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kernel", "stride", "padding", "ceil"), [(2, 1, 0, True), (3, 2, 1, False)])
def test_channels_last_max_pool_is_bit_identical(kernel, stride, padding, ceil):
    """Values and gradients equal bit for bit, ties included (a flat region: the gradient goes to the same first
    maximum of each window); the input's memory format is kept."""
    torch.manual_seed(0)
    x = torch.relu(torch.randn(2, 5, 17, 19))
    x[:, :, 3:9, 4:10] = 0.75
    x.requires_grad_(True)
    plain = torch.nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil)
    fast = speed.ChannelsLastMaxPool2d(kernel, stride, padding, ceil_mode=ceil)
    a, b = plain(x), fast(x)
    assert torch.equal(a, b) and b.is_contiguous()
    g = torch.randn_like(a)
    assert torch.equal(torch.autograd.grad(a, x, g)[0], torch.autograd.grad(b, x, g)[0])
    cl = x.detach().contiguous(memory_format=torch.channels_last)
    assert fast(cl).is_contiguous(memory_format=torch.channels_last)


def test_the_detector_uses_the_fast_max_pool():
    model = detector.build("atto", 3, image_size=160, seed=0)
    pools = [m for m in model.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert pools and all(type(m) is speed.ChannelsLastMaxPool2d for m in pools)
    assert not any("pool" in k for k in model.state_dict())


def test_lean_ema_update_is_bit_identical_to_torch():
    model = detector.build("atto", 3, image_size=160, seed=0)
    fn = ema_multi_avg_fn(0.99, 5)
    ours = EMA(model, multi_avg_fn=fn, use_buffers=True)
    theirs = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=fn, use_buffers=True)
    torch.manual_seed(0)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
            for b in model.buffers():
                if b.is_floating_point():
                    b.mul_(1.01)
                else:
                    b.add_(1)
        ours.update_parameters(model)
        theirs.update_parameters(model)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert int(a["n_averaged"]) == 3


def _training_loss(model, pixels: torch.Tensor, labels: list[dict], epoch: int = 1) -> torch.Tensor:
    """The detector's official training loss on one batch, by the baseline task's route (its criterion)."""
    return BaselineTask(model, []).loss(model, {"pixel_values": pixels, "labels": labels}, epoch)[0]


def _float64_step(model, pixels, labels) -> tuple[float, torch.Tensor]:
    """One float64 training forward + backward (seeded denoising): the loss and every gradient, flattened."""
    labels = [
        {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in t.items()} for t in labels
    ]
    torch.manual_seed(1)
    loss = _training_loss(model, pixels.double(), labels)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _assert_same_float64_step(a: tuple[float, torch.Tensor], b: tuple[float, torch.Tensor]) -> None:
    assert b[0] == pytest.approx(a[0], rel=1e-9)
    assert (a[1] - b[1]).abs().max() <= 1e-9 * a[1].abs().max()


@pytest.mark.slow
def test_compile_backbone_computes_the_eager_step(tiny_dataset):
    """`compile: backbone`: the backbone and the encoder are compiled in place (same state-dict keys), the decoder
    is not. In float64 a training step's loss and gradients equal the eager model's to 1e-9 (in float32 they
    agree to rounding, which the deep network and the loss amplify to about 1e-3 of the largest gradient)."""
    batch, num_classes = _batch(tiny_dataset, n=2)
    results = []
    for compile_ in (False, True):
        model = detector.build("atto", num_classes, image_size=160, seed=0).double().train()
        keys = model.state_dict().keys()
        if compile_:
            assert speed.compile_static_parts(model) == 1
            inner = model.model
            assert inner.conv_encoder._compiled_call_impl is not None
            assert inner.encoder._compiled_call_impl is not None and inner.decoder._compiled_call_impl is None
            assert model.state_dict().keys() == keys
        results.append(_float64_step(model, batch["pixel_values"], batch["labels"]))
    _assert_same_float64_step(*results)


def test_compile_is_applied_after_the_ema_copy(tiny_params, tmp_path, monkeypatch):
    """The loop compiles only with `compile: backbone`, and after the EMA's deep copy (a copy of a compiled module
    would run the original's forward)."""
    from tfg_mm.training import loop as train
    from tfg_mm.training.baseline import run_baseline

    events = []
    make_ema = train.Trainer.make_ema
    monkeypatch.setattr(train.Trainer, "make_ema", lambda self: (events.append("ema"), make_ema(self))[1])
    monkeypatch.setattr(train, "compile_static_parts", lambda model: events.append("compile") or 1)
    run_baseline(tiny_params(epochs=1, ema=True, max_steps_per_epoch=1), progress=False)
    assert events == ["ema"]
    events.clear()
    run_baseline(
        tiny_params(epochs=1, ema=True, max_steps_per_epoch=1, compile="backbone", run_dir=str(tmp_path / "c")),
        progress=False,
    )
    assert events == ["ema", "compile"]


# ----------------------------------------------------------------------------------------------
# memory_format: channels-last training images
# ----------------------------------------------------------------------------------------------
def test_memory_format_choice():
    assert train_mod.channels_last_images("auto", "cpu") is True
    assert train_mod.channels_last_images("auto", "cuda:0") is False  # not measured on a GPU: transformers' way
    assert train_mod.channels_last_images("channels_last", "cuda") is True
    assert train_mod.channels_last_images("contiguous", "cpu") is False
    with pytest.raises(ValueError):
        load_params({"memory_format": "nhwc"})


def test_channels_last_images_give_the_same_step(tiny_dataset):
    """Channels-last training images: the same step in float64 to 1e-9 (in float32 the convolutions' other
    summation order is amplified by the deep network to about 1 % of the largest gradient, like `compile`)."""
    batch, num_classes = _batch(tiny_dataset, n=2)
    results = []
    for channels_last in (False, True):
        model = detector.build("atto", num_classes, image_size=160, seed=0).double().train()
        pixels = train_mod._to_device(batch, "cpu", channels_last)["pixel_values"]
        assert pixels.is_contiguous(memory_format=torch.channels_last) is channels_last
        results.append(_float64_step(model, pixels, batch["labels"]))
    _assert_same_float64_step(*results)


def test_the_loop_trains_on_channels_last_images_and_evaluates_contiguous(tiny_params, tmp_path, monkeypatch):
    from tfg_mm.training import baseline

    seen = {"train": [], "eval": []}
    loss = baseline.BaselineTask.loss

    def recording_loss(self, model, batch, epoch):
        seen["train"].append(batch["pixel_values"].is_contiguous(memory_format=torch.channels_last))
        return loss(self, model, batch, epoch)

    predict_fn = baseline.BaselineTask.predict_fn

    def recording_predict_fn(self, model):
        fn = predict_fn(self, model)

        def wrapped(pixel_values):
            seen["eval"].append(not pixel_values.is_contiguous(memory_format=torch.channels_last))
            return fn(pixel_values)

        return wrapped

    monkeypatch.setattr(baseline.BaselineTask, "loss", recording_loss)
    monkeypatch.setattr(baseline.BaselineTask, "predict_fn", recording_predict_fn)
    baseline.run_baseline(tiny_params(epochs=1, max_steps_per_epoch=2), progress=False)
    assert seen["train"] == [True, True]
    assert seen["eval"] and all(seen["eval"])
    seen["train"].clear()
    baseline.run_baseline(
        tiny_params(epochs=1, max_steps_per_epoch=1, memory_format="contiguous", run_dir=str(tmp_path / "c")),
        progress=False,
    )
    assert seen["train"] == [False]
