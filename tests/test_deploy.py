"""A finished run deployed (tfg_mm.deploy): ``predict`` (sources, outputs, per-class thresholds, EXIF orientation,
video, bad input), ``export`` of a run (its check and a failed one) and ``benchmark`` with the reports' tables.

A tiny baseline and a tiny phase-2 run are trained once for the module (a few seconds; the tests that use them are
``slow``); every prediction is compared with what evaluation measures on the same checkpoint, so predict cannot drift
from the numbers the reports quote.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.cli_runs import cli
from tests.conftest import tiny
from tfg_mm.config import load_params
from tfg_mm.deploy.export import export_run
from tfg_mm.deploy.predict import (
    FALLBACK_THRESHOLD,
    _tensor,
    collect_source,
    load_predictor,
    predict,
    read_image,
    summary_lines,
)
from tfg_mm.errors import ConfigError
from tfg_mm.training.baseline import run_baseline
from tfg_mm.training.judge import evaluate_target
from tfg_mm.training.phase2 import run_phase2


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory) -> dict[str, Path]:
    """A finished tiny baseline and a phase-2 run (MiniLM text branch) on top of it."""
    root = tmp_path_factory.mktemp("deploy_runs")
    base = root / "baseline"
    run_baseline(load_params(tiny(tiny_dataset, run_dir=str(base), epochs=2, max_steps_per_epoch=2)), progress=False)
    p2 = root / "phase2"
    params = tiny(
        tiny_dataset,
        run_dir=str(p2),
        baseline=str(base),
        text_encoder="minilm",
        epochs=1,
        warmup_epochs=1,
        max_steps_per_epoch=2,
    )
    run_phase2(load_params(params), progress=False)
    return {"baseline": base, "phase2": p2, "images": tiny_dataset / "images", "dataset": tiny_dataset}


def _val_images(dataset: Path) -> list[str]:
    return [im["file_name"] for im in json.loads((dataset / "instances_val.json").read_text())["images"]]


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
def test_sources_image_folder_glob_and_bad_ones(tmp_path):
    folder = tmp_path / "parts"
    (folder / "line2").mkdir(parents=True)
    for name in ("a.png", "line2/b.JPG", "notes.txt"):
        path = folder / name
        (Image.new("RGB", (40, 30)).save(path, format="PNG") if name != "notes.txt" else path.write_text("x"))
    assert [n for _, n in collect_source(folder).images] == ["a.png", "line2/b.JPG"]  # recursive, by extension
    assert [n for _, n in collect_source(folder / "a.png").images] == ["a.png"]
    assert [n for _, n in collect_source(f"{folder}/**/*.JPG").images] == ["line2/b.JPG"]
    (tmp_path / "empty").mkdir()
    for bad, message in (
        (tmp_path / "nope", "no such file or folder"),
        (tmp_path / "empty", "holds no image"),
        (f"{folder}/*.bmp", "matches no image"),
        (folder / "notes.txt", "neither an image"),
    ):
        with pytest.raises(ConfigError, match=message):
            collect_source(bad)


# --------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_predictions_are_the_evaluated_detections_at_the_validation_thresholds(runs, tmp_path):
    """The selected checkpoint, read back, gives exactly the detections evaluation scored (same boxes, scores,
    classes), kept at each class's validation operating point; the outputs agree with each other."""
    for run in ("baseline", "phase2"):
        predictor = load_predictor(runs[run], device="cpu")
        final = json.loads((runs[run] / "metrics.json").read_text())["final"]
        for name, point in final["operating_points"].items():
            expected = point["threshold"] if point.get("threshold") is not None else FALLBACK_THRESHOLD
            assert predictor.thresholds[name] == pytest.approx(expected)
        assert ("text branch" in predictor.kind) is (run == "phase2")

        source = collect_source(runs["images"])
        source.images = [(p, n) for p, n in source.images if n in set(_val_images(runs["dataset"]))]
        zero = predict(
            load_predictor(runs[run], threshold=0, device="cpu"), source, tmp_path / run / "all", progress=False
        )
        block, _ = evaluate_target(runs[run], "val")
        evaluated = json.loads((runs[run] / "evaluation_val.detections.json").read_text())
        predicted = json.loads((tmp_path / run / "all" / "predictions.json").read_text())
        assert zero["detections"] == len(evaluated) == len(predicted)
        by_file = {
            im["id"]: im["file_name"]
            for im in json.loads((runs["dataset"] / "instances_val.json").read_text())["images"]
        }

        def key(d, name):
            return (name, d["category_id"], round(d["score"], 5), *(round(v, 3) for v in d["bbox"]))

        assert sorted(key(d, by_file[d["image_id"]]) for d in evaluated) == sorted(
            key(d, d["file_name"]) for d in predicted
        )

        out = tmp_path / run / "auto"
        summary = predict(predictor, source, out, progress=False)
        rows = json.loads((out / "predictions.json").read_text())
        assert all(r["score"] >= predictor.thresholds[r["category"]] for r in rows)
        assert summary["detections"] == len(rows) == len((out / "predictions.csv").read_text().splitlines()) - 1
        assert sum(summary["counts"].values()) == len(rows)
        assert sorted(p.name for p in (out / "images").iterdir()) == sorted(_val_images(runs["dataset"]))
        assert "wrote" in summary_lines(summary, out)[-1]


@pytest.mark.slow
def test_exif_rotated_image_gets_the_boxes_of_the_pixels_shown(runs, tmp_path):
    """An image stored rotated with an EXIF orientation tag is predicted as displayed: exactly the detections of the
    upright original, in its coordinates; the same pixels without the tag give other detections (the test can fail)."""
    name = _val_images(runs["dataset"])[0]
    upright = Image.open(runs["images"] / name).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the file holds it rotated 90° counter-clockwise
    for which, image, tags in (
        ("upright", upright, {}),
        ("tagged", upright.transpose(Image.Transpose.ROTATE_90), {"exif": exif}),
        ("untagged", upright.transpose(Image.Transpose.ROTATE_90), {}),
    ):
        (tmp_path / which).mkdir()
        image.save(tmp_path / which / "part.png", **tags)
    assert np.array_equal(np.asarray(read_image(tmp_path / "tagged" / "part.png")), np.asarray(upright))
    predictor = load_predictor(runs["baseline"], threshold=0.0, device="cpu")
    found = {}
    for which in ("upright", "tagged", "untagged"):
        predict(predictor, collect_source(tmp_path / which), tmp_path / f"out_{which}", progress=False)
        rows = json.loads((tmp_path / f"out_{which}" / "predictions.json").read_text())
        found[which] = sorted((r["category_id"], r["score"], *r["bbox"]) for r in rows)
    assert found["tagged"] == found["upright"]
    assert found["untagged"] != found["upright"]


@pytest.mark.slow
def test_a_corrupt_file_is_skipped_and_counted_and_bad_targets_are_refused(runs, tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in _val_images(runs["dataset"])[:3]:
        shutil.copy(runs["images"] / name, folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    summary = predict(
        load_predictor(runs["baseline"], device="cpu"), collect_source(folder), tmp_path / "o", progress=False
    )
    assert summary["images"] == 3 and summary["skipped"] == ["broken.png"]
    assert "broken.png: cannot be decoded" in caplog.text

    running = tmp_path / "running"
    shutil.copytree(runs["baseline"], running)
    record = json.loads((running / "metrics.json").read_text())
    (running / "metrics.json").write_text(json.dumps({**record, "status": "running"}))
    with pytest.raises(ConfigError, match="not finished \\(status running\\)"):
        load_predictor(running)
    with pytest.raises(ConfigError, match="--threshold 1.5"):
        load_predictor(runs["baseline"], threshold=1.5)


@pytest.mark.slow
def test_cli_predict_missing_source_exits_2_and_writes_nothing(runs, tmp_path):
    out = tmp_path / "never"
    result = cli(["predict", str(runs["baseline"]), str(tmp_path / "nope"), "--out", str(out)])
    assert (
        result.returncode == 2 and "no such file or folder" in result.stderr and "Nothing was written" in result.stderr
    )
    assert not out.exists()
    result = cli(
        ["predict", str(runs["baseline"]), str(runs["images"] / _val_images(runs["dataset"])[0]), "--out", str(out)]
    )
    assert result.returncode == 0, result.stderr
    assert "1 image(s)" in result.stdout and "validation operating point" in result.stdout
    assert (out / "predictions.json").exists() and (out / "summary.json").exists()


@pytest.mark.slow
def test_video_frames_are_predicted_and_an_annotated_video_written(runs, tmp_path):
    av = pytest.importorskip("av", reason="PyAV (the `video` extra) reads video")
    names = _val_images(runs["dataset"])[:3]
    video = tmp_path / "line.mp4"
    with av.open(str(video), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 160, 160, "yuv420p"
        for name in names:
            frame = av.VideoFrame.from_image(Image.open(runs["images"] / name).convert("RGB"))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    out = tmp_path / "video_out"
    summary = predict(
        load_predictor(runs["phase2"], threshold=0.0, device="cpu"), collect_source(video), out, progress=False
    )
    assert summary["images"] == 3 and summary["files"]["video"] == "line_annotated.mp4"
    rows = json.loads((out / "predictions.json").read_text())
    assert {r["file_name"] for r in rows} == {f"line.mp4#frame={i}" for i in range(3)}
    with av.open(str(out / "line_annotated.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 3


# --------------------------------------------------------------------------------------------
# Benchmark and the reports' Deployment sections
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_benchmark_record_and_the_reports_deployment_tables(runs, tmp_path):
    from tfg_mm import reporting
    from tfg_mm.deploy.benchmark import benchmark_target, deploy_lines, read_deploy

    records = {}
    for run in ("baseline", "phase2"):
        record = benchmark_target(runs[run], batches=(1, 2), runs=3, warmup=1)
        assert record == read_deploy(runs[run])
        records[run] = record
        rows = {(r["runtime"].split(" (")[0], r["scope"], r["batch"]) for r in record["rows"]}
        assert rows == {
            (runtime, scope, batch)
            for runtime in ("PyTorch eager", "ONNX Runtime")
            for scope, batch in (("model", 1), ("model", 2), ("end to end", 1))
        }
        for r in record["rows"]:
            assert 0 < r["median_ms"] <= r["p90_ms"] and r["runs"] == 3
            assert r["images_per_s"] == pytest.approx(1000 * r["batch"] / r["median_ms"])
        assert record["gflops"] > 0 and record["checkpoint_mb"] > 0 and record["threads"] >= 1
        exported = json.loads((runs[run] / "export" / "export.json").read_text())  # exported (and checked) first
        assert record["onnx_check"]["status"] == exported["status"]
        assert record["onnx_check"]["max_abs_diff"] == exported["check"]["outputs"]["max_abs_diff"]
        assert record["images"].startswith("the first 2 images of instances_val.json")
        assert len(deploy_lines(record)) == 3 + len(record["rows"]) + (run == "phase2")
    base, fused = records["baseline"], records["phase2"]
    assert base["params"]["text_branch"] == 0 < fused["params"]["text_branch"]
    assert fused["params"]["total"] - base["params"]["total"] == fused["params"]["text_branch"]
    assert "text branch" in fused["model"] and base["model"] == "detector alone"

    assert f"The ONNX file's export check: {base['onnx_check']['status']}" in reporting.deployment.conditions(base)
    table = reporting.deployment_table(base)
    assert table.loc["parameters (M)"].iloc[0] == round(base["params"]["total"] / 1e6, 3)
    comparison = reporting.deployment_comparison(base, fused)
    assert comparison.loc["text branch (parameters)", "text branch cost"] == f"+{fused['params']['text_branch']:,}"
    branch = fused["text_branch_ms"]
    assert "text_branch_ms" not in base and 0 < branch["median_ms"] <= branch["p90_ms"]
    assert branch["median_ms"] < next(r["median_ms"] for r in fused["rows"] if r["scope"] == "model")
    assert comparison.loc["text branch alone, PyTorch ms/image", "text branch cost"].startswith(
        f"+{branch['median_ms']:.3f} ms ("
    )
    assert comparison.loc["text branch alone, PyTorch ms/image", "baseline (detector alone)"] == ""
    assert reporting.deployment_comparison(base, None) is None
    assert reporting.read_deployments(runs["phase2"]) == (base, fused)
    page = reporting.build_index(None, reports_dir=tmp_path / "reports", deployment=(base, fused)).read_text()
    assert "Deployment: what the text branch costs at inference" in page and "ONNX Runtime" in page


def _measured_checkpoint(run: Path, dataset: Path, out: Path) -> Path:
    """The run's selected detector with BatchNorm statistics measured on its validation images: a tiny run trained for
    four steps still has near-constant features, so its top scores tie and each runtime breaks the tie its own way."""
    from tfg_mm import detector as det

    model = det.load(run / "checkpoints" / "best")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    source = collect_source(dataset / "images")
    images = [read_image(p) for p, n in source.images if n in set(_val_images(dataset))]
    with torch.no_grad():
        model(_tensor(images, 160)[0])
    return det.save(model.eval(), out)


@pytest.mark.slow
def test_export_checks_the_file_against_pytorch_and_a_failed_check_keeps_it_and_says_failed(runs, tmp_path):
    folder = _measured_checkpoint(runs["baseline"], runs["dataset"], tmp_path / "measured")
    params = tiny(runs["dataset"])
    record = export_run(folder, sources=[params])
    assert record["status"] == "PASSED" and record["check"]["passed"], record["check"]
    diff = record["check"]["outputs"]["max_abs_diff"]
    assert diff["boxes_normalised"] <= 1e-3 and diff["scores"] <= 1e-4 and diff["labels_mismatch"] == 0
    m = record["check"]["map"]
    assert m["images"] == 6 and m["abs_diff"]["map"] <= 1e-4 and m["passed"]  # (a tiny model: mAP near 0 in both)
    assert json.loads((folder / "export" / "export.json").read_text()) == record
    # the exported file predicts what PyTorch predicts
    onnx_run = load_predictor(folder, threshold=0.0, backend="onnx", sources=[params])
    torch_run = load_predictor(folder, threshold=0.0, sources=[params])
    source = collect_source(runs["images"] / _val_images(runs["dataset"])[0])
    outs = [predict(p, source, tmp_path / p.backend, progress=False) for p in (onnx_run, torch_run)]
    assert outs[0]["counts"] == outs[1]["counts"]

    # a fixed batch: the last validation batch is padded for the mAP check
    fixed = export_run(folder, batch=4, sources=[params])
    assert fixed["batch"] == 4 and fixed["check"]["map"]["passed"], fixed["check"]

    # the unmeasured tiny run ties its scores: the check fails, the command exits 1, the file stays, export.json says it
    result = cli(["export", str(runs["baseline"])])
    assert result.returncode == 1, result.stderr
    saved = json.loads((runs["baseline"] / "export" / "export.json").read_text())
    assert saved["status"] == "FAILED" and saved["check"]["problems"] and "check FAILED" in result.stdout
    assert (runs["baseline"] / "export" / "model.onnx").is_file()
    assert "tied" in saved["check"]["problems"][0]

    with pytest.raises(ConfigError, match="image_size"):
        export_run(folder, image_size=32, sources=[params])
