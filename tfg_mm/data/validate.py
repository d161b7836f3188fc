"""Validation of COCO detection files before anything reaches torch.

Why a separate pass: a malformed entry otherwise surfaces as an ``IndexError`` in a collate
function or a NaN in the matcher, far from its cause. Here every problem is found up front and
reported in one of two ways:

* an error (``DataError``) when the data cannot be used as it is: missing keys, duplicate ids,
  unknown ids, missing or unreadable images, empty datasets, boxes that are clearly in the wrong
  format (``[x1, y1, x2, y2]`` where COCO wants ``[x, y, width, height]``);
* a counted warning when there is one obvious repair, which is then applied to the returned data:
  boxes that stick out of the image are clipped, non-RGB images are converted on load (8-bit and binary
  grayscale silently: nothing is lost), missing
  ``area`` / ``iscrowd`` are filled; with ``strict=False`` zero-area boxes are dropped instead of
  being an error.

Every message names the file, the entry (id, file name or key) and the fix.

Opening an image's header does not prove that its pixels decode (a truncated JPEG has a valid
header). :func:`decode_images` decodes every referenced image once, with the dataset's own reader,
before training; a clean pass is remembered per dataset content hash (a marker file under
``<project root>/.cache/decoded``, moved with ``TFG_MM_CACHE_DIR``), so it is paid once per dataset.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm  # plain bars: tqdm.auto warns in kernels without ipywidgets

from tfg_mm.errors import DataError
from tfg_mm.io import atomic_write_json
from tfg_mm.paths import project_root

log = logging.getLogger(__name__)

REQUIRED_TOP = ("images", "annotations", "categories")
REQUIRED_IMAGE = ("id", "file_name", "width", "height")
REQUIRED_ANNOTATION = ("id", "image_id", "category_id", "bbox")
REQUIRED_CATEGORY = ("id", "name")
#: Boxes may exceed the image by this many pixels (rounding in exporters) without a warning.
EDGE_TOLERANCE = 1.0
MAX_EXAMPLES = 3


class DataWarning(UserWarning):
    """A data problem that was repaired automatically (clipped box, converted image, ...)."""


@dataclass
class ValidationReport:
    """What a validation found: sizes, and warnings counted per kind with one example each.

    ``data`` holds the repaired COCO dict (clipped boxes, filled keys, dropped degenerate boxes),
    which is what the dataset and the evaluation should use.
    """

    source: Path
    n_images: int = 0
    n_annotations: int = 0
    n_categories: int = 0
    counts: Counter = field(default_factory=Counter)
    messages: dict[str, str] = field(default_factory=dict)
    data: dict = field(default_factory=dict, repr=False)

    def warn(self, kind: str, message: str) -> None:
        """Count a warning of ``kind``; the first message of each kind is kept as the example."""
        self.counts[kind] += 1
        self.messages.setdefault(kind, message)

    @property
    def warnings(self) -> dict[str, int]:
        return dict(self.counts)

    def summary(self) -> str:
        head = (
            f"{self.source}: {self.n_images} images, {self.n_annotations} annotations, {self.n_categories} categories"
        )
        if not self.counts:
            return head + ", no warnings."
        lines = [head + f", {sum(self.counts.values())} warnings:"]
        lines += [f"  - {kind} (x{n}): {self.messages[kind]}" for kind, n in sorted(self.counts.items())]
        return "\n".join(lines)

    def emit(self) -> None:
        """Issue one ``DataWarning`` per kind, with its count: readable in a notebook, not a flood."""
        for kind, n in sorted(self.counts.items()):
            warnings.warn(DataWarning(f"{self.source}: {n} x {kind}. First case: {self.messages[kind]}"), stacklevel=3)


def _examples(items: list[str], total: int | None = None) -> str:
    total = len(items) if total is None else total
    shown = ", ".join(items[:MAX_EXAMPLES])
    return shown + (f" and {total - MAX_EXAMPLES} more" if total > MAX_EXAMPLES else "")


def read_json(path: Path) -> Any:
    """Read a JSON file, turning I/O and syntax problems into errors that name the file."""
    if not path.is_file():
        raise DataError(
            f"{path}: file not found. Fix: pass the path of a COCO instances JSON file "
            "(e.g. <dataset>/instances_train.json), or generate the default set with "
            "tfg_mm.data.synthetic.generate."
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}). "
            "Fix: repair or re-export the file."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read ({exc}). Fix: check the file's permissions and encoding.") from None


#: What PIL raises for a file it cannot open or decode (truncated, corrupt, not an image).
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)


def _read_rgb(path: Path) -> Image.Image:
    """``open_rgb`` without the error wrapping (PIL's exceptions pass through)."""
    with Image.open(path) as im:
        im.load()
        return as_rgb(im)


#: Colour modes read without a warning: RGB, and 8-bit / 1-bit grayscale (binarised scans, most industrial
#: cameras), whose conversion to RGB copies the one channel three times and loses nothing.
LOSSLESS_MODES = frozenset({"RGB", "L", "1"})


def as_rgb(im: Image.Image) -> Image.Image:
    """A decoded image as 8-bit RGB (a new image): 16-bit and float grayscale rescaled to 0..255, every other mode
    (grayscale, palette, CMYK, alpha) converted by PIL."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im.copy()


def open_rgb(path: Path) -> Image.Image:
    """Open an image as 8-bit RGB. 16-bit and float grayscale (common for industrial cameras) are
    rescaled to 0..255 instead of being clipped, which is what ``Image.convert('RGB')`` would do."""
    try:
        return _read_rgb(path)
    except DECODE_ERRORS as exc:
        raise DataError(
            f"{path}: the image cannot be decoded ({exc}). Fix: re-export the image or remove its "
            "entry from the annotation file."
        ) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entries(path: Path, entries: Any, section: str, required: Iterable[str]) -> None:
    if not isinstance(entries, list):
        raise DataError(
            f"{path}: '{section}' must be a list, got {type(entries).__name__}. "
            "Fix: write it as a JSON array of objects."
        )
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(
                f"{path}: {section}[{i}] is a {type(entry).__name__}, not an object. "
                "Fix: each entry must be a JSON object."
            )
        missing = [k for k in required if k not in entry]
        if missing:
            ident = f" (id {entry['id']!r})" if "id" in entry else ""
            raise DataError(
                f"{path}: {section}[{i}]{ident} is missing key(s) {missing}. "
                f"Fix: every entry of '{section}' needs {list(required)}."
            )
        if not _is_int(entry["id"]):
            raise DataError(
                f"{path}: {section}[{i}] has id {entry['id']!r}; ids must be integers. "
                "Fix: renumber the entries with integer ids."
            )


def _duplicates(values: Iterable[Any]) -> list[Any]:
    return [v for v, n in Counter(values).items() if n > 1]


def _check_categories(path: Path, categories: list[dict]) -> None:
    if not categories:
        raise DataError(
            f'{path}: \'categories\' is empty. Fix: list the classes as [{{"id": 1, "name": "scratch"}}, ...].'
        )
    dup = _duplicates(c["id"] for c in categories)
    if dup:
        raise DataError(f"{path}: duplicate category id(s) {dup}. Fix: give every category its own id.")
    by_key: dict[str, list[dict]] = {}
    for c in categories:
        if not isinstance(c["name"], str) or not c["name"].strip():
            raise DataError(f"{path}: category id {c['id']} has name {c['name']!r}. Fix: give it a non-empty name.")
        # 'Scratch', 'scratch ' and 'scratch' would become the same text prompt and the same report row.
        by_key.setdefault(" ".join(c["name"].replace("_", " ").split()).casefold(), []).append(c)
    clashes = [group for group in by_key.values() if len(group) > 1]
    if clashes:
        desc = "; ".join(" / ".join(f"id {c['id']} {c['name']!r}" for c in g) for g in clashes)
        raise DataError(
            f"{path}: category names collide ({desc}). They would share one prompt and one report "
            "row. Fix: merge them (remap the annotations to one id) or rename them distinctly."
        )


def _check_images_section(path: Path, images: list[dict]) -> None:
    if not images:
        raise DataError(
            f"{path}: the dataset is empty ('images' has no entries). Fix: point to the right "
            "annotation file, or check the export that wrote it."
        )
    dup = _duplicates(im["id"] for im in images)
    if dup:
        raise DataError(
            f"{path}: duplicate image id(s) {_examples([str(d) for d in dup])}: annotations of those "
            "ids cannot be told apart. Fix: give every image entry a unique id."
        )
    for im in images:
        if not isinstance(im["file_name"], str) or not im["file_name"]:
            raise DataError(
                f"{path}: image id {im['id']} has file_name {im['file_name']!r}. Fix: set the image's "
                "path relative to the images folder."
            )
        for key in ("width", "height"):
            if not _is_int(im[key]) or im[key] <= 0:
                raise DataError(
                    f"{path}: image id {im['id']} ('{im['file_name']}') has {key}={im[key]!r}. "
                    f"Fix: set {key} to the image's size in pixels (a positive integer)."
                )
    names = Counter(im["file_name"] for im in images)
    twice = [n for n, k in names.items() if k > 1]
    if twice:
        ids = {n: [im["id"] for im in images if im["file_name"] == n] for n in twice}
        desc = _examples([f"'{n}' (ids {ids[n]})" for n in twice])
        raise DataError(
            f"{path}: image file(s) referenced by more than one entry: {desc}. Its boxes would be "
            "split across entries (and counted twice in evaluation). Fix: merge the entries into one "
            "and point their annotations at its id."
        )


def _check_box_format(path: Path, anns: list[dict], sizes: dict[int, tuple[int, int]]) -> None:
    """Raise when boxes look like ``[x1, y1, x2, y2]``: many overflow the image as ``[x, y, w, h]``
    while all of them fit (with x2 > x1, y2 > y1) when read as corners."""
    overflow, corner_ok, examples = 0, 0, []
    for a in anns:
        x, y, w, h = a["bbox"]
        width, height = sizes[a["image_id"]]
        if x + w > width + EDGE_TOLERANCE or y + h > height + EDGE_TOLERANCE:
            overflow += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append(f"annotation id {a['id']}: bbox {a['bbox']} on a {width}x{height} image")
        if w > x and h > y and w <= width + EDGE_TOLERANCE and h <= height + EDGE_TOLERANCE:
            corner_ok += 1
    n = len(anns)
    if n and overflow >= 3 and overflow >= 0.1 * n and corner_ok >= 0.95 * n:
        raise DataError(
            f"{path}: {overflow} of {n} boxes extend past their image when read as COCO [x, y, width, height], "
            f"but all fit when read as [x1, y1, x2, y2] (e.g. {'; '.join(examples)}). The boxes are probably in "
            "corner format. Fix: convert each 'bbox' to [x1, y1, x2 - x1, y2 - y1]."
        )


def _check_annotations(path: Path, data: dict, report: ValidationReport, strict: bool) -> list[dict]:
    anns = data["annotations"]
    images = {im["id"]: im for im in data["images"]}
    cat_ids = sorted(c["id"] for c in data["categories"])
    if not anns:
        raise DataError(
            f"{path}: no annotations at all ({len(images)} images). A detector cannot be trained or "
            "evaluated on it. Fix: point to the annotated file, or check the export."
        )
    dup = _duplicates(a["id"] for a in anns)
    if dup:
        raise DataError(
            f"{path}: duplicate annotation id(s) {_examples([str(d) for d in dup], len(dup))}. "
            "Fix: renumber the annotations 1..N."
        )
    unknown_img = [a for a in anns if a["image_id"] not in images]
    if unknown_img:
        cases = _examples([f"annotation id {a['id']} -> image_id {a['image_id']!r}" for a in unknown_img])
        raise DataError(
            f"{path}: {len(unknown_img)} annotation(s) reference image ids not in 'images' "
            f"({cases}). "
            "Fix: add the image entries or delete those annotations."
        )
    unknown_cat = [a for a in anns if a["category_id"] not in set(cat_ids)]
    if unknown_cat:
        cases = _examples([f"annotation id {a['id']} -> category_id {a['category_id']!r}" for a in unknown_cat])
        raise DataError(
            f"{path}: {len(unknown_cat)} annotation(s) have an unknown category_id ({cases}); "
            f"known category ids: {cat_ids}. Fix: add the category to 'categories' or correct the id."
        )
    for a in anns:
        box = a["bbox"]
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
        ):
            raise DataError(
                f"{path}: annotation id {a['id']} (image id {a['image_id']}) has bbox {box!r}. "
                "Fix: 'bbox' must be four finite numbers [x, y, width, height]."
            )
    _check_box_format(path, anns, {i: (im["width"], im["height"]) for i, im in images.items()})

    kept: list[dict] = []
    for a in anns:
        im = images[a["image_id"]]
        x, y, w, h = (float(v) for v in a["bbox"])
        where = f"annotation id {a['id']} on image '{im['file_name']}' ({im['width']}x{im['height']})"
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(im["width"])), min(y + h, float(im["height"]))
        degenerate = w <= 0 or h <= 0 or x1 <= x0 or y1 <= y0
        if degenerate:
            reason = "zero or negative width/height" if (w <= 0 or h <= 0) else "lies entirely outside the image"
            message = (
                f"{where}: bbox {a['bbox']} has {reason}. Fix: correct or delete the annotation "
                "(or load with strict=False to drop such boxes)."
            )
            if strict:
                raise DataError(f"{path}: {message}")
            report.warn("degenerate box dropped", message)
            continue
        a = dict(a)
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            if (
                x < -EDGE_TOLERANCE
                or y < -EDGE_TOLERANCE
                or x + w > im["width"] + EDGE_TOLERANCE
                or y + h > im["height"] + EDGE_TOLERANCE
            ):
                report.warn(
                    "box outside the image, clipped",
                    f"{where}: bbox {a['bbox']} clipped to the image. Fix: correct the box in the file.",
                )
            a["bbox"] = [x0, y0, x1 - x0, y1 - y0]
            a["area"] = (x1 - x0) * (y1 - y0)
        for key, default in (("area", a["bbox"][2] * a["bbox"][3]), ("iscrowd", 0)):
            if key not in a:
                report.warn(
                    f"missing '{key}' filled",
                    f"{where}: no '{key}'; set to {default!r} (pycocotools needs it). "
                    f"Fix: add '{key}' to the annotations.",
                )
                a[key] = default
        kept.append(a)
    if not kept:
        raise DataError(
            f"{path}: no usable annotation is left after dropping degenerate boxes. Fix: correct the boxes in the file."
        )
    return kept


def resolve_images_dir(path: Path, images_dir: str | Path | None) -> Path:
    """The folder image ``file_name``s are relative to: given, else ``<json dir>/images``, else the
    JSON file's own folder (both layouts are common)."""
    if images_dir is not None:
        return Path(images_dir)
    return path.parent / "images" if (path.parent / "images").is_dir() else path.parent


def _check_image_files(path: Path, images: list[dict], images_dir: Path, report: ValidationReport) -> None:
    """Open every image header (cheap): existence, readability, size against the JSON, colour mode."""
    if not images_dir.is_dir():
        raise DataError(
            f"{path}: the images folder {images_dir} does not exist. Fix: pass images_dir= "
            "(the folder the 'file_name' entries are relative to)."
        )
    missing, unreadable = [], []
    for im in images:
        file = images_dir / im["file_name"]
        if not file.is_file():
            missing.append(f"'{im['file_name']}' (image id {im['id']})")
            continue
        try:
            with Image.open(file) as pil:
                size, mode = pil.size, pil.mode
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            unreadable.append(f"'{im['file_name']}' ({type(exc).__name__})")
            continue
        if size != (im["width"], im["height"]):
            raise DataError(
                f"{path}: image id {im['id']} ('{im['file_name']}') is {size[0]}x{size[1]} on disk but "
                f"{im['width']}x{im['height']} in the JSON, so its boxes may not match. Fix: set width/"
                "height to the real size (and check the boxes), or restore the original image."
            )
        if mode not in LOSSLESS_MODES:
            report.warn(
                "non-RGB image converted",
                f"'{im['file_name']}' (image id {im['id']}) has colour mode {mode}; it is converted to "
                "RGB on load. Fix: convert the images to RGB to silence this.",
            )
    if missing:
        raise DataError(
            f"{path}: {len(missing)} image file(s) missing under {images_dir}: "
            f"{_examples(missing)}. Fix: copy the images there, pass the right images_dir=, or "
            "remove those entries."
        )
    if unreadable:
        raise DataError(
            f"{path}: {len(unreadable)} image file(s) under {images_dir} cannot be read: "
            f"{_examples(unreadable)}. Fix: re-export those images or remove their entries."
        )


def validate_coco(
    path: str | Path, images_dir: str | Path | None = None, check_images: bool = True, strict: bool = True
) -> ValidationReport:
    """Validate a COCO detection file (and, with ``check_images``, its image files).

    Raises ``DataError`` for unusable input; returns a ``ValidationReport`` whose ``data`` is the
    repaired dict and whose ``counts`` are the warnings by kind. ``strict=False`` turns zero-area /
    fully-outside boxes from errors into dropped boxes with a counted warning.
    """
    path = Path(path)
    return validate_coco_dict(read_json(path), path, images_dir=images_dir, check_images=check_images, strict=strict)


def validate_coco_dict(
    data: Any, path: str | Path, images_dir: str | Path | None = None, check_images: bool = True, strict: bool = True
) -> ValidationReport:
    """``validate_coco`` for a dict already in memory (the importers check before they write);
    ``path`` is the file it came from or will be written to, used in messages and to find images."""
    path = Path(path)
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: the top level is a {type(data).__name__}; a COCO file is an object with "
            f"{list(REQUIRED_TOP)}. Fix: use the instances JSON, not a results / predictions file."
        )
    missing = [k for k in REQUIRED_TOP if k not in data]
    if missing:
        raise DataError(
            f"{path}: missing top-level key(s) {missing}. Fix: a COCO detection file needs "
            f"{list(REQUIRED_TOP)} (see https://cocodataset.org/#format-data)."
        )
    _check_entries(path, data["categories"], "categories", REQUIRED_CATEGORY)
    _check_entries(path, data["images"], "images", REQUIRED_IMAGE)
    _check_entries(path, data["annotations"], "annotations", REQUIRED_ANNOTATION)
    _check_categories(path, data["categories"])
    _check_images_section(path, data["images"])
    report = ValidationReport(source=path)
    annotations = _check_annotations(path, data, report, strict)
    if check_images:
        _check_image_files(path, data["images"], resolve_images_dir(path, images_dir), report)
    clean = dict(data)
    clean["annotations"] = annotations
    clean.setdefault("info", {})
    clean.setdefault("licenses", [])
    report.data = clean
    report.n_images = len(data["images"])
    report.n_annotations = len(annotations)
    report.n_categories = len(data["categories"])
    return report


# --------------------------------------------------------------------------------------------
# Full decoding, once per dataset content
# --------------------------------------------------------------------------------------------

#: Environment variable that moves the project's cache folder (default ``<project root>/.cache``).
CACHE_ENV = "TFG_MM_CACHE_DIR"


def decode_cache_dir() -> Path:
    """Where the markers of fully decoded datasets live: ``<cache>/decoded``, where ``<cache>`` is
    ``$TFG_MM_CACHE_DIR`` or ``<project root>/.cache`` (the folder that also holds the text cache)."""
    override = os.environ.get(CACHE_ENV)
    return (Path(override) if override else project_root() / ".cache") / "decoded"


def _decode_failure(path: Path) -> str | None:
    """``None`` when ``path`` decodes exactly as the dataset reader decodes it, else what failed."""
    try:
        _read_rgb(path)
    except DECODE_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def decode_images(
    ann_files: Sequence[str | Path],
    images_dir: str | Path | None = None,
    *,
    key: str | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> dict:
    """Decode every image the annotation files reference, fully, with the dataset's own reader.

    Header checks (:func:`validate_coco`) do not see a truncated JPEG: it would kill training when
    the loader first reaches it (or never, in a short run). This pass reads every pixel once, with
    :func:`open_rgb`'s code, before any training, and raises one ``DataError`` that lists every
    failing image with its annotation file and entry.

    ``key`` is the dataset's content hash (:func:`tfg_mm.data.coco.dataset_fingerprint`, which covers
    the annotation files and the bytes of every referenced image): after a clean pass a marker
    ``<key>.json`` is written under :func:`decode_cache_dir` and later calls with the same key (and
    the same Pillow version) return at once. Decoding runs in a thread pool (PIL releases the GIL
    while it decodes); ``workers`` defaults to the CPUs this process may use, at most 8.

    Returns ``{"images", "seconds", "cached", "marker"}``.
    """
    marker = decode_cache_dir() / f"{key}.json" if key else None
    if marker is not None and marker.is_file():
        try:
            seen = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            seen = {}
        if seen.get("hash") == key and seen.get("pillow") == PIL.__version__:
            return {"images": seen.get("images", 0), "seconds": 0.0, "cached": True, "marker": str(marker)}

    t0 = time.perf_counter()
    entries: dict[Path, list[str]] = {}  # image file -> the entries naming it
    for ann in ann_files:
        ann = Path(ann)
        data = read_json(ann)
        folder = resolve_images_dir(ann, images_dir)
        for im in data.get("images", []) if isinstance(data, dict) else []:
            if isinstance(im, dict) and isinstance(im.get("file_name"), str):
                entries.setdefault(folder / im["file_name"], []).append(
                    f"{ann.name} image id {im.get('id')!r} ('{im['file_name']}')"
                )
    files = sorted(entries)
    if workers is None:
        workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    failures: list[tuple[Path, str]] = []
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        tqdm(total=len(files), desc="decoding images", unit="img", disable=not progress) as bar,
    ):
        for file, failure in zip(files, pool.map(_decode_failure, files)):
            bar.update()
            if failure is not None:
                failures.append((file, failure))
    if failures:
        cases = [f"{file} ({', '.join(entries[file])}): {why}" for file, why in failures]
        names = ", ".join(str(Path(a)) for a in ann_files)
        raise DataError(
            f"{len(failures)} of {len(files)} image(s) referenced by {names} cannot be decoded, so training "
            f"would stop when it reaches them: {'; '.join(cases[:MAX_EXAMPLES])}"
            + (f"; and {len(cases) - MAX_EXAMPLES} more" if len(cases) > MAX_EXAMPLES else "")
            + ". Fix: copy or re-export those images again from their source (a truncated file is usually an "
            "interrupted copy or download), or delete their entries (and their annotations) from the "
            "annotation file named. Nothing has been trained."
        )
    seconds = time.perf_counter() - t0
    if marker is not None:
        record = {"hash": key, "images": len(files), "pillow": PIL.__version__, "seconds": round(seconds, 3)}
        try:
            atomic_write_json(marker, record)
        except OSError as exc:  # a cache that cannot be written costs time on the next run, nothing else
            log.warning("could not write the decode marker %s (%s); the next run decodes again", marker, exc)
    return {"images": len(files), "seconds": seconds, "cached": False, "marker": str(marker) if marker else None}
