"""Where figures go and how they are written: PNG (150 dpi, for the HTML reports) and SVG (for the thesis).

The output folders can be redirected with environment variables, which papermill kernels inherit:
``TFG_MM_FIGURES_DIR`` (the ablation runner sets it for every notebook-02 execution of the grid, so
twenty variants do not overwrite the main run's ``reports/figures/02_phase2_*`` files) and
``TFG_MM_REPORTS_DIR`` (where ``tfg_mm.reports.build_index`` writes by default; tests use it).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from matplotlib.figure import Figure

from tfg_mm.config import project_root
from tfg_mm.io import atomic_write_bytes


def default_reports_dir() -> Path:
    """``<project root>/reports`` unless ``TFG_MM_REPORTS_DIR`` redirects it."""
    override = os.environ.get("TFG_MM_REPORTS_DIR")
    return Path(override) if override else project_root() / "reports"


def figures_dir() -> Path:
    """``<reports>/figures`` unless ``TFG_MM_FIGURES_DIR`` redirects it."""
    override = os.environ.get("TFG_MM_FIGURES_DIR")
    return Path(override) if override else default_reports_dir() / "figures"


def save_figure(fig: Figure, stem: str, folder: str | Path | None = None) -> list[Path]:
    """Write ``<folder>/<stem>.png`` (150 dpi) and ``.svg`` atomically (default folder: :func:`figures_dir`);
    returns both paths."""
    folder = Path(folder) if folder is not None else figures_dir()
    written = []
    for ext, kwargs in (("png", {"dpi": 150}), ("svg", {})):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=ext, bbox_inches="tight", **kwargs)
        written.append(atomic_write_bytes(folder / f"{stem}.{ext}", buffer.getvalue()))
    return written
