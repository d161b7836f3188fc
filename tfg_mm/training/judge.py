"""Judging a finished run on images it was not selected on.

Validation chooses (the epoch, the per-class score thresholds); the held-out test split only judges. After the
selection, a run's selected checkpoint and its last one are read back from disk — exactly what
``python -m tfg_mm evaluate`` reads — and evaluated once on the test split:

* :func:`load_checkpoint_model`: a baseline checkpoint (the detector alone) or a phase-2 one (``detector/`` +
  ``fusion.pt``: the fused text branch), as the training loop evaluated it;
* :func:`judge_checkpoint`: COCO metrics on a split, each class's number of instances (a class without any has
  its AP as null with a note, never 0 or NaN), the validation operating points applied unchanged
  (:func:`tfg_mm.evaluation.analysis.at_thresholds`: the precision, recall and F1 a factory would get at the
  thresholds chosen on validation), and the detections, kept for the statistics;
* :func:`judge_run`: ``final.test`` of the run contract: ``{"split", "annotations", "selected", "last"}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tfg_mm import detector as det
from tfg_mm.config import load_params
from tfg_mm.data.coco import CocoDetection, collate
from tfg_mm.data.loaders import Data
from tfg_mm.errors import CheckpointError, ConfigError
from tfg_mm.evaluation.analysis import at_thresholds, pr_curves
from tfg_mm.evaluation.coco import evaluate
from tfg_mm.io import atomic_write_json, json_safe
from tfg_mm.multimodal.fusion import ResidualTextFusion
from tfg_mm.multimodal.model import MultimodalDetector
from tfg_mm.paths import RunPaths
from tfg_mm.runtime.devices import resolve_device
from tfg_mm.training import contract

log = logging.getLogger(__name__)

#: The per-class entry of a class that has no instance in the judged split.
NO_INSTANCES = "no {split} instances"


def evaluation_device(params) -> torch.device:
    """The run's ``device`` when this machine has it, else ``auto`` (a run trained on a GPU judged on a laptop):
    evaluation's numbers do not depend on the device beyond float rounding."""
    try:
        return resolve_device(params.device)
    except ConfigError as exc:
        log.info("evaluating on %s: %s", resolve_device("auto"), exc)
        return resolve_device("auto")


def load_fusion(folder: Path):
    """The fusion saved next to a phase-2 checkpoint's detector (None for ``text_encoder: none``)."""
    path = folder / "fusion.pt"
    if not path.exists():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=False)
    fusion = ResidualTextFusion.from_config(blob["config"], blob["state_dict"]["text_embeddings"])
    fusion.load_state_dict(blob["state_dict"])
    return fusion


def detector_predict_fn(model: torch.nn.Module) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """The detector alone as a prediction function: its final logits and boxes (phase 1 evaluates it so)."""

    def predict(pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        out = model(pixel_values)
        return out.logits, out.pred_boxes

    return predict


def checkpoint_class_names(folder: str | Path) -> list[str]:
    """The class names a checkpoint folder (a detector, or a phase-2 folder with ``detector/``) was trained on."""
    folder = Path(folder)
    config = folder / "detector" / "config.json" if (folder / "detector").is_dir() else folder / "config.json"
    try:
        id2label = json.loads(config.read_text(encoding="utf-8")).get("id2label") or {}
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{config}: cannot read the checkpoint's config ({exc}). Fix: give a checkpoint folder written by this "
            "project (checkpoints/best of a run) or import an official one with `python -m tfg_mm convert`."
        ) from None
    return [id2label[k] for k in sorted(id2label, key=int)]


def load_checkpoint_model(
    folder: str | Path, params, class_names: list[str], device: torch.device
) -> tuple[torch.nn.Module, Callable[[Tensor], tuple[Tensor, Tensor]]]:
    """The model of a checkpoint folder in eval mode on ``device``, and its prediction function: a phase-2
    checkpoint with its fused text branch, a baseline one the detector alone, exactly as training evaluated it."""
    folder = Path(folder)
    if (folder / "detector").is_dir():
        model = MultimodalDetector(det.load(folder / "detector"), load_fusion(folder), params.detector_mode)
        predict_fn = model.predict
    else:
        model = det.load(folder)
        predict_fn = detector_predict_fn(model)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if names != list(class_names):
        raise CheckpointError(
            f"Checkpoint {folder} was trained on the classes {names}; the split to evaluate has {list(class_names)}. "
            "Nothing was written. Fix: evaluate it on a split of its own dataset (same class names, same order), or "
            "train a run on this one."
        )
    model.to(device).eval()
    return model, predict_fn


def judge_checkpoint(
    folder: str | Path,
    params,
    dataset: CocoDetection,
    loader,
    split: str,
    thresholds: Mapping[str, float | None] | None = None,
    device: torch.device | None = None,
    predict_fn: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
) -> tuple[dict, list[dict]]:
    """One checkpoint evaluated on one split: ``(block, detections)``.

    ``block``: ``map`` ... ``map_large``, ``per_class`` (with each class's ``instances``; a class without any has
    ``ap`` / ``ap50`` null and a ``note``), ``checkpoint``, and with ``thresholds`` (the validation operating
    points) ``operating_points``: precision, recall and F1 at those thresholds on this split. ``predict_fn``: the
    model already in memory (an evaluation-only run of a source that is no checkpoint folder), else the
    checkpoint ``folder`` is read.
    """
    device = device if device is not None else evaluation_device(params)
    if predict_fn is None:
        _, predict_fn = load_checkpoint_model(folder, params, dataset.categories, device)
    with torch.no_grad():
        metrics, detections = evaluate(
            predict_fn, loader, dataset.coco, dataset.categories, dataset.cat_ids, top_k=params.top_k, device=device
        )
    counts = dataset.instance_counts()
    per_class = {}
    for name, values in metrics["per_class"].items():
        entry = {**values, "instances": counts[name]}
        if counts[name] == 0:
            entry.update(ap=None, ap50=None, note=NO_INSTANCES.format(split=split))
        per_class[name] = entry
    block = {
        "checkpoint": str(folder),
        **{k: metrics[k] for k in ("map", "map50", "map75", "map_small", "map_medium", "map_large")},
        "per_class": per_class,
        "num_detections": metrics.get("num_detections"),
    }
    if thresholds is not None:
        block["operating_points"] = at_thresholds(
            dataset.coco, detections, thresholds, dataset.categories, dataset.cat_ids
        )
    return json_safe(block), detections


def judge_run(
    params,
    files: RunPaths,
    data: Data,
    final: Mapping[str, Any],
    last_epoch: int | None,
    predict_fn: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
) -> dict:
    """``final.test``: the run's selected checkpoint (``final.checkpoint``) and its last one (when it trained),
    judged on the test split with the validation operating points; writes their detections and the selected
    checkpoint's test PR curves into the run folder. ``predict_fn``: an evaluation-only run's model in memory."""
    device = evaluation_device(params)
    thresholds = {name: (p or {}).get("threshold") for name, p in (final.get("operating_points") or {}).items()}
    out: dict[str, Any] = {
        "split": "test",
        "annotations": str(data.test.coco_path),
        "instances": data.test.instance_counts(),
    }
    candidates = [("selected", final["checkpoint"], final.get("epoch"))]
    if last_epoch is not None and files.last.is_dir():
        candidates.append(("last", str(files.last), last_epoch))
    for which, folder, epoch in candidates:
        block, detections = judge_checkpoint(
            folder,
            params,
            data.test,
            data.test_loader,
            "test",
            thresholds if which == "selected" else None,
            device,
            predict_fn if which == "selected" else None,
        )
        atomic_write_json(files.split_detections("test", which), detections)
        block.update(epoch=epoch, detections=files.split_detections("test", which).name)
        out[which] = block
        if which == "selected":
            curves = pr_curves(data.test.coco, detections, data.test.categories, data.test.cat_ids, "pycocotools")
            atomic_write_json(
                files.split_analysis("test"),
                json_safe({"split": "test", "pr_curves": curves, "operating_points": block["operating_points"]}),
            )
    return out


# --------------------------------------------------------------------------------------------
# python -m tfg_mm evaluate
# --------------------------------------------------------------------------------------------
#: What ``--split`` names: the run's annotation files (else a COCO json path).
SPLIT_PARAMS = {"train": "train_json", "val": "val_json", "test": "test_json"}


def _split_file(params, split: str, root: Path) -> tuple[str, Path]:
    """``(split name, annotation file)`` of ``--split``: one of the run's splits, or a COCO json path."""
    if split in SPLIT_PARAMS:
        name = getattr(params, SPLIT_PARAMS[split])
        if not name:
            raise ConfigError(
                f"--split {split}: the run has no `{SPLIT_PARAMS[split]}` (its params leave it empty), so there is no "
                f"{split} split to evaluate. Fix: pass the annotation file itself (`--split path/to/{split}.json`), or "
                f"set `{SPLIT_PARAMS[split]}` (a `key=value` after the command)."
            )
        return split, root / name
    path = Path(split)
    if path.suffix != ".json":
        raise ConfigError(f"--split {split!r}: choose train, val or test, or give a COCO json file (*.json).")
    return path.stem, path if path.is_absolute() else (root / path if (root / path).is_file() else Path.cwd() / path)


def _names(sources: Sequence[Any]) -> list[str]:
    return [str(s) if isinstance(s, (str, Path)) else "command line" for s in sources]


def resolve_target(
    target: str | Path, which: str = "selected", sources: Sequence[Any] = (), verb: str = "evaluate"
) -> tuple[RunPaths, Any, Mapping[str, Any], Path]:
    """``(files, params, final, checkpoint folder)`` of a finished run or a checkpoint folder (what ``evaluate``,
    ``predict``, ``export`` and ``benchmark`` take).

    A run uses its own params, with ``sources`` (params files, mappings) merged over them, and its ``final`` (the
    selected checkpoint, the validation operating points); ``which="last"`` its last checkpoint. A checkpoint folder
    takes ``sources`` alone (over the schema's defaults) and has an empty ``final``. A run that is not finished is
    refused, naming its status; ``verb`` names the command in the messages.
    """
    files = RunPaths.at(target)
    final: Mapping[str, Any] = {}
    if files.metrics.exists():
        record = contract.read_contract(files.run_dir)
        if not record.finished:
            raise ConfigError(
                f"{files.run_dir}: the run is not finished (status {record.status}); its checkpoints are those of an "
                f"unfinished run. Fix: finish it first (rerun its command: an interrupted run resumes), or {verb} a "
                "checkpoint folder."
            )
        params = load_params(record.params, *sources, source_names=[f"{files.metrics}: params"] + _names(sources))
        final = record.final.model_dump()
        folder = Path(final["checkpoint"]) if which == "selected" else files.last
        if which == "last" and not folder.is_dir():
            raise ConfigError(f"{files.run_dir}: no last checkpoint ({folder}); `--which selected` takes the run's.")
    elif (files.run_dir / "config.json").is_file() or (files.run_dir / "detector").is_dir():
        folder, params = files.run_dir, load_params(*sources, source_names=_names(sources))
    else:
        raise ConfigError(
            f"{target}: neither a run folder (with metrics.json) nor a checkpoint folder. Fix: give a run_dir of "
            "notebook 01 / 02 (e.g. runs/baseline) or a checkpoint folder (e.g. runs/baseline/checkpoints/best)."
        )
    return files, params, final, folder


def evaluate_target(
    target: str | Path, split: str = "test", which: str = "selected", sources: Sequence[Any] = ()
) -> tuple[dict, Path]:
    """``python -m tfg_mm evaluate``: a finished run's selected (or ``last``) checkpoint, or a checkpoint folder,
    evaluated on a split; returns the record and the ``evaluation_<split>.json`` it wrote (with the detections)
    into the run or checkpoint folder.

    A run uses its own params, with ``sources`` (params files, mappings: the command's ``--params`` and
    ``key=value``) merged over them, and the validation operating points of its ``final``; a checkpoint folder the
    ``sources`` alone (over the schema's defaults). A class list that differs from the split's is the project's
    error naming both lists, and nothing is written.
    """
    files, params, final, folder = resolve_target(target, which, sources)
    root = RunPaths.of(params).dataset
    name, annotations = _split_file(params, split, root)
    dataset = CocoDetection(
        root, annotations, params.images_dir, image_size=params.image_size, train=False, augment=False
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=params.batch_size, shuffle=False, collate_fn=collate)
    thresholds = {c: (p or {}).get("threshold") for c, p in (final.get("operating_points") or {}).items()} or None
    block, detections = judge_checkpoint(folder, params, dataset, loader, name, thresholds)
    block.update(split=name, annotations=str(annotations), which=which, epoch=final.get("epoch"))
    out = files.evaluation(name if which == "selected" else f"{name}_{which}")
    atomic_write_json(out.with_name(out.stem + ".detections.json"), detections)
    block["detections"] = out.stem + ".detections.json"
    atomic_write_json(out, block)
    return block, out


def evaluation_table(block: Mapping[str, Any]) -> str:
    """The terminal's per-class table of one evaluation (what ``evaluate`` prints)."""
    points = block.get("operating_points") or {}

    def num(value: Any, digits: int = 4) -> str:
        return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"

    lines = [
        f"{block.get('split', '?')} split, {block.get('which', 'selected')} checkpoint {block.get('checkpoint', '?')}: "
        f"mAP {num(block.get('map'))}  mAP50 {num(block.get('map50'))}",
        f"{'class':<16}{'boxes':>6}{'AP':>8}{'AP50':>8}"
        + (f"{'thr':>7}{'prec':>7}{'rec':>7}{'F1':>7}" if points else ""),
    ]
    for name, entry in (block.get("per_class") or {}).items():
        point = points.get(name) or {}
        row = f"{name:<16}{entry.get('instances', '?'):>6}{num(entry.get('ap')):>8}{num(entry.get('ap50')):>8}"
        if points:
            row += "".join(
                f"{num(point.get(k), 3 if k != 'threshold' else 2):>7}"
                for k in ("threshold", "precision", "recall", "f1")
            )
        lines.append(row + (f"  ({entry['note']})" if entry.get("note") else ""))
    if points:
        lines.append("thr / prec / rec / F1: each class's operating point chosen on validation, applied to this split")
    return "\n".join(lines)
