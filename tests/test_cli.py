"""The one command line: every utility is listed and reachable."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "tfg_mm", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True).stdout
    for command in ("generate", "import-voc", "import-yolo", "convert", "train", "phase2", "pipeline", "report",
                    "params-doc"):
        assert command in out, command


def test_bad_parameter_gives_clear_error_and_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tfg_mm", "train", f"run_dir={tmp_path / 'r'}", "epocs=3"],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "epocs" in proc.stderr and "did you mean `epochs`" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_generate_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tfg_mm", "generate", "--out", str(tmp_path / "d"), "--n-train", "3",
                           "--n-val", "2", "--image-size", "96"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "d" / "instances_train.json").exists()
