"""What a run is: its identity (:func:`run_id`) and what besides params and data decides its numbers.

* :func:`code_version`: package version, git commit and dirty flag, and a hash of the package sources;
* :func:`environment`: the library versions, CPU model and kernel capability, threads, GPU / CUDA of the process;
* :func:`run_id`: a hash of what determines a run's result (params minus :data:`RUN_ID_EXCLUDED`, the dataset's
  content hash, the code, and what the run depends on: phase 2's baseline, the number of processes). A finished
  run with the same id is reused instead of trained again; an interrupted one is resumed only by the same id.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import platform
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import tfg_mm
from tfg_mm.config import EXECUTOR_KEYS, Params, load_params

#: Distributions whose versions decide a number (the ones not installed are recorded as None).
ENVIRONMENT_PACKAGES = (
    "torch",
    "torchvision",
    "transformers",
    "numpy",
    "pycocotools",
    "faster-coco-eval",
    "open_clip_torch",
    "accelerate",
)

#: Parameters that cannot change a run's result, so two runs differing only in them share a run id.
RUN_ID_EXCLUDED = frozenset(
    {
        # where and how the run is stored and executed (the brief's list)
        "run_dir",
        "overwrite",
        "resume",
        "device",
        "num_workers",
        "pin_memory",
        # how the optimiser update / the attention are computed: `foreach` (the default) is bit-identical to
        # `for-loop`; `fused`, the attention kinds, `compile` and `memory_format` differ by float rounding only, like
        # another `device`
        # (tests/test_speed.py)
        "optimizer_impl",
        "attn_implementation",
        "compile",
        "memory_format",
        # checkpoint frequency and the embedding cache location change no number
        "save_every",
        "text_cache_dir",
        # grid-level settings of the ablation runner: adding a seed to `seeds` must not invalidate
        # the finished runs of the other seeds
        "grid",
        "seeds",
        "workers",
        "reuse",
        "bootstrap_resamples",
        "confidence",
        *EXECUTOR_KEYS,  # where a grid run executes (local, SLURM) changes none of its numbers
        # where the run is also logged (MLflow / TensorBoard): a copy of what metrics.json holds
        "tracking",
        "tracking_uri",
        "experiment_name",
        # how the notebooks measure the finished run's speed (deploy.json), after training
        "deploy_benchmark_runs",
    }
)
#: Parameters that may change when an interrupted run resumes: exactly those that cannot change its
#: result (:data:`RUN_ID_EXCLUDED`), so that a resumed run is the same run (same ``run_id``). The
#: contract records their latest values. Any other difference is refused (:func:`check_run_dir`).
RESUME_MAY_CHANGE = RUN_ID_EXCLUDED
#: The resumable state the trainer writes (:meth:`tfg_mm.training.loop.Trainer.save_state`), relative to the run folder.

#: What the provenance's ``git_dirty`` flag looks at, relative to the repository root: the sources,
#: notebooks, params and scripts (not ``reports/``, ``runs/`` or ``data/``, which runs write).
DIRTY_PATHS = ("tfg_mm", "notebooks", "params", "scripts", "pyproject.toml")


def _git(args: Sequence[str], cwd: Path) -> str | None:
    """Output of a read-only git command, or None outside a repository / without git."""
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def _code_version() -> tuple[tuple[str, Any], ...]:
    package_dir = Path(tfg_mm.__file__).resolve().parent
    digest = hashlib.sha256()
    for source in sorted(package_dir.rglob("*.py")):
        digest.update(source.relative_to(package_dir).as_posix().encode() + b"\0")
        digest.update(source.read_bytes() + b"\0")
    commit, dirty = git_state(package_dir)
    return (
        ("package", tfg_mm.__version__),
        ("git_commit", commit),
        ("git_dirty", dirty),
        ("source_sha256", digest.hexdigest()),
    )


def git_state(folder: Path) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the checkout that holds ``folder``; ``(None, None)`` outside git.

    ``dirty`` looks only at what decides a run's numbers (:data:`DIRTY_PATHS`, tracked changes and
    untracked files alike), relative to the repository root: the reports, runs and data that
    ``make all`` itself writes do not make a fresh clone "dirty".
    """
    commit = _git(["rev-parse", "HEAD"], folder)
    top = _git(["rev-parse", "--show-toplevel"], folder) if commit else None
    if not commit or not top:
        return None, None
    status = _git(["status", "--porcelain", "--", *DIRTY_PATHS], Path(top.strip()))
    return commit.strip(), bool(status.strip()) if status is not None else None


def code_version() -> dict:
    """``{"package", "git_commit", "git_dirty", "source_sha256"}`` of the code this process runs.

    ``git_commit`` / ``git_dirty`` are None outside a git checkout (or before the first commit);
    ``source_sha256`` hashes the package's ``.py`` files, so uncommitted edits are still told
    apart. Computed once per process: the code that was imported is the code that ran.
    """
    return dict(_code_version())


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """What besides params, data and code decides a run's numbers, for ``metrics.json``.

    Float results depend on the kernels that ran: the libraries' versions, the CPU's vector
    capability that torch dispatches to (``AVX512`` / ``AVX2`` / ``DEFAULT``, settable with
    ``ATEN_CPU_CAPABILITY``), the number of threads a reduction is split over, and on a GPU its
    model and the CUDA / cuDNN versions. Two runs that differ here can differ in their numbers by
    more than the digits quoted, so quote seed spread, not digits. Read when the contract is
    written: the thread count and deterministic flag are those in force during the run.
    """
    cuda = torch.cuda.is_available()
    deterministic = "off"
    if torch.are_deterministic_algorithms_enabled():
        deterministic = "warn only" if torch.is_deterministic_algorithms_warn_only_enabled() else "on"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        # torch.__version__ carries the build (e.g. "+cu130" / "+cpu"), the distribution version does not
        "packages": {name: torch.__version__ if name == "torch" else _version(name) for name in ENVIRONMENT_PACKAGES},
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": deterministic,
        "gpu": torch.cuda.get_device_name(torch.cuda.current_device()) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": str(torch.backends.cudnn.version()) if cuda and torch.backends.cudnn.is_available() else None,
    }


def with_world_size(depends_on: str, world_size: int) -> str:
    """What a run depends on, with its number of processes when there are several (data parallelism).

    The global batch is ``batch_size`` x processes, so a run of 2 processes is another run than one of
    1 process with the same params: another run id. A one-process run's ``depends_on`` (and id) is unchanged.
    """
    return depends_on if world_size == 1 else f"{depends_on};world_size={world_size}"


def world_size_of(depends_on: str) -> int:
    """The number of processes :func:`with_world_size` folded into ``depends_on`` (1 when none)."""
    for part in depends_on.split(";"):
        if part.startswith("world_size="):
            return int(part.split("=", 1)[1])
    return 1


def run_id(params: Params | Mapping[str, Any], dataset_hash: str, code: Mapping[str, Any], depends_on: str = "") -> str:
    """Stable 16-hex-digit id of what determines a run's result.

    Hashes the params minus :data:`RUN_ID_EXCLUDED`, the dataset hash, and the code version minus
    ``git_dirty`` (a report written into the checkout makes it dirty without changing any code;
    ``source_sha256`` already tells edited code apart).
    """
    if not isinstance(params, Params):
        params = load_params(params, source_names=["run_id(params=...)"])
    payload = {
        "params": {k: v for k, v in params.model_dump(mode="json").items() if k not in RUN_ID_EXCLUDED},
        "dataset": dataset_hash,
        "code": {k: v for k, v in code.items() if k != "git_dirty"},
    }
    if depends_on:
        payload["depends_on"] = depends_on
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
