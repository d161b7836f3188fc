"""Phase 1: the DEIMv2 detector alone (notebook 01).

:func:`run_baseline` trains the detector with the official DEIMv2 criterion (``tfg_mm.detector.loss``), or
only evaluates an existing ``checkpoint``, through the one run sequence of
:mod:`tfg_mm.training.experiment`. Every later number (phase 2, ablations) is compared with this run.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tfg_mm import detector
from tfg_mm.data.loaders import Data
from tfg_mm.detector.loss import DEIMv2Criterion, compute_loss
from tfg_mm.detector.pretrained import load_pretrained
from tfg_mm.errors import ConfigError
from tfg_mm.io import atomic_dir
from tfg_mm.paths import RunPaths
from tfg_mm.training.experiment import Setup, run_experiment
from tfg_mm.training.judge import detector_predict_fn
from tfg_mm.training.loop import Task
from tfg_mm.training.optim import split_decay


def _is_project_model(model: nn.Module) -> bool:
    return isinstance(model, detector.TfgDeimv2ForObjectDetection)


class BaselineTask(Task):
    """The detector alone, trained with the official DEIMv2 criterion (``tfg_mm.detector.loss``), built once from
    the model's config (its preset's criterion settings and the run's overrides)."""

    def __init__(self, model: nn.Module, class_names: list[str]):
        self.model = model
        self.class_names = class_names
        self.criterion = DEIMv2Criterion.from_config(model.config) if _is_project_model(model) else None

    def param_groups(self, params) -> list[dict]:
        backbone, rest = [], []
        for name, prm in self.model.named_parameters():
            (backbone if name.startswith("model.conv_encoder.") else rest).append((name, prm))
        return split_decay(backbone, params.lr_backbone, params.weight_decay, "backbone") + split_decay(
            rest, params.lr, params.weight_decay, "detector"
        )

    def loss(self, model, batch, epoch):
        out = model(batch["pixel_values"], labels=batch["labels"])  # labels: the denoising queries in training
        if self.criterion is None:  # the uncorrected upstream model with its own loss (benchmark comparison only)
            return out.loss, {k: float(v) for k, v in (out.loss_dict or {}).items()}
        return compute_loss(out, batch["labels"], model.config, self.criterion, epoch)

    def predict_fn(self, model):
        return detector_predict_fn(model)

    def save_model(self, model, folder, metadata):
        if _is_project_model(model):
            detector.save(model, folder, metadata)
        else:  # the uncorrected upstream model (benchmark comparison only)
            with atomic_dir(folder) as tmp:
                model.save_pretrained(tmp)


def build_baseline_model(params, data: Data, source: Path | None) -> tuple[nn.Module, dict]:
    """The detector a baseline run trains or evaluates, and where it came from.

    ``source`` is ``checkpoint`` (else ``pretrained``) resolved (:attr:`tfg_mm.paths.RunPaths.source`);
    None builds the preset with a random init. Any source :func:`tfg_mm.detector.pretrained.load_pretrained` reads
    (run_dir, tfg_mm or transformers checkpoint folder, official ``.pth``, hub id); ``pretrained`` with
    another class count re-initialises the class heads (``reinit_class_heads``) and the contract's
    ``model.pretrained`` records what was loaded, re-initialised and dropped. ``checkpoint`` (evaluate
    only) must have the dataset's class count.
    """
    id2label = dict(enumerate(data.class_names))
    n = params.num_classes or len(data.class_names)
    if params.num_classes and params.num_classes != len(data.class_names):
        raise ConfigError(
            f"Parameter `num_classes: {params.num_classes}` but the dataset {data.root} has "
            f"{len(data.class_names)} classes ({data.class_names}). Fix: remove `num_classes` to use "
            f"the dataset's classes."
        )
    if source is not None:
        evaluating = bool(params.checkpoint)
        model, table = load_pretrained(
            params.checkpoint or params.pretrained,
            n,
            id2label,
            adapt_classes=params.reinit_class_heads and not evaluating,
            seed=params.seed,
            what="checkpoint" if evaluating else "pretrained",
        )
        detector.apply_config_overrides(model, detector.run_config_overrides(params))
        if not evaluating and detector.preset_image_size(model.config) != params.image_size:
            model.set_image_size(params.image_size)  # fine-tuned at this size: its checkpoint says so
        origin = {"source": table["path"] or table["source"], "preset": model.config.preset}
        if not evaluating:
            origin["pretrained"] = {
                **table,
                "reinitialised_count": len(table["reinitialised"]),
                "dropped_count": len(table["dropped"]),
            }
        return model, origin
    model = detector.build(
        params.preset,
        n,
        id2label=id2label,
        image_size=params.image_size,
        seed=params.seed,
        fidelity=params.fidelity,
        **detector.run_config_overrides(params),
    )
    return model, {"source": "random init", "preset": params.preset, "fidelity": params.fidelity}


def run_baseline(params, progress: bool = True) -> dict:
    """Notebook 01's work: train (or only evaluate ``checkpoint``) and write the run contract.

    A finished run of the same params, dataset and code in ``run_dir`` is returned as it is.
    """
    paths = RunPaths.of(params)

    def build(data: Data) -> Setup:
        model, origin = build_baseline_model(params, data, paths.source)
        n_params = sum(p.numel() for p in model.parameters())
        corrections = list(detector.CORRECTIONS) if params.fidelity == "official" else []
        extra = {"model": {**origin, "parameters": n_params, "corrections": corrections}, "classes": data.class_names}
        return Setup(BaselineTask(model, data.class_names), extra, evaluated=origin["source"])

    return run_experiment(params, paths, "baseline", build, train=not params.checkpoint, progress=progress)
