"""ONNX export of the detector and of the phase-2 fused model, with the post-processing inside the graph.

The exported graph takes what a deployment has at hand and returns final detections:

* inputs: ``images`` float32 ``[B, 3, S, S]`` in [0, 1] (already resized to the model's square size ``S``; no mean /
  std, as the data pipeline), ``orig_sizes`` int64 ``[B, 2]`` as ``(height, width)``;
* outputs: ``boxes`` float32 ``[B, K, 4]`` xyxy in original-image pixels, ``scores`` float32 ``[B, K]`` (sigmoid),
  ``labels`` int64 ``[B, K]`` (contiguous 0..C-1), sorted by decreasing score; ``K = min(top_k, Q * C)``.

The post-processing is :func:`tfg_mm.evaluation.coco.postprocess` written for a whole batch (:class:`DeployModel`);
:func:`compare_outputs` checks the file against that function on the PyTorch model. A phase-2 model's class text
embeddings are buffers, so they become constants of the graph: the file needs no text encoder.

Exporter: torch's TorchScript exporter (``dynamo=False``). On torch 2.14 the dynamo exporter stops at transformers'
``torch_compilable_check`` (``aten._is_all_true``) and, with those checks disabled
(``TRANSFORMERS_DISABLE_TORCH_CHECK=1``), writes a graph ONNX Runtime refuses (a node input no node produces); the
TorchScript exporter writes atto in about a second and ONNX Runtime matches PyTorch to float rounding. The image size
is fixed in the graph (the eval anchors are constants of size ``S``); the batch is dynamic unless ``batch`` is given.

Two traps made a first export look wrong, neither of them in the graph:

* a wrapper module built around the model starts in ``train()`` mode, and the exporter restores the *wrapper's* mode
  after exporting, recursively: the wrapped detector came back in training mode, so PyTorch — not ONNX Runtime —
  computed something else (anchors recomputed, BatchNorm on batch statistics). :func:`export_onnx` exports in
  ``eval()`` and puts back every module's own flag (:func:`deploy_mode`);
* a randomly initialised detector has near-zero features (about 1e-12 after the HGNetV2 backbone), so every encoder
  token scores the prior bias up to float noise and the query selection's top-k is a tie that any other kernel
  breaks differently. Checks need a model whose scores are not all tied (a trained one, or BatchNorm statistics
  measured on a batch: tests/test_export.py).

``onnx`` and ``onnxruntime`` are optional: the functions that need them import them and say how to install them.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tfg_mm import detector as det
from tfg_mm.data.coco import CocoDetection, collate
from tfg_mm.errors import ConfigError, TfgError
from tfg_mm.evaluation.coco import coco_evaluate, evaluate, postprocess, to_coco_detections, top_detections
from tfg_mm.io import atomic_write_bytes, atomic_write_json
from tfg_mm.paths import RunPaths, portable_text
from tfg_mm.training import contract
from tfg_mm.training.identity import _version
from tfg_mm.training.judge import checkpoint_class_names, load_checkpoint_model, resolve_target

log = logging.getLogger(__name__)

#: The graph's input and output names, in order.
INPUT_NAMES = ("images", "orig_sizes")
OUTPUT_NAMES = ("boxes", "scores", "labels")
#: The opset written by default; the deformable attention's ``grid_sample`` needs :data:`MIN_OPSET` or later.
DEFAULT_OPSET = 17
MIN_OPSET = 16
#: Largest differences :func:`compare_outputs` accepts between ONNX Runtime and PyTorch.
TOLERANCES = {"boxes_normalised": 1e-3, "scores": 1e-4}
INSTALL = "pip install onnx onnxruntime"


def _require(module: str) -> Any:
    """The optional back-end ``module`` (``onnx`` / ``onnxruntime``), or a :class:`TfgError` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise TfgError(
            f"ONNX export and ONNX Runtime inference need the optional package `{module}`, which is not installed "
            f"({error}). Fix: `{INSTALL}` in the project's environment."
        ) from None


# -- the deployed module --------------------------------------------------------------------------------------
class DeployModel(nn.Module):
    """A detector (``out.logits`` / ``out.pred_boxes``) or a :class:`~tfg_mm.multimodal.model.MultimodalDetector`
    (its ``predict``: the fused logits) followed by the batched post-processing of
    :func:`tfg_mm.evaluation.coco.postprocess`.

    ``forward(images, orig_sizes) -> (boxes, scores, labels)``; see the module docstring for the shapes. Put it in
    ``eval()`` before calling it (a new module starts in training mode); :func:`export_onnx` does.
    """

    def __init__(self, model: nn.Module, top_k: int = 300):
        super().__init__()
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"top_k={top_k!r}: give the number of detections kept per image, an integer >= 1.")
        self.model = model
        self.top_k = top_k

    def raw_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits [B, Q, C], pred_boxes [B, Q, 4])`` of the wrapped model, as evaluation reads them."""
        predict = getattr(self.model, "predict", None)
        if callable(predict):
            return predict(images)
        out = self.model(images)
        return out.logits, out.pred_boxes

    def forward(self, images: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits, pred_boxes = self.raw_outputs(images)
        return top_detections(logits, pred_boxes, orig_sizes, self.top_k)


@contextlib.contextmanager
def deploy_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in ``eval()`` inside the block; afterwards exactly as it was.

    Put back: every module's own training flag (a frozen detector inside a training fusion keeps its mode), and the
    detector state an input of another size changes in eval (correction ``anchors_at_input_size``: the anchors, their
    valid mask, the size they are for and the sizes already warned about) and the query-position cache of
    ``query_pos_once``. The attention implementation is not touched: evaluation runs ``sdpa`` under all three
    (:func:`tfg_mm.detector.set_attn_implementation`), so the graph is the same.
    """
    flags = [(module, module.training) for module in model.modules()]
    anchors = [
        (module, module.model.anchors, module.model.valid_mask, module._anchors_hw, set(module._warned_anchor_sizes))
        for module in model.modules()
        if hasattr(module, "_anchors_hw") and hasattr(getattr(module, "model", None), "anchors")
    ]
    caches = [(module, module.__dict__.get("_cached")) for module in model.modules() if hasattr(module, "_cached")]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training
        for module, anchor, valid_mask, anchors_hw, warned in anchors:
            module.model.anchors, module.model.valid_mask = anchor, valid_mask
            module._anchors_hw = anchors_hw
            module._warned_anchor_sizes = warned
        for module, cached in caches:
            if cached is None:
                module.__dict__.pop("_cached", None)
            else:
                module._cached = cached


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _check_export_args(image_size: Any, batch: Any, top_k: Any, opset: Any) -> tuple[int, int | None, int]:
    """``(image_size, fixed batch or None for dynamic, opset)``, or a :class:`ConfigError` naming the argument."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size={image_size!r}: give the model's square input size in pixels, e.g. 640.")
    fixed: int | None = None
    if batch != "dynamic":
        try:
            fixed = int(batch)
        except (TypeError, ValueError):
            fixed = 0
        if isinstance(batch, bool) or fixed < 1 or str(fixed) != str(batch).strip():
            raise ConfigError(f"batch={batch!r}: give `dynamic` or a fixed batch size >= 1, e.g. 1.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k={top_k!r}: give the number of detections kept per image, an integer >= 1.")
    opset = DEFAULT_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ConfigError(
            f"opset={opset!r}: the deformable attention's grid_sample needs ONNX opset {MIN_OPSET} or later. "
            f"Fix: leave opset unset ({DEFAULT_OPSET}) or give an integer >= {MIN_OPSET}."
        )
    return image_size, fixed, opset


# -- export ---------------------------------------------------------------------------------------------------
def export_onnx(
    model: nn.Module,
    path: str | Path,
    image_size: int,
    batch: int | str = "dynamic",
    top_k: int = 300,
    opset: int | None = None,
) -> Path:
    """Export ``model`` (a detector or a ``MultimodalDetector``) with the post-processing to the ONNX file ``path``.

    ``image_size``: the square input size ``S`` fixed in the graph (the eval anchors are those of ``S``);
    ``batch``: ``"dynamic"`` (a batch axis of any size) or a fixed batch size; ``top_k``: detections kept per image,
    capped at ``Q * C`` as :func:`tfg_mm.evaluation.coco.postprocess` does; ``opset``: ONNX opset (default
    :data:`DEFAULT_OPSET`). The export runs in ``eval()`` and leaves ``model`` as it was (:func:`deploy_mode`);
    the exporter's warnings (tracer warnings on shape reads, deprecation notes) go to this module's DEBUG log, its
    errors are raised. The file is written atomically and checked with ``onnx.checker``; returns its path.
    """
    onnx = _require("onnx")
    size, fixed, opset = _check_export_args(image_size, batch, top_k, opset)
    path = Path(path)
    example_batch = fixed if fixed is not None else 2  # not 1: a batch of one could be traced as a squeeze
    device = _device(model)
    generator = torch.Generator().manual_seed(0)  # the caller's random stream is left alone
    images = torch.rand(example_batch, 3, size, size, generator=generator).to(device)
    orig_sizes = torch.tensor([[size, size]] * example_batch, dtype=torch.int64, device=device)
    axes = None if fixed is not None else {name: {0: "batch"} for name in (*INPUT_NAMES, *OUTPUT_NAMES)}
    buffer = io.BytesIO()
    started = time.perf_counter()
    with deploy_mode(model), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapper = DeployModel(model, top_k=top_k).eval()  # eval: the exporter restores the wrapper's mode recursively
        torch.onnx.export(
            wrapper,
            (images, orig_sizes),
            buffer,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            training=torch.onnx.TrainingMode.EVAL,
            dynamo=False,
        )
    for warning in caught:
        log.debug("ONNX exporter: %s: %s", warning.category.__name__, warning.message)
    data = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    atomic_write_bytes(path, data)
    log.info(
        "exported %s (%.1f MB, %s px, batch %s, top %d, opset %d) in %.1f s; %d exporter warnings in the DEBUG log",
        path,
        len(data) / 1e6,
        size,
        "dynamic" if fixed is None else fixed,
        top_k,
        opset,
        time.perf_counter() - started,
        len(caught),
    )
    return path


# -- ONNX Runtime ---------------------------------------------------------------------------------------------
def ort_session(onnx_path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None) -> Any:
    """An ONNX Runtime ``InferenceSession`` of an exported file.

    ``providers``: execution providers in order of preference (default ``["CPUExecutionProvider"]``); those this
    ONNX Runtime build lacks are skipped (logged). ``threads``: intra-op threads (default: ONNX Runtime's).
    """
    ort = _require("onnxruntime")
    path = Path(onnx_path)
    if not path.is_file():
        raise ConfigError(f"{path}: no ONNX file there. Fix: export it first (tfg_mm.deploy.export.export_onnx).")
    wanted = list(providers) if providers else ["CPUExecutionProvider"]
    available = set(ort.get_available_providers())
    chosen = [name for name in wanted if name in available]
    if len(chosen) < len(wanted):
        log.info("ONNX Runtime lacks %s; using %s", sorted(set(wanted) - available), chosen)
    if not chosen:
        raise ConfigError(
            f"ONNX Runtime providers {wanted}: none is available here (available: {sorted(available)}). "
            "Fix: use CPUExecutionProvider, or install the onnxruntime build of your accelerator."
        )
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no per-node placement warnings
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), sess_options=options, providers=chosen)


def ort_predict_fn(session: Any) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """``run(images, orig_sizes) -> (boxes, scores, labels)`` CPU tensors from a session of an exported file.

    ``images``: ``[B, 3, S, S]`` in [0, 1] at the file's size; ``orig_sizes``: ``[B, 2]`` as ``(height, width)``.
    The outputs are those of :class:`DeployModel` (``zip`` them per image for the ``postprocess`` layout).
    """
    inputs = session.get_inputs()
    names = tuple(entry.name for entry in inputs)
    if names != INPUT_NAMES:
        raise ConfigError(
            f"The ONNX file has inputs {list(names)}, not {list(INPUT_NAMES)}: it was not written by "
            "tfg_mm.deploy.export. Fix: export the run with `python -m tfg_mm export`."
        )
    expected = list(inputs[0].shape)  # [batch or a fixed size, 3, S, S]

    def run(images: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        shape = list(images.shape)
        fixed = [dim if isinstance(dim, int) else None for dim in expected]
        if len(shape) != 4 or any(want is not None and want != got for want, got in zip(fixed, shape)):
            raise ConfigError(
                f"ONNX input images of shape {shape}; the file takes {expected} (a named axis is free). Fix: resize "
                "the images to the exported size (or export at this size), and batch as exported."
            )
        sizes = torch.as_tensor(orig_sizes).to("cpu", torch.int64).reshape(-1, 2)
        if sizes.shape[0] != shape[0]:
            raise ConfigError(f"orig_sizes has {sizes.shape[0]} rows for {shape[0]} images; give one (h, w) per image.")
        feed = {
            "images": images.detach().to("cpu", torch.float32).contiguous().numpy(),
            "orig_sizes": sizes.contiguous().numpy(),
        }
        boxes, scores, labels = session.run(list(OUTPUT_NAMES), feed)
        return torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels)

    return run


# -- the check ------------------------------------------------------------------------------------------------
def _match_image(
    torch_side: tuple[Tensor, Tensor, Tensor], ort_side: tuple[Tensor, Tensor, Tensor], scale: Tensor, tol: float
) -> dict[str, float]:
    """Pair one image's PyTorch detections with ONNX Runtime's; the largest differences of the pairs.

    Two runtimes may order detections of (nearly) equal score differently, so each PyTorch detection is paired, one
    to one, with the ONNX Runtime detection of the same label whose score is within ``tol`` and whose box is
    closest. A detection without such a partner counts as a label mismatch, unless its score is within ``tol`` of
    the last kept one: a tie at the top-k cut-off, which either runtime may keep (counted apart). Scores are
    compared in rank order (both lists are sorted), which an exchange of tied detections does not change.
    """
    (boxes_t, scores_t, labels_t), (boxes_o, scores_o, labels_o) = torch_side, ort_side
    scores_t, scores_o = scores_t.double(), scores_o.double()
    score_diff = float((scores_t - scores_o).abs().max()) if len(scores_t) else 0.0
    px_t, px_o = boxes_t.double(), boxes_o.double()
    norm_t, norm_o = px_t / scale, px_o / scale
    candidates = ((scores_t[:, None] - scores_o[None, :]).abs() <= tol) & (labels_t[:, None] == labels_o[None, :])
    cost = (norm_t[:, None, :] - norm_o[None, :, :]).abs().amax(-1)
    cost = cost.masked_fill(~candidates | cost.isnan(), math.inf)
    cutoff = float(torch.maximum(scores_t[-1], scores_o[-1])) if len(scores_t) else 0.0
    used = torch.zeros(len(scores_o), dtype=torch.bool)
    box_norm = box_px = 0.0
    mismatched = tied = 0
    for i in range(len(scores_t)):
        row = cost[i].masked_fill(used, math.inf)
        j = int(row.argmin())
        if math.isfinite(float(row[j])):
            used[j] = True
            box_norm = max(box_norm, float(row[j]))
            box_px = max(box_px, float((px_t[i] - px_o[j]).abs().max()))
        elif float(scores_t[i]) <= cutoff + tol:
            tied += 1
        else:
            mismatched += 1
    return {"boxes_normalised": box_norm, "boxes_px": box_px, "scores": score_diff, "labels": mismatched, "tied": tied}


def compare_outputs(onnx_path: str | Path, model: nn.Module, images: Tensor, orig_sizes: Tensor, top_k: int) -> dict:
    """ONNX Runtime (CPU) on ``onnx_path`` against PyTorch on ``model`` + :func:`~tfg_mm.evaluation.coco.postprocess`.

    ``images`` ``[B, 3, S, S]`` in [0, 1] at the exported size, ``orig_sizes`` ``[B, 2]`` ``(height, width)``,
    ``top_k`` as exported. Detections are paired as :func:`_match_image` describes. Returns
    ``{"max_abs_diff": {"boxes_normalised", "boxes_px", "scores", "labels_mismatch"}, "tied_at_cutoff", "passed",
    "tolerances", "images", "top_k"}``: boxes normalised by the original ``(w, h, w, h)``; ``passed`` when the boxes
    and scores are within :data:`TOLERANCES`, no label mismatches and every value finite. ``model`` is left as it
    was (:func:`deploy_mode`).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ConfigError(f"images of shape {list(images.shape)}: give a batch [B, 3, S, S] in [0, 1].")
    sizes = torch.as_tensor(orig_sizes).to("cpu", torch.int64).reshape(-1, 2)
    boxes_o, scores_o, labels_o = ort_predict_fn(ort_session(onnx_path))(images, sizes)
    with deploy_mode(model), torch.no_grad():
        logits, pred_boxes = DeployModel(model, top_k=top_k).raw_outputs(images.to(_device(model)))
        reference = postprocess(logits.float().cpu(), pred_boxes.float().cpu(), sizes, top_k=top_k)
    if tuple(scores_o.shape) != (len(reference), len(reference[0]["scores"])):
        raise ConfigError(
            f"{onnx_path} gives {list(scores_o.shape)} scores for these images; PyTorch with top_k={top_k} gives "
            f"{[len(reference), len(reference[0]['scores'])]}. Fix: compare with the top_k the file was exported with."
        )
    worst = {"boxes_normalised": 0.0, "boxes_px": 0.0, "scores": 0.0, "labels": 0, "tied": 0}
    for index, result in enumerate(reference):
        height, width = sizes[index].double().tolist()
        scale = torch.tensor([width, height, width, height], dtype=torch.float64)
        image = _match_image(
            (result["boxes"], result["scores"], result["labels"]),
            (boxes_o[index], scores_o[index], labels_o[index]),
            scale,
            TOLERANCES["scores"],
        )
        for key in ("boxes_normalised", "boxes_px", "scores"):
            worst[key] = max(worst[key], image[key]) if math.isfinite(image[key]) else math.inf
        worst["labels"] += image["labels"]
        worst["tied"] += image["tied"]
    finite = all(torch.isfinite(t).all() for t in (boxes_o, scores_o))
    passed = bool(
        finite
        and worst["boxes_normalised"] <= TOLERANCES["boxes_normalised"]
        and worst["scores"] <= TOLERANCES["scores"]
        and worst["labels"] == 0
    )
    return {
        "max_abs_diff": {
            "boxes_normalised": worst["boxes_normalised"],
            "boxes_px": worst["boxes_px"],
            "scores": worst["scores"],
            "labels_mismatch": int(worst["labels"]),
        },
        "tied_at_cutoff": int(worst["tied"]),
        "passed": passed,
        "tolerances": dict(TOLERANCES),
        "images": len(reference),
        "top_k": int(scores_o.shape[1]),
    }


# -- python -m tfg_mm export ----------------------------------------------------------------------------------
#: The run's exported files, relative to its folder.
EXPORT_DIR = "export"
ONNX_FILE = "model.onnx"
EXPORT_RECORD = "export.json"
#: Largest |mAP(ONNX Runtime) − mAP(PyTorch)| on the validation split that the check accepts.
MAP_TOLERANCE = 1e-4
#: Validation images the output comparison runs on.
CHECK_IMAGES = 8


def _val_split(params, image_size: int):
    """The run's validation split at the exported size (a :class:`CocoDetection`), or None when it is not there."""
    root = RunPaths.of(params).dataset
    if not (root / params.val_json).is_file():
        return None
    return CocoDetection(
        root, root / params.val_json, params.images_dir, image_size=image_size, train=False, augment=False
    )


def _map_check(onnx_path: Path, predict_fn, dataset, top_k: int, fixed: int | None) -> dict:
    """mAP / mAP50 on the validation split through PyTorch (the project's evaluation) and through ONNX Runtime."""
    batch = fixed or 8
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, collate_fn=collate)
    with torch.no_grad():
        torch_metrics, _ = evaluate(predict_fn, loader, dataset.coco, dataset.categories, dataset.cat_ids, top_k=top_k)
    run = ort_predict_fn(ort_session(onnx_path))
    results, image_ids = [], []
    for item in loader:
        images, sizes = item["pixel_values"], torch.stack([t["orig_size"] for t in item["labels"]])
        n = images.shape[0]
        if fixed is not None and n < fixed:  # a fixed-batch file: pad the last batch with copies, drop their outputs
            images = torch.cat([images, images[-1:].expand(fixed - n, -1, -1, -1)])
            sizes = torch.cat([sizes, sizes[-1:].expand(fixed - n, -1)])
        boxes, scores, labels = run(images, sizes)
        results += [{"boxes": b, "scores": s, "labels": c} for b, s, c in zip(boxes[:n], scores[:n], labels[:n])]
        image_ids += [t["image_id"] for t in item["labels"]]
    onnx_metrics = coco_evaluate(
        dataset.coco, to_coco_detections(results, image_ids, dataset.cat_ids), dataset.categories, dataset.cat_ids
    )
    diff = {k: abs(onnx_metrics[k] - torch_metrics[k]) for k in ("map", "map50")}
    return {
        "split": "val",
        "images": len(dataset),
        "pytorch": {k: torch_metrics[k] for k in ("map", "map50")},
        "onnx": {k: onnx_metrics[k] for k in ("map", "map50")},
        "abs_diff": diff,
        "tolerance": MAP_TOLERANCE,
        "passed": all(v <= MAP_TOLERANCE for v in diff.values()),
    }


def export_run(
    target: str | Path, image_size: int | None = None, batch: int | str = "dynamic", sources: Sequence[Any] = ()
) -> dict:
    """``python -m tfg_mm export``: a finished run's selected checkpoint (or a checkpoint folder) as
    ``{run_dir}/export/model.onnx``, checked, with the check in ``export.json`` beside it; returns that record.

    The check: ONNX Runtime against PyTorch on the first :data:`CHECK_IMAGES` validation images
    (:func:`compare_outputs`: boxes within 1e-3 of the image size, scores within 1e-4, the same labels) and the
    validation mAP / mAP50 of both within :data:`MAP_TOLERANCE`. A failed check keeps the file and writes
    ``status: FAILED`` with the differences (the command exits 1): never a silent bad model. Without the run's dataset
    the outputs are compared on random pixels and the mAP check says it did not run.
    """
    files, params, _, folder = resolve_target(target, "selected", sources, verb="export")
    size = int(image_size or params.image_size)
    det.check_image_size(params.preset, size)
    fixed = None if str(batch) == "dynamic" else int(batch)
    model, predict_fn = load_checkpoint_model(folder, params, checkpoint_class_names(folder), torch.device("cpu"))
    out = files.run_dir / EXPORT_DIR
    started = time.perf_counter()
    path = export_onnx(model, out / ONNX_FILE, size, batch=batch, top_k=params.top_k)
    seconds = time.perf_counter() - started
    dataset = _val_split(params, size)
    n = fixed or min(CHECK_IMAGES, len(dataset) if dataset is not None else CHECK_IMAGES)
    if dataset is not None:
        items = [dataset[i] for i in range(min(n, len(dataset)))]
        while len(items) < n:
            items.append(items[-1])
        images = torch.stack([image for image, _ in items])
        sizes = torch.stack([target["orig_size"] for _, target in items])
        checked_on = f"the first {min(n, len(dataset))} images of {params.val_json}"
    else:
        images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))
        sizes = torch.full((n, 2), size, dtype=torch.int64)
        checked_on = "random pixels (the run's dataset was not found)"
    outputs = compare_outputs(path, model, images, sizes, params.top_k)
    if dataset is not None and size == params.image_size:
        map_check = _map_check(path, predict_fn, dataset, params.top_k, fixed)
    else:
        reason = (
            "the dataset was not found"
            if dataset is None
            else f"exported at {size} px, trained at {params.image_size} px"
        )
        map_check = {"passed": None, "not_run": reason}
    problems = []
    if not outputs["passed"]:
        diff = outputs["max_abs_diff"]
        tied = diff["scores"] <= TOLERANCES["scores"] and diff["labels_mismatch"] == 0
        problems.append(
            f"outputs differ: {diff} (tolerances {outputs['tolerances']})"
            + (
                "; the scores agree but boxes do not: the model's top scores are tied (an untrained or collapsed "
                "model), and each runtime breaks the tie its own way. Train it further, then export again"
                if tied
                else ""
            )
        )
    if map_check.get("passed") is False:
        problems.append(f"validation mAP differs: PyTorch {map_check['pytorch']}, ONNX Runtime {map_check['onnx']}")
    passed = not problems
    record = {
        "status": "PASSED" if passed else "FAILED",
        "file": f"{EXPORT_DIR}/{ONNX_FILE}",
        "bytes": path.stat().st_size,
        "format": "onnx",
        "exporter": f"torch.onnx TorchScript exporter (dynamo=False), opset {DEFAULT_OPSET}",
        "inputs": {
            "images": f"float32 [{fixed or 'B'}, 3, {size}, {size}] in [0, 1]",
            "orig_sizes": "int64 [B, 2] (height, width)",
        },
        "outputs": {"boxes": "float32 [B, K, 4] xyxy pixels", "scores": "float32 [B, K]", "labels": "int64 [B, K]"},
        "image_size": size,
        "batch": "dynamic" if fixed is None else fixed,
        "top_k": params.top_k,
        "classes": checkpoint_class_names(folder),
        "checkpoint": portable_text(str(folder)),
        "run_id": contract.read_contract(files.run_dir).run_id if files.metrics.exists() else None,
        "seconds": round(seconds, 2),
        "versions": {"torch": torch.__version__, "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime")},
        "check": {
            "passed": passed,
            "checked_on": checked_on,
            "outputs": outputs,
            "map": map_check,
            "problems": problems,
        },
    }
    atomic_write_json(out / EXPORT_RECORD, record)
    return record


def export_lines(record: dict) -> list[str]:
    """What ``export`` prints: the file, the check's differences and its verdict."""
    check, diff = record["check"], record["check"]["outputs"]["max_abs_diff"]
    lines = [
        f"wrote {record['checkpoint'].rsplit('/checkpoints', 1)[0]}/{record['file']} ({record['bytes'] / 2**20:.1f} MB, "
        f"{record['image_size']} px, batch {record['batch']}, top {record['top_k']}) in {record['seconds']:.1f} s",
        f"ONNX Runtime vs PyTorch on {check['checked_on']}: max |Δ| boxes {diff['boxes_normalised']:.2e} (normalised), "
        f"{diff['boxes_px']:.2e} px; scores {diff['scores']:.2e}; labels mismatched {diff['labels_mismatch']}",
    ]
    m = check["map"]
    if m.get("passed") is None:
        lines.append(f"validation mAP check not run: {m['not_run']}")
    else:
        lines.append(
            f"validation mAP ({m['images']} images): PyTorch {m['pytorch']['map']:.4f} / mAP50 {m['pytorch']['map50']:.4f}, "
            f"ONNX Runtime {m['onnx']['map']:.4f} / {m['onnx']['map50']:.4f} (|Δ| {m['abs_diff']['map']:.1e})"
        )
    lines.append(f"check {record['status']}" + (": " + "; ".join(check["problems"]) if check["problems"] else ""))
    return lines
