"""The real notebooks, executed by papermill on a tiny setting, and rendered to HTML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tfg_mm.notebooks import NOTEBOOKS, execute, render_html

pytestmark = pytest.mark.slow


def _tiny(tiny_dataset) -> dict:
    return {
        "dataset": str(tiny_dataset),
        "image_size": 160,
        "batch_size": 4,
        "generate_if_missing": False,
        "preset": "atto",
        "top_k": 50,
        "ema": False,
    }


@pytest.fixture(scope="module")
def executed_01(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("nb")
    params = {**_tiny(tiny_dataset), "epochs": 1, "run_dir": str(out / "baseline")}
    nb = execute(NOTEBOOKS / "01_baseline.ipynb", out / "01.ipynb", params, progress=False)
    return out, nb


def test_notebook_00_runs_and_renders(tiny_dataset, tmp_path):
    nb = execute(
        NOTEBOOKS / "00_data.ipynb",
        tmp_path / "00.ipynb",
        {"dataset": str(tiny_dataset), "run_dir": str(tmp_path / "data")},
        progress=False,
    )
    html = render_html(nb, tmp_path / "00.html").read_text()
    assert "data:image/png;base64" in html
    record = json.loads((tmp_path / "data" / "dataset.json").read_text())
    assert record["hash"] and record["class_counts"]


def test_notebook_01_runs_writes_contract_and_renders_without_code(executed_01, tmp_path):
    out, nb = executed_01
    metrics = json.loads((out / "baseline" / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["params"]["epochs"] == 1
    html = render_html(nb, tmp_path / "01.html").read_text()
    assert "data:image/png;base64" in html
    assert "run_baseline(" not in html  # no code cells in the report
    # a thesis page: no library progress bars (one pair per checkpoint save and load) in stderr blocks
    cells = json.loads(Path(nb).read_text())["cells"]
    stderr = ["".join(o["text"]) for c in cells for o in c.get("outputs", []) if o.get("name") == "stderr"]
    assert not any("Writing model shards" in s or "Loading weights" in s for s in stderr), stderr


def test_notebook_01_with_params_file(tiny_dataset, tmp_path):
    import yaml

    params_file = tmp_path / "p.yaml"
    params_file.write_text(yaml.safe_dump({**_tiny(tiny_dataset), "epochs": 1, "run_dir": str(tmp_path / "run")}))
    execute(NOTEBOOKS / "01_baseline.ipynb", tmp_path / "01.ipynb", {"params_file": str(params_file)}, progress=False)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "finished"


def test_notebook_rejects_misspelled_parameter(tiny_dataset, tmp_path):
    from tfg_mm.errors import ConfigError

    # the project's error, message first (not papermill's wrapper with the kernel's whole traceback)
    with pytest.raises(ConfigError) as err:
        execute(
            NOTEBOOKS / "01_baseline.ipynb",
            tmp_path / "bad.ipynb",
            {**_tiny(tiny_dataset), "epocs": 1, "run_dir": str(tmp_path / "r")},
            progress=False,
        )
    assert "did you mean `epochs`" in str(err.value)
    assert str(err.value).startswith("Invalid parameters") and "01_baseline.ipynb" in str(err.value)
    assert err.value.ename == "ConfigError" and err.value.cell_index is not None  # the grid's failure record
    assert "Traceback" not in str(err.value)
    assert not (tmp_path / "r").exists()  # validated before any work


def test_notebook_02_runs_alpha_zero(executed_01, tiny_dataset, tmp_path):
    out, _ = executed_01
    params = {
        **_tiny(tiny_dataset),
        "alpha": 0.0,
        "epochs": 2,
        "warmup_epochs": 1,
        "baseline": str(out / "baseline"),
        "run_dir": str(tmp_path / "phase2"),
    }
    nb = execute(NOTEBOOKS / "02_phase2.ipynb", tmp_path / "02.ipynb", params, progress=False)
    metrics = json.loads((tmp_path / "phase2" / "metrics.json").read_text())
    base = json.loads((out / "baseline" / "metrics.json").read_text())
    assert metrics["history"][0]["map"] == base["final"]["map"]
    assert "data:image/png;base64" in render_html(nb, tmp_path / "02.html").read_text()
