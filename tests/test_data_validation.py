"""Every bad input gets an error (or, when fixable, a counted warning) naming the file, the entry
and the fix - never a stack trace from inside torch."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tfg_mm.data import CocoDetection, DataWarning, load_coco, validate_coco
from tfg_mm.errors import DataError

W, H = 40, 30


def _folder(tmp_path: Path, mutate: Callable[[dict], None] | None = None, n_images: int = 3) -> Path:
    """A small valid COCO folder (images/ + instances.json), optionally mutated."""
    (tmp_path / "images").mkdir(exist_ok=True)
    images, annotations = [], []
    for i in range(1, n_images + 1):
        Image.new("RGB", (W, H), (100 + i, 100, 100)).save(tmp_path / "images" / f"img{i}.png")
        images.append({"id": i, "file_name": f"img{i}.png", "width": W, "height": H})
        annotations.append(
            {
                "id": i,
                "image_id": i,
                "category_id": 1 + i % 2,
                "bbox": [2.0, 3.0, 10.0, 8.0],
                "area": 80.0,
                "iscrowd": 0,
            }
        )
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "scratch"}, {"id": 2, "name": "dent"}],
    }
    if mutate:
        mutate(data)
    (tmp_path / "instances.json").write_text(json.dumps(data))
    return tmp_path / "instances.json"


def _error(path: Path, *needles: str, **kw) -> str:
    with pytest.raises(DataError) as err:
        validate_coco(path, **kw)
    message = str(err.value)
    assert str(path) in message and "Fix" in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_valid_folder_has_no_warnings(tmp_path):
    report = validate_coco(_folder(tmp_path))
    assert report.counts == {} and (report.n_images, report.n_annotations, report.n_categories) == (3, 3, 2)
    assert "no warnings" in report.summary()


def test_missing_file_and_invalid_json(tmp_path):
    _error(tmp_path / "nope.json", "file not found")
    (tmp_path / "bad.json").write_text('{"images": [}')
    _error(tmp_path / "bad.json", "not valid JSON", "line 1")


def test_missing_top_level_key(tmp_path):
    _error(_folder(tmp_path, lambda d: d.pop("categories")), "missing top-level key(s) ['categories']")


@pytest.mark.parametrize(
    "section, key, needle",
    [
        ("images", "width", "images[0] (id 1) is missing key(s) ['width']"),
        ("annotations", "bbox", "annotations[0] (id 1) is missing key(s) ['bbox']"),
        ("categories", "name", "categories[0] (id 1) is missing key(s) ['name']"),
    ],
)
def test_entry_missing_key(tmp_path, section, key, needle):
    _error(_folder(tmp_path, lambda d: d[section][0].pop(key)), needle)


def test_unknown_category_and_image_ids(tmp_path):
    _error(
        _folder(tmp_path, lambda d: d["annotations"][1].update(category_id=7)),
        "annotation id 2 -> category_id 7",
        "known category ids: [1, 2]",
    )
    _error(_folder(tmp_path, lambda d: d["annotations"][2].update(image_id=99)), "annotation id 3 -> image_id 99")


def test_box_outside_the_image_is_clipped_with_a_counted_warning(tmp_path):
    def mutate(d):
        d["annotations"][0]["bbox"] = [35.0, 3.0, 10.0, 8.0]
        d["annotations"][1]["bbox"] = [-4.0, 25.0, 10.0, 8.0]

    path = _folder(tmp_path, mutate)
    report = validate_coco(path)
    assert report.counts["box outside the image, clipped"] == 2
    assert "annotation id 1 on image 'img1.png'" in report.messages["box outside the image, clipped"]
    assert report.data["annotations"][0]["bbox"] == [35.0, 3.0, 5.0, 8.0]
    assert report.data["annotations"][1]["bbox"] == [0.0, 25.0, 6.0, 5.0]
    with pytest.warns(DataWarning, match=r"2 x box outside the image, clipped.*Fix"):
        load_coco(path)


def test_zero_area_box_is_an_error_or_dropped_when_not_strict(tmp_path):
    path = _folder(tmp_path, lambda d: d["annotations"][1].update(bbox=[5.0, 5.0, 0.0, 4.0]))
    _error(path, "annotation id 2 on image 'img2.png'", "zero or negative width/height", "strict=False")
    report = validate_coco(path, strict=False)
    assert report.counts["degenerate box dropped"] == 1 and report.n_annotations == 2
    path = _folder(tmp_path, lambda d: d["annotations"][0].update(bbox=[50.0, 5.0, 4.0, 4.0]))
    _error(path, "annotation id 1", "entirely outside the image")


def test_non_numeric_bbox(tmp_path):
    _error(
        _folder(tmp_path, lambda d: d["annotations"][0].update(bbox=["2", 3, 10, 8])),
        "annotation id 1 (image id 1) has bbox",
        "four finite numbers",
    )


def test_missing_image_file(tmp_path):
    path = _folder(tmp_path)
    (tmp_path / "images" / "img2.png").unlink()
    _error(path, "1 image file(s) missing", "'img2.png' (image id 2)", "images_dir=")
    _error(path, "images folder", images_dir=tmp_path / "elsewhere")
    assert validate_coco(path, check_images=False).n_images == 3


def test_empty_dataset_and_no_annotations(tmp_path):
    _error(_folder(tmp_path, lambda d: d.update(images=[], annotations=[])), "the dataset is empty ('images'")
    _error(_folder(tmp_path, lambda d: d.update(annotations=[])), "no annotations at all")
    _error(_folder(tmp_path, lambda d: d.update(categories=[])), "'categories' is empty")


def test_duplicate_ids_and_file_referenced_twice(tmp_path):
    _error(_folder(tmp_path, lambda d: d["images"][1].update(id=1)), "duplicate image id(s) 1")
    _error(_folder(tmp_path, lambda d: d["annotations"][1].update(id=1)), "duplicate annotation id(s) 1")
    _error(
        _folder(tmp_path, lambda d: d["images"][2].update(file_name="img1.png")),
        "referenced by more than one entry",
        "'img1.png' (ids [1, 3])",
        "merge the entries",
    )


def test_category_name_collisions(tmp_path):
    _error(
        _folder(tmp_path, lambda d: d["categories"].append({"id": 3, "name": "Scratch "})),
        "category names collide",
        "id 1 'scratch' / id 3 'Scratch '",
        "merge them",
    )
    _error(
        _folder(tmp_path, lambda d: d["categories"].append({"id": 2, "name": "stain"})), "duplicate category id(s) [2]"
    )


def test_boxes_in_corner_format_are_detected(tmp_path):
    def to_xyxy(d):
        boxes = [[15, 5, 35, 25], [10, 2, 35, 28], [20, 10, 38, 25]]
        for a, box in zip(d["annotations"], boxes):
            a["bbox"] = [float(v) for v in box]

    _error(
        _folder(tmp_path, to_xyxy),
        "3 of 3 boxes extend past",
        "[x1, y1, x2, y2]",
        "convert each 'bbox' to [x1, y1, x2 - x1, y2 - y1]",
    )


def test_non_rgb_images_are_converted_with_a_counted_warning(tmp_path):
    path = _folder(tmp_path)
    Image.new("L", (W, H), 120).save(tmp_path / "images" / "img1.png")
    Image.new("RGBA", (W, H), (1, 2, 3, 255)).save(tmp_path / "images" / "img2.png")
    sixteen = np.full((H, W), 40000, dtype=np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "images" / "img3.png")  # 16-bit grayscale
    report = validate_coco(path)
    # 8-bit grayscale (img1) is a normal source, converted without loss: no warning for it
    assert report.counts["non-RGB image converted"] == 2
    assert "colour mode RGBA" in report.messages["non-RGB image converted"]
    with pytest.warns(DataWarning, match="2 x non-RGB image converted"):
        ds = CocoDetection(tmp_path, "instances.json", image_size=32)
    images = [ds[i][0] for i in range(3)]
    assert all(im.shape == (3, 32, 32) for im in images)
    # 16-bit values are rescaled (40000 / 65535 * 255 = 156), not clipped to 255
    assert abs(float(images[2].mean()) * 255 - 156) < 1.0


def test_unreadable_image_and_size_mismatch(tmp_path):
    path = _folder(tmp_path)
    (tmp_path / "images" / "img2.png").write_bytes(b"not an image at all")
    _error(path, "cannot be read", "'img2.png'", "re-export")
    path = _folder(tmp_path)
    Image.new("RGB", (W * 2, H), 0).save(tmp_path / "images" / "img3.png")
    _error(path, "image id 3 ('img3.png') is 80x30 on disk but 40x30 in the JSON", "set width/height")


def test_missing_area_and_iscrowd_are_filled(tmp_path):
    def strip(d):
        for a in d["annotations"]:
            del a["area"], a["iscrowd"]

    report = validate_coco(_folder(tmp_path, strip))
    assert report.counts["missing 'area' filled"] == 3 and report.counts["missing 'iscrowd' filled"] == 3
    assert all(a["area"] == 80.0 and a["iscrowd"] == 0 for a in report.data["annotations"])


def test_dataset_raises_data_error_not_a_torch_trace(tmp_path):
    _folder(tmp_path, lambda d: d["annotations"][0].update(category_id=5))
    with pytest.raises(DataError, match="instances.json"):
        CocoDetection(tmp_path, "instances.json")
    path = _folder(tmp_path)
    ds = CocoDetection(tmp_path, "instances.json", image_size=32)
    (tmp_path / "images" / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # broken after validation
    with pytest.raises(DataError, match=r"img1.png: the image cannot be decoded.*Fix"):
        ds[0]
    assert path.is_file()
