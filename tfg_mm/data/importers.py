"""Pascal VOC XML and YOLO txt <-> COCO JSON.

Public defect benchmarks (NEU-DET, GC10-DET, ...) ship as VOC XML, and many labelling tools
export YOLO txt; the rest of the toolkit reads COCO only. Importers check the input while they
convert (messages name the file, the line or object, and the fix), then run the same COCO
validation as the dataset on the result *before* writing it, so a written JSON is always usable.
Exporters exist so that round trips can be tested and so results can go back to those tools.

Box conventions:

* VOC ``<bndbox>`` holds 1-based, inclusive pixel corners (the VOC devkit's convention):
  ``x = xmin - 1``, ``width = xmax - xmin + 1`` and back, so integer boxes round-trip exactly.
* VOC ``<difficult>1</difficult>`` objects are left out of the VOC evaluation. COCO has no such
  flag; what makes pycocotools' and faster-coco-eval's ``COCOeval`` ignore a ground-truth box is
  ``iscrowd: 1`` (``COCOeval._prepare`` sets ``gt['ignore']`` from ``iscrowd``, overwriting any
  ``ignore`` key in the file). So ``difficult="ignore"`` (the default) writes them with
  ``iscrowd: 1`` (and ``difficult: 1`` for provenance): a detection on one counts neither as a
  true nor as a false positive, and a missed one lowers no recall. Two differences from the VOC
  devkit remain: COCOeval matches a detection to a crowd box by intersection over the
  *detection's* area (not IoU), and the training dataset (``CocoDetection``) leaves crowd boxes
  out of the targets, as the VOC baselines leave out difficult objects (``use_diff=False``).
  ``difficult="keep"`` imports them as ordinary boxes, ``"drop"`` leaves them out of the file.
  Exporting writes ``<difficult>1`` for ``difficult`` or ``iscrowd`` annotations.
* Tags outside the VOC format are reported once per XML file (a logging warning naming the file
  and the tags): they are not imported.
* YOLO lines are ``class cx cy w h`` with the centre and size normalised by the image size;
  converted coordinates are rounded to 1/1000 pixel.
"""

from __future__ import annotations

import json
import logging
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from PIL import Image, UnidentifiedImageError

from tfg_mm.data.validate import ValidationReport, validate_coco, validate_coco_dict
from tfg_mm.errors import DataError
from tfg_mm.io import atomic_dir, atomic_write_text

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: What ``voc_to_coco`` does with ``<difficult>1</difficult>`` objects (module docstring).
DIFFICULT_MODES = ("ignore", "keep", "drop")
#: The tags of the Pascal VOC format (devkit, LabelImg, CVAT exports), by parent; others are reported.
VOC_TAGS = {
    "annotation": {"folder", "filename", "path", "source", "owner", "size", "segmented", "object"},
    "object": {
        "name",
        "pose",
        "truncated",
        "difficult",
        "occluded",
        "bndbox",
        "part",
        "actions",
        "point",
        "attributes",
    },
    "size": {"width", "height", "depth"},
    "bndbox": {"xmin", "ymin", "xmax", "ymax"},
}


def _write_coco(out_json: Path, data: dict, images_dir: Path | None) -> Path:
    """Validate (with the images when we know where they are), report repairs, write atomically."""
    report = validate_coco_dict(data, out_json, images_dir=images_dir, check_images=images_dir is not None)
    report.emit()
    atomic_write_text(out_json, json.dumps(report.data, sort_keys=True, indent=1) + "\n")
    return out_json


def _coco_dict(images: list[dict], annotations: list[dict], names: Sequence[str], source: str) -> dict:
    return {
        "info": {"description": f"converted by tfg_mm.data.importers from {source}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "defect"} for i, n in enumerate(names)],
    }


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"{path}: the image cannot be read ({type(exc).__name__}: {exc}). "
            "Fix: re-export the image or remove it (and its label file)."
        ) from None


def _annotation(
    ann_id: int, image_id: int, category_id: int, x: float, y: float, w: float, h: float, iscrowd: int = 0
) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [x, y, w, h],
        "area": w * h,
        "iscrowd": iscrowd,
    }


def _num(value: float) -> str:
    """Integers without a decimal point (what VOC tools expect), other values to 1/1000."""
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


# --------------------------------------------------------------------------------------------
# Pascal VOC
# --------------------------------------------------------------------------------------------


def _find_image(images_dir: Path | None, name: str) -> Path | None:
    """The image file for a VOC ``<filename>``; some datasets drop the extension, so try by stem."""
    if images_dir is None:
        return None
    if (images_dir / name).is_file():
        return images_dir / name
    for ext in IMAGE_EXTENSIONS:
        candidate = images_dir / (Path(name).stem + ext)
        if candidate.is_file():
            return candidate
    return None


def _unknown_tags(root: ET.Element) -> list[str]:
    """Tags (as ``parent/tag`` paths) that the VOC format does not have, each once."""
    found: dict[str, None] = {}

    def visit(element: ET.Element, where: str, kind: str) -> None:
        for child in element:
            if child.tag not in VOC_TAGS[kind]:
                found.setdefault(f"{where}/{child.tag}")
            elif child.tag in VOC_TAGS:
                visit(child, f"{where}/{child.tag}", child.tag)

    visit(root, root.tag, "annotation")
    return list(found)


def _difficult(obj: ET.Element, xml_path: Path, k: int, label: str) -> bool:
    text = (obj.findtext("difficult") or "0").strip().lower()
    if text in ("0", "1", "false", "true"):
        return text in ("1", "true")
    raise DataError(f"{xml_path}: <object> #{k + 1} ('{label}') has <difficult>{text}</difficult>. Fix: write 0 or 1.")


def _read_voc(
    xml_path: Path, images_dir: Path | None
) -> tuple[str, int, int, list[tuple[str, float, float, float, float, bool]]]:
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise DataError(f"{xml_path}: not valid XML ({exc}). Fix: repair or re-export the annotation.") from None
    unknown = _unknown_tags(root)
    if unknown:
        log.warning(
            "%s: tags outside the Pascal VOC format, not imported: %s. Fix: nothing if they carry nothing you "
            "need; otherwise convert them into VOC <object> entries.",
            xml_path,
            ", ".join(f"<{tag}>" for tag in unknown),
        )
    name = (root.findtext("filename") or "").strip() or xml_path.stem
    image = _find_image(images_dir, name)
    if image is not None:
        name = image.name
    try:
        width = int(float(root.findtext("size/width") or 0))
        height = int(float(root.findtext("size/height") or 0))
    except ValueError:
        raise DataError(f"{xml_path}: <size> has non-numeric width/height. Fix: write integers.") from None
    if width <= 0 or height <= 0:
        if image is None:
            raise DataError(
                f"{xml_path}: no usable <size> (width={width}, height={height}) and the image '{name}' "
                "was not found to measure it. Fix: pass images_dir= or fill <size>."
            )
        width, height = _image_size(image)
    objects = []
    for k, obj in enumerate(root.findall("object")):
        label = (obj.findtext("name") or "").strip()
        if not label:
            raise DataError(f"{xml_path}: <object> #{k + 1} has no <name>. Fix: give every object its class name.")
        try:
            xmin, ymin, xmax, ymax = (
                float(obj.findtext(f"bndbox/{t}") or "nan") for t in ("xmin", "ymin", "xmax", "ymax")
            )
        except ValueError:
            raise DataError(
                f"{xml_path}: <object> #{k + 1} ('{label}') has a non-numeric <bndbox>. "
                "Fix: write xmin, ymin, xmax, ymax as numbers."
            ) from None
        if any(v != v for v in (xmin, ymin, xmax, ymax)):
            raise DataError(
                f"{xml_path}: <object> #{k + 1} ('{label}') lacks <bndbox> xmin/ymin/xmax/ymax. "
                "Fix: add all four corners."
            )
        if xmax < xmin or ymax < ymin:
            raise DataError(
                f"{xml_path}: <object> #{k + 1} ('{label}') has xmax < xmin or ymax < ymin "
                f"({xmin}, {ymin}, {xmax}, {ymax}). Fix: swap the corners or redraw the box."
            )
        difficult = _difficult(obj, xml_path, k, label)
        objects.append((label, xmin - 1.0, ymin - 1.0, xmax - xmin + 1.0, ymax - ymin + 1.0, difficult))
    return name, width, height, objects


def voc_to_coco(
    voc_root_or_ann_dir: str | Path,
    out_json: str | Path,
    images_dir: str | Path | None = None,
    classes: Sequence[str] | None = None,
    difficult: Literal["ignore", "keep", "drop"] = "ignore",
) -> Path:
    """Convert a Pascal VOC dataset (``<root>/Annotations/*.xml`` or a folder of XML files) to COCO.

    ``images_dir`` defaults to ``<root>/JPEGImages`` when it exists; with it the images are
    checked (existence, readability, size). ``classes`` fixes the category order (ids 1..N) and
    rejects unexpected names; by default the names found, sorted, are used. ``difficult``: what
    ``<difficult>1</difficult>`` objects become: ``"ignore"`` (``iscrowd: 1``, ignored by COCO
    evaluation and left out of the training targets), ``"keep"`` (ordinary boxes) or ``"drop"``
    (left out); see the module docstring.
    """
    if difficult not in DIFFICULT_MODES:
        raise DataError(
            f"voc_to_coco(difficult={difficult!r}): unknown option. Fix: use one of {list(DIFFICULT_MODES)}."
        )
    root, out_json = Path(voc_root_or_ann_dir), Path(out_json)
    ann_dir = root / "Annotations" if (root / "Annotations").is_dir() else root
    xml_files = sorted(ann_dir.glob("*.xml"))
    if not xml_files:
        raise DataError(
            f"{ann_dir}: no .xml annotation files. Fix: pass the VOC root (with Annotations/) or the "
            "folder that holds the XML files."
        )
    if images_dir is None and (root / "JPEGImages").is_dir():
        images_dir = root / "JPEGImages"
    images_dir = Path(images_dir) if images_dir is not None else None
    parsed = [(xml, *_read_voc(xml, images_dir)) for xml in xml_files]

    names = list(classes) if classes is not None else sorted({o[0] for *_, objs in parsed for o in objs})
    if not names:
        raise DataError(f"{ann_dir}: the XML files contain no <object>. Fix: check the annotations.")
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    images, annotations, seen, n_difficult = [], [], {}, 0
    for image_id, (xml, file_name, width, height, objects) in enumerate(parsed, start=1):
        if file_name in seen:
            raise DataError(
                f"{xml}: image '{file_name}' is already annotated by {seen[file_name]}. "
                "Fix: merge the two XML files or remove one."
            )
        seen[file_name] = xml
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for label, x, y, w, h, is_difficult in objects:
            if label not in cat_id:
                raise DataError(
                    f"{xml}: object class '{label}' is not in classes={names}. Fix: add it to classes "
                    "(or fix the spelling in the XML)."
                )
            if is_difficult and difficult == "drop":
                n_difficult += 1
                continue
            ann = _annotation(
                len(annotations) + 1, image_id, cat_id[label], x, y, w, h, int(is_difficult and difficult == "ignore")
            )
            if is_difficult:
                n_difficult += 1
                ann["difficult"] = 1
            annotations.append(ann)
    if n_difficult:
        done = {"ignore": "marked iscrowd=1 (ignored by evaluation)", "keep": "kept as ordinary boxes"}
        log.info("%s: %d difficult object(s) %s", ann_dir, n_difficult, done.get(difficult, "dropped"))
    return _write_coco(out_json, _coco_dict(images, annotations, names, str(root)), images_dir)


def coco_to_voc(coco_json: str | Path, out_dir: str | Path, images_dir: str | Path | None = None) -> Path:
    """Write ``<out_dir>/Annotations/<stem>.xml`` per image (and copy the images into
    ``<out_dir>/JPEGImages`` when ``images_dir`` is given). Returns ``out_dir``."""
    coco_json, out_dir = Path(coco_json), Path(out_dir)
    data = _load_for_export(coco_json, images_dir)
    names = {c["id"]: c["name"] for c in data["categories"]}
    by_image: dict[int, list[dict]] = {im["id"]: [] for im in data["images"]}
    for a in sorted(data["annotations"], key=lambda a: a["id"]):
        by_image[a["image_id"]].append(a)
    with atomic_dir(out_dir / "Annotations") as tmp:
        for im in sorted(data["images"], key=lambda im: im["id"]):
            root = ET.Element("annotation")
            ET.SubElement(root, "folder").text = "JPEGImages"
            ET.SubElement(root, "filename").text = Path(im["file_name"]).name
            size = ET.SubElement(root, "size")
            for tag, value in (("width", im["width"]), ("height", im["height"]), ("depth", 3)):
                ET.SubElement(size, tag).text = str(value)
            ET.SubElement(root, "segmented").text = "0"
            for a in by_image[im["id"]]:
                x, y, w, h = a["bbox"]
                obj = ET.SubElement(root, "object")
                ET.SubElement(obj, "name").text = names[a["category_id"]]
                ET.SubElement(obj, "pose").text = "Unspecified"
                ET.SubElement(obj, "truncated").text = "0"
                ET.SubElement(obj, "difficult").text = str(int(bool(a.get("difficult") or a.get("iscrowd"))))
                box = ET.SubElement(obj, "bndbox")
                for tag, value in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w), ("ymax", y + h)):
                    ET.SubElement(box, tag).text = _num(value)
            ET.indent(root)
            (tmp / f"{Path(im['file_name']).stem}.xml").write_text(ET.tostring(root, encoding="unicode") + "\n")
    _copy_images(data, images_dir, out_dir / "JPEGImages")
    return out_dir


# --------------------------------------------------------------------------------------------
# YOLO
# --------------------------------------------------------------------------------------------


def _class_names(class_names: Sequence[str] | str | Path) -> list[str]:
    """A list of names, or a ``classes.txt`` / ``obj.names`` file with one name per line."""
    if isinstance(class_names, (str, Path)):
        path = Path(class_names)
        if not path.is_file():
            raise DataError(
                f"class_names={str(class_names)!r}: not a file. Fix: pass a list of names or the path of "
                "a classes.txt with one name per line."
            )
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return list(class_names)


def _read_yolo(
    label_file: Path, width: int, height: int, n_classes: int
) -> list[tuple[int, float, float, float, float]]:
    objects = []
    for line_no, line in enumerate(label_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{label_file}:{line_no}"
        if len(fields) != 5:
            hint = (
                (" (6 fields look like a predictions file with confidences; more look like segmentation polygons)")
                if len(fields) > 5
                else ""
            )
            raise DataError(
                f"{where}: expected 5 fields 'class cx cy w h', got {len(fields)}{hint}. "
                "Fix: export detection labels in YOLO box format."
            )
        try:
            cls = int(fields[0])
            cx, cy, w, h = (float(v) for v in fields[1:])
        except ValueError:
            raise DataError(
                f"{where}: '{line.strip()}' is not 'int float float float float'. Fix: correct the line."
            ) from None
        if not 0 <= cls < n_classes:
            raise DataError(
                f"{where}: class index {cls} is outside 0..{n_classes - 1} ({n_classes} class names). "
                "Fix: pass the full class list (in the order used for labelling)."
            )
        if max(cx, cy, w, h) > 1.0 + 1e-6 or min(cx, cy, w, h) < 0.0:
            raise DataError(
                f"{where}: values {fields[1:]} are not in [0, 1]; they look like pixel coordinates. "
                "Fix: YOLO labels are normalised - divide cx and w by the image width, cy and h by "
                "its height."
            )
        x, y = round((cx - w / 2) * width, 3), round((cy - h / 2) * height, 3)
        objects.append((cls, x, y, round(w * width, 3), round(h * height, 3)))
    return objects


def yolo_to_coco(
    labels_dir: str | Path, images_dir: str | Path, class_names: Sequence[str] | str | Path, out_json: str | Path
) -> Path:
    """Convert YOLO labels (``<labels_dir>/<image stem>.txt``) for the images in ``images_dir``.

    An image without a label file is a defect-free image (the YOLO convention). A label file
    without an image is reported as a counted warning and skipped.
    """
    labels_dir, images_dir, out_json = Path(labels_dir), Path(images_dir), Path(out_json)
    names = _class_names(class_names)
    if not names:
        raise DataError("yolo_to_coco(class_names=...): no class names. Fix: pass the class list.")
    for folder, what in ((labels_dir, "labels_dir"), (images_dir, "images_dir")):
        if not folder.is_dir():
            raise DataError(
                f"{what}={str(folder)!r}: folder not found. Fix: pass the folder that holds the {what[:-4]}."
            )
    image_files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not image_files:
        raise DataError(f"{images_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}). Fix: pass the images folder.")
    stems = {p.stem for p in image_files}
    if len(stems) != len(image_files):
        raise DataError(
            f"{images_dir}: several images share a file stem (e.g. a.png and a.jpg), so their label "
            "files would collide. Fix: rename them."
        )
    report = ValidationReport(source=labels_dir)
    for orphan in sorted(p for p in labels_dir.glob("*.txt") if p.stem not in stems and p.name != "classes.txt"):
        report.warn(
            "label file without image skipped",
            f"{orphan} has no image '{orphan.stem}.*' in {images_dir}. Fix: add the image or delete the label.",
        )
    report.emit()
    images, annotations = [], []
    for image_id, image in enumerate(image_files, start=1):
        width, height = _image_size(image)
        images.append({"id": image_id, "file_name": image.name, "width": width, "height": height})
        label_file = labels_dir / f"{image.stem}.txt"
        if label_file.is_file():
            for cls, x, y, w, h in _read_yolo(label_file, width, height, len(names)):
                annotations.append(_annotation(len(annotations) + 1, image_id, cls + 1, x, y, w, h))
    return _write_coco(out_json, _coco_dict(images, annotations, names, str(labels_dir)), images_dir)


def coco_to_yolo(coco_json: str | Path, out_dir: str | Path, images_dir: str | Path | None = None) -> Path:
    """Write ``<out_dir>/labels/<stem>.txt`` per image (empty for defect-free images) and
    ``<out_dir>/classes.txt`` (class index = category order by id); copy the images into
    ``<out_dir>/images`` when ``images_dir`` is given. Returns ``out_dir``."""
    coco_json, out_dir = Path(coco_json), Path(out_dir)
    data = _load_for_export(coco_json, images_dir)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    images = {im["id"]: im for im in data["images"]}
    lines: dict[int, list[str]] = {i: [] for i in images}
    for a in sorted(data["annotations"], key=lambda a: a["id"]):
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        cx, cy = (x + w / 2) / im["width"], (y + h / 2) / im["height"]
        lines[a["image_id"]].append(
            f"{index[a['category_id']]} {cx:.6f} {cy:.6f} {w / im['width']:.6f} {h / im['height']:.6f}"
        )
    with atomic_dir(out_dir / "labels") as tmp:
        for image_id, rows in lines.items():
            (tmp / f"{Path(images[image_id]['file_name']).stem}.txt").write_text("".join(r + "\n" for r in rows))
    atomic_write_text(out_dir / "classes.txt", "".join(c["name"] + "\n" for c in categories))
    _copy_images(data, images_dir, out_dir / "images")
    return out_dir


# --------------------------------------------------------------------------------------------
# Shared export helpers
# --------------------------------------------------------------------------------------------


def _load_for_export(coco_json: Path, images_dir: str | Path | None) -> dict:
    """Validated COCO data whose file stems are unique (VOC and YOLO name files by stem)."""
    report = validate_coco(coco_json, images_dir=images_dir, check_images=images_dir is not None)
    report.emit()
    data = report.data
    stems: dict[str, str] = {}
    for im in data["images"]:
        stem = Path(im["file_name"]).stem
        if stem in stems:
            raise DataError(
                f"{coco_json}: images '{stems[stem]}' and '{im['file_name']}' share the stem '{stem}', "
                "so their VOC / YOLO label files would collide. Fix: rename one of them."
            )
        stems[stem] = im["file_name"]
    return data


def _copy_images(data: dict, images_dir: str | Path | None, dest: Path) -> None:
    if images_dir is None:
        return
    with atomic_dir(dest) as tmp:
        for im in data["images"]:
            shutil.copyfile(Path(images_dir) / im["file_name"], tmp / Path(im["file_name"]).name)
