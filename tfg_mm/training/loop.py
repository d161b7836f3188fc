"""One training loop for every phase.

The loop (:class:`Trainer`) knows nothing about DEIMv2 or text: a :class:`Task` supplies the
model, its loss, its prediction function, its parameter groups and how to save it. Phase 1
(:mod:`tfg_mm.training.baseline`) trains or evaluates the detector alone; phase 2 (:mod:`tfg_mm.training.phase2`)
plugs its multimodal task into the same loop. :mod:`tfg_mm.training.experiment` is the sequence around it
(reuse check, run folder, seeding, data, the phase's task, the run contract).

What the loop guarantees, for every phase:
- AdamW (or SGD) with the task's parameter groups; linear warm-up (quadratic with `recipe: official`,
  :func:`tfg_mm.detector.recipe.resolve_recipe`) then flat-cosine / cosine; the no-augmentation tail;
  gradient clipping; an EMA of the weights (``torch.optim.swa_utils.AveragedModel``) with the
  official DEIM warm-up ``decay * (1 - exp(-updates / warmup))``; ``accelerate`` for device,
  mixed precision and ``accelerate launch`` multi-GPU.
- Per-epoch validation with pycocotools, best / last checkpoints, and the run contract
  ``{run_dir}/metrics.json`` rewritten atomically after every evaluated epoch.
- A non-finite loss stops the run with :class:`~tfg_mm.errors.TrainingError` naming epoch, step
  and loss terms; the last good checkpoint and history stay on disk.
- Several processes (``torchrun --nproc_per_node N`` / ``accelerate launch --multi_gpu --num_processes N``):
  data parallelism (:mod:`tfg_mm.runtime.distributed`). Each rank trains on its disjoint share of every global
  batch (``batch_size`` per process, ``batch_size`` x N a step), the gradients and BatchNorm statistics
  are averaged over the ranks, each rank predicts its share of the validation images and the main
  process evaluates them all; checkpoints, the state, the contract and the progress log are written by
  the main process only. Seeds: the model is identical on every rank (rank 0's, broadcast), the data
  order too (``seed``); augmentation and denoising noise draw from ``seed + rank``.
- An interrupted run resumes from ``{run_dir}/state/last.pt`` (model, optimiser, scheduler, EMA,
  RNG states, history) and ends with the same metrics as an uninterrupted run on CPU. The state
  carries the run id it belongs to: a state of another run is refused (the experiment refuses it
  earlier, before any work, listing what differs: :func:`tfg_mm.training.runs.check_run_dir`).
- When the run finishes, the error analysis of the selected checkpoint's validation detections
  (:mod:`tfg_mm.evaluation.analysis`): ``final.operating_points`` and ``final.errors`` in the run contract,
  the curves and the confusion matrix in ``{run_dir}/analysis.json``.
- ``epoch``, ``step`` (within the epoch) and ``stage`` (``setup`` / ``train`` / ``evaluate`` /
  ``save`` / ``analyse``) say where the loop is, so that a failure record can name them.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm  # plain bars: tqdm.auto warns in kernels without ipywidgets

from tfg_mm.config import RECIPE_KEYS
from tfg_mm.detector.recipe import resolve_recipe
from tfg_mm.detector.speed import compile_static_parts
from tfg_mm.errors import CheckpointError, ConfigError, NonFiniteError, TrainingError
from tfg_mm.evaluation import analysis
from tfg_mm.evaluation.coco import coco_evaluate, evaluate, predict, to_coco_detections
from tfg_mm.evaluation.convergence import convergence
from tfg_mm.io import atomic_write_bytes, atomic_write_json
from tfg_mm.paths import RunPaths, portable_text
from tfg_mm.runtime import distributed
from tfg_mm.runtime.devices import check_amp, resolve_device
from tfg_mm.training.optim import EMA, build_optimizer, ema_multi_avg_fn, lr_factor, set_augment_tail
from tfg_mm.training.progress import append_progress
from tfg_mm.training.seeding import make_accelerator, rng_state, set_rng_state

#: Seconds of training between two lines of ``{run_dir}/progress.jsonl`` (plus one at the end of every
#: epoch and one after every evaluation): a few hundred small appends in a 30-minute run.
PROGRESS_EVERY_S = 15.0

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# The task interface
# ----------------------------------------------------------------------------------------------
class Task:
    """What a phase supplies to the loop."""

    #: the module whose parameters are optimised (and averaged by the EMA)
    model: nn.Module
    class_names: list[str]

    def param_groups(self, params) -> list[dict]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def predict_fn(self, model: nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def save_model(self, model: nn.Module, folder: Path, metadata: dict) -> None:
        raise NotImplementedError

    def set_train_mode(self, model: nn.Module) -> None:
        """Put the model in training mode (phase 2 keeps a frozen detector in eval or frozen-train mode)."""
        model.train()

    def on_epoch_start(self, epoch: int, trainer: Trainer) -> None:
        """Stage switches (phase 2) happen here. Called before every epoch, also after resume."""

    def epoch_extra(self, model: nn.Module) -> dict:
        """Extra per-epoch numbers for the history (e.g. alpha, logit scale)."""
        return {}

    def contract_extra(self) -> dict:
        """Top-level run-contract entries measured while training, rewritten with every contract write."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class TrainResult:
    history: list[dict]
    final: dict
    best_dir: Path | None
    last_dir: Path | None
    extra: dict = field(default_factory=dict)


class Trainer:
    """The loop. See the module docstring for what it guarantees."""

    def __init__(
        self,
        params,
        task: Task,
        train_loader: DataLoader,
        val_loader: DataLoader,
        coco_gt,
        cat_ids: list[int],
        run_dir: Path,
        loader_gen: torch.Generator,
        write_contract: Callable[[list[dict], dict | None, str], None],
        progress: bool = True,
        run_id: str = "",
        accelerator: Accelerator | None = None,
    ):
        self.params = params
        #: the run this loop belongs to (:func:`tfg_mm.training.identity.run_id`), stored in and checked against the state
        self.run_id = run_id
        #: where the loop is: the epoch being trained / evaluated, and the stage
        self.epoch: int | None = None
        self.stage = "setup"
        self._epoch_first_step = 0
        self.task = task
        #: the run folder's files (:class:`tfg_mm.paths.RunPaths`)
        self.files = RunPaths.at(run_dir)
        self.run_dir = self.files.run_dir
        self.progress = progress
        self.coco_gt = coco_gt
        self.cat_ids = cat_ids
        self.loader_gen = loader_gen
        self.write_contract = write_contract
        #: the run's device (``device``: auto / cpu / cuda / cuda:N, :func:`tfg_mm.runtime.devices.resolve_device`)
        self.device = resolve_device(params.device)
        check_amp(params.amp, self.device)
        self.accelerator = accelerator if accelerator is not None else make_accelerator(self.device, params.amp)
        #: the gradient scaler: accelerate's for ``amp: fp16``, else a disabled one (its step is the optimiser's step)
        self.scaler = self.accelerator.scaler or torch.amp.GradScaler(self.device.type, enabled=False)
        #: processes of the run (data parallelism, :mod:`tfg_mm.runtime.distributed`) and whether this one writes
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.train_loader = train_loader
        #: the schedule this run trains with (``recipe: official`` resolved against the run's length), recorded as
        #: ``recipe`` in the run contract; the loop and the task's parameter groups read it through ``self.params``
        self.recipe = resolve_recipe(params, self.steps_per_epoch())
        if self.recipe["recipe"] != "custom":
            self.params = params.model_copy(update={k: self.recipe[k] for k in RECIPE_KEYS})
        self.val_loader = val_loader
        self.history: list[dict] = []
        self.best_score = -math.inf
        self.best_epoch = -1
        self.global_step = 0
        self.start_epoch = 0
        #: the last epoch whose resumable state is on disk (a resumed run continues after it)
        self.saved_epoch: int | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.ema: AveragedModel | None = None
        # the progress log (tfg_mm.training.progress.append_progress): timings of this process, for the time left
        self._fit_t0 = time.perf_counter()
        self._last_progress = -math.inf
        self._train_seconds = 0.0
        self._train_steps = 0
        self._eval_seconds = 0.0
        self._latest_eval: dict | None = None

    @property
    def step(self) -> int | None:
        """The step within the current epoch (0-based: the steps it has completed), None outside training."""
        if self.stage != "train":
            return None
        return self.global_step - self._epoch_first_step

    # -- optimiser (rebuilt when a stage changes what trains) ----------------------------------
    def rebuild_optimizer(self) -> None:
        groups = self.task.param_groups(self.params)
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ConfigError("Nothing to train: every parameter is frozen. Fix: check `unfreeze` / `epochs`.")
        self.optimizer = build_optimizer(groups, self.params)

    def steps_per_epoch(self) -> int:
        per_epoch = len(self.train_loader)
        if self.params.max_steps_per_epoch:
            per_epoch = min(per_epoch, self.params.max_steps_per_epoch)
        return per_epoch

    def total_steps(self) -> int:
        return self.steps_per_epoch() * self.params.epochs

    def set_lr(self) -> float:
        p = self.params
        f = lr_factor(
            self.global_step,
            self.total_steps(),
            p.lr_warmup_steps,
            p.scheduler,
            p.flat_fraction,
            p.min_lr_ratio,
            warmup_power=self.recipe["warmup_power"],
            decay_end=self.recipe["decay_end"],
        )
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f
        return self.optimizer.param_groups[0]["lr"]

    def make_ema(self) -> None:
        if self.params.ema:
            self.ema = EMA(
                self.task.model,
                multi_avg_fn=ema_multi_avg_fn(self.params.ema_decay, self.params.ema_warmup),
                use_buffers=True,
            )
            self.ema.to(self.accelerator.device)

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.task.model

    # -- checkpoints ---------------------------------------------------------------------------
    def save_state(self, epoch: int) -> None:
        """Everything needed to resume after ``epoch``: one atomic file (written by the main process; every
        process's RNG states go in it)."""
        ranks_rng = distributed.gather_objects(rng_state(self.loader_gen)) if self.world > 1 else None
        if not self.is_main:
            return
        state = {
            "run_id": self.run_id,
            "epoch": epoch,
            "global_step": self.global_step,
            "model": self.task.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(self.loader_gen),
            "history": self.history,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "task": self.task.state_dict(),
        }
        if self.scaler.is_enabled():  # amp fp16: the gradient scale goes on where it was
            state["scaler"] = self.scaler.state_dict()
        if ranks_rng is not None:
            state["rng_ranks"] = ranks_rng
        buf = io.BytesIO()
        torch.save(state, buf)
        self.stage = "save"
        atomic_write_bytes(self.files.state, buf.getvalue())
        self.saved_epoch = epoch

    def try_resume(self) -> bool:
        path = self.files.state
        # a process killed inside the atomic write leaves its complete-or-partial temporary file
        # (never last.pt itself): it is garbage of the size of the state, removed here
        for leftover in path.parent.glob(f".{path.name}.*.tmp") if self.is_main else ():
            leftover.unlink(missing_ok=True)
        if not (self.params.resume and path.exists()):
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a truncated file cannot happen (atomic writes), but be explicit
            raise CheckpointError(
                f"Cannot read the resume state {path}: {exc}. Fix: delete {path} to restart "
                f"the run from scratch, or set `resume: false`."
            ) from exc
        saved_id = state.get("run_id") if isinstance(state, dict) else None
        if self.run_id and saved_id != self.run_id:
            raise ConfigError(
                f"The resume state {path} belongs to another run (run id {saved_id or 'not recorded'}, this run "
                f"{self.run_id}); it was not loaded. Fix: rerun with that run's params to resume it, or set "
                "`overwrite: true` (or `resume: false`) to start this run_dir over, or choose another `run_dir`."
            )
        self.task.load_state_dict(state.get("task", {}))
        self.task.on_epoch_start(state["epoch"] + 1, self)  # restore the stage's trainable set first
        self.task.model.load_state_dict(state["model"])
        self.rebuild_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.make_ema()
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.global_step = state["global_step"]
        self.history = state["history"]
        self.best_score = state["best_score"]
        self.best_epoch = state["best_epoch"]
        self.start_epoch = state["epoch"] + 1
        self.saved_epoch = state["epoch"]
        ranks_rng = state.get("rng_ranks")
        rank = self.accelerator.process_index
        set_rng_state(ranks_rng[rank] if ranks_rng and len(ranks_rng) == self.world else state["rng"], self.loader_gen)
        log.info("Resumed %s after epoch %d", self.run_dir, state["epoch"])
        return True

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> tuple[dict, list[dict]]:
        """Validation metrics and detections. Several processes: each predicts its share of the images, the
        main process evaluates all of them (each image once) and every process gets its metrics; the
        detections are the main process's (empty elsewhere)."""
        model = self.eval_model()
        was_training = model.training
        model.eval()
        if self.world > 1:
            try:
                return self._evaluate_sharded(model)
            finally:
                model.train(was_training)
        try:
            metrics, dets = evaluate(
                self.task.predict_fn(model),
                self.val_loader,
                self.coco_gt,
                self.task.class_names,
                self.cat_ids,
                top_k=self.params.top_k,
                device=self.accelerator.device,
                progress=self.progress,
            )
        finally:
            model.train(was_training)
        return metrics, dets

    def _evaluate_sharded(self, model: nn.Module) -> tuple[dict, list[dict]]:
        dataset = self.val_loader.dataset
        rank = self.accelerator.process_index
        indices = list(range(rank, len(dataset), self.world))  # strided: every image on exactly one rank
        loader = DataLoader(
            Subset(dataset, indices),
            batch_size=self.val_loader.batch_size,
            shuffle=False,
            collate_fn=self.val_loader.collate_fn,
            num_workers=self.val_loader.num_workers,
            pin_memory=self.val_loader.pin_memory,
        )
        results, image_ids = predict(
            self.task.predict_fn(model),
            loader,
            top_k=self.params.top_k,
            device=self.accelerator.device,
            progress=self.progress and self.is_main,
        )
        shard = [
            (index, to_coco_detections([result], [image_id], self.cat_ids))
            for index, result, image_id in zip(indices, results, image_ids)
        ]
        shards = distributed.gather_objects(shard)
        metrics, dets = None, []
        if self.is_main:
            dets = distributed.merge_detection_shards(shards, len(dataset))
            metrics = coco_evaluate(self.coco_gt, dets, self.task.class_names, self.cat_ids)
        return distributed.broadcast_object(metrics), dets

    def analyse(self) -> dict:
        """The error analysis of the selected checkpoint's detections (``{run_dir}/detections_val.json``):
        writes ``{run_dir}/analysis.json`` and returns ``{"operating_points", "errors"}`` for ``final``
        (:mod:`tfg_mm.evaluation.analysis`); ``{}`` when no detections were kept."""
        if not self.is_main or not self.files.detections.exists():
            return {}
        self.stage = "analyse"
        start = time.perf_counter()
        out = analysis.analyse_run(self.run_dir, self.coco_gt, None, self.task.class_names, self.cat_ids)
        log.info("error analysis of %s in %.2f s", self.run_dir.name, time.perf_counter() - start)
        return out

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        p = self.params
        self._fit_t0 = time.perf_counter()
        self.task.model.to(self.accelerator.device)
        if self.world > 1:
            distributed.broadcast_module(self.task.model)  # rank 0's initial weights everywhere, as DDP does
            self.train_loader = self._sharded_train_loader()
        self.stage = "resume"
        if not self.try_resume():
            self.epoch = 0
            self.stage = "setup"
            self.task.on_epoch_start(0, self)
            self.rebuild_optimizer()
            self.make_ema()
            # epoch-0 evaluation: the starting point of every trajectory (phase 2: the exact-start check)
            self._evaluate_and_record(epoch=0, losses={}, seconds=0.0, lr=0.0)
        if p.compile == "backbone":
            compile_static_parts(self.task.model)  # after the EMA's copy (see its docstring)
        for epoch in range(max(1, self.start_epoch), p.epochs + 1):
            self.epoch, self.stage = epoch, "setup"
            set_augment_tail(self.train_loader, epoch, p.epochs, p.no_aug_epochs)
            self.task.on_epoch_start(epoch, self)
            t0 = time.perf_counter()
            self._epoch_first_step, self.stage = self.global_step, "train"
            losses = self._train_one_epoch(epoch)
            seconds = time.perf_counter() - t0
            if epoch % p.eval_every == 0 or epoch == p.epochs:
                self._evaluate_and_record(epoch, losses, seconds, self.optimizer.param_groups[0]["lr"])
            if epoch % p.save_every == 0 or epoch == p.epochs:
                self.save_state(epoch)
        self.stage = "finish"
        return self._finish()

    def _sharded_train_loader(self) -> DataLoader:
        """Each rank's disjoint share of every global batch (accelerate's ``split_batches``): the loader the
        experiment built holds ``batch_size`` x processes images a batch, in the order of the data seed."""
        return prepare_data_loader(
            self.train_loader,
            num_processes=self.world,
            process_index=self.accelerator.process_index,
            split_batches=True,
            put_on_device=False,
        )

    def _agree_on_step(
        self, epoch: int, step: int, loss: torch.Tensor | None, terms: dict, failure: NonFiniteError | None
    ) -> tuple[float, dict[str, float]]:
        """The step's loss and terms, averaged over the processes (one process: its own); a non-finite loss or a
        :class:`NonFiniteError` on any process stops every process with the same :class:`TrainingError`.

        The non-finite guard: the criterion checks the model outputs (logits, boxes, corners of every decoder /
        encoder / denoising output) before its matcher and every term before returning it
        (:func:`tfg_mm.detector.outputs.check_finite_outputs`): NaN boxes would otherwise die in transformers' GIoU
        assertion as a raw ValueError. Here the error gets the epoch, step, run and fixes; the total is checked too
        (a task whose loss does not go through that criterion, or a sum that overflows).
        """
        value = float(loss.detach().float().item()) if loss is not None else math.nan
        own = (failure.what != "another process", str(failure).rstrip(".")) if failure is not None else None
        shards = distributed.gather_objects((own, value, terms))

        def who(rank: int) -> str:
            return f"process {rank} of {self.world}: " if self.world > 1 else ""

        origin = [(r, f[1]) for r, (f, _, _) in enumerate(shards) if f is not None and f[0]]
        if origin or any(f is not None for f, _, _ in shards):
            rank, what = origin[0] if origin else (0, "non-finite value")
            raise TrainingError(self._non_finite_message(epoch, step, who(rank) + what)) from failure
        bad = [r for r, (_, v, _) in enumerate(shards) if not math.isfinite(v)]
        if bad:
            rank, (_, v, rank_terms) = bad[0], shards[bad[0]]
            raise TrainingError(self._non_finite_message(epoch, step, who(rank) + _describe_non_finite(v, rank_terms)))
        keys = list(dict.fromkeys(k for _, _, t in shards for k in t))
        mean_terms = {k: sum(float(t.get(k, 0.0)) for _, _, t in shards) / self.world for k in keys}
        return sum(v for _, v, _ in shards) / self.world, mean_terms

    def _train_one_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch, a step at a time: forward and loss, the processes agree on it (and on any non-finite value),
        backward, the mean gradient over the processes, unscale (fp16), clip, step, BatchNorm statistics averaged
        over the processes, EMA. In one process the collectives return at once and the scaler is disabled (its
        unscale / step / update are the optimiser's own step), so the same lines run everywhere."""
        p = self.params
        model = self.task.model
        self.task.set_train_mode(model)
        trained = [q for g in self.optimizer.param_groups for q in g["params"]]
        sums: dict[str, float] = {}
        count = 0
        steps = self.steps_per_epoch()
        bar = tqdm(
            self.train_loader,
            total=steps,
            desc=f"epoch {epoch}/{p.epochs}",
            disable=not (self.progress and self.is_main),
            leave=False,
        )
        t_step = time.perf_counter()
        loss_sum = 0.0
        channels_last = channels_last_images(p.memory_format, self.accelerator.device)
        for step, batch in enumerate(bar):
            if step >= steps:
                break
            batch = _to_device(batch, self.accelerator.device, channels_last)
            lr = self.set_lr()
            loss, failure = None, None
            try:
                with self.accelerator.autocast():
                    loss, terms = self.task.loss(model, batch, epoch)
            except NonFiniteError as exc:  # every process learns of it below
                terms, failure = {}, exc
            loss_value, terms = self._agree_on_step(epoch, step, loss, terms, failure)
            self.optimizer.zero_grad(set_to_none=True)
            self.accelerator.backward(loss)  # amp fp16: the loss times the gradient scaler's scale
            distributed.average_gradients(trained)  # the mean gradient of the global batch (what DDP computes)
            # fp16: the true gradients, for clipping; the guard above saw the unscaled loss, so a scale too high for
            # float16 (gradients inf / nan) is not a divergence: the scaler skips that step and lowers its scale
            self.scaler.unscale_(self.optimizer)
            if p.grad_clip > 0:
                self.accelerator.clip_grad_norm_(trained, p.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.global_step += 1
            distributed.average_buffers(model)  # BatchNorm running statistics: the mean over the processes
            if self.ema is not None:
                self.ema.update_parameters(model)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
            loss_sum += loss_value
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}")
            now = time.perf_counter()
            self._train_seconds += now - t_step
            self._train_steps += 1
            t_step = now
            if now - self._last_progress >= PROGRESS_EVERY_S or step + 1 == steps:
                self._progress("train", epoch, step=step + 1, steps=steps, loss=loss_sum / count, lr=lr)
        return {k: v / max(1, count) for k, v in sums.items()}

    # -- the progress log ----------------------------------------------------------------------
    def _evaluations_left(self, first_epoch: int) -> int:
        p = self.params
        return sum(1 for e in range(max(1, first_epoch), p.epochs + 1) if e % p.eval_every == 0 or e == p.epochs)

    def _time_left(self, evaluations_left: int) -> float | None:
        """Seconds left: the remaining steps at this process's mean step time, plus the evaluations left."""
        if not self._train_steps:
            return None
        steps_left = max(0, self.total_steps() - self.global_step)
        return steps_left * self._train_seconds / self._train_steps + evaluations_left * self._eval_seconds

    def _progress(self, event: str, epoch: int, evaluations_from: int | None = None, **values) -> None:
        """One line of ``{run_dir}/progress.jsonl`` (for the terminal; never read by a report; main process only)."""
        if not self.is_main:
            return
        self._last_progress = time.perf_counter()
        entry = {
            "run": portable_text(str(self.run_dir)),
            "event": event,
            "epoch": epoch,
            "epochs": self.params.epochs,
            "stage": getattr(self.task, "stage", None),
            **values,
            **(self._latest_eval or {}),
            "eta_s": self._time_left(self._evaluations_left(epoch if evaluations_from is None else evaluations_from)),
            "elapsed_s": round(self._last_progress - self._fit_t0, 1),
        }
        if entry["eta_s"] is not None:
            entry["eta_s"] = round(entry["eta_s"], 1)
        append_progress(self.run_dir, entry)

    def _non_finite_message(self, epoch: int, step: int, what: str) -> str:
        """The non-finite guard's message: where, what, what is kept, and the fixes with their current values."""
        p = self.params
        return (
            f"Training diverged at epoch {epoch}, step {step} of run {self.run_dir}: {what}. Nothing of this "
            f"epoch was written; the previous epoch's state is kept in {self.files.state} (if an epoch "
            f"finished) and its checkpoints in {self.files.checkpoints}. Fix: lower `lr` (now {p.lr}; phase 2: "
            f"`lr_fusion` {p.lr_fusion}), keep `grad_clip` > 0 (now {p.grad_clip}), use `amp: no` (now "
            f"{p.amp!r}), then rerun (an interrupted run resumes from its last epoch; with changed params use a "
            f"new `run_dir` or `overwrite: true`)."
        )

    def _evaluate_and_record(self, epoch: int, losses: dict, seconds: float, lr: float) -> None:
        self.stage = "evaluate"
        t0 = time.perf_counter()
        metrics, dets = self.evaluate()
        self._eval_seconds = time.perf_counter() - t0
        entry = {
            "epoch": epoch,
            "map": metrics["map"],
            "map50": metrics["map50"],
            "map75": metrics["map75"],
            "map_small": metrics.get("map_small"),
            "map_medium": metrics.get("map_medium"),
            "map_large": metrics.get("map_large"),
            "per_class": metrics["per_class"],
            "lr": lr,
            "loss": sum(losses.values()) if losses else None,
            "losses": _summarise_losses(losses),
            "seconds": round(seconds, 3),
            **self.task.epoch_extra(self.eval_model()),
        }
        self.history.append(entry)
        score = metrics[self.params.select_metric]  # the main process's, on every rank (broadcast)
        model = self.eval_model()
        meta = {"epoch": epoch, "metrics": _headline(metrics), "run_dir": str(self.run_dir)}
        if self.is_main:
            self.task.save_model(model, self.files.last, meta)
        if self._selects(epoch, score):
            self.best_score = score
            self.best_epoch = epoch
            if self.is_main:
                self.task.save_model(model, self.files.best, meta)
                # the selected checkpoint's validation detections: the ablation statistics resample them
                atomic_write_json(self.files.detections, dets)
        if self.is_main:
            self.write_contract(self.history, None, "running")
        self._latest_eval = {"map": metrics["map"], "map50": metrics["map50"], "map_epoch": epoch}
        self._progress("eval", epoch, evaluations_from=epoch + 1)
        if self.progress and self.is_main:
            tqdm.write(f"[{self.run_dir.name}] epoch {epoch}: mAP {metrics['map']:.4f}  mAP50 {metrics['map50']:.4f}")

    def _selects(self, epoch: int, score: float) -> bool:
        """Whether this evaluated epoch becomes the run's checkpoint (``select``). Epoch 0 is the starting point
        (in phase 2 the baseline itself): the reference, not a candidate, unless ``select: best_val_or_baseline``
        or the run trains no epoch. ``last``: every later evaluation replaces the selection."""
        p = self.params
        if epoch == 0 and p.epochs > 0 and p.select != "best_val_or_baseline":
            return False
        return p.select == "last" or score > self.best_score

    def selection(self) -> dict:
        """How the checkpoint was chosen, for ``final``: the rule in words, the parameters, and whether the run fell
        back to its starting point (``best_val_or_baseline`` choosing epoch 0: in phase 2, the baseline)."""
        p = self.params
        rule = {
            "best_val": f"best validation {p.select_metric} among the trained epochs 1-{p.epochs}",
            "last": f"the last epoch ({p.epochs})",
            "best_val_or_baseline": f"best validation {p.select_metric} among epochs 0 (the start) to {p.epochs}",
        }[p.select]
        if p.epochs == 0:
            rule = "epoch 0 (the run trains no epoch)"
        fell_back = p.select == "best_val_or_baseline" and p.epochs > 0 and self.best_epoch == 0
        return {"selected_by": rule, "select": p.select, "select_metric": p.select_metric, "fell_back": fell_back}

    def _finish(self) -> TrainResult:
        best = next(h for h in self.history if h["epoch"] == self.best_epoch)
        final = {k: v for k, v in best.items() if k not in ("losses", "lr", "seconds")}
        final.update(self.selection())
        final["convergence"] = convergence(self.history, self.params.select_metric)
        final["per_class"] = with_instances(final["per_class"], self.val_loader.dataset)
        final["checkpoint"] = str(self.files.best)
        final.update(self.analyse())
        if self.is_main:
            self.write_contract(self.history, final, "finished")
        self._progress("finish", self.params.epochs, best_epoch=self.best_epoch, best_map=best["map"])
        distributed.barrier()  # the other processes return once the contract is final
        return TrainResult(self.history, final, self.files.best, self.files.last)


def with_instances(per_class: dict, dataset) -> dict:
    """Each class's AP entry with its validation boxes; a class without any says so (its AP is null, not 0)."""
    counts = dataset.instance_counts() if hasattr(dataset, "instance_counts") else {}
    out = {}
    for name, entry in per_class.items():
        n = counts.get(name)
        out[name] = {**entry, **({"instances": n} if n is not None else {})}
        if n == 0:
            out[name].update(ap=None, ap50=None, note="no validation instances")
    return out


def _describe_non_finite(loss: float, terms: dict[str, float]) -> str:
    """The non-finite guard's account of a step's loss: the total, the terms that are not finite, all terms."""
    bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
    return (
        f"non-finite loss ({loss}); non-finite terms: {bad or 'none individually (the sum overflowed)'}; "
        f"all terms: { {k: round(v, 4) for k, v in terms.items()} }"
    )


def _headline(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("map", "map50", "map75") if k in metrics}


def _summarise_losses(losses: dict[str, float]) -> dict[str, float]:
    """Group the ~20-50 official loss terms by kind (mal, bbox, giou, fgl, ddf) for the history."""
    out: dict[str, float] = {}
    for k, v in losses.items():
        kind = k.split("_")[1] if k.startswith("loss_") and "_" in k else k
        key = f"loss_{kind}" if k.startswith("loss_") else k
        out[key] = round(out.get(key, 0.0) + v, 6)
    return out


def channels_last_images(memory_format: str, device) -> bool:
    """Whether training images go channels-last (``memory_format``; ``auto``: on the CPU only)."""
    if memory_format == "auto":
        return torch.device(device).type == "cpu"
    return memory_format == "channels_last"


def _to_device(batch: dict, device, channels_last: bool = False) -> dict:
    out = dict(batch)
    out["pixel_values"] = batch["pixel_values"].to(device)
    if channels_last:
        out["pixel_values"] = out["pixel_values"].contiguous(memory_format=torch.channels_last)
    out["labels"] = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in batch["labels"]]
    return out
