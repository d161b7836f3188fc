"""Phase 2: progressive fine-tuning with the text branch (notebook 02).

Schedule, on the one training loop of :mod:`tfg_mm.training.loop`:

- epoch 0: evaluation before any step. With ``alpha = 0`` it equals the baseline exactly.
- stage A, epochs ``1 .. warmup_epochs``: the detector is frozen; only the fusion trains
  (``lr_fusion`` for the projection, ``lr_gate`` for gate / scale / bias, no weight decay on those).
  With ``text_encoder: none`` there is no fusion, so there is no stage A (the control variant
  fine-tunes the detector alone with the same schedule otherwise).
- stage B, the remaining epochs: ``unfreeze`` (none, heads, decoder, encoder, all) is unfrozen at
  ``lr_detector`` while the fusion keeps its learning rates. The optimiser holds every parameter
  that will ever train from the start, so switching stages keeps the fusion's AdamW moments.

**Cached warm-up** (``cache_warmup: true``): in stage A the frozen detector's outputs do not change,
so they are computed once per training image and the fusion trains from the cache. The cached mode
is defined precisely as: the detector in its ``detector_mode`` (``train_frozen``: train mode with
frozen BatchNorm statistics and no dropout; ``eval_shim``: eval mode + shim) on the *un-augmented*
image, **without denoising queries** (they are random per step) and without fusing into the
encoder's top-k scores (that would change which queries are selected). Stage A therefore trains
without augmentation when the cache is on; stage B uses ``augment`` as set.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch
from torch import nn

from tfg_mm import detector as deimv2
from tfg_mm.config import Unfreeze, load_params
from tfg_mm.data.loaders import Data
from tfg_mm.detector.loss import DEIMv2Criterion
from tfg_mm.detector.pretrained import OFFICIAL_SUFFIXES, source_kind
from tfg_mm.errors import CheckpointError, ConfigError
from tfg_mm.multimodal.fusion import FUSION_PARAMS, ResidualTextFusion
from tfg_mm.multimodal.model import MultimodalDetector
from tfg_mm.multimodal.text import build_text_encoder, class_embeddings, class_prompts, prompts_record
from tfg_mm.paths import RunPaths, resolve_path
from tfg_mm.training import contract
from tfg_mm.training.baseline import run_baseline
from tfg_mm.training.experiment import Setup, run_experiment
from tfg_mm.training.loop import Task, Trainer
from tfg_mm.training.optim import split_decay

log = logging.getLogger(__name__)

#: The detector parts (``tfg_mm.detector.unfreeze`` names) of each choice of ``unfreeze``.
UNFREEZE_PARTS: dict[Unfreeze, list[str]] = {
    "none": [],
    "heads": ["heads"],
    "decoder": ["heads", "decoder"],
    "encoder": ["heads", "decoder", "encoder"],
    "all": ["all"],
}


# ----------------------------------------------------------------------------------------------
# Building blocks from params
# ----------------------------------------------------------------------------------------------
def fusion_config(params, hidden_dim: int) -> dict:
    """The fusion's settings under the schema's names, ``{"hidden_dim", *FUSION_PARAMS}``: saved with a
    phase-2 checkpoint, read back by :func:`build_fusion_from_config`."""
    return {"hidden_dim": hidden_dim, **{name: getattr(params, name) for name in FUSION_PARAMS}}


def text_embeddings(params, class_names: list[str]) -> tuple[torch.Tensor | None, dict]:
    """Class embeddings [C, dim] for ``text_encoder`` (None for ``none``) and their provenance."""
    if params.text_encoder == "none":
        return None, {"kind": "none"}
    encoder = build_text_encoder(
        params.text_encoder,
        model=params.text_model,
        pretrained=params.text_pretrained,
        seed=params.seed,
        num_classes=len(class_names),
    )
    prompts = class_prompts(class_names, params.prompts, params.class_descriptions or None, params.templates)
    emb = class_embeddings(encoder, prompts, cache_dir=resolve_path(params.text_cache_dir))
    return emb, {**encoder.description, "prompts": prompts_record(class_names, prompts)}


def build_fusion_from_config(cfg: dict, text: torch.Tensor) -> nn.Module:
    """The fusion of a :func:`fusion_config` dict (also one of a checkpoint written before the dict took
    the schema's names) over the class embeddings ``text``."""
    return ResidualTextFusion.from_config(cfg, text)


def baseline_folder(baseline: str) -> tuple[Path, dict | None]:
    """``baseline`` is a checkpoint folder or a run_dir of notebook 01: the checkpoint and its metrics."""
    if not baseline:
        raise ConfigError(
            "Parameter `baseline` is empty. Fix: set it to the run_dir of notebook 01 "
            "(e.g. `runs/baseline`) or to a checkpoint folder."
        )
    run = RunPaths.at(baseline)
    path = run.run_dir
    if run.metrics.exists():
        metrics = contract.read_metrics(path)  # a damaged contract is a DataError naming it
        require_finished_baseline(baseline)
        ckpt = run.best
        if not ckpt.exists():
            raise CheckpointError(
                f"Baseline run {path} has no checkpoints/best. Fix: finish that run "
                f"(notebook 01) or point `baseline` at a checkpoint folder."
            )
        return ckpt, metrics
    if path.is_dir():
        kind, _ = source_kind(baseline)
        if kind != "tfg_deimv2":
            raise CheckpointError(
                f"Parameter `baseline: {baseline}`: {path} is a {kind} checkpoint, not a baseline trained by notebook 01 "
                "on this dataset (phase 2 freezes the baseline detector, so its class heads must be this dataset's). "
                f"Fix: train the baseline from it first (notebook 01 / `python -m tfg_mm train` with `pretrained: "
                f"{baseline}`: the class heads are adapted to the dataset) and set `baseline` to that run_dir."
            )
        return path, None
    if path.is_file() and path.suffix in OFFICIAL_SUFFIXES:
        raise CheckpointError(
            f"Parameter `baseline: {baseline}`: an official .pth is not a baseline trained on this "
            f"dataset. Fix: train notebook 01 with `pretrained: {baseline}` and set `baseline` to its run_dir."
        )
    raise CheckpointError(
        f"Parameter `baseline: {baseline}`: {path} is neither a run_dir of notebook 01 nor a "
        f"checkpoint folder. Fix: run notebook 01 first (`make all` does) or fix the path."
    )


def require_finished_baseline(baseline: str) -> None:
    """Refuse a baseline run_dir whose run is not finished (``running``: interrupted or still
    training; ``failed``): its checkpoints are those of an unfinished run, so every number built
    on them would be wrong. A folder without ``metrics.json`` (a checkpoint folder) is not checked."""
    run = RunPaths.at(baseline)
    path = run.run_dir
    if not run.metrics.exists():
        return
    record = contract.read_contract(path)  # a damaged contract is a DataError naming it
    if record.finished:
        return
    epochs = [h.epoch for h in record.history]
    failure = record.failure
    why = f"; it failed with {failure.type}: {failure.message[:300]}" if failure is not None else ""
    raise ConfigError(
        f"Parameter `baseline: {baseline}`: the baseline run {path} is not finished (status {record.status}, evaluated "
        f"epochs {epochs or 'none'}{why}); phase 2 starts only from a finished baseline. Nothing was run. Fix: "
        f"finish it first by rerunning the same baseline command (`python -m tfg_mm train --params ... "
        f"run_dir={baseline}` or notebook 01: an interrupted run resumes), or point `baseline` at a finished "
        "baseline run."
    )


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------
class Phase2Task(Task):
    def __init__(self, model, class_names: list[str], params, train_dataset=None):
        self.model = model
        self.class_names = class_names
        self.params = params
        self.stage = None
        self.cache: dict[int, dict] = {}
        #: stage A trains in the cached mode (no denoising, un-augmented images) when cache_warmup is on
        self.cached_mode = bool(params.cache_warmup and params.warmup_epochs > 0 and model.fusion is not None)
        #: whether the cached mode reads the cache (False: recompute every step, same results, slower)
        self.use_cache = self.cached_mode
        self.train_dataset = train_dataset
        #: seconds spent filling the warm-up cache (detector forward passes), recorded in the run contract
        self.cache_seconds = 0.0

    # which parameters train in stage B
    def _stage_b_params(self) -> list[tuple[str, nn.Parameter]]:
        parts = UNFREEZE_PARTS[self.params.unfreeze]
        if not parts:
            return []
        det = self.model.detector
        # temporarily unfreeze to discover the parameter set, then restore
        saved = {n: p.requires_grad for n, p in det.named_parameters()}
        deimv2.freeze(det, ["all"])
        deimv2.unfreeze(det, parts)
        chosen = [(n, p) for n, p in det.named_parameters() if p.requires_grad]
        for n, p in det.named_parameters():
            p.requires_grad_(saved[n])
        return chosen

    def param_groups(self, params) -> list[dict]:
        groups = []
        if self.model.fusion is not None:
            groups += self.model.fusion.param_groups(params.lr_fusion, params.lr_gate, params.weight_decay)
        stage_b = self._stage_b_params()
        for _, p in stage_b:  # include them now (grad None while frozen: AdamW skips them)
            p.requires_grad_(True)
        groups += split_decay(stage_b, params.lr_detector, params.weight_decay, "detector")
        for _, p in stage_b:
            p.requires_grad_(self.stage == "B")
        return groups

    def on_epoch_start(self, epoch: int, trainer: Trainer) -> None:
        # without a text branch (`text_encoder: none`) stage A would train nothing: stage B throughout
        warmup = self.params.warmup_epochs if self.model.fusion is not None else 0
        stage = "A" if epoch <= warmup else "B"
        if epoch == 0:
            stage = "A" if warmup > 0 else "B"
        if stage == self.stage:
            return
        self.stage = stage
        det = self.model.detector
        deimv2.freeze(det, ["all"])
        if stage == "B":
            parts = UNFREEZE_PARTS[self.params.unfreeze]
            if parts:
                deimv2.unfreeze(det, parts)
            log.info(
                "phase 2 stage B from epoch %d: unfreeze=%s (%d trainable detector tensors)",
                epoch,
                self.params.unfreeze,
                sum(p.requires_grad for p in det.parameters()),
            )
            if self.train_dataset is not None:
                self.train_dataset.load_images = True
                self.train_dataset.augment = self.params.augment
        else:
            if self.cached_mode and self.train_dataset is not None:
                self.train_dataset.augment = False

    def set_train_mode(self, model) -> None:
        model.set_train_mode()

    def _cached_outputs(self, model, batch) -> dict:
        ids = [int(t["image_id"]) for t in batch["labels"]]
        missing = [i for i, iid in enumerate(ids) if iid not in self.cache]
        if missing:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.detector_outputs(batch["pixel_values"][missing], None, 0)
            for j, i in enumerate(missing):
                self.cache[ids[i]] = _slice(out, j)
            self.cache_seconds += time.perf_counter() - t0
        # the cache lives on the CPU (host memory); the batch goes where the model is
        device = next(model.parameters()).device
        return _to(_stack([self.cache[iid] for iid in ids]), device)

    def loss(self, model, batch, epoch):
        if self.stage == "A" and self.cached_mode:
            # the cached mode's definition (module docstring); computed from the cache or, when the
            # cache is switched off (benchmark reference), by a full detector forward pass each step
            if self.use_cache:
                outputs = self._cached_outputs(model, batch)
                if self.train_dataset is not None and len(self.cache) == len(self.train_dataset):
                    self.train_dataset.load_images = False  # every image cached: targets only from now on
            else:
                outputs = model.detector_outputs(batch["pixel_values"], None, epoch)
            return model.loss_from_outputs(outputs, batch["labels"], epoch)
        out = model(batch["pixel_values"], labels=batch["labels"], epoch=epoch)
        return out["loss"], out["loss_dict"]

    def predict_fn(self, model):
        return model.predict

    def save_model(self, model, folder, metadata):
        cfg = fusion_config(self.params, model.detector.config.d_model) if model.fusion is not None else {}
        model.save(folder, metadata, cfg)

    def epoch_extra(self, model) -> dict:
        extra = {"stage": self.stage}
        if model.fusion is not None:
            extra.update(model.fusion.state_summary())
        return extra

    def contract_extra(self) -> dict:
        return {"cache_seconds": round(self.cache_seconds, 2)}

    def state_dict(self) -> dict:
        return {"stage": self.stage}

    def load_state_dict(self, state: dict) -> None:
        self.stage = None  # on_epoch_start re-applies the stage of the resumed epoch


def _slice(obj, j: int):
    """Sample ``j`` of a batched official-outputs structure (tensors with a batch dim), on CPU."""
    if torch.is_tensor(obj):
        return obj[j].detach().cpu() if obj.ndim >= 1 and obj.shape[0] > j and obj.ndim > 1 else obj
    if isinstance(obj, dict):
        return {k: _slice(v, j) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_slice(v, j) for v in obj)
    return obj


def _to(obj, device: torch.device):
    """A structure of tensors (dicts, lists, tuples) moved to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _stack(items: list):
    first = items[0]
    if torch.is_tensor(first):
        if (
            first.ndim >= 1
            and all(t.shape == first.shape for t in items)
            and first.ndim > 0
            and not (first.ndim == 1 and first.numel() == 1)
        ):
            return torch.stack(items)
        return first
    if isinstance(first, dict):
        return {k: _stack([it[k] for it in items]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_stack([it[i] for it in items]) for i in range(len(first)))
    return first


# ----------------------------------------------------------------------------------------------
# Notebook 02's work
# ----------------------------------------------------------------------------------------------
def build_multimodal(params, class_names: list[str], baseline: tuple[Path, dict | None] | None = None):
    """The multimodal model on the frozen baseline detector, the baseline's provenance and the text's.

    ``baseline``: :func:`baseline_folder` of ``params.baseline`` when the caller has read it already.
    """
    ckpt, baseline_metrics = baseline if baseline is not None else baseline_folder(params.baseline)
    detector = deimv2.load(ckpt)
    # matcher_change_epoch / num_queries of this run over the baseline's (before the criterion reads them)
    deimv2.apply_config_overrides(detector, deimv2.run_config_overrides(params))
    names = [detector.config.id2label[i] for i in range(detector.config.num_labels)]
    if names != list(class_names):
        raise CheckpointError(
            f"Baseline checkpoint {ckpt} was trained on classes {names}, the dataset has "
            f"{list(class_names)}. Fix: use the baseline trained on this dataset, or retrain "
            f"notebook 01 on it."
        )
    text, text_info = text_embeddings(params, class_names)
    fusion = None
    if text is not None:
        fusion = build_fusion_from_config(fusion_config(params, detector.config.d_model), text)
    deimv2.freeze(detector, ["all"])
    criterion = DEIMv2Criterion.from_config(detector.config)  # after the run's overrides: the loss they ask for
    model = MultimodalDetector(detector, fusion, params.detector_mode, params.kd_weight, criterion=criterion)
    return model, {"checkpoint": str(ckpt), "metrics": baseline_metrics}, text_info


def run_phase2(params, progress: bool = True) -> dict:
    """Notebook 02's work: progressive fine-tuning on top of the baseline, and the run contract.

    A finished run of the same params, dataset, code and baseline run in ``run_dir`` is returned as it is.
    """
    baseline = baseline_folder(params.baseline)  # read once: identity of the result and the starting detector

    def build(data: Data) -> Setup:
        model, base, text_info = build_multimodal(params, data.class_names, baseline)
        base_final = (base["metrics"] or {}).get("final")
        extra = {
            "baseline": {"checkpoint": base["checkpoint"], "final": base_final},
            "text_encoder": text_info,
            "detector_mode": params.detector_mode,
            "classes": data.class_names,
            "cached_warmup_mode": "detector_mode outputs on un-augmented images, no denoising queries, "
            "no encoder fusion"
            if params.cache_warmup
            else None,
        }
        return Setup(Phase2Task(model, data.class_names, params, data.train), extra)

    return run_experiment(
        params, RunPaths.of(params), "phase2", build, depends_on=_depends_on(params, baseline), progress=progress
    )


def depends_on_baseline(params) -> str:
    """What a phase-2 result depends on beyond its params: the baseline run's ``run_id``.

    Folded into the phase-2 ``run_id``, so retraining the baseline in the same folder invalidates
    the phase-2 runs built on the old one. A plain checkpoint folder is identified by its files.
    """
    return _depends_on(params, baseline_folder(params.baseline))


def _depends_on(params, baseline: tuple[Path, dict | None]) -> str:
    """The baseline's identity, plus the content hash of a ``class_descriptions`` file: the params
    hold only its path, so an edited file must still make another run (nothing added without a file)."""
    identity = _baseline_identity(*baseline)
    if isinstance(params.class_descriptions, str) and params.text_encoder != "none":
        path = resolve_path(params.class_descriptions)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"
        identity += f";class_descriptions:{digest}"
    return identity


def _baseline_identity(ckpt: Path, base_metrics: dict | None) -> str:
    return (base_metrics or {}).get("run_id") or _folder_stamp(ckpt)


def _folder_stamp(folder: Path) -> str:
    """Identity of a checkpoint folder that is not a run (sizes and mtimes of its files)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def ensure_baseline(params, baseline_params_file: str = "params/baseline.yaml", progress: bool = False) -> Path:
    """Find the baseline ``params.baseline`` names, or train it first (notebook 01's work).

    A finished baseline run is reused as it is; a missing one is trained with ``baseline_params_file``
    (relative: from the working directory, else the project root) on the same dataset and seed, into
    ``params.baseline`` as its run_dir.
    """
    path = resolve_path(params.baseline) if params.baseline else None
    if path is not None and (
        contract.is_finished(path)
        or (path.is_dir() and not (path / "state").exists() and any(path.glob("*.safetensors")))
    ):
        return path
    if not params.baseline:
        raise ConfigError(
            "Parameter `baseline` is empty. Fix: set it to a run_dir of notebook 01 (e.g. `runs/baseline`)."
        )
    src = Path(baseline_params_file)
    if not src.exists():
        src = resolve_path(src)
    base_params = load_params(
        src,
        {
            "run_dir": params.baseline,
            "dataset": params.dataset,
            "seed": params.seed,
            "image_size": params.image_size,
            "preset": params.preset,
        },
    )
    log.info("baseline %s not found: training it first with %s", params.baseline, src)
    run_baseline(base_params, progress=progress)
    return path
