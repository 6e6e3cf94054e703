"""What a run leaves in EMBED_RUNS_DIR: its report, the rows that failed, names by time.

Every name carries the UTC time, so runs sort by when they ran and never overwrite
each other, whichever engine or process wrote them.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from .config import relative

log = logging.getLogger(__name__)


def utc_stamp(micro: bool = False) -> str:
    """The UTC time in run output names (`runs/run-<stamp>.ipynb`): sortable, no colons.
    With microseconds, workers finishing in the same second keep separate files."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S{'%f' if micro else ''}Z}"


def default_report_path(settings=None) -> Path:
    """<EMBED_RUNS_DIR>/report-<UTC time>.json, for notebook runs not given RUN_REPORT_PATH."""
    from .constants import DEFAULT_RUNS_DIR
    folder = settings.EMBED_RUNS_DIR if settings is not None else DEFAULT_RUNS_DIR
    return Path(folder) / f"report-{utc_stamp()}.json"


def write_failures(failures: list[dict], folder: Path) -> str:
    """The rows that got no vector, one JSON object per line; "" when there are none."""
    if not failures:
        return ""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"failures-{utc_stamp(micro=True)}.jsonl"
    with open(path, "w") as fh:
        for failure in failures:
            fh.write(json.dumps(failure) + "\n")
    log.warning("%d rows failed; listed in %s", len(failures), relative(path))
    return str(path)
