"""`scripts/bench_real.py` (DeepPCB end to end): the checks that need no data. The benchmark itself runs with
`make bench-real` (about 45 min); its figures are in reports/bench_real.json and docs/real_data.md."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from tfg_mm.config import load_params
from tfg_mm.paths import project_root

SCRIPT = project_root() / "scripts" / "bench_real.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_real", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_the_data_it_exits_2_naming_the_folder_and_writes_nothing(tmp_path, monkeypatch):
    bench = _module()

    def never(*args, **kwargs):
        raise AssertionError("no work without the data")

    monkeypatch.setattr(bench, "prepare_data", never)
    monkeypatch.setattr(bench, "run_notebook", never)
    missing = tmp_path / "no_deeppcb"
    assert bench.main(["--data", str(missing)]) == 2
    assert not missing.exists() and list(tmp_path.iterdir()) == []
    # the real command line: one message on stderr, naming the folder and where the public dataset lives
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(missing)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and done.stdout == ""
    assert str(missing) in done.stderr and "github.com/tangsanli5201/DeepPCB" in done.stderr
    assert "train.json" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_every_recipe_names_valid_params_and_the_split_the_script_writes():
    bench = _module()
    for name, recipe in bench.RECIPES.items():
        for key in ("baseline", "phase2"):
            params = load_params(project_root() / recipe[key])
            assert params.dataset == bench.DATA and params.test_json == "test.json", (name, key)
            assert (params.train_json, params.val_json) == ("train.json", "val.json")
        assert recipe["phase2_on"] in recipe["runs"]


def test_the_document_is_written_from_the_record_alone():
    bench = _module()
    per_class = {c: {"ap50": 0.5, "ap": 0.25} for c in ("open", "short", "pin_hole")}
    run = {
        "run_dir": "runs/bench_real/x",
        "pretrained": "runs/baseline",
        "epochs": 12,
        "selected_epoch": 12,
        "convergence": "still rising: validation mAP +0.0400 over epochs 10-12",
        "val": {"map": 0.2, "map50": 0.4},
        "test": {"map": 0.1875, "map50": 0.375, "per_class": per_class},
        "train_seconds": 600.0,
    }
    record = {
        "recipe": "cpu",
        "baselines": {"finetuned": run, "scratch": {**run, "pretrained": "none (random init)"}},
        "phase2_grid_test": [
            {"variant": "minilm", "seeds": "3", "mAP": "0.19", "ΔmAP [95% CI]": "+0.0010 [-0.0010, +0.0030]"}
        ],
        "image_size_choice": [
            {"image_size": 320, "median_shorter_side_px": 15.5, "under_half_stride": 0.0, "under_one_stride": 0.56}
        ],
        "published": bench.PUBLISHED,
        "seconds": {"00_data": 10.0, "total": 2400.0},
        "machine": {"processor": "x86_64", "cpus": 2, "platform": "Linux", "python": "3.11"},
        "data": {"split": {"train": {"images": 798}, "val": {"images": 202}}},
    }
    text = bench.markdown(record)
    assert "**0.375 / 0.188**" in text and "still rising" in text and "+0.0010 [-0.0010, +0.0030]" in text
    assert "| 320 | 15.5 | 0.0 % | 56.0 % |" in text and "0.986" in text and "40.0 min" in text
