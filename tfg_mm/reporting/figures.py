"""How the reports' figures are written and styled: PNG (150 dpi, for the HTML reports) and SVG (for the thesis),
in :func:`tfg_mm.paths.figures_dir` unless told otherwise; the colour and marking of the hard classes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import seaborn as sns

from tfg_mm.io import atomic_write_bytes
from tfg_mm.paths import figures_dir

HARD_COLOR = "#c0392b"


def finish(fig: plt.Figure, save: str | None) -> plt.Figure:
    fig.tight_layout()
    if save:
        save_figure(fig, save)
    return fig


def legend_outside(ax: plt.Axes) -> None:
    """The legend right of the axes, where it cannot cover a bar."""
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), title=None, frameon=False, fontsize=8)


def highlight_hard(ax: plt.Axes, hard_classes: Sequence[str]) -> None:
    for label in ax.get_xticklabels():
        if label.get_text() in hard_classes:
            label.set_color(HARD_COLOR)
            label.set_fontweight("bold")


def save_figure(fig: plt.Figure, stem: str, folder: str | Path | None = None) -> list[Path]:
    """Write ``<folder>/<stem>.png`` (150 dpi) and ``.svg`` atomically (default folder: :func:`tfg_mm.paths.figures_dir`);
    returns both paths."""
    folder = Path(folder) if folder is not None else figures_dir()
    written = []
    for ext, kwargs in (("png", {"dpi": 150}), ("svg", {})):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=ext, bbox_inches="tight", **kwargs)
        written.append(atomic_write_bytes(folder / f"{stem}.{ext}", buffer.getvalue()))
    return written
