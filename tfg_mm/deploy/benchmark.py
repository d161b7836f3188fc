"""``python -m tfg_mm benchmark``: how big and how fast a run's model is, per runtime, into ``{run_dir}/deploy.json``.

Measured on the run's selected checkpoint at the run's image size:

* **size**: parameters (the text branch's own, folded into constants at inference, counted apart), GFLOPs of one
  forward pass at batch 1 (``torch.utils.flop_counter``: 2 FLOPs per multiply-add; the deformable attention's
  ``grid_sample`` is not counted, as in most published DETR figures), and the checkpoint's size on disk;
* **latency**: median and 90th percentile over ``runs`` timed calls after ``warmup`` untimed ones, at batch 1, for
  PyTorch eager and ONNX Runtime (the run's exported file, :mod:`tfg_mm.deploy.export`; exported and checked first
  when absent), each twice: ``model`` (the network and the top-k post-processing on a preprocessed tensor — the
  same graph in both runtimes) and ``end to end`` (from the image file on disk: decode, convert, resize, the model,
  the per-class thresholds);
* **throughput** at the larger batch (images per second, ``model`` scope);
* for a phase-2 run, **the text branch alone** (the fusion on the detector's outputs, PyTorch, batch 1): its
  inference cost measured directly, well below the noise of two whole-model timings taken minutes apart.

Threads are stated (ONNX Runtime gets torch's intra-op thread count); on a GPU, PyTorch runs on CUDA (synchronised
around each call) and ONNX Runtime on its CUDA execution provider when the installed build has one. The images are
the first validation images of the run's dataset (random pixels when the dataset is absent; the record says which).
A measurement on a busy machine is slower: measure with nothing else running.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from tfg_mm.data.validate import read_json
from tfg_mm.deploy.export import (
    EXPORT_DIR,
    EXPORT_RECORD,
    ONNX_FILE,
    DeployModel,
    export_run,
    ort_predict_fn,
    ort_session,
)
from tfg_mm.deploy.predict import _keep, _tensor, load_predictor, read_image
from tfg_mm.errors import ConfigError
from tfg_mm.io import atomic_write_json
from tfg_mm.paths import RunPaths, portable_text
from tfg_mm.runtime.devices import resolve_device
from tfg_mm.training import contract
from tfg_mm.training.identity import _cpu_model, _version
from tfg_mm.training.judge import checkpoint_class_names, load_checkpoint_model, resolve_target

log = logging.getLogger(__name__)

DEPLOY_FILE = "deploy.json"
#: Bumped when the record's layout changes (a report reads older ones by their keys).
DEPLOY_SCHEMA = 1


def time_calls(fn: Callable[[], Any], runs: int, warmup: int, sync: Callable[[], None] = lambda: None) -> dict:
    """Median / p90 milliseconds of ``runs`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000.0)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)), "runs": runs}


def gflops(module: torch.nn.Module, images: torch.Tensor, sizes: torch.Tensor) -> float:
    """Forward-pass GFLOPs of ``module(images, sizes)`` counted by torch's own FLOP counter."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(images, sizes)
    return counter.get_total_flops() / 1e9


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20


def _images(params, count: int, image_size: int) -> tuple[list[Path], str]:
    """The first ``count`` validation image files of the run's dataset, or none (random pixels) when it is absent."""
    try:
        root = RunPaths.of(params).dataset
        data = read_json(root / params.val_json)
        files = [root / params.images_dir / im["file_name"] for im in data["images"][:count]]
        if files and all(f.is_file() for f in files):
            return files, f"the first {len(files)} images of {params.val_json}"
    except Exception as exc:  # noqa: BLE001 - any unreadable dataset: measure on random pixels and say so
        log.info("benchmark on random pixels: %s", exc)
    return [], f"random pixels ({image_size} x {image_size}; the dataset was not found)"


def benchmark_target(
    target: str | Path,
    device: str = "cpu",
    batches: Sequence[int] = (1, 8),
    runs: int = 50,
    warmup: int = 10,
    backends: Sequence[str] = ("torch", "onnx"),
    sources: Sequence[Any] = (),
    write: bool = True,
) -> dict:
    """Benchmark a finished run's selected checkpoint (or a checkpoint folder); returns (and writes) ``deploy.json``."""
    if runs < 1 or warmup < 0:
        raise ConfigError(f"benchmark: runs={runs}, warmup={warmup}; give runs >= 1 and warmup >= 0.")
    if not batches or any(int(b) < 1 for b in batches):
        raise ConfigError(f"--batch {','.join(map(str, batches))}: give batch sizes >= 1, e.g. `--batch 1,8`.")
    unknown = sorted(set(backends) - {"torch", "onnx"})
    if unknown:
        raise ConfigError(f"--backend {', '.join(unknown)}: choose torch and / or onnx.")
    files, params, final, folder = resolve_target(target, "selected", sources, verb="benchmark")
    dev = resolve_device(device)
    size = int(params.image_size)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    names = checkpoint_class_names(folder)
    model, _ = load_checkpoint_model(folder, params, names, dev)
    deploy_model = DeployModel(model, top_k=params.top_k).eval()
    fusion = getattr(model, "fusion", None)
    # the text branch at inference: its weights and its cached class embeddings (buffers, constants in the graph)
    text_params = sum(t.numel() for t in [*fusion.parameters(), *fusion.buffers()]) if fusion is not None else 0
    text_buffers = sum(t.numel() for t in fusion.buffers()) if fusion is not None else 0
    paths, image_source = _images(params, max(batches), size)
    if paths:
        pixels, sizes = _tensor([read_image(p) for p in paths], size)
    else:
        generator = torch.Generator().manual_seed(0)
        pixels = torch.rand(max(batches), 3, size, size, generator=generator)
        sizes = torch.full((max(batches), 2), size, dtype=torch.int64)
    while pixels.shape[0] < max(batches):  # fewer validation images than the batch: repeat them
        pixels, sizes = torch.cat([pixels, pixels]), torch.cat([sizes, sizes])

    record: dict[str, Any] = {
        "schema": DEPLOY_SCHEMA,
        "checkpoint": portable_text(str(folder)),
        "run_id": getattr(_contract(files), "run_id", None),
        "model": "phase 2 (detector + fused text branch)" if (folder / "detector").is_dir() else "detector alone",
        "preset": params.preset,
        "image_size": size,
        "classes": len(names),
        "params": {
            "total": sum(p.numel() for p in model.parameters()) + text_buffers,
            "text_branch": text_params,
        },
        "gflops": gflops(deploy_model.cpu(), pixels[:1].cpu(), sizes[:1]),
        "flop_counter": "torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add; grid_sample not counted)",
        "checkpoint_mb": _folder_mb(folder),
        "images": image_source,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "gpu": torch.cuda.get_device_name(dev) if cuda else None,
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": _version("onnxruntime"),
            "python": platform.python_version(),
        },
        "runs": runs,
        "warmup": warmup,
        "batches": list(batches),
        "rows": [],
    }
    deploy_model.to(dev)

    def add(runtime: str, scope: str, batch: int, timing: dict) -> None:
        ms = timing["median_ms"]
        record["rows"].append(
            {
                "runtime": runtime,
                "scope": scope,
                "batch": batch,
                **timing,
                "ms_per_image": ms / batch,
                "images_per_s": 1000.0 * batch / ms,
            }
        )

    end_image = paths[0] if paths else None
    with torch.no_grad():
        if "torch" in backends:
            runtime = f"PyTorch eager ({'CUDA' if cuda else 'CPU'})"
            for batch in batches:
                x, s = pixels[:batch].to(dev), sizes[:batch].to(dev)
                add(runtime, "model", batch, time_calls(lambda x=x, s=s: deploy_model(x, s), runs, warmup, sync))
            if fusion is not None:  # the text branch alone, on the detector's own outputs: its cost without noise
                out = model.detector(pixels[:1].to(dev))
                timing = time_calls(lambda: fusion(out.logits, out.last_hidden_state), runs, warmup, sync)
                record["text_branch_ms"] = {"runtime": runtime, "batch": 1, **timing}
            if end_image is not None:
                predictor = load_predictor(target, device=str(dev), sources=sources)
                add(
                    runtime,
                    "end to end",
                    1,
                    time_calls(lambda: _end_to_end(predictor, end_image), runs, warmup, sync),
                )
        if "onnx" in backends:
            onnx_path = _ensure_export(files, target, sources)
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
            session = ort_session(onnx_path, providers=providers, threads=torch.get_num_threads())
            used = session.get_providers()[0].replace("ExecutionProvider", "")
            runtime = f"ONNX Runtime ({used})"
            run_onnx = ort_predict_fn(session)
            record["onnx"] = portable_text(str(onnx_path))
            exported = (
                read_json(onnx_path.parent / EXPORT_RECORD) if (onnx_path.parent / EXPORT_RECORD).is_file() else {}
            )
            check = exported.get("check") or {}
            record["onnx_check"] = {
                "status": exported.get("status", "not recorded"),
                "max_abs_diff": (check.get("outputs") or {}).get("max_abs_diff"),
                "map": check.get("map"),
            }
            for batch in batches:
                x, s = pixels[:batch], sizes[:batch]
                add(runtime, "model", batch, time_calls(lambda x=x, s=s: run_onnx(x, s), runs, warmup))
            if end_image is not None:
                predictor = load_predictor(target, backend="onnx", sources=sources, onnx_path=onnx_path)
                add(
                    runtime,
                    "end to end",
                    1,
                    time_calls(lambda: _end_to_end(predictor, end_image), runs, warmup),
                )
    record["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if write:
        atomic_write_json(files.run_dir / DEPLOY_FILE, record)
    return record


def _end_to_end(predictor, path: Path) -> list:
    """One image from its file to thresholded detections, as ``predict`` does it."""
    pixels, sizes = _tensor([read_image(path)], predictor.image_size)
    return _keep(predictor.detect(pixels, sizes)[0], predictor)


def _contract(files: RunPaths):
    return contract.read_contract(files.run_dir) if files.metrics.exists() else None


def _ensure_export(files: RunPaths, target, sources) -> Path:
    path = files.run_dir / EXPORT_DIR / ONNX_FILE
    if not path.is_file():
        log.info("no ONNX file in %s: exporting it first", portable_text(str(path.parent)))
        export_run(target, sources=sources)
    return path


def read_deploy(run_dir: str | Path) -> dict | None:
    """A run's ``deploy.json``, or None when it was never benchmarked."""
    path = Path(run_dir) / DEPLOY_FILE
    return read_json(path) if path.is_file() else None


def deploy_lines(record: dict) -> list[str]:
    """The terminal's table of one benchmark."""
    p = record["params"]
    branch = record.get("text_branch_ms")
    lines = [
        f"{record['model']}, {record['preset']} at {record['image_size']} px: {p['total'] / 1e6:.2f} M parameters "
        f"(text branch {p['text_branch']:,}), {record['gflops']:.2f} GFLOPs, checkpoint {record['checkpoint_mb']:.1f} MB",
        f"{record['device']}, {record['threads']} thread(s), {record['cpu']}; {record['runs']} timed runs after "
        f"{record['warmup']} warm-up; images: {record['images']}",
        f"{'runtime':<26}{'scope':<12}{'batch':>6}{'median ms':>11}{'p90 ms':>9}{'ms/img':>9}{'img/s':>9}",
    ]
    if branch:
        lines.insert(
            2, f"the text branch alone: {branch['median_ms']:.3f} ms (p90 {branch['p90_ms']:.3f}) per image, PyTorch"
        )
    for r in record["rows"]:
        lines.append(
            f"{r['runtime']:<26}{r['scope']:<12}{r['batch']:>6}{r['median_ms']:>11.2f}{r['p90_ms']:>9.2f}"
            f"{r['ms_per_image']:>9.2f}{r['images_per_s']:>9.1f}"
        )
    return lines


def benchmark_for_report(params) -> dict | None:
    """Notebooks 01 / 02: the run's ``deploy.json``, measured now when it does not describe this run's selected
    checkpoint with ``params.deploy_benchmark_runs`` timed runs (``0``: never measure, show what is there)."""
    files = RunPaths.of(params)
    existing = read_deploy(files.run_dir)
    runs = params.deploy_benchmark_runs
    if runs == 0:
        return existing
    contract = _contract(files)
    current = existing and existing.get("run_id") == getattr(contract, "run_id", None) and existing.get("runs") == runs
    if current and existing.get("checkpoint") == portable_text(str(contract.final.checkpoint)):
        return existing
    device = "cuda" if resolve_device(params.device).type == "cuda" else "cpu"
    return benchmark_target(files.run_dir, device=device, runs=runs, warmup=max(1, runs // 5))
