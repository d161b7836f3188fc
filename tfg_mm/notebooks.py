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
from transformers.utils import logging as transformers_logging

from tfg_mm import errors
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
    """Run ``notebook`` with papermill into ``output`` (the executed copy, kept even when a cell fails).

    A cell that raises one of the project's errors (:mod:`tfg_mm.errors`) re-raises that error here,
    with its message first and the notebook, cell and executed copy named after it, instead of
    papermill's ``PapermillExecutionError`` (whose text is the kernel's whole traceback). The
    papermill attributes (``ename``, ``evalue``, ``cell_index``, ``source``, ``traceback``) are kept
    on it. Any other error is papermill's, unchanged.
    """
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
    try:
        pm.execute_notebook(
            str(notebook),
            str(output),
            parameters=parameters or {},
            cwd=env_cwd,
            kernel_name=kernel_name,
            progress_bar=progress,
            log_output=False,
        )
    except pm.PapermillExecutionError as exc:
        project_error = _project_error(exc, notebook, output)
        if project_error is None:
            raise
        raise project_error from None
    return output


def _project_error(exc, notebook: Path, output: Path) -> Exception | None:
    """The project's error a notebook cell raised, as that class, or None for any other error."""
    cls = getattr(errors, str(getattr(exc, "ename", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, (errors.TfgError, errors.TrainingError))):
        return None
    where = f"cell {exc.exec_count}" if getattr(exc, "exec_count", None) else f"cell #{exc.cell_index}"
    error = cls(f"{exc.evalue}\n(raised in notebook {notebook.name}, {where}; the executed notebook: {output})")
    for attr in ("ename", "evalue", "cell_index", "exec_count", "source", "traceback"):
        setattr(error, attr, getattr(exc, attr, None))
    return error


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
    # A notebook is a thesis page: transformers' per-save / per-load progress bars ("Writing model shards",
    # "Loading weights") would fill its stderr blocks. The terminal (CLI) keeps them.
    transformers_logging.disable_progress_bar()
    return params_from_notebook({k: v for k, v in namespace.items() if v is not None})
