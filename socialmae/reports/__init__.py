"""Read-only views of a project's pipeline outputs for the numbered notebooks.

Where the project and its MLflow store are, the data overview (manifests, the per-clip table,
validation, class balance, face crops with their fbank), the paper's Fig. 2 for chosen clips,
and the paper's results tables (Tables I-III) built from the MLflow fine-tuning runs, with
bootstrap confidence intervals and, where a baseline was given, paired p-values.

Figures are ``matplotlib.figure.Figure`` objects made without pyplot (no global state); nothing
here writes into the project.
"""

from __future__ import annotations

from socialmae.layout import FACES, RAW, VALIDATION
from socialmae.reports.data import (
    class_balance,
    pick_clips,
    plot_clip_distributions,
    plot_face_grid,
    quarantine_reasons,
    read_clips,
    read_manifests,
    read_validation,
    split_summary,
)
from socialmae.reports.pretraining import (
    plot_curves,
    reconstruction_figures,
)
from socialmae.reports.project import (
    PROJECT_ENV,
    execute_notebook,
    load_params,
    project_root,
    tasks,
    tracking_uri,
)
from socialmae.reports.results import (
    MISSING,
    MODE_HEADINGS,
    MODE_NAMES,
    MODES,
    OURS,
    PAPER_TABLE_I,
    PAPER_TABLE_II,
    PAPER_TABLE_III,
    PAPER_TABLES,
    PAPER_TASKS,
    RESULT_COLUMNS,
    TRAIT_HEADINGS,
    FinetuneRun,
    confusion_table,
    format_cell,
    latest_finetune_runs,
    mode_table,
    paper_table,
    promotion_decision,
    registered_versions,
    results_frame,
    run_predictions,
    runs_frame,
    table_i,
    table_ii,
    table_iii,
    table_metrics,
)

__all__ = [
    "FACES",
    "MISSING",
    "MODES",
    "MODE_HEADINGS",
    "MODE_NAMES",
    "OURS",
    "PAPER_TABLES",
    "PAPER_TABLE_I",
    "PAPER_TABLE_II",
    "PAPER_TABLE_III",
    "PAPER_TASKS",
    "PROJECT_ENV",
    "RAW",
    "RESULT_COLUMNS",
    "TRAIT_HEADINGS",
    "VALIDATION",
    "FinetuneRun",
    "class_balance",
    "confusion_table",
    "execute_notebook",
    "format_cell",
    "latest_finetune_runs",
    "load_params",
    "mode_table",
    "paper_table",
    "pick_clips",
    "plot_clip_distributions",
    "plot_curves",
    "plot_face_grid",
    "project_root",
    "promotion_decision",
    "quarantine_reasons",
    "read_clips",
    "read_manifests",
    "read_validation",
    "reconstruction_figures",
    "registered_versions",
    "results_frame",
    "run_predictions",
    "runs_frame",
    "split_summary",
    "table_i",
    "table_ii",
    "table_iii",
    "table_metrics",
    "tasks",
    "tracking_uri",
]
