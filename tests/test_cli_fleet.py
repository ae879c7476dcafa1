"""`tensorslm collect` and `tensorslm dashboard`: thin commands, clean errors, a real server."""
from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest
from pathlib import Path
from click.testing import CliRunner

from tensorslm.cli import cli
from tests.brokers import free_port, wait_for_port

RUN_CLI = [sys.executable, "-c", "from tensorslm.cli import main; main()"]


def test_both_commands_are_registered():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "collect" in result.output and "dashboard" in result.output


@pytest.mark.parametrize("yaml_text, message", [
    (None, "collector.yaml: file not found"),
    ("broker: {url: mqtt://x}\n", "collector.yaml, line 1, field 'database': required field is missing"),
    ("broker:\n  url: ftp://x\ndatabase: c.db\n",
     "collector.yaml, line 2, field 'broker.url': expected a broker URL mqtt://host[:port] or mqtts://host[:port]"),
])
def test_collect_reports_bad_config_without_traceback(tmp_path, yaml_text, message):
    config = tmp_path / "collector.yaml"
    if yaml_text is not None:
        config.write_text(yaml_text)
    result = CliRunner().invoke(cli, ["collect", "--config", str(config)])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_dashboard_reports_missing_metadata(tmp_path):
    result = CliRunner().invoke(cli, ["dashboard", "--db", str(tmp_path / "central.db"),
                                      "--metadata", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert "dashboard metadata not found at" in result.output


def test_default_metadata_is_the_shipped_copy(monkeypatch):
    """The dashboard definition comes from the package data (``tensorslm.deploy``), so an
    install that is not a checkout finds it; when it is missing the error says --metadata."""
    from tensorslm.fleet import dashboard

    repo_copy = Path(__file__).resolve().parents[1] / "deploy" / "dashboard" / "metadata.yaml"
    assert dashboard.default_metadata().read_text() == repo_copy.read_text()
    assert dashboard.load_metadata("x/central.db")["plugins"]["datasette-dashboards"]["fleet"]

    def missing(relative):
        raise FileNotFoundError(f"{relative} is not shipped with this install of tensorslm")

    monkeypatch.setattr(dashboard, "shipped_file", missing)
    with pytest.raises(dashboard.DashboardError, match="pass --metadata"):
        dashboard.default_metadata()


def test_dashboard_command_serves_the_dashboard(tmp_path):
    """`tensorslm dashboard` becomes Datasette: the dashboard page and its database answer,
    and a database that does not exist yet is created empty with the current schema."""
    port = free_port()
    db_path = tmp_path / "fleet-central.db"
    proc = subprocess.Popen(RUN_CLI + ["dashboard", "--db", str(db_path), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port, timeout=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/dashboards/fleet?hours=24",
                                    timeout=10) as response:
            page = response.read().decode()
        assert "tensorslm fleet" in page
        assert "vega-lite.min.js" in page
        # Charts point at the database by its file name, not the template's "central".
        assert '"db": "fleet-central"' in page
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/fleet-central/fleet_status.json",
                                    timeout=10) as response:
            assert response.status == 200
    finally:
        proc.terminate()
        proc.wait(10)
    assert db_path.exists()
