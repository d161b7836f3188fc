"""Pascal VOC and YOLO <-> COCO: round trips and the importers' errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tfg_mm.data.importers import coco_to_voc, coco_to_yolo, voc_to_coco, yolo_to_coco
from tfg_mm.data.synthetic import generate
from tfg_mm.data.validate import DataWarning
from tfg_mm.errors import DataError


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("syn") / "set", seed=11, n_train=12, n_val=3, image_size=96, progress=False)


def _by_file(data: dict) -> dict[str, list[tuple[str, list[float]]]]:
    names = {c["id"]: c["name"] for c in data["categories"]}
    images = {im["id"]: im["file_name"] for im in data["images"]}
    out: dict[str, list[tuple[str, list[float]]]] = {name: [] for name in images.values()}
    for a in data["annotations"]:
        out[images[a["image_id"]]].append((names[a["category_id"]], a["bbox"]))
    return {k: sorted(v) for k, v in out.items()}


def test_voc_round_trip(synth, tmp_path):
    src = json.loads((synth / "instances_train.json").read_text())
    voc = coco_to_voc(synth / "instances_train.json", tmp_path / "voc", images_dir=synth / "images")
    assert len(list((voc / "Annotations").glob("*.xml"))) == 12 and len(list((voc / "JPEGImages").iterdir())) == 12
    out = voc_to_coco(voc, tmp_path / "back.json", classes=[c["name"] for c in src["categories"]])
    back = json.loads(out.read_text())
    assert [c["name"] for c in back["categories"]] == [c["name"] for c in src["categories"]]
    assert _by_file(back) == _by_file(src)  # integer boxes survive exactly (1-based VOC corners)
    assert {(im["file_name"], im["width"], im["height"]) for im in back["images"]} == {
        (im["file_name"], im["width"], im["height"]) for im in src["images"]
    }


def test_voc_import_with_default_classes_and_extensionless_filenames(synth, tmp_path):
    voc = coco_to_voc(synth / "instances_val.json", tmp_path / "voc", images_dir=synth / "images")
    for xml in (voc / "Annotations").glob("*.xml"):
        xml.write_text(xml.read_text().replace(".png</filename>", "</filename>"))
    back = json.loads(voc_to_coco(voc / "Annotations", tmp_path / "v.json", images_dir=voc / "JPEGImages").read_text())
    src = json.loads((synth / "instances_val.json").read_text())
    present = sorted(
        {c["name"] for c in src["categories"] if any(a["category_id"] == c["id"] for a in src["annotations"])}
    )
    assert [c["name"] for c in back["categories"]] == present  # sorted names found
    assert {im["file_name"] for im in back["images"]} == {im["file_name"] for im in src["images"]}


def test_yolo_round_trip(synth, tmp_path):
    src = json.loads((synth / "instances_train.json").read_text())
    yolo = coco_to_yolo(synth / "instances_train.json", tmp_path / "yolo", images_dir=synth / "images")
    assert (yolo / "classes.txt").read_text().split() == [c["name"] for c in src["categories"]]
    assert len(list((yolo / "labels").glob("*.txt"))) == 12  # one per image, empty when defect-free
    back = json.loads(
        yolo_to_coco(yolo / "labels", yolo / "images", yolo / "classes.txt", tmp_path / "y.json").read_text()
    )
    a, b = _by_file(src), _by_file(back)
    assert a.keys() == b.keys()
    for name in a:
        assert [n for n, _ in a[name]] == [n for n, _ in b[name]]
        for (_, box_a), (_, box_b) in zip(a[name], b[name]):
            assert box_b == pytest.approx(box_a, abs=1e-3)


def _tiny_yolo(tmp_path: Path, line: str) -> tuple[Path, Path]:
    from PIL import Image

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    Image.new("RGB", (40, 30), (90, 90, 90)).save(images / "a.png")
    (labels / "a.txt").write_text(line + "\n")
    return images, labels


@pytest.mark.parametrize(
    "line, match",
    [
        ("0 12 10 5 5", "pixel coordinates"),
        ("3 0.5 0.5 0.1 0.1", "class index 3"),
        ("0 0.5 0.5 0.1", "expected 5 fields"),
        ("0 0.5 0.5 0.1 0.1 0.9", "predictions file"),
        ("zero 0.5 0.5 0.1 0.1", "is not 'int float"),
    ],
)
def test_yolo_errors_name_file_line_and_fix(tmp_path, line, match):
    images, labels = _tiny_yolo(tmp_path, line)
    with pytest.raises(DataError, match=match) as err:
        yolo_to_coco(labels, images, ["scratch", "dent"], tmp_path / "out.json")
    assert "a.txt:1" in str(err.value) and "Fix" in str(err.value)
    assert not (tmp_path / "out.json").exists()


def test_yolo_orphan_label_is_a_counted_warning(tmp_path):
    images, labels = _tiny_yolo(tmp_path, "1 0.5 0.5 0.2 0.2")
    (labels / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.warns(DataWarning, match="1 x label file without image"):
        out = yolo_to_coco(labels, images, ["scratch", "dent"], tmp_path / "out.json")
    data = json.loads(out.read_text())
    assert len(data["images"]) == 1 and data["annotations"][0]["category_id"] == 2
    assert data["annotations"][0]["bbox"] == pytest.approx([16.0, 12.0, 8.0, 6.0])


def _voc_xml(
    name: str, objects: str, size: str = "<size><width>40</width><height>30</height><depth>3</depth></size>"
) -> str:
    return f"<annotation><filename>{name}</filename>{size}{objects}</annotation>"


def _obj(label: str, box: tuple) -> str:
    x1, y1, x2, y2 = box
    return (
        f"<object><name>{label}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
    )


@pytest.mark.parametrize(
    "files, classes, match",
    [
        ({"a.xml": _voc_xml("a.png", _obj("rust", (1, 1, 5, 5)))}, ["scratch"], "'rust' is not in classes"),
        ({"a.xml": "<annotation><filename>a.png</filename"}, None, "not valid XML"),
        ({"a.xml": _voc_xml("a.png", _obj("scratch", (9, 1, 5, 5)))}, None, "xmax < xmin"),
        ({"a.xml": _voc_xml("a.png", "<object><name>scratch</name></object>")}, None, "lacks <bndbox>"),
        (
            {
                "a.xml": _voc_xml("a.png", _obj("scratch", (1, 1, 5, 5))),
                "b.xml": _voc_xml("a.png", _obj("scratch", (2, 2, 6, 6))),
            },
            None,
            "already annotated",
        ),
        ({"a.xml": _voc_xml("a.png", _obj("scratch", (1, 1, 5, 5)), size="")}, None, "no usable <size>"),
    ],
)
def test_voc_errors_name_file_object_and_fix(tmp_path, files, classes, match):
    ann = tmp_path / "Annotations"
    ann.mkdir()
    for name, text in files.items():
        (ann / name).write_text(text)
    with pytest.raises(DataError, match=match) as err:
        voc_to_coco(tmp_path, tmp_path / "out.json", classes=classes)
    assert ".xml" in str(err.value) and "Fix" in str(err.value)
    assert not (tmp_path / "out.json").exists()


def test_voc_box_past_the_image_is_clipped_with_a_counted_warning(tmp_path):
    ann = tmp_path / "Annotations"
    ann.mkdir()
    (ann / "a.xml").write_text(_voc_xml("a.png", _obj("scratch", (30, 20, 48, 28))))
    with pytest.warns(DataWarning, match="box outside the image, clipped"):
        out = voc_to_coco(tmp_path, tmp_path / "out.json")
    assert json.loads(out.read_text())["annotations"][0]["bbox"] == [29.0, 19.0, 11.0, 9.0]


def test_export_refuses_colliding_stems(synth, tmp_path):
    data = json.loads((synth / "instances_val.json").read_text())
    data["images"][1]["file_name"] = "sub/" + data["images"][0]["file_name"]
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="share the stem"):
        coco_to_yolo(tmp_path / "c.json", tmp_path / "y")
