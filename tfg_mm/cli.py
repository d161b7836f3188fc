"""The project's one command line: ``python -m tfg_mm <command>`` (``--help`` lists them).

Parameters for ``train`` / ``phase2`` come from flat YAML files (``--params``, repeatable) and
``key=value`` overrides, validated by the schema in :mod:`tfg_mm.config` before any work starts.
Files are merged in the order given, then the overrides in the order given: later wins, and an
override on the command line wins over every file, wherever it stands
(``--params A k=v --params B k=w`` is A, then B, then k=v, then k=w).

Exit codes: 0 success; 2 one of the project's errors (the message names the file / parameter and the
fix: a bad parameter, a run folder in use by another process, a full disk, ...); 128 + the signal when a
run is stopped from outside (130 Ctrl-C / SIGINT, 143 SIGTERM, 138 SIGUSR1), after one line naming what
stopped it and the command that resumes it; any other failure exits non-zero with Python's traceback. A
training run that fails is marked ``status: failed`` in its ``metrics.json``, with its traceback in
``run_dir/traceback.txt``; a stopped one ``status: interrupted``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import yaml
from transformers.utils import logging as hf_logging

from tfg_mm import ablations, reporting
from tfg_mm.config import default_of, load_params, parameter_reference
from tfg_mm.data.importers import DIFFICULT_MODES, voc_to_coco, yolo_to_coco
from tfg_mm.data.loaders import DEFAULT_DATASET
from tfg_mm.data.split import format_counts, split_coco
from tfg_mm.data.synthetic import HARD_CLASSES, generate
from tfg_mm.deploy.benchmark import DEPLOY_FILE, benchmark_target, deploy_lines
from tfg_mm.deploy.export import export_lines, export_run
from tfg_mm.deploy.predict import collect_source, default_out, load_predictor, predict, summary_lines
from tfg_mm.detector.convert import main as convert_main
from tfg_mm.errors import TfgError, TrainingError
from tfg_mm.io import atomic_write_text
from tfg_mm.paths import RunPaths, portable_text, project_root
from tfg_mm.runtime import distributed
from tfg_mm.training.baseline import run_baseline
from tfg_mm.training.interrupts import RunInterrupted
from tfg_mm.training.judge import evaluate_target, evaluation_table
from tfg_mm.training.phase2 import run_phase2
from tfg_mm.workflow.pipeline import STEPS, run_pipeline

# Imports at module level (as everywhere in tfg_mm, except the optional back-ends: MLflow, TensorBoard, open_clip,
# faster-coco-eval, and papermill when a notebook is executed).


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise TfgError(f"Argument {pair!r} is not key=value. Fix: write e.g. `epochs=3`.")
        key, value = pair.split("=", 1)
        out[key.strip().lstrip("-")] = yaml.safe_load(value)
    return out


def _params(args):
    sources = list(args.params or [])
    return load_params(*sources, **_overrides(args.set))


def cmd_generate(args) -> int:
    t0 = time.perf_counter()
    out = generate(
        args.out,
        seed=args.seed,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        image_size=args.image_size,
        progress=True,
        stress=args.stress,
        **({"classes": [c.strip() for c in args.classes.split(",") if c.strip()]} if args.classes else {}),
    )
    print(f"synthetic dataset in {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_import_voc(args) -> int:
    out = voc_to_coco(args.voc_dir, args.out_json, images_dir=args.images_dir, difficult=args.difficult)
    print(f"wrote {out}")
    return _split_after_import(args, out)


def cmd_import_yolo(args) -> int:
    names = (
        [c.strip() for c in args.classes.split(",")]
        if "," in args.classes or not Path(args.classes).exists()
        else [line.strip() for line in Path(args.classes).read_text().splitlines() if line.strip()]
    )
    out = yolo_to_coco(args.labels_dir, args.images_dir, names, args.out_json)
    print(f"wrote {out}")
    return _split_after_import(args, out)


def _print_split(record: dict, out_dir: Path) -> None:
    print(format_counts(record))
    files = ", ".join(record["files"].values())
    print(f"wrote {files} and split_counts.json in {out_dir}")


def _split_after_import(args, out: Path) -> int:
    if args.val_fraction is None:
        return 0
    record = split_coco(out, val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed)
    _print_split(record, Path(out).parent)
    return 0


def cmd_split(args) -> int:
    record = split_coco(
        args.coco_json,
        out_dir=args.out,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
    )
    _print_split(record, Path(args.out) if args.out else Path(args.coco_json).parent)
    return 0


def _split_options(p, val_default: float | None) -> None:
    p.add_argument(
        "--val-fraction",
        type=float,
        default=val_default,
        help="fraction of the images in val.json"
        + (" (default 0.2)" if val_default is not None else "; given, the imported json is split right away"),
    )
    p.add_argument(
        "--test-fraction", type=float, default=0.0, help="fraction of the images in test.json (default 0: none)"
    )
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0): the same seed gives the same split")


def cmd_convert(args) -> int:
    argv = [args.checkpoint, args.out_dir] + (["--size", args.size] if args.size else [])
    return convert_main(argv)


def _run_phase(run, label: str, args) -> int:
    """``train`` / ``phase2``: the phase's run from the command's params, and one line of its result."""
    metrics = run(_params(args))
    if distributed.rank() == 0:  # several processes: the main one reports
        f = metrics["final"]
        print(f"{label}: mAP {f['map']:.4f}  mAP50 {f['map50']:.4f}  (run_dir {metrics['params']['run_dir']})")
    return 0


def cmd_train(args) -> int:
    return _run_phase(run_baseline, "baseline", args)


def cmd_phase2(args) -> int:
    return _run_phase(run_phase2, "phase 2", args)


def cmd_evaluate(args) -> int:
    record, path = evaluate_target(args.target, args.split, args.which, _sources(args))
    print(evaluation_table(record))
    print(f"wrote {portable_text(str(path))}")
    return 0


def _sources(args) -> list:
    return [*(args.params or []), *([_overrides(args.set)] if args.set else [])]


def _no_load_bars() -> None:
    """predict / export / benchmark load a checkpoint once or twice: transformers' "Loading weights" bars would come
    before the command's own output and say nothing it does not (the training commands keep them)."""
    hf_logging.disable_progress_bar()


def cmd_predict(args) -> int:
    source = collect_source(args.source)  # checked before anything is loaded or written
    _no_load_bars()
    predictor = load_predictor(
        args.target, threshold=args.threshold, device=args.device, backend=args.backend, sources=_sources(args)
    )
    out = Path(args.out) if args.out else default_out(args.target)
    summary = predict(predictor, source, out, batch_size=args.batch_size, save_images=not args.no_images)
    print("\n".join(summary_lines(summary, out)))
    return 0


def cmd_export(args) -> int:
    _no_load_bars()
    record = export_run(args.target, image_size=args.image_size, batch=args.batch, sources=_sources(args))
    print("\n".join(export_lines(record)))
    return 0 if record["check"]["passed"] else 1


def cmd_benchmark(args) -> int:
    _no_load_bars()
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    record = benchmark_target(
        args.target,
        device=args.device,
        batches=batches,
        runs=args.runs,
        warmup=args.warmup,
        sources=_sources(args),
        backends=[b.strip() for b in args.backend.split(",")],
    )
    print("\n".join(deploy_lines(record)))
    print(f"wrote {portable_text(str(RunPaths.at(args.target).run_dir / DEPLOY_FILE))}")
    return 0


def cmd_params_doc(args) -> int:
    text = parameter_reference()
    if args.write:
        atomic_write_text(args.write, text)
        print(f"wrote {args.write}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_pipeline(args) -> int:
    run_pipeline(grid=args.grid, skip_ablations=args.skip_ablations, params_dir=args.params_dir, only=args.only)
    return 0


def cmd_report(args) -> int:
    # the statistics first (they may re-predict detections); the index only draws them
    summary = ablations.summarize_if_run(args.ablations_dir)
    hard = summary["hard_classes"] if summary else HARD_CLASSES
    flips = reporting.phase2_flips(args.phase2_dir, hard)
    deployment = reporting.read_deployments(args.phase2_dir)
    lowshot = reporting.read_lowshot(args.lowshot_dir)
    print(reporting.build_index(summary, flips=flips, deployment=deployment, lowshot=lowshot))
    return 0


def _params_options(p, example: str, what: str = "repeatable, merged in order") -> None:
    p.add_argument("--params", action="append", help=f"flat YAML parameter file ({what})")
    p.add_argument("set", nargs="*", help=f"key=value overrides, e.g. {example}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tfg_mm",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="write the embedded synthetic defect dataset (COCO folder)")
    p.add_argument("--out", default=str(project_root() / DEFAULT_DATASET))
    p.add_argument("--seed", type=int, default=default_of("synthetic_seed"))
    p.add_argument("--n-train", type=int, default=default_of("synthetic_train"))
    p.add_argument("--n-val", type=int, default=default_of("synthetic_val"))
    p.add_argument(
        "--n-test", type=int, default=default_of("synthetic_test"), help="held-out test images (0: no test split)"
    )
    p.add_argument("--image-size", type=int, default=default_of("synthetic_image_size"))
    p.add_argument(
        "--stress",
        action="store_true",
        help="the stress case: grayscale images with image-spanning defects (boxes touching every border)",
    )
    p.add_argument(
        "--classes",
        default=None,
        help="comma-separated subset of the classes to draw (default all six: scratch,perforation,break,stain,dent,"
        "inclusion); category ids follow the order given",
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("import-voc", help="convert a Pascal VOC XML dataset to a COCO json")
    p.add_argument("voc_dir", help="folder with the VOC XML annotations (or a VOC root with Annotations/)")
    p.add_argument("out_json")
    p.add_argument("--images-dir", default=None)
    p.add_argument(
        "--difficult",
        choices=DIFFICULT_MODES,
        default="ignore",
        help="<difficult>1</difficult> objects: ignore = iscrowd 1, ignored by COCO evaluation and left out of the "
        "training targets (default); keep = ordinary boxes; drop = left out",
    )
    _split_options(p, None)
    p.set_defaults(func=cmd_import_voc)

    p = sub.add_parser("import-yolo", help="convert a YOLO txt dataset to a COCO json")
    p.add_argument("labels_dir")
    p.add_argument("images_dir")
    p.add_argument("out_json")
    p.add_argument("--classes", required=True, help="comma-separated class names, or a file with one name a line")
    _split_options(p, None)
    p.set_defaults(func=cmd_import_yolo)

    p = sub.add_parser(
        "split",
        help="stratified, seeded train / val (/ test) split of one COCO json (train.json, val.json, split_counts.json)",
    )
    p.add_argument("coco_json")
    p.add_argument("--out", default=None, help="output folder (default: beside the input json)")
    _split_options(p, 0.2)
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("convert", help="import an official DEIMv2 .pth checkpoint into the project's format")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--size", default=None, help="atto, femto, pico, n, s, m, l or x (inferred when omitted)")
    p.set_defaults(func=cmd_convert)

    for name, func, helptext in (
        ("train", cmd_train, "phase 1: train / evaluate the DEIMv2 baseline"),
        ("phase2", cmd_phase2, "phase 2: progressive fine-tuning with the text branch"),
    ):
        p = sub.add_parser(name, help=helptext)
        _params_options(p, "epochs=3 run_dir=runs/try")
        p.set_defaults(func=func)

    p = sub.add_parser(
        "evaluate",
        help="evaluate a finished run (its selected or last checkpoint) or a checkpoint folder on a split",
        description="Evaluates RUN_OR_CHECKPOINT on --split (train / val / test of its params, or a COCO json of the "
        "same classes), applies a run's validation operating points, writes evaluation_<split>.json and its "
        "detections into the folder, and prints the per-class table. A checkpoint folder takes its dataset and "
        "size from --params / key=value.",
    )
    p.add_argument("target", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--split", default="test", help="train, val, test (default) or a COCO json file")
    p.add_argument("--which", choices=("selected", "last"), default="selected", help="a run's checkpoint")
    _params_options(p, "dataset=data/mine test_json=test.json")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "predict",
        help="a finished run (or checkpoint folder) on new images, a folder, a glob or a video",
        description="Detects with the run's selected checkpoint (a phase-2 run with its fused text branch) on SOURCE: "
        "one image, a folder (recursive), a quoted glob or a video file (PyAV, the `video` extra). Writes annotated "
        "images (or the annotated video), predictions.json (COCO results with file names), predictions.csv and "
        "summary.json into --out, and prints the boxes per class.",
    )
    p.add_argument("target", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--out", default=None, help="output folder (default runs/predict/<run name>)")
    p.add_argument(
        "--threshold",
        default="auto",
        help="auto (default): each class's operating point chosen on validation; a number: that score for every class",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the run's device if present)")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch", help="onnx: the run's exported file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-images", action="store_true", help="write the predictions only, no annotated images")
    _params_options(p, "dataset=data/mine image_size=320", "for a checkpoint folder: its dataset and size")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "export",
        help="ONNX export of a finished run, post-processing in the graph, checked against PyTorch",
        description="Writes {run_dir}/export/model.onnx (boxes in pixels, scores, labels: the top-k post-processing "
        "inside the graph; a phase-2 run's text branch folded in) and export.json with the check: ONNX Runtime vs "
        "PyTorch on validation images and the validation mAP of both. Exits 1 when the check fails (the file is kept, "
        "export.json says FAILED).",
    )
    p.add_argument("target", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--format", choices=("onnx",), default="onnx")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the run's image_size)")
    p.add_argument("--batch", default="dynamic", help="dynamic (default) or a fixed batch size")
    _params_options(p, "dataset=data/mine image_size=320", "for a checkpoint folder: its dataset and size")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "benchmark",
        help="parameters, GFLOPs, latency and throughput of a run per runtime ({run_dir}/deploy.json)",
    )
    p.add_argument("target", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--batch", default="1,8", help="batch sizes, comma-separated (default 1,8)")
    p.add_argument("--backend", default="torch,onnx", help="torch, onnx or both (default torch,onnx)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per measurement (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    _params_options(p, "dataset=data/mine image_size=320", "for a checkpoint folder: its dataset and size")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("pipeline", help="the main job: data -> baseline -> phase 2 -> ablation grid -> reports")
    p.add_argument("--grid", default=None, help="ablation grid file (default: the small grid)")
    p.add_argument("--params-dir", default=str(project_root() / "params"))
    p.add_argument("--skip-ablations", action="store_true")
    p.add_argument(
        "--only",
        action="append",
        choices=STEPS,
        default=None,
        help="run only this step (repeatable); each finds or trains what it needs first",
    )
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("report", help="rebuild reports/index.html from finished runs")
    p.add_argument("--ablations-dir", default=str(project_root() / "runs" / "ablations"))
    p.add_argument(
        "--phase2-dir",
        default=str(project_root() / "runs" / "phase2"),
        help="the phase-2 run whose baseline -> phase 2 flips (and deployment figures, when benchmarked) the index shows",
    )
    p.add_argument(
        "--lowshot-dir",
        default=str(project_root() / "runs" / "lowshot"),
        help="the low-data grid (notebook 04, `make lowshot`) whose figure the index shows, when it has run",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("params-doc", help="print (or --write) the generated parameter reference")
    p.add_argument("--write", default=None)
    p.set_defaults(func=cmd_params_doc)
    return parser


#: Commands whose key=value overrides may stand anywhere, also after a repeated ``--params``.
_PARAMS_COMMANDS = ("train", "phase2", "evaluate", "predict", "export", "benchmark")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse takes one batch of a positional `nargs="*"` argument: key=value pairs after a second
    # `--params` come back as unknown arguments, and are overrides too (in order, after the first batch)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        stray = [u for u in unknown if args.command not in _PARAMS_COMMANDS or "=" not in u or u.startswith("-")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        args.set = list(args.set or []) + unknown
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (TfgError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:
        print(interrupted_line(exc, argv if argv is not None else sys.argv[1:]), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside a run (the pipeline between notebooks, a report, an import)
        command = " ".join(["python -m tfg_mm", *(argv if argv is not None else sys.argv[1:])])
        print(
            f"stopped by SIGINT (Ctrl-C). Rerun `{command}`: finished runs are reused, interrupted ones resume.",
            file=sys.stderr,
        )
        return 130


def interrupted_line(exc: RunInterrupted, argv: list[str]) -> str:
    """The one line a stopped run leaves in the terminal: what stopped it, where, and the command that resumes it."""
    where = getattr(exc, "where", None) or {}
    at = ", ".join(f"{k} {where[k]}" for k in ("epoch", "step") if where.get(k) is not None)
    saved = where.get("saved_epoch")
    run = f" run {portable_text(where['run_dir'])}" if where.get("run_dir") else ""
    record = (
        f" recorded `status: interrupted`; it resumes after epoch {saved}"
        if saved is not None
        else " recorded `status: interrupted` (no epoch saved yet: it starts over)"
        if where
        else ""
    )
    command = " ".join(["python -m tfg_mm", *argv])
    return f"stopped by {exc.signal}{f' at {at}' if at else ''}:{run}{record}. Resume with: {command}"
