"""``python -m tfg_mm predict``: a finished run (or a checkpoint folder) on new images, folders, globs and video.

* The images are read as the datasets are (:func:`tfg_mm.data.validate.open_rgb`: grayscale, CMYK, 16-bit and
  alpha converted to 8-bit RGB), with the EXIF orientation applied first, so the boxes land on the pixels the user
  sees; they are resized as evaluation resizes them (:func:`tfg_mm.data.transforms.build_transforms`).
* The model predicts as evaluation predicts: a phase-2 checkpoint with its fused text branch, a baseline the
  detector alone (:func:`tfg_mm.training.judge.load_checkpoint_model`), post-processed by
  :func:`tfg_mm.evaluation.coco.postprocess`; ``backend="onnx"`` runs the run's exported ONNX file instead
  (:mod:`tfg_mm.deploy.export`: the same post-processing inside the graph).
* ``threshold="auto"``: each class's operating point chosen on validation (``final.operating_points``): the
  per-class thresholds a factory would deploy; a number: one threshold for every class. A checkpoint folder has no
  operating points: ``auto`` falls back to :data:`FALLBACK_THRESHOLD` and the summary says so.
* Writes into ``out``: ``images/`` (annotated copies, the source's folder layout kept), ``predictions.json``
  (COCO results format with each detection's ``file_name``), ``predictions.csv`` (one row a box),
  ``summary.json`` (where the predictions came from, thresholds, counts, skipped files) and for a video the
  annotated video (frames read and written with PyAV, the ``video`` extra).

A corrupt file inside a folder is a warning naming it and is skipped (the summary counts it); a SOURCE that does
not exist or holds no image is the project's error before anything is written.
"""

from __future__ import annotations

import csv
import functools
import glob
import io
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import Tensor
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from tfg_mm.data.transforms import build_transforms
from tfg_mm.data.validate import DECODE_ERRORS, as_rgb, read_json
from tfg_mm.deploy.export import EXPORT_DIR, ONNX_FILE, ort_predict_fn, ort_session
from tfg_mm.errors import ConfigError, DataError
from tfg_mm.evaluation.coco import postprocess
from tfg_mm.io import atomic_write_json, atomic_write_text
from tfg_mm.paths import RunPaths, portable_text, project_root
from tfg_mm.runtime.devices import resolve_device
from tfg_mm.training.judge import checkpoint_class_names, evaluation_device, load_checkpoint_model, resolve_target

log = logging.getLogger(__name__)

#: What a folder or glob source picks up (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: What is read as a video (with PyAV).
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
#: ``threshold="auto"`` for a class without an operating point (a checkpoint folder, a class without validation
#: instances).
FALLBACK_THRESHOLD = 0.5
#: One colour per class (matplotlib's tab10, readable on grey metal and on green PCBs).
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
@dataclass
class Source:
    """What ``SOURCE`` names: image files (with the names they keep in the outputs) or one video."""

    images: list[tuple[Path, str]] = field(default_factory=list)
    video: Path | None = None
    label: str = ""


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def collect_source(source: str | Path) -> Source:
    """The images (or the video) of ``source``: one image, a folder (recursive), a glob or a video file.

    Each image keeps a name relative to the folder (or the glob's fixed part), under which its annotated copy and
    its predictions are written. A source that does not exist or holds no image is a :class:`ConfigError`.
    """
    text = str(source)
    path = Path(text)
    if any(ch in text for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if _is_image(Path(p)))
        # names relative to the folder part of the pattern before its first wildcard (`data/imgs/**/*.png`: data/imgs)
        base = Path(os.path.dirname(re.split(r"[*?\[]", text, maxsplit=1)[0]) or ".")
        found = [(p, _relative(p, base)) for p in matches if p.is_file()]
        if not found:
            raise ConfigError(
                f"SOURCE {text!r}: the pattern matches no image ({', '.join(IMAGE_EXTENSIONS)}). Nothing was written. "
                "Fix: check the pattern (quote it so the shell does not expand it)."
            )
        return Source(images=found, label=text)
    if not path.exists():
        raise ConfigError(
            f"SOURCE {text}: no such file or folder. Nothing was written. Fix: give an image, a folder of images, a "
            "glob (quoted) or a video file."
        )
    if path.is_dir():
        found = sorted((p, _relative(p, path)) for p in path.rglob("*") if p.is_file() and _is_image(p))
        if not found:
            raise ConfigError(
                f"SOURCE {text}: the folder holds no image ({', '.join(IMAGE_EXTENSIONS)}, searched recursively). "
                "Nothing was written. Fix: point SOURCE at the folder with the images."
            )
        return Source(images=found, label=text)
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return Source(video=path, label=text)
    if not _is_image(path):
        raise ConfigError(
            f"SOURCE {text}: {path.suffix or 'no extension'} is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor "
            f"a video ({', '.join(VIDEO_EXTENSIONS)}). Nothing was written."
        )
    return Source(images=[(path, path.name)], label=text)


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.name


def read_image(path: Path) -> Image.Image:
    """An image as the datasets read it (8-bit RGB; 16-bit grayscale rescaled), after its EXIF orientation: the
    pixels an image viewer shows. PIL's decode errors pass through (the caller names and skips the file)."""
    with Image.open(path) as raw:
        raw.load()
        return as_rgb(ImageOps.exif_transpose(raw))


def _video_frames(path: Path) -> Iterator[tuple[Image.Image, float]]:
    av = _require_av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            yield frame.to_image().convert("RGB"), float(stream.average_rate or 25)


def _require_av():
    try:
        import av
    except ImportError:
        raise ConfigError(
            "Reading video needs PyAV, which is not installed. Fix: `pip install -e '.[video]'` (or `pip install av`)."
        ) from None
    return av


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
Detect = Callable[[Tensor, Tensor], list[dict]]


@dataclass
class Predictor:
    """A run's checkpoint ready to predict: ``detect(images [B,3,S,S], orig_sizes [B,2]) -> postprocess results``."""

    detect: Detect
    class_names: list[str]
    cat_ids: list[int]
    thresholds: dict[str, float]
    threshold_source: dict[str, str]
    image_size: int
    checkpoint: Path
    run_dir: Path
    backend: str
    device: torch.device
    kind: str

    def threshold_tensor(self) -> Tensor:
        return torch.tensor([self.thresholds[n] for n in self.class_names])


def _categories(params, names: Sequence[str]) -> list[int]:
    """The dataset's category ids of the model's classes (COCO results use them); 1..C when the dataset is gone."""
    try:
        root = RunPaths.of(params).dataset
        cats = sorted(read_json(root / params.train_json)["categories"], key=lambda c: c["id"])
        if [c["name"] for c in cats] == list(names):
            return [int(c["id"]) for c in cats]
    except (DataError, OSError, KeyError, TypeError):
        pass
    return list(range(1, len(names) + 1))


def load_predictor(
    target: str | Path,
    threshold: str | float = "auto",
    device: str | None = None,
    backend: str = "torch",
    which: str = "selected",
    sources: Sequence[Any] = (),
    onnx_path: str | Path | None = None,
) -> Predictor:
    """The predictor of a finished run (its selected checkpoint and validation operating points) or of a checkpoint
    folder; refuses a run that is not finished (:func:`tfg_mm.training.judge.resolve_target`)."""
    files, params, final, folder = resolve_target(target, which, sources, verb="predict from")
    dev = resolve_device(device) if device else evaluation_device(params)
    names = checkpoint_class_names(folder)
    _, predict_fn = load_checkpoint_model(folder, params, names, dev)
    thresholds, origin = _thresholds(threshold, names, final)
    kind = "phase 2 (detector + fused text branch)" if (Path(folder) / "detector").is_dir() else "detector alone"
    if backend == "onnx":
        path = Path(onnx_path) if onnx_path else files.run_dir / EXPORT_DIR / ONNX_FILE
        if not path.is_file():
            raise ConfigError(
                f"--backend onnx: {path} does not exist. Fix: export the run first (`python -m tfg_mm export "
                f"{portable_text(str(files.run_dir))}`)."
            )
        run_onnx = ort_predict_fn(ort_session(path))

        def detect(images: Tensor, sizes: Tensor) -> list[dict]:
            boxes, scores, labels = run_onnx(images, sizes)
            return [{"boxes": b, "scores": s, "labels": c} for b, s, c in zip(boxes, scores, labels)]

        dev = torch.device("cpu")
    elif backend == "torch":
        top_k = params.top_k

        @torch.no_grad()
        def detect(images: Tensor, sizes: Tensor) -> list[dict]:
            logits, boxes = predict_fn(images.to(dev))
            return postprocess(logits.float().cpu(), boxes.float().cpu(), sizes, top_k=top_k)

    else:
        raise ConfigError(f"--backend {backend!r}: choose torch or onnx.")
    return Predictor(
        detect=detect,
        class_names=names,
        cat_ids=_categories(params, names),
        thresholds=thresholds,
        threshold_source=origin,
        image_size=int(params.image_size),
        checkpoint=Path(folder),
        run_dir=files.run_dir,
        backend=backend,
        device=dev,
        kind=kind,
    )


def _thresholds(threshold: str | float, names: Sequence[str], final) -> tuple[dict[str, float], dict[str, str]]:
    if threshold != "auto":
        try:
            value = float(threshold)
        except (TypeError, ValueError):
            raise ConfigError(f"--threshold {threshold!r}: give `auto` or a number in [0, 1].") from None
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"--threshold {value}: scores are in [0, 1]; give a number in [0, 1] or `auto`.")
        return dict.fromkeys(names, value), dict.fromkeys(names, "--threshold")
    points = (final or {}).get("operating_points") or {}
    out, origin = {}, {}
    for name in names:
        value = (points.get(name) or {}).get("threshold")
        if value is None:
            out[name], origin[name] = FALLBACK_THRESHOLD, "fallback (no validation operating point)"
        else:
            out[name], origin[name] = float(value), "validation operating point"
    return out, origin


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def annotate(image: Image.Image, detections: Iterable[dict], class_names: Sequence[str]) -> Image.Image:
    """A copy of ``image`` with each detection's box, class name and score; a colour per class, lines and text sized
    to the image so small defects stay readable."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    side = min(out.size)
    width = max(1, round(side / 320))
    font = _font(max(10, round(side / 45)))
    for d in detections:
        colour = PALETTE[class_names.index(d["class"]) % len(PALETTE)]
        x0, y0, x1, y1 = d["xyxy"]
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        text = f"{d['class']} {d['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y0 - th - 2 * width if y0 - th - 2 * width >= 0 else min(y1 + width, out.height - th - 2 * width)
        tx = min(max(0, x0), max(0, out.width - tw - 2 * width))
        draw.rectangle([tx, ty, tx + tw + 2 * width, ty + th + 2 * width], fill=colour)
        draw.text((tx + width - left, ty + width - top), text, fill=(255, 255, 255), font=font)
    return out


# --------------------------------------------------------------------------------------------
# Predicting
# --------------------------------------------------------------------------------------------
def _keep(result: dict, predictor: Predictor) -> list[dict]:
    """The detections of one image above their class's threshold, as plain numbers."""
    thr = predictor.threshold_tensor()
    labels = result["labels"].long().cpu()
    scores = result["scores"].float().cpu()
    boxes = result["boxes"].double().cpu()
    keep = scores >= thr[labels]
    out = []
    for box, score, label in zip(boxes[keep].tolist(), scores[keep].tolist(), labels[keep].tolist()):
        out.append({"class": predictor.class_names[label], "label": label, "score": score, "xyxy": box})
    return out


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@functools.cache
def _resize(image_size: int):
    """Evaluation's transform (square resize, float in [0, 1]), built once per size."""
    return build_transforms(image_size, train=False, augment="none")


def _tensor(images: Sequence[Image.Image], image_size: int) -> tuple[Tensor, Tensor]:
    resize = _resize(image_size)
    pixels = torch.stack([resize(F.pil_to_tensor(im)) for im in images])
    sizes = torch.tensor([[im.height, im.width] for im in images], dtype=torch.int64)
    return pixels, sizes


def default_out(target: str | Path) -> Path:
    """``runs/predict/<name of the run or checkpoint folder>``."""
    path = Path(target)
    name = path.name if path.name not in ("best", "last", "checkpoints") else f"{path.parents[1].name}_{path.name}"
    return project_root() / "runs" / "predict" / name


def predict(
    predictor: Predictor,
    source: Source,
    out: str | Path,
    batch_size: int = 8,
    progress: bool = True,
    save_images: bool = True,
) -> dict:
    """Predict every image (or frame) of ``source`` into ``out``; returns the summary written as ``summary.json``."""
    out = Path(out)
    images_out = out / "images"
    rows: list[dict] = []
    skipped: list[str] = []
    n_done = 0
    writer = None
    frames = _video_frames(source.video) if source.video is not None else None
    items: Iterable = (
        ((f"{source.video.name}#frame={i}", frame) for i, (frame, _) in enumerate(frames))
        if frames is not None
        else ((name, path) for path, name in source.images)
    )
    total = None if source.video is not None else len(source.images)
    bar = tqdm(total=total, desc="predict", unit="img", disable=not progress, leave=False)
    try:
        for batch in _batches(items, batch_size):
            loaded: list[tuple[str, Image.Image]] = []
            for name, item in batch:
                if isinstance(item, Image.Image):
                    loaded.append((name, item))
                    continue
                try:
                    loaded.append((name, read_image(item)))
                except DECODE_ERRORS as exc:
                    skipped.append(name)
                    log.warning("%s: cannot be decoded (%s); skipped", item, exc)
            bar.update(len(batch))
            if not loaded:
                continue
            pixels, sizes = _tensor([im for _, im in loaded], predictor.image_size)
            results = predictor.detect(pixels, sizes)
            for (name, image), result in zip(loaded, results):
                kept = _keep(result, predictor)
                image_id = n_done
                n_done += 1
                for d in kept:
                    x0, y0, x1, y1 = d["xyxy"]
                    rows.append(
                        {
                            "image_id": image_id,
                            "file_name": name,
                            "category_id": predictor.cat_ids[d["label"]],
                            "category": d["class"],
                            "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "score": d["score"],
                        }
                    )
                if source.video is not None:
                    writer = writer or _VideoWriter(out / f"{source.video.stem}_annotated.mp4", image.size, source)
                    writer.write(annotate(image, kept, predictor.class_names))
                elif save_images:
                    dest = images_out / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    annotate(image, kept, predictor.class_names).save(dest.with_suffix(".png"))
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    counts = Counter(r["category"] for r in rows)
    summary = {
        "source": source.label,
        "checkpoint": portable_text(str(predictor.checkpoint)),
        "model": predictor.kind,
        "backend": predictor.backend,
        "device": str(predictor.device),
        "image_size": predictor.image_size,
        "thresholds": {
            n: {"value": predictor.thresholds[n], "from": predictor.threshold_source[n]} for n in predictor.class_names
        },
        "images": n_done,
        "skipped": skipped,
        "detections": len(rows),
        "counts": {n: counts.get(n, 0) for n in predictor.class_names},
        "files": {
            "predictions": "predictions.json",
            "table": "predictions.csv",
            **({"video": f"{source.video.stem}_annotated.mp4"} if source.video is not None else {}),
            **({"images": "images/"} if save_images and source.video is None else {}),
        },
    }
    atomic_write_json(out / "predictions.json", rows)
    atomic_write_text(out / "predictions.csv", _csv(rows))
    atomic_write_json(out / "summary.json", summary)
    return summary


def _csv(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    fields = ["file_name", "category", "category_id", "score", "x_min", "y_min", "x_max", "y_max"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        x, y, w, h = r["bbox"]
        writer.writerow(
            {
                "file_name": r["file_name"],
                "category": r["category"],
                "category_id": r["category_id"],
                "score": f"{r['score']:.4f}",
                "x_min": f"{x:.1f}",
                "y_min": f"{y:.1f}",
                "x_max": f"{x + w:.1f}",
                "y_max": f"{y + h:.1f}",
            }
        )
    return buffer.getvalue()


class _VideoWriter:
    """The annotated video (MPEG-4 Part 2 through PyAV: an encoder every FFmpeg build has)."""

    def __init__(self, path: Path, size: tuple[int, int], source: Source) -> None:
        av = _require_av()
        path.parent.mkdir(parents=True, exist_ok=True)
        with av.open(str(source.video)) as probe:
            rate = probe.streams.video[0].average_rate or 25
        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream("mpeg4", rate=rate)
        self.stream.width, self.stream.height = size[0] - size[0] % 2, size[1] - size[1] % 2
        self.stream.pix_fmt = "yuv420p"
        self._av = av

    def write(self, image: Image.Image) -> None:
        frame = self._av.VideoFrame.from_image(image.crop((0, 0, self.stream.width, self.stream.height)))
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def summary_lines(summary: dict, out: Path) -> list[str]:
    """What the terminal shows at the end: counts per class, thresholds' origin, skipped files, where the files are."""
    lines = [
        f"{summary['images']} image(s){' (video frames)' if 'video' in summary['files'] else ''}, "
        f"{summary['detections']} detection(s); {summary['model']}, {summary['backend']} on {summary['device']}",
        f"{'class':<16}{'boxes':>7}{'threshold':>11}  from",
    ]
    for name, count in summary["counts"].items():
        thr = summary["thresholds"][name]
        lines.append(f"{name:<16}{count:>7}{thr['value']:>11.3f}  {thr['from']}")
    if summary["skipped"]:
        lines.append(f"skipped {len(summary['skipped'])} unreadable file(s): {', '.join(summary['skipped'][:5])}")
    lines.append(f"wrote {portable_text(str(out))}/ ({', '.join(summary['files'].values())}, summary.json)")
    return lines
