"""Great Expectations plumbing: an offline ephemeral context, suites run over DataFrames and
the Data Docs site."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from socialmae.io import atomic_directory

CLIPS_SUITE = "socialmae_clips"
MANIFEST_SUITE = "socialmae_manifest_coverage"
DOCS_SITE = "socialmae"
DATA_DOCS_DIR = "data_docs"


@dataclass(frozen=True)
class Check:
    """One expectation plus how its unexpected rows are read.

    ``reason`` turns a failing row into a quarantine reason (row-level checks); ``category``
    is the key of the per-reason counts; ``stage`` marks checks whose failure fails the stage.
    """

    key: str
    expectation: Any
    category: str = ""
    reason: Callable[[pd.Series], str] | None = None
    stage: bool = False


def gx_module() -> Any:
    """Import Great Expectations lazily (slow), with analytics off and its logger quiet.

    ``GX_ANALYTICS_ENABLED`` is only set when unset; GE's logger only gets WARNING when no
    level was configured for it (its import logs hundreds of INFO lines otherwise).
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:
        gx_logger.setLevel(logging.WARNING)
    import great_expectations

    return great_expectations


def _context(docs_dir: Path) -> Any:
    """An ephemeral GX context (in-memory stores) whose one Data Docs site is ``docs_dir``."""
    gx = gx_module()
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={
            DOCS_SITE: {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    return gx.get_context(mode="ephemeral", project_config=config, cloud_mode=False)


def _run_suite(
    context: Any, name: str, frame: pd.DataFrame, checks: list[Check]
) -> tuple[Any, dict[str, Any]]:
    """Validate ``frame`` against ``checks``; returns (GX result, check key -> GX result)."""
    gx = gx_module()

    asset = context.data_sources.add_pandas(name).add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("whole_table")
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    for check in checks:
        check.expectation.meta = {"check": check.key, "stage": check.stage}
        suite.add_expectation(check.expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=name, data=batch, suite=suite)
    )
    result = definition.run(
        batch_parameters={"dataframe": frame},
        result_format={
            "result_format": "COMPLETE",
            "unexpected_index_column_names": ["row", "clip_id"],
        },
    )
    by_key = {r.expectation_config.meta["check"]: r for r in result.results}
    return result, by_key


def failing_rows(result: Any) -> list[int]:
    rows = (result.result or {}).get("unexpected_index_list") or []
    return [int(r["row"]) for r in rows]


def run_expectations(
    frame: pd.DataFrame, coverage: pd.DataFrame, checks: list[Check], out: Path
) -> tuple[Any, Any, dict[str, Any], list[Check]]:
    """Run the clip suite on ``frame`` and the manifest-coverage suite on ``coverage`` with
    Great Expectations, and build the Data Docs site in ``out``; the two suite results, every
    check's result by key, and the coverage checks."""
    gx = gx_module()
    coverage_checks = [
        Check(
            "manifest_clips_present",
            gx.expectations.ExpectColumnValuesToBeInSet(column="in_clip_table", value_set=[True]),
            stage=True,
        )
    ]
    results: dict[str, tuple[Any, dict[str, Any]]] = {}

    def build(docs_dir: Path) -> None:
        context = _context(docs_dir)
        results[CLIPS_SUITE] = _run_suite(context, CLIPS_SUITE, frame, checks)
        results[MANIFEST_SUITE] = _run_suite(context, MANIFEST_SUITE, coverage, coverage_checks)
        context.build_data_docs(site_names=[DOCS_SITE])

    atomic_directory(out / DATA_DOCS_DIR, build)
    (clips_result, by_key), (cover_result, cover_by_key) = results.values()
    return clips_result, cover_result, {**by_key, **cover_by_key}, coverage_checks
