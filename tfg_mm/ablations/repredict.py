"""Detections of a run's selected checkpoint, re-predicted when the run did not save them, and WiSE-FT.

**Detections** (:func:`run_detections`): ``{run_dir}/detections_val.json`` when the run wrote it,
otherwise they are re-predicted from the checkpoint (:func:`predict_run_detections`), cached, and
the recomputed mAP is checked against the contract's.

**WiSE-FT** (:func:`wise_curve`): θ = (1−λ)·θ_baseline + λ·θ_finetuned on the detector weights
(every floating-point tensor; integer buffers from the fine-tuned model). The baseline has no text
branch, i.e. an effective gate α = 0, so the fusion's effective gate is scaled by λ too (the
projection, scale and bias are kept): λ = 0 is the baseline exactly, λ = 1 the fine-tuned model.

Per-run caches (:func:`cache_key`, :func:`read_cache`, :func:`write_cache`) hold a value with the
key of everything it depends on; a cache whose key differs is ignored and rewritten.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tfg_mm import detector as det
from tfg_mm.config import load_params
from tfg_mm.data.loaders import make_data
from tfg_mm.errors import DataError
from tfg_mm.evaluation.coco import evaluate
from tfg_mm.io import atomic_write_json
from tfg_mm.multimodal.model import MultimodalDetector
from tfg_mm.paths import RunPaths
from tfg_mm.training.contract import RunContract, as_contract
from tfg_mm.training.judge import evaluation_device, load_checkpoint_model, load_fusion
from tfg_mm.training.seeding import seed_everything

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Per-run caches
# --------------------------------------------------------------------------------------------
def cache_key(*parts: Any) -> str:
    """A short hash of everything a cached value depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_cache(path: Path, key: str) -> Any:
    """The value cached in ``path`` under ``key``; None when there is none, it is unreadable or stale."""
    try:
        blob = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return blob.get("value") if isinstance(blob, dict) and blob.get("key") == key else None


def write_cache(path: Path, key: str, value: Any) -> None:
    atomic_write_json(path, {"key": key, "value": value})


# --------------------------------------------------------------------------------------------
# Detections of a run's selected checkpoint
# --------------------------------------------------------------------------------------------
def _val_data(params):
    return make_data(params, seed_everything(params.seed, params.deterministic), progress=False, need_train=False)


def _detect(model_fn, params, data) -> tuple[dict, list[dict]]:
    return evaluate(
        model_fn,
        data.val_loader,
        data.val.coco,
        data.class_names,
        data.cat_ids,
        top_k=params.top_k,
        device=evaluation_device(params),
    )


def predict_run_detections(metrics: RunContract | Mapping[str, Any]) -> tuple[list[dict], dict]:
    """Re-predict the validation detections of a run's selected checkpoint (``final.checkpoint``).

    For a run that did not save ``detections_val.json``. A phase-2 checkpoint (``detector/`` +
    ``fusion.pt``) runs through :class:`~tfg_mm.multimodal.model.MultimodalDetector`, a baseline checkpoint
    through the detector alone, exactly as the training loop evaluated them. Returns
    ``(detections, metrics)`` so the caller can check the recomputed mAP against the contract's.
    """
    run = as_contract(metrics)
    params = load_params(run.params, source_names=["metrics.json params"])
    folder = Path(run.final.checkpoint)
    data = _val_data(params)
    _, model_fn = load_checkpoint_model(folder, params, data.class_names, evaluation_device(params))
    evaluated, detections = _detect(model_fn, params, data)
    return detections, evaluated


def run_detections(
    run_dir: str | Path, metrics: Mapping[str, Any], cache_path: Path | None = None
) -> tuple[list[dict], str]:
    """The selected checkpoint's validation detections and a note on where they came from.

    ``{run_dir}/detections_val.json`` (written by the run) is used as is; otherwise they are
    re-predicted once and cached in ``cache_path`` (default ``{run_dir}/detections_val.cache.json``)
    keyed by the run id and checkpoint.
    """
    run = RunPaths.at(run_dir)
    if run.detections.exists():
        return json.loads(run.detections.read_text(encoding="utf-8")), "saved by the run"
    cache_path = cache_path or run.detections_cache
    run = as_contract(metrics)
    key = cache_key(run.run_id, run.final.checkpoint, run.final.epoch)
    cached = read_cache(cache_path, key)
    if cached is not None:
        return cached["detections"], cached["note"]
    detections, evaluated = predict_run_detections(run)
    recorded = run.final.map
    note = f"re-predicted from {run.final.checkpoint}: mAP {evaluated['map']:.4f}"
    if recorded is not None and not math.isclose(evaluated["map"], recorded, abs_tol=1e-4):
        note += f" (the contract says {recorded:.4f}: the checkpoint does not reproduce its own number)"
        log.warning("%s: %s", run_dir, note)
    write_cache(cache_path, key, {"detections": detections, "note": note})
    return detections, note


# --------------------------------------------------------------------------------------------
# WiSE-FT
# --------------------------------------------------------------------------------------------
def interpolate_state(base: Mapping[str, Any], finetuned: Mapping[str, Any], lam: float) -> dict:
    """θ = (1−λ)·θ_base + λ·θ_finetuned for floating tensors; other buffers from the fine-tuned model."""
    if set(base) != set(finetuned):
        raise DataError(
            f"WiSE-FT needs two checkpoints of one architecture; keys differ: {sorted(set(base) ^ set(finetuned))[:5]}"
        )
    out = {}
    for name, tensor in finetuned.items():
        if tensor.is_floating_point():
            out[name] = base[name].to(tensor.dtype) * (1.0 - lam) + tensor * lam
        else:
            out[name] = tensor.clone()
    return out


def scale_gate(fusion, lam: float) -> None:
    """Multiply the fusion's *effective* gate α by λ (through atanh when the gate is tanh-bounded)."""
    with torch.no_grad():
        if fusion.gate_tanh:
            fusion.gate.copy_(torch.atanh(torch.tanh(fusion.gate) * lam))
        else:
            fusion.gate.mul_(lam)


def wise_curve(
    metrics: RunContract | Mapping[str, Any], baseline_checkpoint: str | Path, lambdas: Sequence[float]
) -> list[dict]:
    """mAP, mAP50 and per-class AP of the WiSE-FT interpolation for each λ (see the module docstring)."""
    run = as_contract(metrics)
    params = load_params(run.params, source_names=["metrics.json params"])
    folder = Path(run.final.checkpoint)
    data = _val_data(params)
    base_state = det.load(baseline_checkpoint).state_dict()
    finetuned = det.load(folder / "detector")
    tuned_state = copy.deepcopy(finetuned.state_dict())
    fusion_state = load_fusion(folder)
    points = []
    for lam in lambdas:
        finetuned.load_state_dict(interpolate_state(base_state, tuned_state, float(lam)))
        fusion = copy.deepcopy(fusion_state)
        if fusion is not None:
            scale_gate(fusion, float(lam))
        model = MultimodalDetector(finetuned, fusion, params.detector_mode).to(evaluation_device(params)).eval()
        evaluated, _ = _detect(model.predict, params, data)
        points.append(
            {
                "lambda": float(lam),
                "map": evaluated["map"],
                "map50": evaluated["map50"],
                "per_class": evaluated["per_class"],
            }
        )
    return points
