"""A short phase 1 + phase 2 on one CUDA GPU at a preset's official input size: throughput, memory, mAP.

    bash scripts/gpu_check.sh                      # the wrapper: SIZE, EPOCHS, ... as environment variables
    python scripts/gpu_check.py --size s --epochs 3 --amp bf16

On the embedded synthetic set (generated here: ``--train-images`` / ``--val-images`` images of 160 px, the
embedded default's size, resized by the loaders to the preset's official input size), it trains

1. phase 1 (``tfg_mm.training.baseline.run_baseline``): the preset from a random init for ``--epochs`` epochs;
2. phase 2 (``tfg_mm.training.phase2.run_phase2``) on that baseline: one cached warm-up epoch (stage A) and
   ``--epochs`` epochs of stage B (fusion + detector heads), with ``--text-encoder`` (``random`` by default:
   fixed prototypes, no text model to load; the text only enters once, as a cached matrix);

through the project's own entry points (the same loop, loaders and run contract as any run), then times the
detector's forward pass on the GPU. It prints and writes to ``$OUT/gpu_check.json`` (``$OUT`` set) or
``reports/gpu_check.json``:

- training images / s, steady state: the epochs after the first of each phase's training stage, from the run
  contract's per-epoch training time (``history[].seconds``: the loop's wall time, data loading included,
  evaluation excluded); the first epoch (allocator growth, kernel selection, worker start) separately;
- inference images / s: the detector's forward pass (``predict_fn``, as evaluation calls it) on a batch already
  on the GPU, after warm-up iterations, synchronised, in float32 and under the run's autocast;
- peak GPU memory (``torch.cuda.max_memory_allocated``) of each phase and of inference;
- the GPU, torch / CUDA / cuDNN versions, the loader settings, each stage's wall time, and the mAP of both
  runs (a pipeline check: a few epochs from a random init are not an accuracy figure).

Without a visible CUDA device it stops with exit code 3, unless ``--allow-cpu`` (``GPU_CHECK_ALLOW_CPU=1``)
runs the same sequence on CPU as a dry run of the script (tiny sizes only).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from tfg_mm import detector as deimv2
from tfg_mm.config import load_params
from tfg_mm.config.presets import PRESETS
from tfg_mm.data.synthetic import generate
from tfg_mm.io import atomic_write_json
from tfg_mm.paths import project_root
from tfg_mm.runtime.devices import cpu_count, loader_settings, resolve_device
from tfg_mm.training.baseline import BaselineTask, run_baseline
from tfg_mm.training.phase2 import run_phase2
from tfg_mm.training.seeding import make_accelerator

REPO = project_root()


def _args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="s", choices=list(PRESETS), help="DEIMv2 preset (default s)")
    ap.add_argument("--image-size", type=int, default=0, help="network input; 0 = the preset's official size")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs of phase 1 and of phase 2's stage B")
    ap.add_argument("--train-images", type=int, default=512)
    ap.add_argument("--val-images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--amp", default="bf16", choices=["no", "bf16", "fp16"])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N (or cpu with --allow-cpu)")
    ap.add_argument("--num-workers", default="auto", help="DataLoader workers: auto or a number")
    ap.add_argument("--text-encoder", default="random", help="phase 2's text_encoder (random: nothing to load)")
    ap.add_argument("--text-model", default="", help="phase 2's text_model (e.g. ViT-B-32 for open_clip)")
    ap.add_argument("--inference-iters", type=int, default=30)
    ap.add_argument(
        "--budget-s",
        type=float,
        default=330,
        help="wall-time budget: phase 2's epochs are shortened (max_steps_per_epoch) when phase 1 was too slow",
    )
    ap.add_argument("--work", default="", help="scratch folder (default runs/gpu_check)")
    ap.add_argument("--allow-cpu", action="store_true", default=os.environ.get("GPU_CHECK_ALLOW_CPU") == "1")
    return ap.parse_args(argv)


def _say(text: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {text}", flush=True)


def _environment(device: torch.device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpus": cpu_count(),
        "device": str(device),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return env


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def _throughput(contract: dict, images_per_epoch: int, epochs: list[int]) -> dict:
    """Training images / s of ``epochs`` (history entries), first one apart from the steady state after it."""
    seconds = {h["epoch"]: h["seconds"] for h in contract["history"] if h["epoch"] in epochs}
    ordered = [seconds[e] for e in epochs if e in seconds]
    rate = [images_per_epoch / s for s in ordered if s > 0]
    return {
        "epochs": epochs,
        "images_per_epoch": images_per_epoch,
        "epoch_seconds": [round(s, 3) for s in ordered],
        "first_epoch_images_per_s": round(rate[0], 2) if rate else None,
        # steady state: every epoch after the first (the first one alone when there is no other)
        "steady_images_per_s": round(images_per_epoch * len(ordered[1:]) / sum(ordered[1:]), 2)
        if len(ordered) > 1
        else (round(rate[0], 2) if rate else None),
    }


def _inference(ckpt: Path, device: torch.device, amp: str, batch: int, image_size: int, iters: int) -> dict:
    """Forward passes of the detector as evaluation calls them, on a batch already on the device."""
    model = deimv2.load(ckpt).to(device).eval()
    fn = BaselineTask(model, []).predict_fn(model)
    x = torch.rand(batch, 3, image_size, image_size, device=device)
    accelerator = make_accelerator(device, amp)
    out = {}
    for name, context in (("float32", None), (amp, accelerator.autocast)):
        if name == "no" or (name == "float32" and out.get("float32")):
            continue
        _reset_peak(device)
        with torch.inference_mode():
            for _ in range(max(3, iters // 5)):  # warm-up: kernel selection, allocator
                with context() if context else _null():
                    fn(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                with context() if context else _null():
                    fn(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
        out[name] = {
            "images_per_s": round(batch * iters / seconds, 1),
            "ms_per_batch": round(1000 * seconds / iters, 2),
            "peak_memory_gib": _peak_gib(device),
        }
    return {"batch_size": batch, "iterations": iters, **out}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _run(phase, params, result: dict, device: torch.device) -> tuple[dict, object]:
    """``phase(params)``; a failure under mixed precision is recorded (``amp_fallback``) and the phase rerun in
    float32, so that one call on a lent GPU still measures something. Returns the contract and the params used."""
    try:
        return phase(params, progress=False), params
    except Exception as exc:
        if params.amp == "no":
            raise
        failure = f"{type(exc).__name__}: {str(exc)[:1500]}"
        _say(f"{phase.__name__} failed with amp {params.amp} ({failure[:300]}); rerunning it with amp no")
        result.setdefault("amp_fallback", []).append({"phase": phase.__name__, "amp": params.amp, "failure": failure})
        params = load_params(params, amp="no", overwrite=True)
        _reset_peak(device)
        return phase(params, progress=False), params


def main(argv=None) -> int:
    args = _args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # checkpoint save / load bars would bury the figures
    t_start = time.perf_counter()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(
            "gpu_check: no CUDA device is visible to torch "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). This check measures a GPU: "
            "run it on a machine with one and a CUDA build of torch (`nvidia-smi` should list the GPU). "
            "For a dry run of the script on CPU set GPU_CHECK_ALLOW_CPU=1 (tiny SIZE / IMAGES).",
            file=sys.stderr,
        )
        return 3
    device = resolve_device(args.device if torch.cuda.is_available() else "cpu")
    image_size = args.image_size or PRESETS[args.size]["image_size"]
    work = Path(args.work) if args.work else REPO / "runs" / "gpu_check"
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "reports"
    num_workers = args.num_workers if args.num_workers == "auto" else int(args.num_workers)
    env = _environment(device)
    _say(f"{env.get('gpu', 'CPU (dry run)')}; torch {env['torch']} CUDA {env['cuda']}; {args.size} at {image_size} px")
    result: dict = {
        "status": "running",
        "environment": env,
        "settings": {
            "preset": args.size,
            "image_size": image_size,
            "epochs": args.epochs,
            "train_images": args.train_images,
            "val_images": args.val_images,
            "batch_size": args.batch_size,
            "amp": args.amp,
            "text_encoder": args.text_encoder,
            "loader": loader_settings(num_workers, "auto", device).as_kwargs(),
            "deterministic": False,
        },
        "seconds": {},
    }
    json_path = out_dir / "gpu_check.json"

    def save() -> None:
        result["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
        atomic_write_json(json_path, result)

    try:
        t0 = time.perf_counter()
        data = generate(
            work / "data", seed=0, n_train=args.train_images, n_val=args.val_images, image_size=160, progress=False
        )
        result["seconds"]["data"] = round(time.perf_counter() - t0, 1)
        _say(f"data: {args.train_images} + {args.val_images} synthetic images in {result['seconds']['data']} s")
        common = dict(
            dataset=str(data),
            generate_if_missing=False,
            preset=args.size,
            image_size=image_size,
            batch_size=args.batch_size,
            amp=args.amp,
            device=str(device),
            num_workers=num_workers,
            deterministic=False,  # cuDNN / atomics as a real GPU run would use them
            seed=0,
            eval_every=1,  # every epoch's training time lands in the run contract
            overwrite=True,
            resume=False,
        )
        steps = args.train_images // args.batch_size if args.train_images > args.batch_size else 1
        images_per_epoch = steps * args.batch_size if args.train_images > args.batch_size else args.train_images

        # phase 1 -------------------------------------------------------------------------------
        base_dir = work / "baseline"
        p1 = load_params(
            common,
            epochs=args.epochs,
            lr=5e-4,
            lr_backbone=5e-4,
            lr_warmup_steps=min(50, steps),
            ema=True,
            ema_decay=0.99,
            ema_warmup=min(50, steps),
            run_dir=str(base_dir),
        )
        _reset_peak(device)
        t0 = time.perf_counter()
        c1, p1 = _run(run_baseline, p1, result, device)
        result["seconds"]["phase1"] = round(time.perf_counter() - t0, 1)
        result["phase1"] = {
            "train": _throughput(c1, images_per_epoch, list(range(1, args.epochs + 1))),
            "amp": p1.amp,
            "peak_memory_gib": _peak_gib(device),
            "map": c1["final"]["map"],
            "map50": c1["final"]["map50"],
            "status": c1["status"],
        }
        _say(f"phase 1: {result['phase1']['train']} peak {result['phase1']['peak_memory_gib']} GiB")
        save()

        # phase 2: one cached warm-up epoch (stage A), then stage B ------------------------------
        # about phase 1's time again (one more epoch, but a cheaper one); shortened to stay within the budget
        left = args.budget_s - (time.perf_counter() - t_start) - 30  # 30 s for inference and the rest
        estimate = result["seconds"]["phase1"] * (args.epochs + 1) / max(1, args.epochs)
        max_steps = None
        if estimate > left:
            max_steps = max(2, int(steps * max(0.0, left) / estimate))
            _say(f"phase 1 took {result['seconds']['phase1']} s: phase 2 capped at {max_steps} steps an epoch")
        result["settings"]["phase2_max_steps_per_epoch"] = max_steps
        p2 = load_params(
            common,
            amp=p1.amp,  # float32 when phase 1 had to fall back to it
            baseline=str(base_dir),
            epochs=args.epochs + 1,
            warmup_epochs=1,
            unfreeze="heads",
            text_encoder=args.text_encoder,
            text_model=args.text_model,
            text_cache_dir=str(work / "text_cache"),
            ema=True,
            ema_decay=0.99,
            ema_warmup=min(50, steps),
            lr_warmup_steps=min(50, steps),
            run_dir=str(work / "phase2"),
            max_steps_per_epoch=max_steps,
        )
        _reset_peak(device)
        t0 = time.perf_counter()
        c2, p2 = _run(run_phase2, p2, result, device)
        result["seconds"]["phase2"] = round(time.perf_counter() - t0, 1)
        result["phase2"] = {
            "train_stage_b": _throughput(
                c2,
                images_per_epoch if max_steps is None else min(steps, max_steps) * args.batch_size,
                list(range(2, args.epochs + 2)),
            ),
            "stage_a_cached_epoch_seconds": next((h["seconds"] for h in c2["history"] if h["epoch"] == 1), None),
            "cache_seconds": c2.get("cache_seconds"),
            "amp": p2.amp,
            "peak_memory_gib": _peak_gib(device),
            "map": c2["final"]["map"],
            "map50": c2["final"]["map50"],
            "status": c2["status"],
        }
        _say(f"phase 2: {result['phase2']['train_stage_b']} peak {result['phase2']['peak_memory_gib']} GiB")
        save()

        # inference ------------------------------------------------------------------------------
        t0 = time.perf_counter()
        result["inference"] = _inference(
            base_dir / "checkpoints" / "best", device, p2.amp, args.batch_size, image_size, args.inference_iters
        )
        result["seconds"]["inference"] = round(time.perf_counter() - t0, 1)
        result["status"] = "finished"
    except BaseException as exc:
        result["status"] = "failed"
        result["failure"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
        save()
        raise
    save()
    _report(result, json_path)
    return 0


def _report(r: dict, json_path: Path) -> None:
    env, s = r["environment"], r["settings"]
    p1, p2, inf = r["phase1"], r["phase2"], r["inference"]
    lines = [
        "",
        f"GPU check: {env.get('gpu', 'CPU (dry run)')} ({env.get('gpu_memory_gib', '-')} GiB), torch {env['torch']}, "
        f"CUDA {env['cuda']}, cuDNN {env['cudnn']}, transformers {env.get('transformers')}, Python {env['python']}",
        f"  DEIMv2-{s['preset']} at {s['image_size']} px, batch {s['batch_size']}, amp {s['amp']}, loader "
        f"{s['loader']}, {s['train_images']} train / {s['val_images']} val images",
        f"  phase 1 training : {p1['train']['steady_images_per_s']} images/s steady "
        f"(first epoch {p1['train']['first_epoch_images_per_s']}, amp {p1['amp']}), peak {p1['peak_memory_gib']} GiB, "
        f"mAP {p1['map']:.4f} after {s['epochs']} epochs",
        f"  phase 2 training : {p2['train_stage_b']['steady_images_per_s']} images/s steady in stage B "
        f"(first {p2['train_stage_b']['first_epoch_images_per_s']}, amp {p2['amp']}), peak {p2['peak_memory_gib']} GiB, "
        f"mAP {p2['map']:.4f}",
    ]
    for name in ("float32", s["amp"]):
        if name in inf:
            lines.append(
                f"  inference {name:8s}: {inf[name]['images_per_s']} images/s (batch {inf['batch_size']}, "
                f"{inf[name]['ms_per_batch']} ms), peak {inf[name]['peak_memory_gib']} GiB"
            )
    lines.append(f"  wall time: {r['seconds']}  -> {json_path}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
