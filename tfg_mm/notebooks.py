"""Executing the project's notebooks with papermill and rendering them with nbconvert.

Notebooks stay thin; this module is the one place that knows how they are run: the generic
``python3`` kernel of whichever environment runs them, the repository root as working directory,
and an HTML report that is standalone (images embedded as base64) and, by default, shows no code.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter

from tfg_mm.config import params_from_notebook, project_root
from tfg_mm.io import atomic_write_text

log = logging.getLogger(__name__)

NOTEBOOKS = project_root() / "notebooks"
REPORTS = project_root() / "reports"


def execute(
    notebook: str | Path,
    output: str | Path,
    parameters: dict | None = None,
    cwd: str | Path | None = None,
    progress: bool = True,
    kernel_name: str = "python3",
) -> Path:
    """Run ``notebook`` with papermill into ``output`` (the executed copy, kept even when a cell fails)."""
    # imported here: papermill takes ~4 s to import (measured), and every notebook kernel imports this
    # module for `notebook_params` alone
    import papermill as pm

    notebook = Path(notebook)
    if not notebook.is_absolute() and not notebook.exists():
        notebook = project_root() / notebook
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    env_cwd = str(cwd or project_root())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pm.execute_notebook(
        str(notebook),
        str(output),
        parameters=parameters or {},
        cwd=env_cwd,
        kernel_name=kernel_name,
        progress_bar=progress,
        log_output=False,
    )
    return output


def render_html(executed: str | Path, html: str | Path, with_code: bool = False) -> Path:
    """Render an executed notebook to a standalone HTML file (atomic write)."""
    nb = nbformat.read(str(executed), as_version=4)
    exporter = HTMLExporter(exclude_input=not with_code, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb)
    return atomic_write_text(html, body)


def run_and_render(
    name: str,
    parameters: dict | None = None,
    executed_dir: str | Path = "runs/notebooks",
    html_dir: str | Path = REPORTS,
    progress: bool = True,
) -> Path:
    """Execute ``notebooks/{name}.ipynb`` and render ``reports/{name}.html``; returns the HTML path."""
    executed_dir = Path(executed_dir)
    if not executed_dir.is_absolute():
        executed_dir = project_root() / executed_dir
    executed = execute(NOTEBOOKS / f"{name}.ipynb", executed_dir / f"{name}.ipynb", parameters, progress=progress)
    return render_html(executed, Path(html_dir) / f"{name}.html")


def notebook_params(namespace: dict):
    """The validated :class:`~tfg_mm.config.Params` of a notebook run, from ``globals()``.

    The notebooks' ``parameters`` cells set ``params_file`` and leave the other names at ``None``
    ("not given here"), so a value from ``params_file`` is only overridden by what papermill's
    ``-p name value`` / ``-f file.yaml`` inject. A misspelled injected name fails with a
    did-you-mean (:func:`tfg_mm.config.params_from_notebook`).
    """
    return params_from_notebook({k: v for k, v in namespace.items() if v is not None})
