"""Serve the retraining flow on this machine, on a schedule, without a work pool:

    python -m flows.serve                        # cron "0 3 * * 1" (Mondays 03:00 UTC)
    python -m flows.serve --cron "0 2 * * *" --root /data/socialmae
    python -m flows.serve --interval 86400       # daily, the first run right after start

Run it from the repository root (the flow's code is loaded from flows/retrain.py) with
PREFECT_API_URL pointing at the Prefect server; one retraining runs at a time.
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Sequence
from pathlib import Path

from prefect.schedules import Cron, Interval, Schedule

from flows.retrain import retrain

CRON = "0 3 * * 1"  # the same schedule as prefect.yaml's deployment
DEPLOYMENT = "retrain"
FIRST_RUN_DELAY = datetime.timedelta(seconds=10)  # lets the scheduler see the first slot ahead


def schedule(cron: str | None = None, interval: float | None = None) -> Schedule:
    """A cron schedule, or every ``interval`` seconds starting shortly after now."""
    if interval is None:
        return Cron(cron or CRON, timezone="UTC")
    if interval <= 0:
        raise ValueError(f"interval must be > 0 seconds, got {interval}")
    start = datetime.datetime.now(datetime.UTC) + FIRST_RUN_DELAY
    return Interval(datetime.timedelta(seconds=interval), anchor_date=start)


def main(argv: Sequence[str] | None = None) -> None:
    """Create (or update) the deployment and run its scheduled flow runs until stopped."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.serve", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--cron", default=CRON, help=f"cron schedule (default {CRON!r}, UTC)")
    when.add_argument("--interval", type=float, help="seconds between runs instead of cron")
    parser.add_argument("--root", default=".", help="the project (default: this directory)")
    parser.add_argument("--name", default=DEPLOYMENT, help="deployment name")
    args = parser.parse_args(argv)
    retrain.serve(
        name=args.name,
        schedule=schedule(args.cron, args.interval),
        parameters={"root": str(Path(args.root).resolve())},
        limit=1,  # DVC takes a repository lock: one retraining at a time
    )


if __name__ == "__main__":
    main()
