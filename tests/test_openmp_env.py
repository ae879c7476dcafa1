"""The OpenMP settings the agent runs with: ``tensorslm`` exports them before any command runs
(an owner's own value wins), the systemd unit sets the same, and nothing forces
``OMP_WAIT_POLICY=PASSIVE`` (it makes a 2-thread decode slower than one thread:
docs/engine.md, Threads)."""
from __future__ import annotations

import os
import sys

import pytest

from tensorslm.cli import main
from tensorslm.constants import OPENMP_ENV


def _run_cli(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["tensorslm", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 0


def test_the_cli_exports_the_openmp_settings_before_a_command_runs(monkeypatch):
    for name in [*OPENMP_ENV, "OMP_WAIT_POLICY"]:
        monkeypatch.delenv(name, raising=False)
    _run_cli(monkeypatch, "--version")
    assert {name: os.environ.get(name) for name in OPENMP_ENV} == OPENMP_ENV
    assert "OMP_WAIT_POLICY" not in os.environ


def test_an_owners_own_openmp_setting_wins(monkeypatch):
    name = next(iter(OPENMP_ENV))
    monkeypatch.setenv(name, "12345")
    _run_cli(monkeypatch, "--version")
    assert os.environ[name] == "12345"


def test_the_agents_unit_runs_with_the_clis_openmp_settings():
    from .test_systemd_units import UNITS, unit_settings

    environment = dict(item.split("=", 1) for line in
                       unit_settings(UNITS / "tensorslm-agent.service")["Environment"]
                       for item in line.split())
    assert {name: environment.get(name) for name in OPENMP_ENV} == OPENMP_ENV
    assert "OMP_WAIT_POLICY" not in environment
