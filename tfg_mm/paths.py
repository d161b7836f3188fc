"""Where things are: the project root, user paths resolved against it, a run's paths, and the report folders.

The bottom of the library (it imports nothing of tfg_mm): every module that needs a folder asks here.

* :func:`project_root` / :func:`resolve_path`: relative paths in params resolve against the checkout, so the same
  params file works from the repository root, from ``notebooks/`` and under papermill.
* :class:`RunPaths`: one run's absolute paths, resolved once from its validated params, with the files a run
  folder holds (the contract, its detections and analysis, the resumable state, ...).
* :func:`portable_text`: a text with this machine's folders replaced, for reports (no machine paths on a thesis page).
* :func:`reports_dir` / :func:`figures_dir`: where reports and figures go; ``TFG_MM_REPORTS_DIR`` and
  ``TFG_MM_FIGURES_DIR`` redirect them (papermill kernels inherit them: the ablation runner sets the figures folder
  of every notebook-02 execution of the grid, so twenty variants do not overwrite the main run's figures; tests use
  both).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path


def project_root() -> Path:
    """The source checkout holding this package (the folder with ``pyproject.toml``), else the cwd.

    Relative paths in params resolve here, so the same params file works from the repository root,
    from ``notebooks/`` (Jupyter's working directory) and under papermill.
    """
    checkout = Path(__file__).resolve().parent.parent
    return checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()


def resolve_path(path: str | Path) -> Path:
    """An absolute path: relative ones are taken against :func:`project_root`."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_root() / path


def portable_text(text: str) -> str:
    """``text`` with this machine's absolute folders replaced, for reports (a thesis page shows no machine path).

    The project root becomes a relative path (``.`` alone; a ``.venv`` inside it stays ``.venv/...``), a
    Python environment elsewhere ``{python env}`` (no angle brackets: Markdown would take them for a tag)
    and the home folder ``~``; other paths (a user's own data elsewhere) stay as they are.
    """
    prefixes = [(project_root(), ""), (Path.home(), "~")]
    if not Path(sys.prefix).is_relative_to(project_root()):
        prefixes.append((Path(sys.prefix), "{python env}"))
    for prefix, shown in sorted(prefixes, key=lambda p: -len(str(p[0]))):
        if str(prefix) in ("/", ""):
            continue
        pattern = re.escape(str(prefix)) + r"(/|(?![\w.-]))"
        text = re.sub(pattern, lambda m, s=shown: (f"{s}/" if s else "") if m.group(1) else (s or "."), text)
    return text


#: The files of a run folder, named once (:class:`RunPaths` gives their absolute paths).
METRICS_FILE = "metrics.json"
#: Written when a run folder is prepared: only folders carrying it (or a metrics.json) are ever emptied.
MARKER_FILE = ".tfg_mm_run"
#: The resumable state the trainer writes after each saved epoch.
STATE_FILE = "state/last.pt"
#: The traceback of a failed run (named in ``failure.traceback``).
TRACEBACK_FILE = "traceback.txt"
#: The training progress log (one JSON object a line; the terminal reads it, never a report).
PROGRESS_FILE = "progress.jsonl"
#: The selected checkpoint's validation detections (COCO results list).
DETECTIONS_FILE = "detections_val.json"
#: Re-predicted detections of a run that did not keep them (the statistics' cache).
DETECTIONS_CACHE = "detections_val.cache.json"
#: The error analysis of the selected checkpoint's validation detections (curves, confusion matrix).
ANALYSIS_FILE = "analysis.json"
#: The checkpoints folder: ``best`` (the selected epoch) and ``last``.
CHECKPOINTS_DIR = "checkpoints"
#: A held-out split's judgement of a checkpoint (``test``: ``final.test`` of the run): its detections of the
#: selected checkpoint (``detections_test.json``), of the last (``detections_test_last.json``), the PR curves
#: (``analysis_test.json``), and what ``python -m tfg_mm evaluate`` writes (``evaluation_<split>.json``).
SPLIT_DETECTIONS = "detections_{split}{which}.json"
SPLIT_ANALYSIS = "analysis_{split}.json"
EVALUATION_FILE = "evaluation_{split}.json"


@dataclass(frozen=True)
class RunPaths:
    """The absolute paths of one run, resolved once (:func:`resolve_path`) from its validated params
    (:meth:`of`) or from a run folder (:meth:`at`), and the files inside its folder.

    The params keep the paths as written: relative ones stay relative in the run contract, so a
    run's id does not depend on where the checkout lives. The code that runs uses these.
    """

    #: ``run_dir``
    run_dir: Path
    #: ``dataset`` (the embedded default is generated there on first use); None for a folder read back
    dataset: Path | None = None
    #: where the detector's weights come from: ``checkpoint``, else ``pretrained``; None for a random init
    source: Path | None = None

    @classmethod
    def of(cls, params) -> RunPaths:
        source = params.checkpoint or params.pretrained
        return cls(
            run_dir=resolve_path(params.run_dir),
            dataset=resolve_path(params.dataset),
            source=resolve_path(source) if source else None,
        )

    @classmethod
    def at(cls, run_dir: str | Path) -> RunPaths:
        """The files of the run folder ``run_dir`` (a user path: relative to the project root)."""
        return cls(run_dir=resolve_path(run_dir))

    @property
    def metrics(self) -> Path:
        return self.run_dir / METRICS_FILE

    @property
    def marker(self) -> Path:
        return self.run_dir / MARKER_FILE

    @property
    def state(self) -> Path:
        return self.run_dir / STATE_FILE

    @property
    def traceback(self) -> Path:
        return self.run_dir / TRACEBACK_FILE

    @property
    def progress(self) -> Path:
        return self.run_dir / PROGRESS_FILE

    @property
    def detections(self) -> Path:
        return self.run_dir / DETECTIONS_FILE

    @property
    def detections_cache(self) -> Path:
        return self.run_dir / DETECTIONS_CACHE

    @property
    def analysis(self) -> Path:
        return self.run_dir / ANALYSIS_FILE

    def split_detections(self, split: str, which: str = "selected") -> Path:
        """The detections of the selected (or ``last``) checkpoint on ``split`` (``val`` is :attr:`detections`)."""
        if split == "val" and which == "selected":
            return self.detections
        return self.run_dir / SPLIT_DETECTIONS.format(split=split, which="" if which == "selected" else f"_{which}")

    def split_analysis(self, split: str) -> Path:
        return self.analysis if split == "val" else self.run_dir / SPLIT_ANALYSIS.format(split=split)

    def evaluation(self, split: str) -> Path:
        return self.run_dir / EVALUATION_FILE.format(split=split)

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / CHECKPOINTS_DIR

    @property
    def best(self) -> Path:
        """The selected checkpoint."""
        return self.checkpoints / "best"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last"


def reports_dir() -> Path:
    """``<project root>/reports`` unless ``TFG_MM_REPORTS_DIR`` redirects it."""
    override = os.environ.get("TFG_MM_REPORTS_DIR")
    return Path(override) if override else project_root() / "reports"


def figures_dir() -> Path:
    """``<reports>/figures`` unless ``TFG_MM_FIGURES_DIR`` redirects it."""
    override = os.environ.get("TFG_MM_FIGURES_DIR")
    return Path(override) if override else reports_dir() / "figures"
