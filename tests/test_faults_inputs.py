"""Faults in what a run reads and writes: each gives the project's error naming the file and the fix.

- a truncated image (valid header, missing pixels) is found by the full decode before any training,
  and a clean decode is remembered per dataset content hash;
- a truncated ``model.safetensors`` is a ``CheckpointError`` naming the file;
- ``convert`` on a file that is not a PyTorch checkpoint says so, without suggesting to unpickle it;
- a read-only ``run_dir`` (or parent) is a ``ConfigError`` naming the folder, before any work (root
  ignores permissions, so the process drops its capabilities with ``setpriv``);
- files and folders written through temporary names follow the umask;
- VOC ``<difficult>`` objects: ignored by evaluation (``iscrowd``), kept or dropped on request;
  unknown VOC tags are reported once per file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.conftest import REPO_ROOT, TINY
from tfg_mm.data import validate
from tfg_mm.data.coco import CocoDetection
from tfg_mm.data.importers import coco_to_voc, voc_to_coco
from tfg_mm.data.loaders import dataset_record
from tfg_mm.data.synthetic import generate
from tfg_mm.data.validate import decode_images, validate_coco
from tfg_mm.errors import CheckpointError, ConfigError, DataError
from tfg_mm.evaluation.coco import coco_evaluate
from tfg_mm.io import atomic_dir, atomic_write_json, atomic_write_text
from tfg_mm.training.runs import prepare_run_dir

# --------------------------------------------------------------------------------------------
# Truncated images
# --------------------------------------------------------------------------------------------


def _jpeg_dataset(root: Path) -> Path:
    """A small synthetic COCO folder whose images are grayscale JPEGs (like NEU-DET's)."""
    generate(root, seed=5, n_train=6, n_val=3, image_size=96, defect_free_fraction=0.0, progress=False)
    for split in ("train", "val"):
        ann = root / f"instances_{split}.json"
        data = json.loads(ann.read_text())
        for im in data["images"]:
            png = root / "images" / im["file_name"]
            im["file_name"] = png.with_suffix(".jpg").name
            Image.open(png).convert("L").save(root / "images" / im["file_name"], quality=90)
            png.unlink()
        ann.write_text(json.dumps(data))
    return root


def _truncate(path: Path, keep: float = 0.6) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


@pytest.fixture
def jpeg_dataset(tmp_path) -> Path:
    return _jpeg_dataset(tmp_path / "jpeg_set")


def _jsons(root: Path) -> list[Path]:
    return [root / "instances_train.json", root / "instances_val.json"]


def test_truncated_jpeg_passes_the_header_check_but_not_the_full_decode(jpeg_dataset):
    victim = jpeg_dataset / "images" / "train_000002.jpg"
    _truncate(victim)
    validate_coco(jpeg_dataset / "instances_train.json")  # the header is intact: no error here
    with pytest.raises(DataError) as refused:
        decode_images(_jsons(jpeg_dataset), jpeg_dataset / "images", progress=False)
    message = str(refused.value)
    assert str(victim) in message  # the file
    assert "instances_train.json image id" in message and "'train_000002.jpg'" in message  # the entry
    assert "truncated" in message and "Fix:" in message and "Nothing has been trained" in message
    assert message.startswith("1 of 9 image(s)")


def test_decode_is_cached_per_dataset_hash_and_a_changed_image_is_decoded_again(jpeg_dataset, monkeypatch, capsys):
    monkeypatch.setenv("TFG_MM_CACHE_DIR", str(jpeg_dataset.parent / "cache"))
    key = dataset_record(jpeg_dataset, "instances_train.json", "instances_val.json")["hash"]
    first = decode_images(_jsons(jpeg_dataset), jpeg_dataset / "images", key=key, progress=True)
    assert first["images"] == 9 and not first["cached"]
    assert "decoding images" in capsys.readouterr().err  # the progress bar
    marker = Path(first["marker"])
    assert marker == jpeg_dataset.parent / "cache" / "decoded" / f"{key}.json" and marker.is_file()

    decoded = []
    real = validate._decode_failure
    monkeypatch.setattr(validate, "_decode_failure", lambda path: decoded.append(path) or real(path))
    second = decode_images(_jsons(jpeg_dataset), jpeg_dataset / "images", key=key, progress=True)
    assert second["cached"] and second["images"] == 9 and decoded == []  # nothing decoded again
    assert capsys.readouterr().err == ""

    # the marker is per content: the truncated image changes the dataset hash, so it is decoded
    _truncate(jpeg_dataset / "images" / "val_000001.jpg")
    new_key = dataset_record(jpeg_dataset, "instances_train.json", "instances_val.json")["hash"]
    assert new_key != key
    with pytest.raises(DataError, match="val_000001.jpg"):
        decode_images(_jsons(jpeg_dataset), jpeg_dataset / "images", key=new_key, progress=False)
    assert len(decoded) == 9 and not (marker.parent / f"{new_key}.json").exists()  # no marker for a failure
    assert capsys.readouterr().err == ""  # progress=False: no bar


def test_truncated_image_stops_the_run_before_any_training(jpeg_dataset, tmp_path, tiny_params):
    from tfg_mm.training.baseline import run_baseline

    _truncate(jpeg_dataset / "images" / "val_000000.jpg")
    run_dir = tmp_path / "run"
    # max_steps_per_epoch=1 used to finish with rc 0 without ever reading the image
    params = tiny_params(dataset=str(jpeg_dataset), run_dir=str(run_dir), epochs=1, max_steps_per_epoch=1)
    with pytest.raises(DataError, match=r"val_000000\.jpg.*instances_val\.json image id"):
        run_baseline(params, progress=False)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "state").exists()


# --------------------------------------------------------------------------------------------
# Truncated checkpoints, non-checkpoint files
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def atto_model():
    from tfg_mm.detector import build

    return build("atto", num_classes=3)


def test_truncated_safetensors_is_a_checkpoint_error_naming_the_file(atto_model, tmp_path):
    from tfg_mm.detector import from_pretrained, load, save

    folder = save(atto_model, tmp_path / "ck")
    weights = folder / "model.safetensors"
    _truncate(weights, keep=0.5)
    for loader in (lambda: load(folder), lambda: from_pretrained(str(folder))):
        with pytest.raises(CheckpointError) as refused:
            loader()
        message = str(refused.value)
        assert str(weights) in message and "truncated" in message and "Fix:" in message


def test_convert_refuses_a_text_file_without_suggesting_to_unpickle_it(tmp_path):
    from tfg_mm.detector.convert import load_official_state_dict

    text = tmp_path / "deimv2_atto.pth"
    text.write_text("<!DOCTYPE html>\n<html><body>Sign in to download</body></html>\n")
    with pytest.raises(CheckpointError) as refused:
        load_official_state_dict(text)
    message = str(refused.value)
    assert "not a PyTorch checkpoint" in message and "HTML page" in message and str(text) in message
    assert "weights_only=False" not in message and "Fix:" in message


# --------------------------------------------------------------------------------------------
# Read-only run_dir
# --------------------------------------------------------------------------------------------

#: Ways to run a command without root's permission override, tried in order.
_UNPRIVILEGED = (
    ["setpriv", "--inh-caps=-all", "--bounding-set=-all"],
    ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"],
)


def _unprivileged_prefix(probe_dir: Path) -> list[str]:
    """A command prefix under which a read-only folder really refuses writes, or skip the test."""
    if os.name != "posix":
        pytest.skip("read-only folder semantics are tested on POSIX only")
    target = probe_dir / "probe"
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and `setpriv` (util-linux) is missing, so root's permission override stays")
    for prefix in _UNPRIVILEGED:
        done = subprocess.run(
            [*prefix, sys.executable, "-c", f"import os; os.mkdir({str(target)!r})"], capture_output=True, text=True
        )
        if done.returncode != 0 and "PermissionError" in done.stderr:
            return prefix
        if target.exists():
            target.rmdir()
    pytest.skip("running as root and neither setpriv variant drops the permission override here")


@pytest.mark.slow
def test_read_only_run_dir_is_a_config_error_naming_the_folder(tiny_dataset, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    old_run = locked / "old_run"  # an interrupted run, now read-only: nothing in it may change
    old_run.mkdir()
    (old_run / ".tfg_mm_run").write_text('{"created": "earlier"}\n')
    (old_run / "metrics.json").write_text('{"status": "running", "history": []}\n')
    before = {p.name: p.read_bytes() for p in old_run.iterdir()}
    os.chmod(old_run, 0o555)
    os.chmod(locked, 0o555)
    try:
        prefix = _unprivileged_prefix(locked)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
        # the first write refused is the run folder's lock, beside it (the folder itself is read-only too)
        for run_dir, folder in ((locked / "new_run", locked), (old_run, locked)):
            params = tmp_path / f"{run_dir.name}.yaml"
            params.write_text(yaml.safe_dump({**TINY, "dataset": str(tiny_dataset), "run_dir": str(run_dir)}))
            done = subprocess.run(
                [*prefix, sys.executable, "-m", "tfg_mm", "train", "--params", str(params)],
                cwd=REPO_ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 2, done.stderr[-2000:]
            assert "Traceback" not in done.stderr, done.stderr[-2000:]
            assert f"run_dir `{run_dir}`" in done.stderr and f"the folder {folder} cannot be written" in done.stderr
            assert f"chmod u+w {folder}" in done.stderr
        assert not (locked / "new_run").exists()
        assert {p.name: p.read_bytes() for p in old_run.iterdir()} == before
    finally:
        os.chmod(locked, 0o755)
        os.chmod(old_run, 0o755)


def test_prepare_run_dir_probes_a_read_only_folder_it_does_not_write(tmp_path, monkeypatch):
    """The probe: a resumable run folder (marker present, nothing to write) is still checked."""
    run_dir = prepare_run_dir(tmp_path / "run")

    def refuse(folder):
        raise PermissionError(13, "Permission denied", str(Path(folder) / ".write-probe.1234.tmp"))

    monkeypatch.setattr("tfg_mm.training.runs.probe_writable", refuse)
    with pytest.raises(ConfigError, match=f"the folder {run_dir} cannot be written"):
        prepare_run_dir(run_dir)


# --------------------------------------------------------------------------------------------
# umask
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_and_folders_follow_the_umask(umask, tmp_path, atto_model):
    from tfg_mm.detector import save

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    previous = os.umask(umask)
    try:
        run_dir = prepare_run_dir(tmp_path / "runs" / "r")
        metrics = atomic_write_json(run_dir / "metrics.json", {"status": "running"})
        text = atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "inside.txt").write_text("y")
        checkpoint = save(atto_model, run_dir / "checkpoints" / "best")
        voc = _voc_tree(tmp_path / "voc", [("scratch", (3, 4, 20, 25), 0)])
        imported = voc_to_coco(voc, tmp_path / "imported" / "instances.json")
    finally:
        os.umask(previous)
    files = [metrics, text, run_dir / ".tfg_mm_run", tmp_path / "folder" / "inside.txt", imported]
    files += [checkpoint / "model.safetensors", checkpoint / "config.json", checkpoint / "tfg_mm.json"]
    folders = [run_dir, tmp_path / "runs", tmp_path / "folder", checkpoint, checkpoint.parent, imported.parent]
    assert {str(f): oct(mode(f)) for f in files} == {str(f): oct(0o666 & ~umask) for f in files}
    assert {str(d): oct(mode(d)) for d in folders} == {str(d): oct(0o777 & ~umask) for d in folders}
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary left behind


# --------------------------------------------------------------------------------------------
# VOC difficult objects and unknown tags
# --------------------------------------------------------------------------------------------


def _voc_tree(root: Path, objects: list[tuple[str, tuple[int, int, int, int], int]], extra: str = "") -> Path:
    """``root/Annotations/a.xml`` (+ ``root/JPEGImages/a.png``, 60x40) with the given objects
    ``(name, (xmin, ymin, xmax, ymax), difficult)``; ``extra`` is inserted into the first object."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    Image.new("RGB", (60, 40), (90, 90, 90)).save(root / "JPEGImages" / "a.png")
    parts = []
    for i, (name, (x0, y0, x1, y1), difficult) in enumerate(objects):
        parts.append(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{difficult}</difficult>{extra if i == 0 else ''}"
            f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><folder>JPEGImages</folder><filename>a.png</filename>"
        "<size><width>60</width><height>40</height><depth>3</depth></size><segmented>0</segmented>"
        + "".join(parts)
        + "</annotation>\n"
    )
    return root


_EASY, _HARD = (3, 4, 20, 25), (30, 5, 55, 35)  # VOC corners (1-based, inclusive)


@pytest.fixture
def voc_with_difficult(tmp_path) -> Path:
    return _voc_tree(tmp_path / "voc", [("scratch", _EASY, 0), ("scratch", _HARD, 1)])


@pytest.mark.parametrize(
    ("option", "expected"),
    [("ignore", [(0, None), (1, 1)]), ("keep", [(0, None), (0, 1)]), ("drop", [(0, None)])],
)
def test_voc_difficult_objects_under_each_option(voc_with_difficult, tmp_path, option, expected):
    out = voc_to_coco(voc_with_difficult, tmp_path / f"{option}.json", difficult=option)
    anns = sorted(json.loads(out.read_text())["annotations"], key=lambda a: a["id"])
    assert [(a["iscrowd"], a.get("difficult")) for a in anns] == expected
    assert anns[0]["bbox"] == [2.0, 3.0, 18.0, 22.0]
    # the training dataset's targets: ignored boxes are left out, kept ones are ordinary boxes
    dataset = CocoDetection(tmp_path, out.name, voc_with_difficult / "JPEGImages", image_size=64)
    _, target = dataset[0]
    assert len(target["boxes"]) == (2 if option == "keep" else 1)
    # the export writes the flag back: a round trip keeps the difficult object difficult
    if option == "ignore":
        back = coco_to_voc(out, tmp_path / "exported")
        again = voc_to_coco(back, tmp_path / "again.json")
        assert [(a["iscrowd"], a["bbox"]) for a in json.loads(again.read_text())["annotations"]] == [
            (a["iscrowd"], a["bbox"]) for a in anns
        ]


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_a_missed_difficult_box_does_not_lower_ap_when_ignored(voc_with_difficult, tmp_path, backend):
    detections = [{"image_id": 1, "category_id": 1, "bbox": [2.0, 3.0, 18.0, 22.0], "score": 0.9}]
    results = {}
    for option in ("ignore", "keep", "drop"):
        gt = voc_to_coco(voc_with_difficult, tmp_path / f"{option}.json", difficult=option)
        results[option] = coco_evaluate(gt, detections, backend=backend)
    assert results["ignore"]["map50"] == pytest.approx(1.0)  # the missed difficult box costs nothing
    assert results["ignore"]["map"] == pytest.approx(results["drop"]["map"])
    assert results["keep"]["map50"] < 0.6  # kept as an ordinary box, missing it halves the recall
    # a detection on an ignored box is no false positive either
    on_hard = [*detections, {"image_id": 1, "category_id": 1, "bbox": [29.0, 4.0, 26.0, 31.0], "score": 0.95}]
    gt = tmp_path / "ignore.json"
    assert coco_evaluate(gt, on_hard, backend=backend)["map50"] == pytest.approx(1.0)


def test_voc_cli_option_and_bad_difficult_values(voc_with_difficult, tmp_path):
    from tfg_mm.cli import main

    assert main(["import-voc", str(voc_with_difficult), str(tmp_path / "d.json"), "--difficult", "drop"]) == 0
    assert len(json.loads((tmp_path / "d.json").read_text())["annotations"]) == 1
    with pytest.raises(SystemExit):
        main(["import-voc", str(voc_with_difficult), str(tmp_path / "x.json"), "--difficult", "maybe"])
    with pytest.raises(DataError, match="unknown option"):
        voc_to_coco(voc_with_difficult, tmp_path / "x.json", difficult="maybe")
    bad = _voc_tree(tmp_path / "bad", [("scratch", _EASY, 2)])
    with pytest.raises(DataError, match=r"a\.xml: <object> #1 \('scratch'\) has <difficult>2</difficult>"):
        voc_to_coco(bad, tmp_path / "bad.json")


def test_unknown_voc_tags_are_warned_once_per_file(tmp_path, caplog):
    plain = _voc_tree(tmp_path / "plain", [("scratch", _EASY, 0)])
    odd = _voc_tree(tmp_path / "odd", [("scratch", _EASY, 0), ("dent", _HARD, 0)], extra="<score>0.7</score>")
    xml = odd / "Annotations" / "a.xml"
    xml.write_text(xml.read_text().replace("<segmented>", "<reviewer>ann</reviewer><segmented>"))
    xml.write_text(xml.read_text().replace("<object><name>dent", "<object><score>1</score><name>dent"))
    with caplog.at_level(logging.WARNING, logger="tfg_mm.data.importers"):
        voc_to_coco(plain, tmp_path / "plain.json")
        assert caplog.records == []
        voc_to_coco(odd, tmp_path / "odd.json")
    assert len(caplog.records) == 1  # once for the file, though <score> occurs twice
    message = caplog.records[0].getMessage()
    assert str(xml) in message and "<annotation/reviewer>" in message and "<annotation/object/score>" in message
