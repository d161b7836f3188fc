"""The embedded default dataset: procedural industrial surfaces with COCO annotations.

Why a generator instead of a download: the thesis dataset is private, and the toolkit must run
end to end (data -> baseline -> phase 2 -> ablations -> reports) on a fresh machine without a
network. The generator reproduces the *structure* of the thesis problem: a metal texture with
grain, uneven illumination and noise; four clearly visible defect classes; and two hard ones
(``perforation``: holes a few pixels wide with moderate contrast; ``break``: thin, faint,
branching cracks), so that the per-class analysis of the thesis (hard classes lagging) has the
same shape here.

Determinism: every image draws from its own ``numpy.random.Generator(PCG64([seed, split, index]))``,
so the same seed gives byte-identical PNGs and JSON (Pillow's PNG encoder is deterministic for the
same pixels and options, no timestamps are written, JSON keys are sorted), and changing ``n_train``
does not change the images that already existed. No global RNG is touched.

Everything is drawn in a canonical orientation (grain along x) and half of the images are then
transposed, so the rolling direction varies without the defect painters having to know about it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import distance_transform_edt, gaussian_filter, gaussian_filter1d
from tqdm import tqdm  # plain bars: tqdm.auto warns in kernels without ipywidgets

from tfg_mm.errors import ConfigError, DataError
from tfg_mm.io import atomic_dir

DEFAULT_CLASSES: tuple[str, ...] = ("scratch", "perforation", "break", "stain", "dent", "inclusion")
#: The hard classes of the embedded set (the thesis's "Perforaciones" and "Roturas": small holes, thin cracks);
#: the default of an ablation grid's `hard_classes` and the classes reports highlight.
HARD_CLASSES: tuple[str, ...] = ("perforation", "break")

#: Bumped whenever the drawing code changes, so a cached set made by older code is regenerated.
GENERATOR_VERSION = 6
MANIFEST_NAME = "README.json"
PNG_COMPRESS_LEVEL = 1  # fast zlib level: 1.9 ms vs 15 ms an image at level 6 for +7 % size

Box = tuple[int, int, int, int]  # x, y, width, height in pixels (COCO order)


@dataclass(frozen=True)
class _Canvas:
    """Per-image drawing context: pixel grids, the size scale and the light direction."""

    size: int
    yy: np.ndarray
    xx: np.ndarray
    light: float  # angle of the light, shared by every dent of the image

    @property
    def k(self) -> float:
        """Scale factor relative to the default 160 px, so defects keep their look at any size."""
        return self.size / 160.0


# --------------------------------------------------------------------------------------------
# Texture
# --------------------------------------------------------------------------------------------


def _unit(a: np.ndarray) -> np.ndarray:
    return a / (a.std() + 1e-8)


def _metal_texture(rng: np.random.Generator, c: _Canvas) -> np.ndarray:
    """Rolled / brushed metal: streaky grain along x, roll bands, an illumination gradient,
    a specular hotspot, sensor noise and a slight steel / aluminium tint. Returns (S, S, 3)."""
    s, k = c.size, c.k
    gray = np.full((s, s), rng.uniform(0.40, 0.60), dtype=np.float64)
    # Coarse grain: white noise smeared along the rolling direction.
    gray += rng.uniform(0.02, 0.04) * _unit(
        gaussian_filter1d(rng.standard_normal((s, s)), rng.uniform(8, 24) * k, axis=1)
    )
    # Fine brushing lines.
    gray += 0.012 * _unit(gaussian_filter1d(rng.standard_normal((s, s)), 2.0 * k, axis=1))
    # Roll marks: bands across the rolling direction.
    gray += (
        rng.uniform(0.008, 0.025) * _unit(gaussian_filter1d(rng.standard_normal(s), rng.uniform(3, 10) * k))[:, None]
    )
    # Illumination: a linear gradient in a random direction plus a soft hotspot.
    angle = rng.uniform(0, 2 * np.pi)
    gray += rng.uniform(0.03, 0.10) * ((c.xx * np.cos(angle) + c.yy * np.sin(angle)) / s - 0.5)
    hx, hy = rng.uniform(0, s, size=2)
    hs = rng.uniform(0.3, 0.7) * s
    gray += rng.uniform(0.0, 0.10) * np.exp(-((c.xx - hx) ** 2 + (c.yy - hy) ** 2) / (2 * hs**2))
    gray += rng.normal(0.0, 0.01, size=(s, s))
    tint = 1.0 + rng.uniform(-0.03, 0.03, size=3)
    return gray[..., None] * tint


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------


def _bbox(mask: np.ndarray) -> Box | None:
    """Tight pixel box of a boolean mask, or None when the defect fell outside the image."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0 or cols.size == 0:
        return None
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    return x0, y0, x1 - x0 + 1, y1 - y0 + 1


def _stroke(points: np.ndarray, width: float, size: int) -> np.ndarray:
    """Anti-aliased stroke of the given width through the points (x, y), from a distance map."""
    inside = (points[:, 0] >= 0) & (points[:, 0] <= size - 1) & (points[:, 1] >= 0) & (points[:, 1] <= size - 1)
    ij = np.round(points[inside]).astype(int)
    free = np.ones((size, size), dtype=bool)
    if ij.size == 0:
        return np.zeros((size, size))
    free[ij[:, 1], ij[:, 0]] = False
    return np.clip(width / 2 + 0.5 - distance_transform_edt(free), 0.0, 1.0)


def _walk(
    rng: np.random.Generator, start: np.ndarray, heading: float, length: float, drift: float, jitter: float
) -> tuple[np.ndarray, np.ndarray]:
    """A random walk of unit steps: slowly drifting heading plus per-step jitter (jagged)."""
    n = max(int(length), 2)
    headings = heading + np.cumsum(rng.normal(0.0, drift, n)) + rng.normal(0.0, jitter, n)
    steps = np.stack([np.cos(headings), np.sin(headings)], axis=1)
    return start + np.cumsum(steps, axis=0), headings


def _ellipse(c: _Canvas, cx: float, cy: float, rx: float, ry: float, theta: float) -> np.ndarray:
    """Normalised elliptical radius squared (1 on the ellipse boundary)."""
    dx, dy = c.xx - cx, c.yy - cy
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    return (u / rx) ** 2 + (v / ry) ** 2


# --------------------------------------------------------------------------------------------
# Defect painters: each draws onto ``img`` in place and returns the boxes of what it drew.
# --------------------------------------------------------------------------------------------


def _paint_scratch(rng: np.random.Generator, img: np.ndarray, c: _Canvas) -> list[Box]:
    """A straight-ish line along the rolling direction (within 20 degrees), mostly bright (specular),
    3-4.5 px wide and high-contrast: easy."""
    s, k = c.size, c.k
    start = rng.uniform(0.1 * s, 0.9 * s, size=2)
    heading = rng.uniform(-0.35, 0.35) + (np.pi if rng.random() < 0.5 else 0.0)
    points, _ = _walk(rng, start, heading, rng.uniform(0.2, 0.45) * s, drift=0.01, jitter=0.0)
    mask = _stroke(points, rng.uniform(3.0, 4.5) * k, s)
    sign = 1.0 if rng.random() < 0.8 else -1.0
    img += (sign * rng.uniform(0.32, 0.45) * mask)[..., None]
    box = _bbox(mask > 0.3)
    return [box] if box else []


def _paint_perforation(rng: np.random.Generator, img: np.ndarray, c: _Canvas) -> list[Box]:
    """One to three small round holes (5-8 px) of moderate contrast with a faint burr: hard (the
    smallest class, below one cell of the detector's stride-16 features)."""
    s, k = c.size, c.k
    n = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    margin = 4 * k
    center = rng.uniform(margin, s - margin, size=2)
    placed: list[np.ndarray] = []
    boxes: list[Box] = []
    for i in range(n):
        r = rng.uniform(2.5, 3.8) * k
        cxy = center if i == 0 else np.clip(center + rng.normal(0.0, 9.0 * k, size=2), margin, s - margin)
        if any(np.hypot(*(cxy - p)) < 2 * r + 4 * k for p in placed):
            continue  # holes of a cluster do not merge
        placed.append(cxy)
        d = np.hypot(c.xx - cxy[0], c.yy - cxy[1])
        hole = np.clip(r + 0.5 - d, 0.0, 1.0)
        rim = np.clip(1.0 - np.abs(d - r - 1.0), 0.0, 1.0)
        img += (-rng.uniform(0.26, 0.36) * hole + rng.uniform(0.02, 0.05) * rim)[..., None]
        box = _bbox(hole > 0.3)
        if box:
            boxes.append(box)
    return boxes


def _paint_break(rng: np.random.Generator, img: np.ndarray, c: _Canvas) -> list[Box]:
    """A thin (about 1 px), faint, jagged crack with one to three branches: hard."""
    s, k = c.size, c.k
    trunk_len = rng.uniform(0.25, 0.45) * s
    start = rng.uniform(0.15 * s, 0.85 * s, size=2)
    trunk, headings = _walk(rng, start, rng.uniform(0, 2 * np.pi), trunk_len, drift=0.06, jitter=0.35)
    parts = [trunk]
    for _ in range(int(rng.integers(1, 4))):
        j = int(rng.integers(len(trunk) // 5, max(len(trunk) * 4 // 5, len(trunk) // 5 + 1)))
        side = 1.0 if rng.random() < 0.5 else -1.0
        branch, _ = _walk(
            rng,
            trunk[j],
            headings[j] + side * rng.uniform(0.4, 1.0),
            rng.uniform(0.25, 0.55) * trunk_len,
            drift=0.08,
            jitter=0.35,
        )
        parts.append(branch)
    mask = _stroke(np.concatenate(parts), rng.uniform(0.9, 1.2) * k, s)
    img -= (rng.uniform(0.07, 0.11) * mask)[..., None]
    box = _bbox(mask > 0.3)
    return [box] if box else []


def _paint_stain(rng: np.random.Generator, img: np.ndarray, c: _Canvas) -> list[Box]:
    """A large, soft, irregular discolouration (rust, oil or water mark): easy."""
    s, k = c.size, c.k
    cx, cy = rng.uniform(0.15 * s, 0.85 * s, size=2)
    e = _ellipse(c, cx, cy, rng.uniform(0.08, 0.17) * s, rng.uniform(0.08, 0.17) * s, rng.uniform(0, np.pi))
    blob = (1.0 - e) + 0.35 * _unit(gaussian_filter(rng.standard_normal((s, s)), 3.0 * k))
    mask = gaussian_filter(np.clip(blob / 0.25, 0.0, 1.0), 1.2 * k)
    palette = np.array([[0.55, 0.36, 0.20], [0.22, 0.22, 0.25], [0.36, 0.39, 0.43]])
    color = palette[int(rng.integers(len(palette)))] * rng.uniform(0.9, 1.1)
    alpha = rng.uniform(0.4, 0.65) * mask[..., None]
    img *= 1.0 - alpha
    img += alpha * color
    box = _bbox(mask > 0.25)
    return [box] if box else []


def _paint_dent(rng: np.random.Generator, img: np.ndarray, c: _Canvas) -> list[Box]:
    """A shallow depression lit from the image's light direction (bright and dark halves): easy."""
    s = c.size
    cx, cy = rng.uniform(0.12 * s, 0.88 * s, size=2)
    sx, sy = rng.uniform(0.035, 0.06, size=2) * s
    dx, dy = c.xx - cx, c.yy - cy
    h = np.exp(-(dx**2 / (2 * sx**2) + dy**2 / (2 * sy**2)))
    slope = -(dx / sx * np.cos(c.light) + dy / sy * np.sin(c.light)) * h
    shade = slope / (np.abs(slope).max() + 1e-8)
    img += (rng.uniform(0.18, 0.28) * shade - 0.05 * h)[..., None]
    box = _bbox(h > 0.1)
    return [box] if box else []


def _paint_inclusion(rng: np.random.Generator, img: np.ndarray, c: _Canvas) -> list[Box]:
    """A dark, elongated, sharp-edged slag spot stretched along the rolling direction: easy."""
    s, k = c.size, c.k
    cx, cy = rng.uniform(0.1 * s, 0.9 * s, size=2)
    e = _ellipse(c, cx, cy, rng.uniform(8.0, 16.0) * k, rng.uniform(2.5, 4.0) * k, rng.uniform(-0.2, 0.2))
    edge = 0.25 * _unit(gaussian_filter(rng.standard_normal((s, s)), 1.0 * k))
    mask = np.clip((1.0 - e + edge) / 0.25, 0.0, 1.0)
    tone = np.array([1.0, 1.0, 1.05]) * -rng.uniform(0.28, 0.40)
    img += mask[..., None] * tone
    box = _bbox(mask > 0.3)
    return [box] if box else []


def _paint_spanning(
    rng: np.random.Generator, img: np.ndarray, c: _Canvas, classes: Sequence[str]
) -> list[tuple[str, Box]]:
    """The stress case (``generate(stress=True)``): one or two defects that span the image from border to border.

    Modelled on public steel-strip sets (200 px grayscale, boxes over most of the image) on which DEIMv2 predicted
    inverted boxes (issue 9): a band across the whole width (touches left and right), a crack along the whole
    height (touches top and bottom) and, in a quarter of the images, a discolouration over the whole image
    (touches every border). Labelled with the first two of ``stain``, ``scratch``, ``break`` that are in
    ``classes`` (else the first class).
    """
    s, k = c.size, c.k
    names = [n for n in ("stain", "scratch", "break") if n in classes] or [classes[0]]
    band_name, line_name = names[0], names[min(1, len(names) - 1)]
    objects: list[tuple[str, Box]] = []
    # A band across the whole width, 20-60 % of the height.
    height = int(rng.uniform(0.2, 0.6) * s)
    top = int(rng.integers(0, s - height + 1))
    profile = np.zeros(s)
    profile[top : top + height] = 1.0
    profile = gaussian_filter1d(profile, 1.5 * k)
    grain = 0.3 * _unit(gaussian_filter(rng.standard_normal((s, s)), 2.0 * k))
    band = np.clip(profile[:, None] * (1.0 + grain), 0.0, 1.0)
    img += (-rng.uniform(0.15, 0.25) * band)[..., None]
    objects.append((band_name, (0, top, s, height)))
    # A crack along the whole height (border to border), drifting sideways.
    if rng.random() < 0.7:
        x = rng.uniform(0.2 * s, 0.8 * s) + np.cumsum(rng.normal(0.0, 0.4, s))
        points = np.stack([np.clip(x, 0, s - 1), np.arange(s, dtype=np.float64)], axis=1)
        mask = _stroke(points, rng.uniform(2.0, 3.5) * k, s)
        img -= (rng.uniform(0.2, 0.3) * mask)[..., None]
        box = _bbox(mask > 0.3)
        if box:
            x0, _, w, _ = box
            objects.append((line_name, (x0, 0, w, s)))
    # A discolouration over the whole image.
    if rng.random() < 0.25:
        img *= 1.0 - rng.uniform(0.1, 0.2) * (0.5 + 0.5 * _unit(gaussian_filter(rng.standard_normal((s, s)), 8 * k)))[
            ..., None
        ].clip(0.0, 1.0)
        objects.append((band_name, (0, 0, s, s)))
    return objects


_PAINTERS: dict[str, Callable[[np.random.Generator, np.ndarray, _Canvas], list[Box]]] = {
    "scratch": _paint_scratch,
    "perforation": _paint_perforation,
    "break": _paint_break,
    "stain": _paint_stain,
    "dent": _paint_dent,
    "inclusion": _paint_inclusion,
}
# Large, soft defects first so small ones painted later stay visible where they overlap.
_PAINT_ORDER = ("stain", "dent", "inclusion", "scratch", "break", "perforation")


# --------------------------------------------------------------------------------------------
# Images and the dataset
# --------------------------------------------------------------------------------------------


def render_image(
    seed: int,
    split: str,
    index: int,
    image_size: int,
    classes: Sequence[str],
    defect_free: bool,
    stress: bool = False,
) -> tuple[np.ndarray, list[tuple[str, Box]]]:
    """Draw one image; returns the uint8 (S, S, 3) pixels (``stress``: (S, S), grayscale) and
    ``(class name, box)`` pairs.

    Public so notebooks can show how a single sample is made; ``generate`` is the entry point.
    ``stress`` adds image-spanning defects (:func:`_paint_spanning`) after the ordinary ones, on a defect-free
    image too, and returns a grayscale image; ``stress=False`` draws exactly what it always drew.
    """
    rng = np.random.Generator(np.random.PCG64([seed, _SPLIT_CODES[split], index]))
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float64)
    canvas = _Canvas(image_size, yy, xx, light=float(rng.uniform(0, 2 * np.pi)))
    img = _metal_texture(rng, canvas)
    chosen: list[str] = []
    if not defect_free:
        n = int(rng.choice([1, 2, 3, 4], p=[0.35, 0.35, 0.2, 0.1]))
        chosen = [classes[int(i)] for i in rng.integers(0, len(classes), size=n)]
    objects: list[tuple[str, Box]] = []
    for name in sorted(chosen, key=_PAINT_ORDER.index):
        objects.extend((name, box) for box in _PAINTERS[name](rng, img, canvas))
    if stress:
        objects.extend(_paint_spanning(rng, img, canvas, classes))
        img = img.mean(axis=2, keepdims=True)
    pixels = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    if rng.random() < 0.5:  # vertical rolling direction
        pixels = np.ascontiguousarray(pixels.transpose(1, 0, 2))
        objects = [(name, (y, x, h, w)) for name, (x, y, w, h) in objects]
    if stress:
        pixels = pixels[..., 0]
    return pixels, objects


_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB" if pixels.ndim == 3 else "L").save(
        buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False
    )
    return buf.getvalue()


def _check_params(
    seed: int, n_train: int, n_val: int, image_size: int, classes: Sequence[str], defect_free_fraction: float
) -> tuple[str, ...]:
    if isinstance(classes, str):
        raise ConfigError(f"generate(classes={classes!r}): give a list of class names, e.g. {list(DEFAULT_CLASSES)}.")
    classes = tuple(classes)
    unknown = [c for c in classes if c not in _PAINTERS]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ConfigError(
            f"generate(classes={list(classes)}): the synthetic generator can draw {list(DEFAULT_CLASSES)}; "
            f"unknown: {unknown or 'none'}. Fix: pass a non-empty list of distinct names from that list."
        )
    for name, value, low in (
        ("seed", seed, 0),
        ("n_train", n_train, 1),
        ("n_val", n_val, 1),
        ("image_size", image_size, 64),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"generate({name}={value!r}): must be an integer >= {low}.")
    if not 0.0 <= defect_free_fraction < 1.0:
        raise ConfigError(f"generate(defect_free_fraction={defect_free_fraction!r}): must be in [0, 1).")
    return classes


def _split_json(
    split: str,
    records: list[tuple[int, str, list[tuple[str, Box]]]],
    image_size: int,
    classes: tuple[str, ...],
    params: dict,
) -> str:
    cat_id = {name: i + 1 for i, name in enumerate(classes)}
    images, annotations = [], []
    for image_id, file_name, objects in records:
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for name, (x, y, w, h) in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat_id[name],
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {
            "description": f"tfg-mm synthetic industrial surface defects ({split})",
            "version": str(GENERATOR_VERSION),
            "generator": "tfg_mm.data.synthetic",
            "params": params,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cat_id[n], "name": n, "supercategory": "defect"} for n in classes],
    }
    return json.dumps(coco, sort_keys=True, indent=1) + "\n"


def _is_current(out_dir: Path, manifest: dict) -> bool:
    """True when ``out_dir`` already holds a complete set made with the same parameters."""
    try:
        existing = json.loads((out_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    if existing.get("params") != manifest["params"] or existing.get("version") != manifest["version"]:
        return False
    splits = ["train", "val"] + (["test"] if manifest["params"].get("n_test") else [])
    files = [out_dir / f"instances_{split}.json" for split in splits]
    files += [out_dir / "images" / name for name in existing.get("images", [])]
    return len(existing.get("images", [])) == manifest["n_images"] and all(f.is_file() for f in files)


def generate(
    out_dir: str | Path,
    seed: int = 0,
    n_train: int = 400,
    n_val: int = 100,
    image_size: int = 160,
    n_test: int = 0,
    classes: Sequence[str] = DEFAULT_CLASSES,
    defect_free_fraction: float = 0.1,
    progress: bool = True,
    stress: bool = False,
) -> Path:
    """Write the synthetic defect dataset as an ordinary COCO folder and return ``out_dir``.

    Layout: ``images/{train,val,test}_NNNNNN.png``, ``instances_train.json``, ``instances_val.json``,
    ``instances_test.json`` (with ``n_test`` > 0: the held-out test split), ``README.json`` (the parameters,
    the image list and class counts; used to skip regeneration when an identical set is already there) and
    ``README.txt``. Category ids are 1..len(classes) in the given order; image ids are unique across the
    splits. The folder is replaced atomically, and a non-empty folder that was not made by this generator is
    never overwritten.

    Every split draws from its own random stream (seed, split, image index), so the test split adds images
    without changing one byte of the train and val images or annotation files (their ``info.params`` leave
    ``n_test`` out; the manifest records it).

    ``stress=True`` (``python -m tfg_mm generate --stress``) writes the stress case of issue 9: grayscale PNGs
    whose defects include image-spanning ones (a band across the whole width, a crack along the whole height,
    a discolouration over the whole image: boxes touching every border, next to the small ordinary defects).
    It reproduces the kind of data on which DEIMv2 predicts inverted boxes (see ``tfg_mm.detector.loss.box_cxcywh_to_xyxy``).
    The default set (``stress=False``) is unchanged, byte for byte.
    """
    out_dir = Path(out_dir)
    classes = _check_params(seed, n_train, n_val, image_size, classes, defect_free_fraction)
    if not isinstance(n_test, int) or isinstance(n_test, bool) or n_test < 0:
        raise ConfigError(f"generate(n_test={n_test!r}): must be an integer >= 0 (0: no test split).")
    params = {
        "seed": int(seed),
        "n_train": n_train,
        "n_val": n_val,
        "image_size": image_size,
        "classes": list(classes),
        "defect_free_fraction": float(defect_free_fraction),
    }
    if stress:  # only then: the default set's manifest (and so its dataset hash) stays as it was
        params["stress"] = True
    # the train / val annotation files carry the parameters of before the test split (their bytes unchanged)
    split_params = dict(params)
    if n_test:
        params["n_test"] = n_test
    manifest = {
        "generator": "tfg_mm.data.synthetic",
        "version": GENERATOR_VERSION,
        "params": params,
        "n_images": n_train + n_val + n_test,
    }
    if _is_current(out_dir, manifest):
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise DataError(
            f"generate(out_dir={str(out_dir)!r}): the folder is not empty and was not written by the "
            f"synthetic generator (no {MANIFEST_NAME}). Fix: pass an empty or new folder."
        )

    image_names: list[str] = []
    class_counts = {name: 0 for name in classes}
    counts = {"train": n_train, "val": n_val, **({"test": n_test} if n_test else {})}
    splits: dict[str, list[tuple[int, str, list[tuple[str, Box]]]]] = {split: [] for split in counts}
    with (
        atomic_dir(out_dir) as tmp,
        tqdm(total=sum(counts.values()), desc="synthetic defects", disable=not progress, unit="img") as bar,
    ):
        (tmp / "images").mkdir()
        image_id = 0
        for split, count in counts.items():
            # The defect-free images are an exact share, chosen by the split's own generator.
            split_rng = np.random.Generator(np.random.PCG64([seed, _SPLIT_CODES[split], 2**32]))
            n_free = int(round(defect_free_fraction * count))
            free = set(split_rng.choice(count, size=n_free, replace=False).tolist()) if n_free else set()
            for index in range(count):
                pixels, objects = render_image(seed, split, index, image_size, classes, index in free, stress)
                image_id += 1
                file_name = f"{split}_{index:06d}.png"
                (tmp / "images" / file_name).write_bytes(_png_bytes(pixels))
                image_names.append(file_name)
                splits[split].append((image_id, file_name, objects))
                for name, _ in objects:
                    class_counts[name] += 1
                bar.update(1)
        for split, records in splits.items():
            written = params if split == "test" else split_params
            (tmp / f"instances_{split}.json").write_text(_split_json(split, records, image_size, classes, written))
        manifest.update({"images": image_names, "class_counts": class_counts})
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, sort_keys=True, indent=1) + "\n")
        (tmp / "README.txt").write_text(
            "Synthetic industrial surface defects generated by tfg_mm.data.synthetic "
            f"(generator version {GENERATOR_VERSION}).\n"
            f"Parameters: {json.dumps(params, sort_keys=True)}\n"
            "COCO annotations: instances_train.json, instances_val.json"
            + (", instances_test.json (held out: judged on, never selected on)" if n_test else "")
            + "; images in images/.\n"
            f"Hard classes (small / faint by design): {', '.join(c for c in HARD_CLASSES if c in classes) or 'none'}.\n"
            "Regenerate with: python -m tfg_mm generate (or tfg_mm.data.synthetic.generate).\n"
        )
    return out_dir
