"""Fleet commands: ``tensorslm collect`` (the central collector) and ``tensorslm dashboard``.

Thin: each builds its arguments and calls one library function; the heavy imports (paho,
sqlite-utils, datasette) happen inside the callbacks.
"""
from __future__ import annotations

from pathlib import Path

import click

from .errors import library_errors


@click.command()
@click.option("--config", "config_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="collector.yaml: broker URL, TLS, credentials, prefix, database path "
                   "(see deploy/collector.example.yaml).")
@library_errors
def collect(config_path: Path) -> None:
    """Store every device's query records, status and telemetry in the central database.

    Runs until SIGTERM or Ctrl-C; records published while it is down are delivered when it
    returns (persistent MQTT session).
    """
    from tensorslm.fleet.collector import collect as run_collector

    run_collector(config_path)


@click.command()
@click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The central database written by `tensorslm collect`.")
@click.option("--port", default=8001, show_default=True, type=click.IntRange(1, 65535))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--metadata", "metadata_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Dashboard definition (default: deploy/dashboard/metadata.yaml).")
@library_errors
def dashboard(db_path: Path, port: int, host: str, metadata_path: Path | None) -> None:
    """Serve the fleet dashboard (Datasette) at http://HOST:PORT/-/dashboards/fleet."""
    from tensorslm.fleet.dashboard import serve_dashboard

    serve_dashboard(db_path, host=host, port=port, metadata_path=metadata_path)


COMMANDS = [collect, dashboard]
