"""The one sequence of a training run, shared by phase 1 (:mod:`tfg_mm.training.baseline`) and phase 2 (:mod:`tfg_mm.training.phase2`).

:func:`run_experiment`, in this order:

1. the dataset is located (the embedded default is generated on first use) and fingerprinted,
   once: the record is stored in the run contract and folded into the run id;
2. a finished run with the same run id in ``run_dir`` is returned as it is (reuse);
3. a folder holding another run is refused, listing what differs (:func:`tfg_mm.training.runs.check_run_dir`):
   another finished run unless ``overwrite``, and an interrupted run unless it is this very run
   (same params, dataset and code), since resuming continues the old run; then ``run_dir`` is
   prepared;
4. the run's tracking starts (:func:`tfg_mm.training.tracking.start`: MLflow / TensorBoard, or nothing with
   ``tracking: none``; a resumed run continues its MLflow run), before seeding, so that nothing
   the tracking libraries do can move a random number of the run;
5. every RNG is seeded, then the data are loaded, then the phase builds its model and task. This
   order fixes which random numbers each step draws, so it is part of a run's result;
6. the loop (:class:`~tfg_mm.training.loop.Trainer`) trains and rewrites the run contract after every
   evaluated epoch, or, for an evaluation-only run, the checkpoint is evaluated once; each contract
   is also handed to the tracker, which logs what is new (and, at the end, the artefacts);
7. the run contract, as written, is returned.

Several processes (``torchrun`` / ``accelerate launch``, data parallelism: :mod:`tfg_mm.runtime.distributed`):
steps 1-4 run on the main process (the others wait and get its outcome, an error included), the data
are loaded by the main process first (it validates and caches, the others then read), every
process seeds with ``seed`` (data order) and ``seed + rank`` (augmentation), the train loader holds
``batch_size`` x processes images a batch (each process trains on its share: the Trainer), and only
the main process writes the run folder, the contract and the tracking. The number of processes is
part of the run's identity (it changes the global batch): :func:`tfg_mm.training.identity.with_world_size`.

Any exception after step 3 (a bad batch, a non-finite loss, Ctrl-C, ...) marks the run failed
before it propagates: ``metrics.json`` keeps its history and gets ``status: failed`` and
``failure`` (type, message, epoch, step, stage, the traceback file ``run_dir/traceback.txt``); the
checkpoints already written stay; the tracked run ends FAILED (KILLED for Ctrl-C) with that
contract and traceback as artefacts. Rerunning the same command resumes from the last saved epoch.

The phase supplies its paths (:class:`~tfg_mm.paths.RunPaths`, resolved once when the run
starts), its name, what else its result depends on, and a ``build`` step that turns the loaded
:class:`~tfg_mm.data.loaders.Data` into a :class:`Setup`.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from tfg_mm.data.loaders import Data, make_data, record_of, resolve_dataset
from tfg_mm.io import atomic_write_json, atomic_write_text
from tfg_mm.paths import RunPaths
from tfg_mm.runtime import distributed
from tfg_mm.runtime.devices import check_amp, resolve_device
from tfg_mm.training import contract, identity, runs, tracking
from tfg_mm.training.interrupts import RunInterrupted, stop_on_signals
from tfg_mm.training.judge import judge_run
from tfg_mm.training.loop import Task, Trainer, with_instances
from tfg_mm.training.seeding import make_accelerator, seed_everything

log = logging.getLogger(__name__)

#: The per-class / size metrics an evaluation-only run records, as a training run's history does.
_EVAL_KEYS = ("map", "map50", "map75", "map_small", "map_medium", "map_large", "per_class")


@dataclass
class Setup:
    """What a phase builds once its data are loaded."""

    task: Task
    #: the phase's top-level entries of the run contract (they follow ``phase``)
    extra: dict
    #: an evaluation-only run: the checkpoint it evaluates, named in ``final``
    evaluated: str = ""


def run_experiment(
    params,
    paths: RunPaths,
    phase: str,
    build: Callable[[Data], Setup],
    *,
    depends_on: str = "",
    train: bool = True,
    progress: bool = True,
) -> dict:
    """Run one phase-1 / phase-2 experiment (the steps in the module docstring); returns its run contract.

    ``depends_on`` names what else the result depends on (phase 2: the baseline run's id); it is
    folded into the run id. ``train=False`` evaluates the model ``build`` loads instead of training.
    """
    accelerator = None
    if distributed.launched_world_size() > 1:  # the process group opens here, before any file is touched
        device = resolve_device(params.device)
        check_amp(params.amp, device)
        accelerator = make_accelerator(device, params.amp)
    world = accelerator.num_processes if accelerator is not None else 1
    is_main = accelerator is None or accelerator.is_main_process
    depends_on = identity.with_world_size(depends_on, world)
    code = identity.code_version()

    stack = contextlib.ExitStack()  # the run folder's lock, held from before any work to the end

    def prepare() -> tuple[dict, dict | None, dict | None]:
        stack.enter_context(runs.hold_run_dir(paths.run_dir))  # one writer per run folder (main process)
        root = resolve_dataset(params, progress=progress, root=paths.dataset)
        record = record_of(params, root)
        rid = identity.run_id(params, record["hash"], code, depends_on)
        if not params.overwrite:
            existing = runs.finished_run(paths.run_dir, rid)
            if existing is not None:
                log.info("reusing the finished run %s (same params, dataset and code)", paths.run_dir)
                return record, existing, None
        runs.check_run_dir(paths.run_dir, params, record["hash"], code, depends_on)
        # the run this one resumes (read before prepare_run_dir, which may start the folder over)
        resumed = runs.interrupted_run(paths.run_dir) if params.resume and not params.overwrite else None
        runs.prepare_run_dir(paths.run_dir, overwrite=params.overwrite, resume=params.resume)
        return record, None, resumed

    with stack, stop_on_signals():
        record, existing, resumed = _on_main(prepare, is_main, world)
        if existing is not None:
            return existing
        rid = identity.run_id(params, record["hash"], code, depends_on)
        # before seeding: whatever the tracking libraries do on import cannot shift a random number of the run
        tracker = (
            tracking.start(params, paths.run_dir, phase=phase, run_id=rid, dataset=record, code=code, previous=resumed)
            if is_main
            else tracking.Tracker()
        )
        trainer: Trainer | None = None
        setup: Setup | None = None
        try:
            loader_gen = seed_everything(params.seed, params.deterministic, rank=distributed.rank())
            if not is_main:  # the main process validates the images first (a cached marker), then the others
                distributed.barrier()
            data = make_data(params, loader_gen, progress=progress, need_train=train, record=record, processes=world)
            if is_main:
                distributed.barrier()
            setup = build(data)
            task = setup.task

            training = {"world_size": world, "batch_size_per_process": params.batch_size}
            training["global_batch_size"] = params.batch_size * world
            if data.shots:
                training["train_shots"] = data.shots

            def write_contract(history: list[dict], final: dict | None, status: str) -> None:
                if not is_main:
                    return
                if status == "finished" and data.test is not None and final is not None:
                    # judged once, after the selection: the held-out test split (nothing selects on it)
                    if trainer is not None:
                        trainer.stage = "judge"
                    final = {
                        **final,
                        "test": judge_run(
                            params,
                            paths,
                            data,
                            final,
                            last_epoch=history[-1]["epoch"] if train and history else None,
                            predict_fn=None if train else task.predict_fn(task.model),
                        ),
                    }

                def write() -> None:
                    contract.write_metrics(
                        paths.run_dir,
                        params=params,
                        dataset=record,
                        history=history,
                        final=final,
                        extra={
                            "phase": phase,
                            # the schedule used (`recipe: official` resolved: tfg_mm.detector.recipe.resolve_recipe)
                            **({"recipe": trainer.recipe} if trainer is not None else {}),
                            **setup.extra,
                            "training": training,
                            **task.contract_extra(),
                            **tracker.contract_entry(),
                        },
                        status=status,
                        depends_on=depends_on,
                    )

                write()
                errors = len(tracker.errors)
                tracker.log_contract(history, final)
                if status == "finished":
                    tracker.end("finished", [paths.metrics, *_figures(paths.run_dir)])
                if len(tracker.errors) != errors:  # a backend failed and was switched off: the contract says so
                    write()

            # an evaluation-only run never draws a training batch: its loop gets the validation loader
            trainer = Trainer(
                params,
                task,
                data.train_loader if train else data.val_loader,
                data.val_loader,
                data.val.coco,
                data.cat_ids,
                paths.run_dir,
                loader_gen,
                write_contract,
                progress,
                run_id=rid,
                accelerator=accelerator,
            )
            if train:
                trainer.fit()
            else:
                task.model.to(trainer.accelerator.device)
                trainer.stage = "evaluate"
                metrics, dets = trainer.evaluate()
                if is_main:
                    atomic_write_json(paths.detections, dets)
                entry = {
                    "epoch": 0,
                    **{k: metrics[k] for k in _EVAL_KEYS},
                    "lr": 0.0,
                    "loss": None,
                    "losses": {},
                    "seconds": 0.0,
                }
                final = {**entry, "selected_by": "evaluation only", "checkpoint": setup.evaluated, **trainer.analyse()}
                final["per_class"] = with_instances(final["per_class"], data.val)
                write_contract([entry], final, "finished")
                distributed.barrier()
        except BaseException as exc:  # recorded, then raised unchanged: the caller's exit code says it failed
            if not is_main:  # the main process records it (every process raises the same TrainingError)
                raise
            _record_failure(exc, paths, params, record, phase, depends_on, setup, trainer, tracker)
            status = "killed" if isinstance(exc, (KeyboardInterrupt, RunInterrupted)) else "failed"
            tracker.end(status, [paths.metrics, paths.traceback])
            raise
        return contract.read_metrics(paths.run_dir)


def _on_main(step: Callable, is_main: bool, world: int):
    """``step()`` on the main process; the other processes wait and get its result, or raise its error."""
    if world == 1:
        return step()
    outcome, error = None, None
    if is_main:
        try:
            outcome = step()
        except Exception as exc:  # handed to the other processes, then raised here unchanged
            error = exc
    try:
        shared = distributed.broadcast_object((outcome, error))
    except Exception:  # an error that does not pickle: its message
        shared = distributed.broadcast_object((outcome, RuntimeError(f"{type(error).__name__}: {error}")))
    if error is not None:
        raise error
    if shared[1] is not None:
        raise shared[1]
    return shared[0]


def _record_failure(
    exc: BaseException,
    paths: RunPaths,
    params,
    record: dict,
    phase: str,
    depends_on: str,
    setup: Setup | None,
    trainer: Trainer | None,
    tracker: tracking.Tracker,
) -> None:
    """Write ``run_dir/traceback.txt`` and mark the run contract failed — or ``interrupted`` when a signal stopped
    it (:class:`~tfg_mm.training.interrupts.RunInterrupted`: it gets ``run_dir``, ``epoch``, ``step`` and the last
    saved epoch for the command line's one line) — never raising over ``exc``."""
    interrupted = isinstance(exc, RunInterrupted)
    status = "interrupted" if interrupted else "failed"
    failure = {
        "type": type(exc).__name__,
        "message": str(exc)[:4000],
        **({"signal": exc.signal} if interrupted else {}),
        "epoch": trainer.epoch if trainer is not None else None,
        "step": trainer.step if trainer is not None else None,
        "stage": trainer.stage if trainer is not None else "setup",
        "traceback": paths.traceback.name,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if interrupted:
        saved = trainer.saved_epoch if trainer is not None else None
        exc.where = {"run_dir": str(paths.run_dir), **failure, "saved_epoch": saved}
    try:
        atomic_write_text(paths.traceback, "".join(traceback.format_exception(exc)))
        if contract.mark_failed(paths.run_dir, failure, status) is None:  # nothing evaluated yet: a contract of its own
            extra = {
                "phase": phase,
                **(setup.extra if setup is not None else {}),
                **tracker.contract_entry(),
                "failure": failure,
            }
            contract.write_metrics(
                paths.run_dir,
                params=params,
                dataset=record,
                history=[],
                final=None,
                extra=extra,
                status=status,
                depends_on=depends_on,
            )
        if not interrupted:
            log.error(
                "run %s failed (%s); recorded in its metrics.json and %s",
                paths.run_dir,
                failure["type"],
                paths.traceback.name,
            )
    except Exception:  # the original error matters more than its record
        log.exception("could not record the failure of %s", paths.run_dir)


def _figures(run_dir) -> list:
    """PNG / SVG files a run wrote into its own folder (logged with its artefacts)."""
    return sorted(p for p in run_dir.iterdir() if p.suffix in (".png", ".svg") and p.is_file())
