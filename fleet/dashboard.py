"""The fleet dashboard: Datasette with datasette-dashboards over the central database.

``tensorslm dashboard --db central.db`` runs ``datasette serve`` with the metadata of
``deploy/dashboard/metadata.yaml``: a dashboard at ``/-/dashboards/fleet`` whose charts read
the views of :mod:`tensorslm.fleet.central_db`. The charts are Vega-Lite, rendered by the vega,
vega-lite and vega-embed files that datasette-dashboards ships as static files, so the page
works on a network without internet access.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .central_db import CentralDB
from .errors import FleetError
from tensorslm.shipped import shipped_file

log = logging.getLogger(__name__)

TEMPLATE_DB = "central"          # the database name used in metadata.yaml
DASHBOARD_SLUG = "fleet"
PLUGIN = "datasette-dashboards"


class DashboardError(FleetError, RuntimeError):
    """The dashboard cannot start (missing metadata, Datasette or its plugin)."""


def load_metadata(db_path: str | Path, metadata_path: str | Path | None = None) -> dict[str, Any]:
    """The Datasette metadata with every ``db: central`` pointed at ``db_path``'s name."""
    source = Path(metadata_path) if metadata_path is not None else default_metadata()
    try:
        metadata = yaml.safe_load(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DashboardError(f"dashboard metadata not found at {source}; pass --metadata with "
                             f"the path of deploy/dashboard/metadata.yaml") from None
    except yaml.YAMLError as exc:
        raise DashboardError(f"dashboard metadata {source} is not valid YAML: {exc}") from None
    dashboards = (metadata or {}).get("plugins", {}).get(PLUGIN)
    if not isinstance(dashboards, dict) or not dashboards:
        raise DashboardError(f"{source} has no plugins.{PLUGIN} section; expected a mapping "
                             f"of dashboards with their charts")
    return rename_database(metadata, TEMPLATE_DB, database_name(db_path))


def default_metadata() -> Path:
    """The dashboard definition shipped with the package (``deploy/dashboard/metadata.yaml``)."""
    try:
        return shipped_file("dashboard/metadata.yaml")
    except FileNotFoundError as exc:
        raise DashboardError(f"{exc}; pass --metadata with the path of "
                             f"deploy/dashboard/metadata.yaml") from None


def database_name(db_path: str | Path) -> str:
    """The name Datasette gives a database file: its file name without the suffix."""
    return Path(db_path).stem


def rename_database(metadata: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """A copy of ``metadata`` whose charts, filters and database section use ``new``."""
    result = copy.deepcopy(metadata)
    databases = result.get("databases", {})
    if old in databases and old != new:
        databases[new] = databases.pop(old)
    for dashboard in result["plugins"][PLUGIN].values():
        for item in list(dashboard.get("charts", {}).values()) + list(
                dashboard.get("filters", {}).values()):
            if item.get("db") == old:
                item["db"] = new
    return result


def datasette_command(db_path: str | Path, metadata_file: str | Path, *,
                      host: str = "127.0.0.1", port: int = 8001) -> list[str]:
    """The ``datasette serve`` command line for the dashboard."""
    executable = Path(sys.executable).with_name("datasette")
    program = [str(executable)] if executable.exists() else (
        [shutil.which("datasette")] if shutil.which("datasette") else [sys.executable, "-m", "datasette"])
    return [*program, "serve", str(db_path), "--metadata", str(metadata_file),
            "--host", host, "--port", str(port),
            "--setting", "sql_time_limit_ms", "5000",
            # time series are bucketed to at most 150 points per series (metadata.yaml)
            "--setting", "max_returned_rows", "20000",
            "--setting", "default_cache_ttl", "0"]


def check_plugin() -> None:
    """Datasette and datasette-dashboards are in the ``dashboard`` extra; say so if absent."""
    try:
        import datasette  # noqa: F401
        import datasette_dashboards  # noqa: F401
    except ImportError as exc:
        raise DashboardError(f"{exc.name} is not installed; install the dashboard extra: "
                             f"pip install 'tensorslm[dashboard]'") from None


def prepare(db_path: str | Path, *, metadata_path: str | Path | None = None,
            workdir: str | Path | None = None) -> Path:
    """Make sure the database has the current schema and views (creating an empty one if
    the collector has not run yet) and write the metadata JSON. Returns the metadata file."""
    db_path = Path(db_path)
    if not db_path.exists():
        log.warning("no central database at %s yet; creating an empty one (tensorslm collect "
                    "fills it)", db_path)
    CentralDB(db_path).close()
    metadata = load_metadata(db_path, metadata_path)
    out_dir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="tensorslm-dashboard-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata_file = out_dir / "metadata.json"
    metadata_file.write_text(json.dumps(metadata, indent=1), encoding="utf-8")
    return metadata_file


def start_dashboard(db_path: str | Path, *, host: str = "127.0.0.1", port: int = 8001,
                    metadata_path: str | Path | None = None,
                    workdir: str | Path | None = None, **popen: Any) -> subprocess.Popen:
    """Start Datasette in the background (tests, embedding); the caller stops it."""
    check_plugin()
    metadata_file = prepare(db_path, metadata_path=metadata_path, workdir=workdir)
    command = datasette_command(db_path, metadata_file, host=host, port=port)
    log.info("starting the dashboard: %s", " ".join(command))
    return subprocess.Popen(command, **popen)


def serve_dashboard(db_path: str | Path, *, host: str = "127.0.0.1", port: int = 8001,
                    metadata_path: str | Path | None = None) -> None:
    """Replace this process with Datasette (``tensorslm dashboard``): signals such as
    systemd's SIGTERM then reach Datasette directly."""
    check_plugin()
    metadata_file = prepare(db_path, metadata_path=metadata_path)
    command = datasette_command(db_path, metadata_file, host=host, port=port)
    log.info("dashboard at http://%s:%d/-/dashboards/%s", host, port, DASHBOARD_SLUG)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
