"""The one command line: every utility is listed and reachable."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tfg_mm.errors import ConfigError
from tfg_mm.workflow import pipeline


def test_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "tfg_mm", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    for command in (
        "generate",
        "import-voc",
        "import-yolo",
        "convert",
        "train",
        "phase2",
        "pipeline",
        "report",
        "params-doc",
        "split",
    ):
        assert command in out, command


def test_bad_parameter_gives_clear_error_and_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tfg_mm", "train", f"run_dir={tmp_path / 'r'}", "epocs=3"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "epocs" in proc.stderr and "did you mean `epochs`" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_generate_command(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tfg_mm",
            "generate",
            "--out",
            str(tmp_path / "d"),
            "--n-train",
            "3",
            "--n-val",
            "2",
            "--image-size",
            "96",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "d" / "instances_train.json").exists()


def test_generate_command_draws_a_class_subset(tmp_path):
    """`--classes`: another synthetic set with fewer classes (scripts/bench_pretrained.py's target set)."""
    argv = [sys.executable, "-m", "tfg_mm", "generate", "--n-train", "6", "--n-val", "2", "--image-size", "96"]
    proc = subprocess.run(
        [*argv, "--out", str(tmp_path / "d"), "--seed", "1", "--classes", "break, stain"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    for split in ("train", "val"):
        data = json.loads((tmp_path / "d" / f"instances_{split}.json").read_text())
        assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "break"), (2, "stain")]
        assert {a["category_id"] for a in data["annotations"]} <= {1, 2}
    assert {a["category_id"] for a in json.loads((tmp_path / "d" / "instances_train.json").read_text())["annotations"]}
    bad = subprocess.run(
        [*argv, "--out", str(tmp_path / "e"), "--classes", "scratch,rust"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "rust" in bad.stderr and "scratch" in bad.stderr
    assert not (tmp_path / "e").exists()


def test_pipeline_only_runs_the_named_steps(monkeypatch, tmp_path):
    """`make baseline` / `make phase2` / `make ablations`: one notebook each, through the pipeline."""
    ran = []
    monkeypatch.setattr(pipeline, "run_and_render", lambda name, parameters, progress: ran.append((name, parameters)))
    monkeypatch.setattr(pipeline, "REPORTS", tmp_path)
    pipeline.run_pipeline(only=["02_phase2"], params_dir=tmp_path / "params", progress=False)
    assert ran == [
        (
            "02_phase2",
            {
                "params_file": str(tmp_path / "params" / "phase2.yaml"),
                "baseline": "runs/baseline",
                "run_dir": "runs/phase2",
            },
        )
    ]
    assert not (tmp_path / "pipeline_timing.json").exists()  # the timings file is the whole pipeline's
    ran.clear()
    pipeline.run_pipeline(skip_ablations=True, params_dir=tmp_path, progress=False)
    assert [name for name, _ in ran] == ["00_data", "01_baseline", "02_phase2"]
    assert (tmp_path / "pipeline_timing.json").exists()
    with pytest.raises(ConfigError, match="Unknown pipeline step"):
        pipeline.run_pipeline(only=["01_basline"])


def test_repeated_params_files_take_overrides_anywhere(tmp_path, monkeypatch):
    from tfg_mm import cli

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("epochs: 3\nlr: 0.01\nseed: 1\n")
    b.write_text("epochs: 4\n")
    seen = {}

    def run_baseline(params):  # stands in for training: the parsing is what is tested
        seen["p"] = params
        return {"final": {"map": 0.0, "map50": 0.0}, "params": {"run_dir": params.run_dir}}

    monkeypatch.setattr(cli, "run_baseline", run_baseline)
    assert cli.main(["train", "--params", str(a), "seed=2", "--params", str(b), "seed=3", "batch_size=2"]) == 0
    p = seen["p"]
    assert (p.epochs, p.lr, p.seed, p.batch_size) == (4, 0.01, 3, 2)  # files in order, then overrides in order
    with pytest.raises(SystemExit):  # anything else after a --params is still an error
        cli.main(["train", "--params", str(a), "seed=2", "--params", str(b), "--bogus"])
