"""Thesis-ready figures and tables from run contracts, and the reports index (``reports/index.html``).

Everything here only draws what it is given: run contracts (``metrics.json``, :mod:`tfg_mm.training.runs`),
a run's saved detections and analysis, and the ablation summary that :func:`tfg_mm.ablations.summarize` computes
from the run folders. It never loads a checkpoint or runs a model, so a report can always be rebuilt from the run
folders (``python -m tfg_mm report``). One module a job:

* :mod:`.provenance`: the run card (where a number came from) and the metrics table;
* :mod:`.curves`: training curves of a run (trajectory, per-class AP and Δ, gate, losses);
* :mod:`.errors`: error analysis (PR / F1 curves, operating points, confusion matrix, TIDE breakdown);
* :mod:`.judgement`: a run on its held-out test split next to its validation numbers;
* :mod:`.deployment`: a run's size and speed per runtime (``deploy.json``), baseline vs phase 2;
* :mod:`.galleries`: detections drawn on validation images, baseline vs phase 2, the flips;
* :mod:`.ablations`: the Δ tables and figures of a grid;
* :mod:`.index`: ``reports/index.html``;
* :mod:`.data`: the dataset report of notebook 00 (class and box statistics, samples);
* :mod:`.figures`: how figures are written (PNG + SVG) and styled.

The notebooks' API is re-exported here: ``from tfg_mm import reporting; reporting.plot_trajectory(metrics)``.
"""

from tfg_mm.reporting.ablations import (
    ablation_table,
    baseline_spread_table,
    covers_once,
    plot_ablation_gates,
    plot_ablation_trajectories,
    plot_delta_heatmap,
    plot_wise_curve,
    show_ablation_tables,
)
from tfg_mm.reporting.curves import plot_gate, plot_losses, plot_per_class, plot_per_class_delta, plot_trajectory
from tfg_mm.reporting.deployment import deployment_comparison, deployment_table, read_deployments, show_deployment
from tfg_mm.reporting.errors import (
    error_comparison,
    error_table,
    operating_points_table,
    plot_confusion,
    plot_error_breakdown,
    plot_f1_curves,
    plot_pr_curves,
    read_analysis,
    show_error_analysis,
)
from tfg_mm.reporting.figures import save_figure
from tfg_mm.reporting.galleries import flips_summary, phase2_flips, show_galleries, show_side_by_side
from tfg_mm.reporting.index import NOTEBOOK_REPORTS, build_index, phase2_run_of
from tfg_mm.reporting.judgement import show_test_results, test_operating_points_table, test_table
from tfg_mm.reporting.lowshot import lowshot_table, lowshot_verdict, plot_lowshot, read_lowshot
from tfg_mm.reporting.provenance import (
    baseline_final_of,
    contract_field,
    environment_summary,
    final_table,
    provenance_markdown,
    show_provenance,
)

__all__ = [
    "NOTEBOOK_REPORTS",
    "ablation_table",
    "baseline_final_of",
    "baseline_spread_table",
    "covers_once",
    "deployment_comparison",
    "deployment_table",
    "build_index",
    "contract_field",
    "environment_summary",
    "error_comparison",
    "error_table",
    "final_table",
    "flips_summary",
    "operating_points_table",
    "phase2_flips",
    "phase2_run_of",
    "plot_lowshot",
    "lowshot_table",
    "lowshot_verdict",
    "read_lowshot",
    "plot_ablation_gates",
    "plot_ablation_trajectories",
    "plot_confusion",
    "plot_delta_heatmap",
    "plot_error_breakdown",
    "plot_f1_curves",
    "plot_gate",
    "plot_losses",
    "plot_per_class",
    "plot_per_class_delta",
    "plot_pr_curves",
    "plot_trajectory",
    "plot_wise_curve",
    "provenance_markdown",
    "read_analysis",
    "read_deployments",
    "save_figure",
    "show_ablation_tables",
    "show_error_analysis",
    "show_deployment",
    "show_galleries",
    "show_provenance",
    "show_side_by_side",
    "show_test_results",
    "test_operating_points_table",
    "test_table",
]
