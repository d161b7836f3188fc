"""The real notebooks, executed by papermill on a tiny setting, and rendered to HTML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tiny
from tfg_mm.data.loaders import dataset_record
from tfg_mm.workflow.notebooks import NOTEBOOKS, execute, render_html, report_noise

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def executed_01(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("nb")
    params = {**tiny(tiny_dataset), "epochs": 1, "run_dir": str(out / "baseline")}
    nb = execute(NOTEBOOKS / "01_baseline.ipynb", out / "01.ipynb", params, progress=False)
    return out, nb


def test_notebook_00_runs_and_renders(tiny_dataset, tmp_path):
    nb = execute(
        NOTEBOOKS / "00_data.ipynb",
        tmp_path / "00.ipynb",
        {"dataset": str(tiny_dataset), "run_dir": str(tmp_path / "data")},
        progress=False,
    )
    assert report_noise(nb) == []  # a thesis page: no stderr block, progress bar or warning
    html = render_html(nb, tmp_path / "00.html").read_text()
    assert "data:image/png;base64" in html
    record = json.loads((tmp_path / "data" / "dataset.json").read_text())
    assert record["class_counts"] and Path(record["test_json"]).name == "instances_test.json"
    # the hash the report prints is the one every run of these params records (the test split's bytes included)
    assert (
        record["hash"]
        == dataset_record(tiny_dataset, "instances_train.json", "instances_val.json", "images", "instances_test.json")[
            "hash"
        ]
    )
    assert record["hash"] in html


def test_notebook_01_runs_writes_contract_and_renders_without_code(executed_01, tmp_path):
    out, nb = executed_01
    metrics = json.loads((out / "baseline" / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["params"]["epochs"] == 1
    html = render_html(nb, tmp_path / "01.html").read_text()
    assert "data:image/png;base64" in html
    assert "run_baseline(" not in html  # no code cells in the report
    # the Deployment section: the run benchmarked once (ONNX exported and checked first), its table in the report
    deploy = json.loads((out / "baseline" / "deploy.json").read_text())
    assert deploy["run_id"] == metrics["run_id"] and deploy["runs"] == 3
    assert "PyTorch ms/image" in html and "ONNX Runtime ms/image" in html and "export check" in html
    # a thesis page: no stderr block, library progress bar (transformers' one pair per checkpoint save
    # and load) or warning, in the executed notebook itself (render_html's stripping is only the safety net)
    assert report_noise(nb) == []
    assert not Path(f"{nb}.stderr.txt").exists()


def test_notebook_01_with_params_file(tiny_dataset, tmp_path):
    import yaml

    params_file = tmp_path / "p.yaml"
    params_file.write_text(yaml.safe_dump({**tiny(tiny_dataset), "epochs": 1, "run_dir": str(tmp_path / "run")}))
    nb = execute(
        NOTEBOOKS / "01_baseline.ipynb", tmp_path / "01.ipynb", {"params_file": str(params_file)}, progress=False
    )
    assert report_noise(nb) == []
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "finished"


def test_notebook_rejects_misspelled_parameter(tiny_dataset, tmp_path):
    from tfg_mm.errors import ConfigError

    # the project's error, message first (not papermill's wrapper with the kernel's whole traceback)
    with pytest.raises(ConfigError) as err:
        execute(
            NOTEBOOKS / "01_baseline.ipynb",
            tmp_path / "bad.ipynb",
            {**tiny(tiny_dataset), "epocs": 1, "run_dir": str(tmp_path / "r")},
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
        **tiny(tiny_dataset),
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
    assert report_noise(nb) == []
    assert "data:image/png;base64" in render_html(nb, tmp_path / "02.html").read_text()


def test_a_notebook_run_from_a_notebook_leaves_no_stderr(tmp_path):
    """The grid of notebook 03 runs notebook 02 from inside its kernel: papermill's "Passed unknown
    parameter" and the inner kernel's start-up warning would be notebook 03's stderr blocks."""
    import nbformat

    inner = nbformat.v4.new_notebook()
    parameters = nbformat.v4.new_code_cell("known = None")
    parameters.metadata["tags"] = ["parameters"]
    inner.cells = [parameters, nbformat.v4.new_code_cell("print(known)")]
    inner.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    nbformat.write(inner, tmp_path / "inner.ipynb")
    outer = nbformat.v4.new_notebook()
    outer.cells = [
        nbformat.v4.new_code_cell(
            "from tfg_mm.workflow.notebooks import execute\n"
            f"out = execute({str(tmp_path / 'inner.ipynb')!r}, {str(tmp_path / 'inner_run.ipynb')!r}, "
            "{'known': 1, 'epochs': 2}, progress=False)\nprint('inner done')"
        )
    ]
    nbformat.write(outer, tmp_path / "outer.ipynb")
    nb = execute(tmp_path / "outer.ipynb", tmp_path / "outer_run.ipynb", progress=False)
    texts = [
        "".join(o.get("text", "")) for c in json.loads(Path(nb).read_text())["cells"] for o in c.get("outputs", [])
    ]
    assert "inner done\n" in texts
    assert report_noise(nb) == [], report_noise(nb)
    assert report_noise(tmp_path / "inner_run.ipynb") == []
