"""Training-step speed of the embedded default (issue 10, item 4): options side by side in ONE process.

    python scripts/bench_step.py                 # every option, interleaved, median of the repeats
    python scripts/bench_step.py --compile       # also `compile: backbone` (a minute or two of compiling, once)
    python scripts/bench_step.py --epoch         # also one full epoch: chosen default vs today
    python scripts/bench_step.py --profile       # the top operators of today's step (torch.profiler)
    python scripts/bench_step.py --components 20 --out reports/bench_step_parts.json  # the parts alone

The model and loss are those of ``params/baseline.yaml`` (atto, 160 px, batch 8, the official criterion),
on real batches of the embedded synthetic set (augmented, as in training). One *step* is what the training
loop does per batch: forward + loss, ``zero_grad``, backward, gradient clipping (0.1), optimiser step and
the EMA update. Each option starts from the same weights and batches; the options run interleaved (one
round = a few steps of every option, in turn), rounds are repeated and the median ms / step is reported,
so that a machine shared with other work affects every option alike. Ratios are ``today / option``
(> 1: faster). Prints a table and writes ``reports/bench_step.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from transformers.loss.loss_for_object_detection import box_iou, generalized_box_iou  # noqa: E402

from tfg_mm import detector  # noqa: E402
from tfg_mm.config import load_params  # noqa: E402
from tfg_mm.data.coco import CocoDetection, collate  # noqa: E402
from tfg_mm.data.synthetic import generate  # noqa: E402
from tfg_mm.detector import loss as tfg_loss  # noqa: E402
from tfg_mm.detector.outputs import official_outputs  # noqa: E402
from tfg_mm.detector.speed import ChannelsLastMaxPool2d, compile_static_parts  # noqa: E402
from tfg_mm.io import atomic_write_json  # noqa: E402
from tfg_mm.paths import project_root  # noqa: E402
from tfg_mm.training.baseline import BaselineTask  # noqa: E402
from tfg_mm.training.optim import EMA, build_optimizer, ema_multi_avg_fn  # noqa: E402
from tfg_mm.training.seeding import seed_everything  # noqa: E402

REPO = project_root()


@dataclass
class Option:
    """One way of running the step: model build overrides, optimiser kind, memory format, global switches."""

    name: str
    what: str
    attn: str | None = None  # None: the project's default
    optimizer_impl: str | None = None  # None: the project's default
    channels_last: bool = False  # the model's weights and the images in channels-last format
    channels_last_input: bool = True  # only the images (the activations follow them): `memory_format: auto` on CPU
    deterministic: bool = True
    threads: int | None = None
    compile: bool = False
    ema: str = "lean"  # "torch": torch's AveragedModel.update_parameters (before this change)
    pool: str = "channels-last"  # "torch": nn.MaxPool2d in the input's (contiguous) format
    loss: str = "paired"  # "matrix": the loss before this change (diagonal of N x N IoU / GIoU matrices)


def _params():
    import yaml

    values = yaml.safe_load((REPO / "params" / "baseline.yaml").read_text())
    values.update(dataset=str(REPO / "data" / "synthetic"), run_dir=str(REPO / "runs" / "bench_step"))
    return load_params(values)


def _dataset(params) -> CocoDetection:
    root = Path(params.dataset)
    if not (root / params.train_json).exists():
        generate(root, progress=False)
    return CocoDetection(
        root, params.train_json, params.images_dir, image_size=params.image_size, train=True, augment=True
    )


def _batches(ds: CocoDetection, batch_size: int, n: int) -> list[dict]:
    torch.manual_seed(0)
    order = torch.randperm(len(ds)).tolist()
    return [collate([ds[order[(i * batch_size + j) % len(ds)]] for j in range(batch_size)]) for i in range(n)]


def _build(option: Option, params, num_classes: int, init_state: dict):
    overrides = detector.run_config_overrides(params)
    model = detector.build(params.preset, num_classes, image_size=params.image_size, seed=params.seed, **overrides)
    model.load_state_dict(init_state)
    if option.pool == "torch":
        for module in model.modules():
            if isinstance(module, ChannelsLastMaxPool2d):
                module.__class__ = torch.nn.MaxPool2d
    if option.attn is not None:
        detector.set_attn_implementation(model, option.attn)
    model.train()
    if option.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt_params = params
    if option.optimizer_impl is not None:
        opt_params = params.model_copy(update={"optimizer_impl": option.optimizer_impl})
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "lr": params.lr, "weight_decay": params.weight_decay},
        {"params": no_decay, "lr": params.lr, "weight_decay": 0.0},
    ]
    optimizer = build_optimizer(groups, opt_params)
    ema_cls = torch.optim.swa_utils.AveragedModel if option.ema == "torch" else EMA
    ema = ema_cls(model, multi_avg_fn=ema_multi_avg_fn(params.ema_decay, params.ema_warmup), use_buffers=True)
    if option.compile:
        compile_static_parts(model)  # `compile: backbone`, after the EMA's copy as in training
    task = BaselineTask(model, [])  # the training loop's loss: the official criterion built from the config
    return model, task.loss, optimizer, ema


def _matrix_diag_iou(boxes1, boxes2):
    iou, union = box_iou(boxes1, boxes2)
    return torch.diag(iou), torch.diag(union)


def _matrix_diag_giou(boxes1, boxes2):
    return torch.diag(generalized_box_iou(boxes1, boxes2))


_PAIRED = (tfg_loss.paired_box_iou, tfg_loss.paired_generalized_box_iou)


@contextlib.contextmanager
def _switches(option: Option):
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(option.deterministic, warn_only=True)
    if option.threads:
        torch.set_num_threads(option.threads)
    if option.loss == "matrix":
        tfg_loss.paired_box_iou, tfg_loss.paired_generalized_box_iou = _matrix_diag_iou, _matrix_diag_giou
    try:
        yield
    finally:
        tfg_loss.paired_box_iou, tfg_loss.paired_generalized_box_iou = _PAIRED
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True, warn_only=True)


def _step_fn(option: Option, params, model, loss_fn, optimizer, ema) -> Callable[[dict, int], float]:
    def step(batch: dict, epoch: int = 1) -> float:
        pixels = batch["pixel_values"]
        if option.channels_last or option.channels_last_input:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        loss, _ = loss_fn(model, {"pixel_values": pixels, "labels": batch["labels"]}, epoch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for g in optimizer.param_groups for q in g["params"]], params.grad_clip)
        optimizer.step()
        ema.update_parameters(model)
        return float(loss.detach())

    return step


def _options(with_compile: bool) -> list[Option]:
    today = {
        "attn": "sdpa",
        "optimizer_impl": "for-loop",
        "loss": "matrix",
        "ema": "torch",
        "pool": "torch",
        "channels_last_input": False,
    }

    def like_today(name: str, what: str, **changes) -> Option:
        return Option(name, what, **{**today, **changes})

    options = [
        like_today(
            "today",
            "before the speed work: SDPA attention, AdamW for-loop, N x N IoU in the loss, torch's EMA update, "
            "contiguous max pooling",
        ),
        like_today("loss=paired", "the loss's IoU / GIoU on matched pairs (bit-identical)", loss="paired"),
        like_today("adamw=foreach", "AdamW over all tensors per operation (bit-identical)", optimizer_impl="foreach"),
        like_today("adamw=fused", "AdamW fused kernel (equal to rounding)", optimizer_impl="fused"),
        like_today("attn=eager", "attention as matmul + softmax instead of SDPA", attn="eager"),
        like_today(
            "attn=blocks", "decoder self-attention over the visible denoising blocks only (rounding)", attn="blocks"
        ),
        like_today(
            "ema=lean", "the EMA update without torch's per-tensor detach / regrouping (bit-identical)", ema="lean"
        ),
        like_today(
            "pool=channels-last", "the stem's max pooling in channels-last format (bit-identical)", pool="channels-last"
        ),
        like_today(
            "input=channels-last", "training images in channels-last format (rounding)", channels_last_input=True
        ),
        like_today("channels_last", "model and images in channels-last memory format", channels_last=True),
        like_today("deterministic=false", "torch.use_deterministic_algorithms(False)", deterministic=False),
        like_today("threads=1", "torch.set_num_threads(1)", threads=1),
        Option("new default", "every default after this change"),
    ]
    if with_compile:
        options.append(
            Option("compile=backbone", "new default + `compile: backbone` (backbone and encoder)", compile=True)
        )
    return options


def bench_steps(options: list[Option], params, ds, rounds: int, steps_per_round: int, warmup: int) -> dict:
    num_classes = len(ds.categories)
    init = detector.build(params.preset, num_classes, image_size=params.image_size, seed=params.seed).state_dict()
    batches = _batches(ds, params.batch_size, max(steps_per_round * 2, 4))
    runs = {}
    for option in options:
        t0 = time.perf_counter()
        built = _build(option, params, num_classes, init)
        step = _step_fn(option, params, *built)
        with _switches(option):
            losses = [step(batches[i % len(batches)]) for i in range(warmup)]
        runs[option.name] = {"step": step, "times": [], "first_losses": losses, "setup_s": time.perf_counter() - t0}
        print(
            f"  built {option.name:22s} setup + {warmup} warm-up steps: {runs[option.name]['setup_s']:.1f} s",
            flush=True,
        )
    k = 0
    for r in range(rounds):
        for option in options:
            run = runs[option.name]
            with _switches(option):
                for _ in range(steps_per_round):
                    batch = batches[k % len(batches)]
                    t = time.perf_counter()
                    run["step"](batch)
                    run["times"].append(time.perf_counter() - t)
        k += steps_per_round
        so_far = ", ".join(f"{o.name} {statistics.median(runs[o.name]['times']) * 1000:.0f}" for o in options)
        print(f"  round {r + 1}/{rounds}, median ms so far: {so_far}", flush=True)
    today = statistics.median(runs["today"]["times"])
    result = {}
    for option in options:
        run = runs[option.name]
        ms = statistics.median(run["times"])
        result[option.name] = {
            "what": option.what,
            "ms_per_step": round(ms * 1000, 1),
            "images_per_s": round(params.batch_size / ms, 2),
            "ratio_vs_today": round(today / ms, 3),
            "setup_s": round(run["setup_s"], 1),
            "warmup_losses": [round(v, 6) for v in run["first_losses"]],
            "steps_timed": len(run["times"]),
        }
    return result


def bench_epoch(params, ds) -> dict:
    """One full epoch through the real DataLoader (data loading included): today vs the new default, alternating."""
    from torch.utils.data import DataLoader

    num_classes = len(ds.categories)
    init = detector.build(params.preset, num_classes, image_size=params.image_size, seed=params.seed).state_dict()
    out = {}
    for option in (_options(False)[0], _options(False)[-1]):
        built = _build(option, params, num_classes, init)
        step = _step_fn(option, params, *built)
        gen = torch.Generator().manual_seed(0)
        loader = DataLoader(
            ds, batch_size=params.batch_size, shuffle=True, generator=gen, collate_fn=collate, drop_last=True
        )
        with _switches(option):
            t = time.perf_counter()
            losses = [step(batch) for batch in loader]
            seconds = time.perf_counter() - t
        out[option.name] = {
            "seconds": round(seconds, 1),
            "steps": len(losses),
            "images_per_s": round(len(losses) * params.batch_size / seconds, 2),
            "mean_loss": round(sum(losses) / len(losses), 5),
        }
        print(f"  epoch {option.name}: {seconds:.1f} s", flush=True)
    out["ratio"] = round(out["today"]["seconds"] / out["new default"]["seconds"], 3)
    return out


def _leaves(tree, memo: dict):
    """The output dict with every floating tensor a fresh leaf that requires grad (shared ones stay shared)."""
    if isinstance(tree, dict):
        return {k: _leaves(v, memo) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_leaves(v, memo) for v in tree]
    if isinstance(tree, torch.Tensor) and tree.is_floating_point():
        if id(tree) not in memo:
            memo[id(tree)] = tree.detach().clone().requires_grad_(True)
        return memo[id(tree)]
    return tree


def _interleaved(fns: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: round(statistics.median(v) * 1000, 2) for name, v in times.items()}


def bench_components(params, ds, reps: int) -> dict:
    """Parts of the step timed alone, interleaved (median ms): the loss forward + backward on fixed model outputs
    (N x N matrix vs paired IoU), the optimiser update (for-loop / foreach / fused), and the model's forward +
    backward with SDPA vs eager attention."""
    num_classes = len(ds.categories)
    model = detector.build(params.preset, num_classes, image_size=params.image_size, seed=params.seed)
    model.train()
    batch = _batches(ds, params.batch_size, 1)[0]
    criterion = tfg_loss.DEIMv2Criterion.from_config(model.config)
    with torch.no_grad():
        raw = model(batch["pixel_values"], labels=batch["labels"])
    outputs = official_outputs(raw, model.config)

    def loss_step(kind: str) -> Callable[[], None]:
        def run() -> None:
            with _switches(Option(kind, "", loss=kind)):
                memo: dict = {}
                sum(criterion(_leaves(outputs, memo), batch["labels"], epoch=1).values()).backward()

        return run

    result = {"loss_fwd_bwd_ms": _interleaved({"matrix": loss_step("matrix"), "paired": loss_step("paired")}, reps)}

    optimizers = {}
    for impl in ("for-loop", "foreach", "fused"):
        copy_ = detector.build(params.preset, num_classes, image_size=params.image_size, seed=params.seed)
        for q in copy_.parameters():
            q.grad = torch.randn_like(q) * 1e-3
        groups = [{"params": list(copy_.parameters()), "lr": params.lr}]
        opt = build_optimizer(groups, params.model_copy(update={"optimizer_impl": impl}))
        optimizers[impl] = opt.step
    result["optimizer_step_ms"] = _interleaved(optimizers, reps)

    def model_step(impl: str) -> Callable[[], None]:
        def run() -> None:
            detector.set_attn_implementation(model, impl)
            loss, _ = tfg_loss.compute_loss(
                model(batch["pixel_values"], labels=batch["labels"]), batch["labels"], model.config, criterion, 1
            )
            model.zero_grad(set_to_none=True)
            loss.backward()

        return run

    result["model_fwd_bwd_ms"] = _interleaved(
        {"sdpa": model_step("sdpa"), "eager": model_step("eager")}, max(3, reps // 3)
    )
    detector.set_attn_implementation(model, "sdpa")
    return result


def profile_today(params, ds, steps: int = 3) -> str:
    from torch.profiler import ProfilerActivity, profile

    option = _options(False)[0]
    num_classes = len(ds.categories)
    init = detector.build(params.preset, num_classes, image_size=params.image_size, seed=params.seed).state_dict()
    step = _step_fn(option, params, *_build(option, params, num_classes, init))
    batches = _batches(ds, params.batch_size, steps)
    with _switches(option):
        step(batches[0])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in batches:
                step(b)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated option names (today is always included)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile of the detector")
    ap.add_argument("--epoch", action="store_true", help="also one full epoch, today vs the new default")
    ap.add_argument("--profile", action="store_true", help="print the top operators of today's step")
    ap.add_argument(
        "--components",
        type=int,
        default=0,
        metavar="REPS",
        help="only time the parts (loss, optimiser, attention) alone, REPS interleaved repeats",
    )
    ap.add_argument("--out", default=str(REPO / "reports" / "bench_step.json"))
    args = ap.parse_args(argv)

    params = _params()
    seed_everything(params.seed, params.deterministic)
    ds = _dataset(params)
    if args.profile:
        print(profile_today(params, ds))
        return 0
    if args.components:
        parts = bench_components(params, ds, args.components)
        print(json.dumps(parts, indent=1))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(args.out), {"threads": torch.get_num_threads(), "components": parts})
        return 0
    options = _options(args.compile)
    if args.only:
        keep = {"today", *args.only.split(",")}
        options = [o for o in options if o.name in keep]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"{len(options)} options x {args.rounds} rounds x {args.steps_per_round} steps",
        flush=True,
    )
    steps = bench_steps(options, params, ds, args.rounds, args.steps_per_round, args.warmup)
    report = {
        "conditions": {
            "preset": params.preset,
            "image_size": params.image_size,
            "batch_size": params.batch_size,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "rounds": args.rounds,
            "steps_per_round": args.steps_per_round,
        },
        "steps": steps,
    }
    if args.epoch:
        report["epoch"] = bench_epoch(params, ds)
    print()
    print(f"{'option':22s} {'ms/step':>9s} {'images/s':>9s} {'ratio':>7s}  setup s")
    for name, row in steps.items():
        print(
            f"{name:22s} {row['ms_per_step']:9.1f} {row['images_per_s']:9.2f} {row['ratio_vs_today']:7.3f}  "
            f"{row['setup_s']:.1f}"
        )
    if "epoch" in report:
        e = report["epoch"]
        print(
            f"\none epoch: today {e['today']['seconds']} s, new default {e['new default']['seconds']} s, "
            f"ratio {e['ratio']}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out), report)
    print(f"\nwritten: {Path(args.out).relative_to(REPO) if Path(args.out).is_relative_to(REPO) else args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
