"""Terminal progress (the trainer's progress log and its watcher) and what a rendered report leaves out."""

from __future__ import annotations

import io
import json
import time

import nbformat
import pytest

from tfg_mm import paths
from tfg_mm.training import progress
from tfg_mm.workflow.notebooks import ProgressWatcher, render_html, report_noise


def _entry(**values) -> dict:
    return {"run": "runs/baseline", "epochs": 40, **values}


def test_format_progress_names_run_epoch_step_loss_map_and_time_left():
    line = progress.format_progress(
        _entry(
            event="train", epoch=3, step=120, steps=250, loss=12.34567, map=0.5123, map50=0.7, map_epoch=2, eta_s=1085
        )
    )
    assert line == (
        "[runs/baseline] epoch 3/40 step 120/250 · loss 12.3457 · mAP 0.5123 / mAP50 0.7000 (epoch 2) "
        "· ~18 min 05 s left"
    )
    evaluated = progress.format_progress(_entry(event="eval", epoch=3, stage="B", map=0.52, map50=0.71, map_epoch=3))
    assert evaluated.startswith("[runs/baseline] epoch 3/40 (stage B) evaluated · mAP 0.5200")
    done = progress.format_progress(_entry(event="finish", epoch=40, best_epoch=38, best_map=0.61, map=0.6, eta_s=0))
    assert "finished: best epoch 38, mAP 0.6100" in done and "left" not in done and "mAP 0.6000" not in done


def test_watcher_prints_new_entries_of_every_run_folder_once(tmp_path):
    baseline, grid = tmp_path / "baseline", tmp_path / "ablations"
    baseline.mkdir()
    progress.append_progress(baseline, _entry(event="train", epoch=1, step=5, steps=10, loss=1.0))  # before: skipped
    out = io.StringIO()
    watcher = ProgressWatcher([baseline, grid], stream=out, interval=0.05)
    assert watcher.poll() == []
    progress.append_progress(baseline, _entry(event="train", epoch=1, step=10, steps=10, loss=0.5))
    seed = grid / "minilm" / "seed0"
    seed.mkdir(parents=True)  # a folder that appears later (the grid's runs) is read from its start
    progress.append_progress(seed, {**_entry(event="eval", epoch=1, map=0.25, map50=0.5, map_epoch=1), "run": "s0"})
    with open(seed / paths.PROGRESS_FILE, "a") as handle:
        handle.write('{"run": "s0", "event": "tr')  # a line being written: waits for the next poll
    lines = sorted(watcher.poll())
    assert len(lines) == 2 and lines[0].startswith("[runs/baseline] epoch 1/40 step 10/10 · loss 0.5000")
    assert lines[1].startswith("[s0] epoch 1/40 evaluated · mAP 0.2500")
    assert sorted(out.getvalue().splitlines()) == lines
    with open(seed / paths.PROGRESS_FILE, "a") as handle:
        handle.write('ain", "epoch": 2, "epochs": 2, "step": 1, "steps": 3}\nnot json\n')
    assert watcher.poll() == ["[s0] epoch 2/2 step 1/3"]
    assert watcher.poll() == []


def test_watcher_thread_prints_while_the_work_runs(tmp_path):
    out = io.StringIO()
    with ProgressWatcher([tmp_path], stream=out, interval=0.05):
        progress.append_progress(tmp_path, _entry(event="train", epoch=1, step=1, steps=2, loss=2.0))
        deadline = time.monotonic() + 5
        while "step 1/2" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "step 1/2" in out.getvalue()  # printed by the thread, before the block ends
        progress.append_progress(tmp_path, _entry(event="finish", epoch=40, best_epoch=1, best_map=0.1))
    assert "finished: best epoch 1" in out.getvalue()  # the last poll on exit
    assert out.getvalue().count("\n") == 2
    entries = [json.loads(line) for line in (tmp_path / paths.PROGRESS_FILE).read_text().splitlines()]
    assert all(e["time"] for e in entries)


def _notebook(*outputs) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x = 1")
    cell.outputs = [nbformat.v4.new_output(**o) for o in outputs]
    nb.cells = [nbformat.v4.new_markdown_cell("# A thesis page"), cell]
    return nb


@pytest.mark.parametrize(
    ("output", "noisy"),
    [
        ({"output_type": "stream", "name": "stdout", "text": "dataset data/synthetic\nno warnings.\n"}, False),
        ({"output_type": "stream", "name": "stderr", "text": "anything at all\n"}, True),
        ({"output_type": "stream", "name": "stdout", "text": "\rLoading weights:  40%|████      | 2/5"}, True),
        ({"output_type": "stream", "name": "stdout", "text": "bootstrap 50/200 [00:03<00:09, 15.2it/s]"}, True),
        ({"output_type": "stream", "name": "stdout", "text": "x.py:3: UserWarning: careful\n"}, True),
        ({"output_type": "stream", "name": "stdout", "text": "[IPKernelApp] WARNING | Kernel is running\n"}, True),
    ],
)
def test_report_noise_finds_stderr_progress_bars_and_warnings(output, noisy):
    assert bool(report_noise(_notebook(output))) is noisy


def test_render_html_keeps_stderr_out_of_the_report(tmp_path):
    nb = _notebook(
        {"output_type": "stream", "name": "stdout", "text": "the result 0.123\n"},
        {"output_type": "stream", "name": "stderr", "text": "Writing model shards: 100%|██| 1/1\n"},
    )
    executed = tmp_path / "01.ipynb"
    nbformat.write(nb, executed)
    html = render_html(executed, tmp_path / "01.html").read_text()
    assert "the result 0.123" in html
    assert "Writing model shards" not in html and 'data-mime-type="application/vnd.jupyter.stderr"' not in html
    assert "Writing model shards" in (tmp_path / "01.ipynb.stderr.txt").read_text()
    assert len(report_noise(executed)) == 1  # the executed notebook keeps its record
    nb.cells[1].outputs = nb.cells[1].outputs[:1]
    nbformat.write(nb, executed)
    render_html(executed, tmp_path / "01.html")
    assert not (tmp_path / "01.ipynb.stderr.txt").exists()  # nothing stale left behind
