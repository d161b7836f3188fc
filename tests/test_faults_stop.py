"""A run stopped from outside, a run folder two processes want, a full disk: real subprocesses, real signals.

* SIGTERM (a SLURM time limit, ``kill``) and Ctrl-C typed into a terminal (a pseudo-terminal: the terminal
  driver sends SIGINT to the foreground process group) leave ``status: interrupted``, one line naming the signal
  and the command that resumes the run, the exit code 143 / 130, and the same command resumes the run to the
  history of an uninterrupted one;
* a second ``train`` into a run folder in use exits 2 within seconds naming the holder, and changes nothing; once
  the holder is gone (killed), its lock is taken over;
* a full disk while a checkpoint is written is the project's error naming the folder and the free space, and the
  previous checkpoint still loads.

Faults are injected by ``tests/fault_inject.py`` (``pause``: the child stops at a known training step and says
so through a marker file; ``enospc``: a checkpoint write finds the disk full).
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests import cli_runs
from tests.conftest import REPO_ROOT
from tfg_mm import detector

pytestmark = pytest.mark.slow

#: The training step at which the `pause` fault stops: the first step of the last epoch (epochs 1-2 saved).
PAUSE_STEP = 5


def _default_sigint() -> None:
    """The child of a test runner may have SIGINT ignored (a background job of a non-interactive shell)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _train(params: Path) -> list[str]:
    return ["train", "--params", str(params)]


def _start(params: Path, marker: Path, fault_step: int = PAUSE_STEP) -> subprocess.Popen:
    return subprocess.Popen(
        cli_runs.argv(_train(params), ("pause", fault_step)),
        cwd=REPO_ROOT,
        env=cli_runs.env(TFG_MM_PAUSE_MARKER=str(marker)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _wait_for(marker: Path, process: subprocess.Popen | None = None, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not marker.exists():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended before its pause: {process.stderr.read()[-3000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"no pause marker {marker} after {timeout} s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory) -> dict:
    """The uninterrupted run every stopped-and-resumed run must reproduce."""
    return cli_runs.reference_run(tiny_dataset, tmp_path_factory.mktemp("reference"))


def test_sigterm_leaves_an_interrupted_run_one_line_and_exit_143_and_it_resumes(reference, tiny_dataset, tmp_path):
    run_dir = tmp_path / "term"
    params_file = cli_runs.params_file(tmp_path, tiny_dataset, run_dir)
    child = _start(params_file, tmp_path / "paused")
    _wait_for(tmp_path / "paused", child)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM at epoch 3, step 0:") and "resumes after epoch 2" in last, last
    assert f"Resume with: python -m tfg_mm train --params {params_file}" in last
    assert "Traceback" not in err
    record = cli_runs.contract(run_dir)
    assert record["status"] == "interrupted" and record["failure"]["signal"] == "SIGTERM"
    assert (record["failure"]["epoch"], record["failure"]["step"]) == (3, 0)
    resumed = cli_runs.cli(_train(params_file), timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    finished = cli_runs.contract(run_dir)
    assert finished["status"] == "finished" and "failure" not in finished
    assert cli_runs.without_seconds(finished["history"]) == cli_runs.without_seconds(reference["history"])
    assert finished["final"]["map"] == reference["final"]["map"]


def test_ctrl_c_typed_into_a_terminal_is_an_interruption_not_a_failure(tiny_dataset, tmp_path):
    run_dir = tmp_path / "ctrl_c"
    params_file = cli_runs.params_file(tmp_path, tiny_dataset, run_dir)
    marker = tmp_path / "paused"
    pid, master = pty.fork()
    if pid == 0:  # the child: the pseudo-terminal is its controlling terminal, it is the foreground group
        os.chdir(REPO_ROOT)
        _default_sigint()
        command = cli_runs.argv(_train(params_file), ("pause", PAUSE_STEP))
        os.execve(command[0], command, cli_runs.env(TFG_MM_PAUSE_MARKER=str(marker)))
    output = b""
    try:
        end = time.monotonic() + 240
        while not marker.exists():
            assert time.monotonic() < end, output.decode(errors="replace")[-3000:]
            if select.select([master], [], [], 0.2)[0]:
                output += os.read(master, 65536)
        os.write(master, b"\x03")  # Ctrl-C: the terminal driver sends SIGINT to the foreground process group
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(master)
    text = output.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 130, text[-3000:]
    assert "stopped by SIGINT at epoch 3, step 0" in text and "Traceback" not in text, text[-3000:]
    record = cli_runs.contract(run_dir)
    assert record["status"] == "interrupted" and record["failure"]["signal"] == "SIGINT"


def test_a_second_process_cannot_share_a_run_folder_and_a_dead_holders_lock_is_taken_over(
    reference, tiny_dataset, tmp_path
):
    run_dir = tmp_path / "busy"
    params_file = cli_runs.params_file(tmp_path, tiny_dataset, run_dir)
    first = _start(params_file, tmp_path / "paused")
    _wait_for(tmp_path / "paused", first)
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    t0 = time.monotonic()
    second = cli_runs.cli(_train(params_file), timeout=400)
    assert second.returncode == 2 and time.monotonic() - t0 < 60
    assert f"is in use by process {first.pid} on host" in second.stderr and str(run_dir) in second.stderr
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before  # nothing touched
    first.kill()  # the holder dies without a word: the kernel releases its lock
    first.communicate(timeout=60)
    third = cli_runs.cli(_train(params_file), timeout=400)
    assert third.returncode == 0, third.stderr[-3000:]
    assert cli_runs.without_seconds(cli_runs.contract(run_dir)["history"]) == cli_runs.without_seconds(
        reference["history"]
    )  # resumed, same numbers


def test_a_full_disk_is_the_projects_error_and_the_previous_checkpoint_still_loads(tiny_dataset, tmp_path):
    run_dir = tmp_path / "full"
    params_file = cli_runs.params_file(tmp_path, tiny_dataset, run_dir)
    # checkpoint writes: epoch 0 last (the start is no candidate), epoch 1 last + best, epoch 2 last: the 4th
    # finds the disk full
    done = subprocess.run(
        cli_runs.argv(_train(params_file), ("enospc", 4)),
        cwd=REPO_ROOT,
        env=cli_runs.env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()
    assert any(line.startswith("error: Cannot write") for line in message), done.stderr[-3000:]
    text = done.stderr
    assert "No space left on device" in text and "free of" in text and str(run_dir / "checkpoints") in text
    assert "Fix: free space" in text and "Traceback" not in text
    record = cli_runs.contract(run_dir)
    assert record["status"] == "failed" and record["failure"]["type"] == "StorageError"
    assert [h["epoch"] for h in record["history"]] == [0, 1]  # epoch 2's contract was never written
    model = detector.load(run_dir / "checkpoints" / "last")  # epoch 1's, whole
    assert detector.read_metadata(run_dir / "checkpoints" / "last")["epoch"] == 1
    assert model.config.num_labels == 6
