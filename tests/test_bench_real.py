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
