"""The distribution as a user gets it: the wheel built from a copy of this tree, installed into
a fresh venv, works outside the checkout: one ``tensorslm`` import namespace, the console
script, and the demo's policy shipped as package data.

The new venv gets the wheel only (``--no-deps``); its dependencies (torch, transformers, ...)
come from this project's venv through a path line, so nothing is downloaded. That path line
does not run the venv's ``.pth`` hooks, so the editable install of the checkout stays out.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "tensorslm", "agent", "controller", "rank_store",
           "fleet", "deploy")


def run(*args: str | Path, cwd: Path) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the fresh venv's python, a folder outside the checkout to run it from)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(path, source / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "-w", work / "dist", source, cwd=work)
    wheel, = (work / "dist").glob("tensorslm-*.whl")
    venv = work / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=work)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel,
        cwd=work)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                    cwd=work).strip())
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    outside = work / "elsewhere"
    outside.mkdir()
    return python, outside


def test_the_installed_wheel_imports_from_its_own_site_packages(installed):
    python, outside = installed
    out = run(python, "-c", "import tensorslm, tensorslm.agent.daemon, tensorslm.fleet.collector, "
              "tensorslm.controller.decision.control_loop, tensorslm.rank_store.store; "
              "print(tensorslm.__file__)", cwd=outside)
    installed_at = Path(out.strip())
    assert ROOT not in installed_at.parents and python.parent.parent in installed_at.parents


def test_the_command_and_the_demo_policy_work_outside_the_checkout(installed):
    python, outside = installed
    help_text = run(python.parent / "tensorslm", "demo", "--help", cwd=outside)
    assert "Usage: tensorslm demo [OPTIONS]" in help_text and "--policy" in help_text
    assert "Usage: tensorslm [OPTIONS] COMMAND" in run(python, "-m", "tensorslm", "--help",
                                                       cwd=outside)
    policy = Path(run(python, "-c", "from tensorslm.cli.demo import DemoOptions; "
                      "print(DemoOptions().policy)", cwd=outside).strip())
    assert python.parent.parent in policy.parents and policy.name == "battery.yaml"
    out = run(python, "-c", "from tensorslm.controller.decision.policy import load_policy; "
              "from tensorslm.cli.demo import DemoOptions; "
              "print(load_policy(DemoOptions().policy).names)", cwd=outside)
    assert out.strip().startswith("[")


@pytest.mark.parametrize("relative", ["agent.example.yaml", "collector.example.yaml",
                                      "dashboard/metadata.yaml", "traces/discharge.csv",
                                      "systemd/tensorslm-agent.service"])
def test_deploy_files_ship_as_package_data(installed, relative):
    python, outside = installed
    path = Path(run(python, "-c", f"from tensorslm.shipped import shipped_file; "
                    f"print(shipped_file({relative!r}))", cwd=outside).strip())
    assert python.parent.parent in path.parents and path.stat().st_size > 0
