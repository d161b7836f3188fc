"""The low-data grid: notebook 04 executed for real (papermill) on the tiny set, its summary, report and index."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import tiny
from tfg_mm import ablations, reporting
from tfg_mm.ablations.grid import load_ablation_grid, run_grid
from tfg_mm.errors import ConfigError
from tfg_mm.workflow.notebooks import NOTEBOOKS, execute, render_html, report_noise


def _grid(tmp_path, tiny_dataset, **shots) -> tuple:
    base = tmp_path / "baseline.yaml"
    base.write_text(
        yaml.safe_dump(tiny(tiny_dataset, epochs=1, test_json="instances_test.json", deploy_benchmark_runs=0))
    )
    phase2 = tmp_path / "phase2.yaml"
    phase2.write_text(
        yaml.safe_dump(
            tiny(
                tiny_dataset,
                epochs=1,
                warmup_epochs=0,
                test_json="instances_test.json",
                deploy_benchmark_runs=0,
                bootstrap_resamples=20,
            )
        )
    )
    grid = tmp_path / "lowshot.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "description": "tiny low-data grid",
                "seeds": [0],
                "hard_classes": ["perforation", "break"],
                "shots": {"k": [1, 2], "classes": ["perforation"], "baseline_params": str(base), **shots},
                "variants": [
                    {"name": "minilm", "overrides": {"text_encoder": "minilm"}},
                    {"name": "none", "overrides": {"text_encoder": "none"}},
                ],
            }
        )
    )
    return grid, phase2


def test_a_shots_block_is_checked_and_notebook_03_refuses_it(tmp_path, tiny_dataset):
    grid, _ = _grid(tmp_path, tiny_dataset)
    loaded = load_ablation_grid(grid)
    assert loaded["shots"]["k"] == [1, 2] and loaded["shots"]["seed"] == 0 and loaded["shots"]["baseline"] == {}
    with pytest.raises(ConfigError, match="notebook 04"):
        run_grid(loaded, tmp_path / "ablations")
    for bad, words in (({"k": []}, "shots.k"), ({"k": [0]}, "train_shots"), ({"kk": [1]}, "unknown key")):
        data = yaml.safe_load(grid.read_text())
        data["shots"] = {**data["shots"], **bad}
        if "kk" in bad:
            del data["shots"]["k"]
        grid.write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError, match=words):
            load_ablation_grid(grid)


@pytest.mark.slow
def test_notebook_04_runs_every_k_on_its_own_starved_baseline(tmp_path, tiny_dataset):
    grid, phase2 = _grid(tmp_path, tiny_dataset)
    run_dir = tmp_path / "lowshot"
    nb = execute(
        NOTEBOOKS / "04_lowshot.ipynb",
        tmp_path / "04.ipynb",
        {"params_file": str(phase2), "grid": str(grid), "run_dir": str(run_dir)},
        progress=False,
    )
    assert report_noise(nb) == []
    html = render_html(nb, tmp_path / "04.html").read_text()
    assert "data:image/png;base64" in html and "k = 1: text (minilm)" in html

    summary = json.loads((run_dir / "lowshot.json").read_text())
    assert [level["k"] for level in summary["levels"]] == [1, 2]
    tests = set()
    for level in summary["levels"]:
        k = level["k"]
        base = json.loads((run_dir / f"k{k}" / "baseline" / "metrics.json").read_text())
        kept = base["training"]["train_shots"]
        assert base["params"]["train_shots"] == k and kept["images"]["perforation"]["kept"] <= k
        card = (run_dir / f"k{k}" / "baseline" / "01_baseline.html").read_text()
        assert "low-data training set" in card and f"train_shots: {k}" in card  # the run card says so
        tests.add(json.dumps(base["final"]["test"]["instances"], sort_keys=True))  # the same test images for every k
        for name in ("minilm", "none"):
            variant = json.loads((run_dir / f"k{k}" / name / "seed0" / "metrics.json").read_text())
            # the variant fine-tuned this k's baseline on the same starved set
            assert variant["params"]["train_shots"] == k and variant["params"]["shots_classes"] == ["perforation"]
            assert variant["training"]["train_shots"] == kept
            assert variant["params"]["baseline"].endswith(f"k{k}/baseline")
            delta = level["variants"][name]["test"]["map"]
            assert delta["lo"] <= delta["delta"] <= delta["hi"]
    assert len(tests) == 1
    # a second call reuses every finished run (no notebook executed)
    record = ablations.run_lowshot(
        grid, run_dir, params_file=phase2, progress=False, run_variant=_never, run_baseline=_never
    )
    assert {level["baseline"]["status"] for level in record["levels"]} == {"reused"}
    assert {r["status"] for level in record["levels"] for r in level["grid"]} == {"reused"}
    # the index shows the figure and the verdict
    index = reporting.build_index(None, reports_dir=tmp_path / "reports", lowshot=summary).read_text()
    assert "Low-data regime" in index and "lowshot_delta" in index and "k = 2" in index


def _never(parameters, run_dir):
    raise AssertionError(f"{run_dir} should have been reused")
