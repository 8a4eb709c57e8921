"""The ``validate`` stage: Great Expectations checks over ``clips.parquet`` and the manifest.

Per-clip problems (silent audio, too few face detections, bad labels, ...) quarantine the clip;
the stage fails only when a threshold is crossed: too many clips quarantined, a speaker in two
splits, duplicate clip ids, manifest clips missing from the clip table, or classes too
imbalanced. Modules: :mod:`.checks` (thresholds and expectations), :mod:`.expectations`
(Great Expectations plumbing), :mod:`.stage` (the stage and its outputs).

Outputs (all written atomically under ``out_dir``):

* ``validation.json``: the Great Expectations results (one per suite),
* ``data_docs/index.html``: the Data Docs site (built offline; the pages load their styles
  from public CDNs when viewed),
* ``quarantine.csv`` (clip_id, path, reason) and ``accepted.csv`` (clip_id, dataset, split),
* ``balance.json``: accepted clips per dataset x split x label and the imbalance ratios,
* ``metrics.json``: counts, quarantine fraction, per-reason counts and success flags.
"""

from socialmae.data.validate.checks import (
    REQUIRED_COLUMNS,
    UNLABELLED_DATASETS,
    ValidationThresholds,
)
from socialmae.data.validate.expectations import CLIPS_SUITE, DATA_DOCS_DIR, MANIFEST_SUITE
from socialmae.data.validate.stage import (
    OUTPUTS,
    ValidationFailed,
    ValidationReport,
    run_validate,
    validate,
)

__all__ = [
    "CLIPS_SUITE",
    "DATA_DOCS_DIR",
    "MANIFEST_SUITE",
    "OUTPUTS",
    "REQUIRED_COLUMNS",
    "UNLABELLED_DATASETS",
    "ValidationFailed",
    "ValidationReport",
    "ValidationThresholds",
    "run_validate",
    "validate",
]
