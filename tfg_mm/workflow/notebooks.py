"""Executing the project's notebooks with papermill and rendering them with nbconvert.

Notebooks stay thin; this module is the one place that knows how they are run: the generic
``python3`` kernel of whichever environment runs them, the repository root as working directory,
and an HTML report that is standalone (images embedded as base64) and, by default, shows no code.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

import nbformat
import papermill as pm
from nbconvert import HTMLExporter
from tqdm import tqdm

from tfg_mm import errors
from tfg_mm.io import atomic_write_text
from tfg_mm.paths import PROGRESS_FILE, portable_text, project_root, resolve_path
from tfg_mm.training.progress import format_progress

log = logging.getLogger(__name__)

NOTEBOOKS = project_root() / "notebooks"
REPORTS = project_root() / "reports"
#: Where :func:`render_html` puts the stderr of an executed notebook (next to it), out of the report.
STDERR_SUFFIX = ".stderr.txt"
#: Kernel options of every execution: ipykernel's start-up warning ("Kernel is running over TCP
#: without encryption") goes to the kernel's stderr, which for a notebook run from inside another
#: notebook (the grid of notebook 03) is that notebook's cell output.
KERNEL_ARGUMENTS = ("--IPKernelApp.log_level=ERROR",)

_PROGRESS = re.compile(r"\r|\d+%\||\d(?:\.\d+)?\s*(?:it/s|s/it)\]|\bExecuting:? +\d")
_WARNING = re.compile(r"\b\w*Warning:|\bWARNING\b|^\s*warn(?:ing)?s?:", re.MULTILINE)


class _UnknownParameterFilter(logging.Filter):
    """Drops papermill's "Passed unknown parameter" warning.

    The notebooks' ``parameters`` cells list a few names; every other parameter of
    :class:`tfg_mm.config.Params` is injected as well and validated by :func:`notebook_params`
    (a misspelled one fails there with a did-you-mean), so the warning says nothing and, for the
    grid's executions inside notebook 03, would land in that notebook's report.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Passed unknown parameter")


def report_noise(notebook) -> list[str]:
    """What in an executed notebook does not belong on a thesis page, one line per output.

    Every ``stderr`` stream, and any stream that looks like a library progress bar or a warning.
    ``notebook`` is a path or a notebook (``nbformat`` node or dict). Empty: a clean report.
    """
    nb = nbformat.read(str(notebook), as_version=4) if isinstance(notebook, (str, Path)) else notebook
    found = []
    for index, cell in enumerate(nb["cells"]):
        for output in cell.get("outputs", []):
            if output.get("output_type") != "stream":
                continue
            text = "".join(output.get("text", ""))
            name = output.get("name")
            if name == "stderr" or _PROGRESS.search(text) or _WARNING.search(text):
                found.append(f"cell {index} ({name}): {text.strip()[:200]!r}")
    return found


def _strip_stderr(nb) -> str:
    """Remove the ``stderr`` streams of ``nb`` (in place); returns their text."""
    removed = []
    for cell in nb.cells:
        outputs = cell.get("outputs")
        if not outputs:
            continue
        kept = []
        for output in outputs:
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                removed.append("".join(output.get("text", "")))
            else:
                kept.append(output)
        cell["outputs"] = kept
    return "".join(removed)


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
    notebook = Path(notebook)
    if not notebook.is_absolute() and not notebook.exists():
        notebook = project_root() / notebook
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    env_cwd = str(cwd or project_root())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    papermill_log = logging.getLogger("papermill")
    if not any(isinstance(f, _UnknownParameterFilter) for f in papermill_log.filters):
        papermill_log.addFilter(_UnknownParameterFilter())
    try:
        pm.execute_notebook(
            str(notebook),
            str(output),
            parameters=parameters or {},
            cwd=env_cwd,
            kernel_name=kernel_name,
            progress_bar=progress,
            log_output=False,
            extra_arguments=list(KERNEL_ARGUMENTS),
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
    """Render an executed notebook to a standalone HTML file (atomic write).

    A report is a thesis page: ``stderr`` streams (library progress bars, warnings, logs) are left
    out of it and kept in ``<executed>.stderr.txt`` next to the executed notebook (which keeps them
    too); the file is removed when there is nothing to keep. The sources are silenced where they
    start (:func:`notebook_params`, :data:`KERNEL_ARGUMENTS`, papermill's parameter warning), so
    this is the safety net, and ``tests/test_notebooks.py`` checks :func:`report_noise` is empty.
    """
    nb = nbformat.read(str(executed), as_version=4)
    stderr = _strip_stderr(nb)
    stderr_file = Path(executed).with_name(Path(executed).name + STDERR_SUFFIX)
    if stderr.strip():
        atomic_write_text(stderr_file, stderr)
    else:
        stderr_file.unlink(missing_ok=True)
    exporter = HTMLExporter(exclude_input=not with_code, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb)
    return atomic_write_text(html, body)


class ProgressWatcher:
    """Prints the training progress of the runs a notebook trains in the terminal, while it runs.

    A thread reads ``progress.jsonl`` (:data:`tfg_mm.paths.PROGRESS_FILE`, written by the trainer) in
    each of ``folders`` and in the run folders up to two levels below them (the grid's
    ``<variant>/seed<k>``) every ``interval`` seconds, and prints one line per new entry
    (:func:`tfg_mm.training.progress.format_progress`) to ``stream`` (default: the terminal's stderr, through
    ``tqdm.write`` so papermill's cell counter stays intact). Lines that were in a file before the
    watcher started are skipped: a reused run prints nothing. The notebook and its report never see it.
    """

    def __init__(self, folders: Iterable[str | Path], stream=None, interval: float = 3.0):
        self.folders = [resolve_path(f) for f in folders]
        self.stream = stream
        self.interval = interval
        self._offsets: dict[Path, int] = {path: path.stat().st_size for path in self._files()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _files(self) -> list[Path]:
        found = []
        for folder in self.folders:
            for pattern in (PROGRESS_FILE, f"*/{PROGRESS_FILE}", f"*/*/{PROGRESS_FILE}"):
                found.extend(folder.glob(pattern))
        return sorted(set(found))

    def poll(self) -> list[str]:
        """Print (and return) the lines of every entry appended since the last poll."""
        lines = []
        for path in self._files():
            try:
                size = path.stat().st_size
                offset = self._offsets.get(path, 0)
                if size < offset:  # the run folder was started over
                    offset = 0
                with open(path, "rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read(size - offset)
            except OSError:
                continue
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits for the next poll
            self._offsets[path] = offset + len(complete)
            for raw in complete.decode("utf-8", errors="replace").splitlines():
                try:
                    lines.append(format_progress(json.loads(raw)))
                except (ValueError, TypeError, AttributeError):
                    continue
        for line in lines:
            tqdm.write(line, file=self.stream or sys.stderr)
        return lines

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def __enter__(self) -> ProgressWatcher:
        self._thread = threading.Thread(target=self._run, name="tfg_mm-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.poll()  # what the last interval appended


def run_and_render(
    name: str,
    parameters: dict | None = None,
    executed_dir: str | Path = "runs/notebooks",
    html_dir: str | Path = REPORTS,
    progress: bool = True,
) -> Path:
    """Execute ``notebooks/{name}.ipynb`` and render ``reports/{name}.html``; returns the HTML path.

    With ``progress``, the terminal shows papermill's cell counter and the epoch-level progress of
    the runs the notebook trains (:class:`ProgressWatcher` on its ``run_dir`` and ``baseline``).
    """
    executed_dir = Path(executed_dir)
    if not executed_dir.is_absolute():
        executed_dir = project_root() / executed_dir
    folders = [v for k, v in (parameters or {}).items() if k in ("run_dir", "baseline") and v]
    with ProgressWatcher(folders if progress else []):
        executed = execute(NOTEBOOKS / f"{name}.ipynb", executed_dir / f"{name}.ipynb", parameters, progress=progress)
    html = render_html(executed, Path(html_dir) / f"{name}.html")
    stderr_file = executed.with_name(executed.name + STDERR_SUFFIX)
    if stderr_file.exists():
        log.warning("%s wrote to stderr (kept out of its report): see %s", name, portable_text(str(stderr_file)))
    return html
