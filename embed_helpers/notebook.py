"""Run `notebooks/run.ipynb` through papermill, taking parameters as people type them."""
from __future__ import annotations

import ast
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from .constants import NOTEBOOK_PATH, PROJECT_ROOT
from .errors import ConfigError
from .run_files import utc_stamp

log = logging.getLogger(__name__)


def parse_param(assignment: str) -> tuple[str, Any]:
    """`NAME=VALUE` -> (NAME, value); numbers, booleans and None become Python values.

    >>> parse_param("EMBED_BATCH_SIZE=128")
    ('EMBED_BATCH_SIZE', 128)
    >>> parse_param("RESET_TABLE=True")
    ('RESET_TABLE', True)
    >>> parse_param("DATA_PATH=data/x.csv")
    ('DATA_PATH', 'data/x.csv')
    >>> parse_param("EMBED_BATCH_SIZE=abc")
    ('EMBED_BATCH_SIZE', 'abc')
    """
    name, sep, raw = assignment.partition("=")
    if not sep or not name.strip().isidentifier():
        raise ConfigError("--param", f"expected NAME=VALUE, got {assignment!r}")
    raw = raw.strip()
    if raw.lower() in ("true", "false"):
        return name.strip(), raw.lower() == "true"
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return name.strip(), value


def default_output() -> Path:
    """<EMBED_RUNS_DIR>/run-<UTC time>.ipynb (EMBED_RUNS_DIR from the environment or .env)."""
    from .config import load_settings
    return Path(load_settings().EMBED_RUNS_DIR) / f"run-{utc_stamp()}.ipynb"


def _secrets_to_environment(parameters: dict) -> dict:
    """Secrets given as parameters (`PARAMS="DATABASE_URL=..."`) reach the kernel through
    its environment instead: papermill writes parameters into the executed notebook."""
    import os
    from .config import SECRET_NAMES
    for name in SECRET_NAMES:
        if name in parameters:
            os.environ[name] = str(parameters.pop(name))
    return parameters


def run_notebook(params: Sequence[str] = (), out: Path | str | None = None,
                 notebook: Path = NOTEBOOK_PATH) -> tuple[Path, dict | None]:
    """Execute the notebook; return the executed notebook's path and its run report."""
    import papermill

    out = Path(out).resolve() if out else default_output()
    out.parent.mkdir(parents=True, exist_ok=True)
    parameters = _secrets_to_environment(dict(parse_param(p) for p in params))
    report_path = out.with_suffix(".report.json")
    parameters.setdefault("RUN_REPORT_PATH", str(report_path))
    log.info("executing %s -> %s", notebook, out)
    papermill.execute_notebook(str(notebook), str(out), parameters=parameters,
                               cwd=str(PROJECT_ROOT), progress_bar=False)
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    return out, report


def strip_volatile_outputs(path: Path | str = NOTEBOOK_PATH) -> int:
    """Drop what an executed notebook should not keep: progress bars and warnings (stderr
    streams) and the execution timestamps. Returns how many outputs were dropped.
    `make notebook` calls it before the notebook is committed."""
    path = Path(path)
    notebook = json.loads(path.read_text())
    dropped = 0
    for cell in notebook["cells"]:
        cell.get("metadata", {}).pop("execution", None)
        kept = [o for o in cell.get("outputs", [])
                if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
        dropped += len(cell.get("outputs", [])) - len(kept)
        if "outputs" in cell:
            cell["outputs"] = kept
    path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
    return dropped
