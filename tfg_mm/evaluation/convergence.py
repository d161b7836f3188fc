"""Whether a run's validation metric had stopped rising when its training ended.

A run compared with another must have finished learning, or the comparison measures the schedule. The
check looks at the last quarter of the run's evaluated epochs (at least the last three evaluations): a
straight line is fitted to the validation metric there, and the gain it implies over that window is set
against the window's own epoch-to-epoch noise (the one-sided ``confidence`` bound of the fitted gain,
Student's t on the residuals, and never under ``MIN_GAIN``). A gain above that bound is "still rising"; a loss below minus the bound is
"falling" (the selection then chose an earlier epoch); anything between is "converged" (a plateau within
noise). Fewer than three evaluated epochs: "not assessed".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

#: The share of the run's epochs that the check looks at, and the fewest evaluations it fits.
WINDOW_FRACTION = 0.25
MIN_POINTS = 3
#: The smallest gain called a change however smooth the curve (0.1 mAP point: below what the reports print).
MIN_GAIN = 0.001


def convergence(
    history: Sequence[Mapping], metric: str = "map", confidence: float = 0.95, fraction: float = WINDOW_FRACTION
) -> dict:
    """``{"verdict", "still_rising", "metric", "epochs", "gain", "observed_gain", "noise", "slope_per_epoch",
    "sentence"}`` of a run's ``history`` (epoch 0, the untrained start, is left out)."""
    points = [
        (int(h["epoch"]), float(h[metric]))
        for h in history
        if int(h.get("epoch", 0)) >= 1 and h.get(metric) is not None and np.isfinite(h[metric])
    ]
    if len(points) < MIN_POINTS:
        return {
            "verdict": "not assessed",
            "still_rising": None,
            "metric": metric,
            "sentence": f"not assessed: {len(points)} evaluated epoch(s), the check needs {MIN_POINTS}",
        }
    last = points[-1][0]
    window = [p for p in points if p[0] >= last * (1 - fraction)]
    if len(window) < MIN_POINTS:
        window = points[-MIN_POINTS:]
    x = np.array([p[0] for p in window], dtype=float)
    y = np.array([p[1] for p in window], dtype=float)
    fit = stats.linregress(x, y)
    span = float(x[-1] - x[0])
    gain = float(fit.slope) * span
    noise = float(stats.t.ppf(confidence, len(x) - 2) * fit.stderr * span) if np.isfinite(fit.stderr) else 0.0
    noise = max(noise, MIN_GAIN)
    verdict = "still rising" if gain > noise else "falling" if gain < -noise else "converged"
    epochs = f"epochs {int(x[0])}-{int(x[-1])}"
    name = {"map": "mAP", "map50": "mAP50"}.get(metric, metric)
    sentence = {
        "still rising": f"still rising: validation {name} {gain:+.4f} over {epochs} (a trend of "
        f"{fit.slope:+.4f} per epoch, above its noise of ±{noise:.4f}); more epochs would likely raise it",
        "falling": f"falling: validation {name} {gain:+.4f} over {epochs} (beyond its noise of ±{noise:.4f}); "
        "the selection keeps an earlier epoch",
        "converged": f"converged: validation {name} {gain:+.4f} over {epochs}, within its noise of ±{noise:.4f}",
    }[verdict]
    return {
        "verdict": verdict,
        "still_rising": verdict == "still rising",
        "metric": metric,
        "epochs": [int(x[0]), int(x[-1])],
        "gain": round(gain, 6),
        "observed_gain": round(float(y[-1] - y[0]), 6),
        "noise": round(noise, 6),
        "slope_per_epoch": round(float(fit.slope), 6),
        "confidence": confidence,
        "sentence": sentence,
    }
