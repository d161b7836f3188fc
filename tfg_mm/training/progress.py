"""The progress of a running run, for the terminal, never for a report.

The trainer appends to ``{run_dir}/progress.jsonl`` (:data:`tfg_mm.paths.PROGRESS_FILE`): one JSON object a line,
every few seconds of training and after every evaluation. ``make all`` prints it in the terminal
(:class:`tfg_mm.workflow.notebooks.ProgressWatcher`); ``tail -f`` works too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tfg_mm.paths import PROGRESS_FILE


def append_progress(run_dir: str | Path, entry: Mapping[str, Any]) -> None:
    """Append ``entry`` (plus its UTC ``time``) as one line of ``{run_dir}/progress.jsonl``.

    Best effort: the progress log is a convenience, so a write that fails never stops a run.
    """
    line = json.dumps({"time": datetime.now(UTC).isoformat(timespec="seconds"), **entry}, default=str)
    try:
        with open(Path(run_dir) / PROGRESS_FILE, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    except OSError:
        pass


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def format_progress(entry: Mapping[str, Any]) -> str:
    """One terminal line of a progress entry (:func:`append_progress`): run, epoch, step, loss, mAP, time left."""
    parts = [f"[{entry.get('run', '?')}]"]
    event = entry.get("event")
    epoch = f"epoch {entry.get('epoch', '?')}/{entry.get('epochs', '?')}"
    if entry.get("stage"):
        epoch += f" (stage {entry['stage']})"
    if event == "train":
        parts.append(f"{epoch} step {entry.get('step', '?')}/{entry.get('steps', '?')}")
        if isinstance(entry.get("loss"), (int, float)):
            parts.append(f"loss {entry['loss']:.4f}")
    elif event == "eval":
        parts.append(f"{epoch} evaluated")
    elif event == "finish":
        parts.append(f"finished: best epoch {entry.get('best_epoch', '?')}, mAP {_fmt(entry.get('best_map'))}")
        entry = {k: v for k, v in entry.items() if k != "map"}
    else:
        parts.append(str(event))
    if isinstance(entry.get("map"), (int, float)):
        parts.append(f"mAP {entry['map']:.4f} / mAP50 {_fmt(entry.get('map50'))} (epoch {entry.get('map_epoch', '?')})")
    if isinstance(entry.get("eta_s"), (int, float)) and event != "finish":
        parts.append(f"~{_duration(entry['eta_s'])} left")
    if isinstance(entry.get("elapsed_s"), (int, float)):
        parts.append(f"{_duration(entry['elapsed_s'])} elapsed")
    return f"{parts[0]} {' · '.join(parts[1:])}"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "?"
