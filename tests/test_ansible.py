"""The rollout playbook, run by ansible-playbook against localhost (``-c local``).

Two inventory hosts, pi-01 and pi-02, are both this machine with their paths in a temporary
directory; the user, the venv and systemd are switched off by inventory variables (nothing here
may create users, download torch or talk to systemd), so the handlers show in the output as
notified-but-skipped, which is what "restarts only where something changed" is checked on.
"""
from __future__ import annotations

import getpass
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from tensorslm.agent.config import load_config

ROOT = Path(__file__).resolve().parents[1]
ANSIBLE = ROOT / "deploy" / "ansible"
PLAYBOOK = shutil.which("ansible-playbook", path=str(Path(sys.executable).parent)) or shutil.which(
    "ansible-playbook")
RESTART = "tensorslm_agent : Restart tensorslm-agent"
HOSTS = ("pi-01", "pi-02")


@pytest.fixture(scope="module", autouse=True)
def _ansible():
    if PLAYBOOK is None:
        pytest.fail("ansible-playbook not found; it comes with the test extra (ansible-core)")


def make_ladder(path: Path, tag: str) -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(f'{{"ladder": "{tag}"}}\n')
    (path / "rung-8.npz").write_bytes(tag.encode() * 100)
    return path


class Fleet:
    """An inventory of two local 'Pis' under tmp_path and ansible-playbook runs against it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.env = {**os.environ, "ANSIBLE_HOME": str(tmp_path / ".ansible"), "ANSIBLE_NOCOLOR": "1",
                    "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_RETRY_FILES_ENABLED": "0",
                    "ANSIBLE_LOCALHOST_WARNING": "0", "ANSIBLE_CONFIG": str(tmp_path / "none.cfg")}
        self.ladders = {tag: make_ladder(tmp_path / "release" / tag, tag) for tag in ("v1", "v2", "v3", "v4")}
        self.host_vars = {host: {} for host in HOSTS}
        self.group_vars = {"tensorslm_ladder_src": str(self.ladders["v1"]),
                           "tensorslm_ladder_version": "v1",
                           "tensorslm_power": {"kind": "simulated",
                                               "load_board": "raspberry-pi-4"},
                           # the fake ladders are no rank stores: no policy check against them
                           "tensorslm_check_cli": ""}
        # Both hosts in one batch: faster runs (the verification step uses batches of 1).
        # `serial` is a play keyword, so it only takes extra vars, not inventory vars.
        self.serial = "100%"

    def pi(self, host: str) -> Path:
        return self.tmp / host

    def write_inventory(self) -> Path:
        me = getpass.getuser()
        hosts = {}
        for host in HOSTS:
            base = self.pi(host)
            hosts[host] = {
                "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                "ansible_become": False,
                "tensorslm_opt": f"{base}/opt/tensorslm", "tensorslm_etc": f"{base}/etc/tensorslm",
                "tensorslm_state": f"{base}/var/lib/tensorslm",
                "tensorslm_unit_dir": f"{base}/etc/systemd/system",
                "tensorslm_user": me, "tensorslm_owner": me, "tensorslm_manage_user": False,
                "tensorslm_manage_venv": False, "tensorslm_systemd": False,
                "tensorslm_broker_password": f"pw-{host}", "tensorslm_group": "lab",
                **self.host_vars[host],
            }
        inventory = {"all": {"children": {"tensorslm_agents": {"hosts": hosts,
                                                               "vars": self.group_vars}}}}
        path = self.tmp / "inventory.yml"
        path.write_text(yaml.safe_dump(inventory))
        return path

    def run(self, playbook: str, *args: str, check: bool = True) -> "Run":
        result = subprocess.run([PLAYBOOK, "-i", str(self.write_inventory()), str(ANSIBLE / playbook),
                                 "-e", f"tensorslm_serial={self.serial}", *args],
                                capture_output=True, text=True, env=self.env, timeout=300)
        if check and result.returncode != 0:
            raise AssertionError(f"ansible-playbook {playbook} failed:\n{result.stdout}\n{result.stderr}")
        return Run(result)

    def link(self, host: str, name: str) -> str | None:
        path = self.pi(host) / "var/lib/tensorslm/ladders" / name
        return os.readlink(path) if path.is_symlink() else None

    def ladder_dirs(self, host: str) -> list[str]:
        ladders = self.pi(host) / "var/lib/tensorslm/ladders"
        return sorted(p.name for p in ladders.iterdir() if p.is_dir() and not p.is_symlink())


class Run:
    """What each task did on each host, read from the default callback's output."""

    _TASK = re.compile(r"^(?:TASK|RUNNING HANDLER) \[(.+)\] \**$")
    _RESULT = re.compile(r"^(ok|changed|skipping|failed|fatal): \[([^\]]+)\]")
    _RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)")

    def __init__(self, result: subprocess.CompletedProcess) -> None:
        self.result = result
        self.stdout = result.stdout
        self.events: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        self.changed: dict[str, int] = {}
        task = None
        for line in result.stdout.splitlines():
            if m := self._TASK.match(line):
                task = m.group(1)
            elif (m := self._RESULT.match(line)) and task is not None:
                self.events[task][m.group(2)].append(m.group(1))
            elif m := self._RECAP.match(line):
                self.changed[m.group(1)] = int(m.group(3))

    def restarted(self) -> set[str]:
        """Hosts on which the restart handler was notified (it is skipped: no systemd here)."""
        return set(self.events.get(RESTART, {}))


@pytest.fixture
def fleet(tmp_path) -> Fleet:
    return Fleet(tmp_path)


@pytest.mark.parametrize("playbook", ["site.yml", "rollback.yml"])
def test_syntax_check(playbook):
    result = subprocess.run([PLAYBOOK, "--syntax-check", "-i", str(ANSIBLE / "inventory.example.yml"),
                             str(ANSIBLE / playbook)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"playbook: {ANSIBLE / playbook}" in result.stdout


@pytest.mark.slow   # runs the playbooks against a fleet of local hosts
def test_check_mode_reports_the_changes_and_writes_nothing(fleet):
    run = fleet.run("site.yml", "--check", "--diff")
    assert run.changed == {"pi-01": run.changed["pi-01"], "pi-02": run.changed["pi-02"]}
    assert run.changed["pi-01"] >= 5
    assert run.restarted() == set(HOSTS)
    assert "+device: pi-01" in run.stdout and "+device: pi-02" in run.stdout  # the --diff of agent.yaml
    assert not fleet.pi("pi-01").exists() and not fleet.pi("pi-02").exists()


@pytest.mark.slow   # runs the playbooks against a fleet of local hosts
def test_rollout_lifecycle(fleet):
    """One fleet through its life: first rollout, a re-run, a new ladder on one Pi, a rollback,
    a third ladder with a config change elsewhere, and a ladder that fails verification."""
    first = fleet.run("site.yml")
    assert first.restarted() == set(HOSTS)
    for host in HOSTS:
        etc = fleet.pi(host) / "etc/tensorslm"
        config = load_config(etc / "agent.yaml")   # the agent's own reader accepts what we wrote
        assert (config.device, config.group, config.topic_prefix) == (host, "lab", "tensorslm")
        assert config.broker.username == host and config.broker.password == f"pw-{host}"
        assert config.model.store == fleet.pi(host) / "var/lib/tensorslm/ladders/current"
        assert config.policy_path == etc / "policy.yaml"
        assert (etc / "policy.yaml").read_text() == (ROOT / "deploy/policies/battery.yaml").read_text()
        assert config.power.plain == {"kind": "simulated", "load_board": "raspberry-pi-4"}
        assert (etc / "broker.password").read_text() == f"pw-{host}\n"
        assert (etc / "broker.password").stat().st_mode & 0o777 == 0o640
        assert (fleet.pi(host) / "etc/systemd/system/tensorslm-agent.service").read_text() == (
            ROOT / "deploy/systemd/tensorslm-agent.service").read_text()
        assert fleet.link(host, "current") == "v1" and fleet.link(host, "previous") is None

    # Nothing changed: nothing restarted.
    again = fleet.run("site.yml")
    assert again.changed == {"pi-01": 0, "pi-02": 0}
    assert again.restarted() == set()

    # A new ladder on pi-01 only: pi-01 restarts, pi-02 is left alone; `previous` keeps v1.
    fleet.host_vars["pi-01"].update(tensorslm_ladder_src=str(fleet.ladders["v2"]),
                                    tensorslm_ladder_version="v2")
    update = fleet.run("site.yml")
    assert update.restarted() == {"pi-01"} and update.changed["pi-02"] == 0
    assert (fleet.link("pi-01", "current"), fleet.link("pi-01", "previous")) == ("v2", "v1")
    current = fleet.pi("pi-01") / "var/lib/tensorslm/ladders/current"
    assert (current / "manifest.json").read_text() == '{"ladder": "v2"}\n'
    assert (fleet.link("pi-02", "current"), fleet.link("pi-02", "previous")) == ("v1", None)

    # Roll pi-01 back.
    back = fleet.run("rollback.yml", "--limit", "pi-01")
    assert back.restarted() == {"pi-01"}
    assert (fleet.link("pi-01", "current"), fleet.link("pi-01", "previous")) == ("v1", "v2")

    # A third ladder on pi-01 (the one neither current nor previous is removed) and a config
    # change on pi-02: both restart, pi-02 for its one changed file.
    fleet.host_vars["pi-01"].update(tensorslm_ladder_src=str(fleet.ladders["v3"]),
                                    tensorslm_ladder_version="v3")
    fleet.host_vars["pi-02"]["tensorslm_serving"] = {"queue_size": 4}
    third = fleet.run("site.yml")
    assert third.restarted() == set(HOSTS) and third.changed["pi-02"] == 1
    assert (fleet.link("pi-01", "current"), fleet.link("pi-01", "previous")) == ("v3", "v1")
    assert fleet.ladder_dirs("pi-01") == ["v1", "v3"]
    config = yaml.safe_load((fleet.pi("pi-02") / "etc/tensorslm/agent.yaml").read_text())
    assert config["serving"] == {"queue_size": 4}

    # A ladder that fails verification never goes live; batches of one Pi with
    # max_fail_percentage 0: the first batch fails and the second never starts.
    for host in HOSTS:
        fleet.host_vars[host].update(tensorslm_ladder_src=str(fleet.ladders["v4"]),
                                     tensorslm_ladder_version="v4", tensorslm_ladder_verify_cmd="false")
    fleet.serial = "1"
    bad = fleet.run("site.yml", check=False)
    assert bad.result.returncode != 0
    assert bad.events["tensorslm_agent : Ladder verified before it goes live"] == {"pi-01": ["fatal"]}
    assert fleet.link("pi-01", "current") == "v3" and fleet.link("pi-02", "current") == "v1"
    assert bad.restarted() == set()


@pytest.mark.slow   # runs the playbooks against a fleet of local hosts
def test_rollback_without_a_previous_ladder_fails_clearly(fleet):
    run = fleet.run("rollback.yml", check=False)
    assert run.result.returncode != 0
    assert "nothing to roll back to" in run.stdout
    assert not fleet.pi("pi-01").exists()


@pytest.mark.slow   # runs the playbooks against a fleet of local hosts
def test_inventory_mistakes_are_refused_before_anything_changes(fleet):
    fleet.host_vars["pi-01"]["tensorslm_device"] = "pi 01"
    run = fleet.run("site.yml", "--limit", "pi-01", check=False)
    assert run.result.returncode != 0 and "must be one MQTT topic level" in run.stdout
    assert not fleet.pi("pi-01").exists()


@pytest.mark.slow   # runs the playbooks against a fleet of local hosts
def test_a_policy_without_a_power_source_is_refused(fleet):
    del fleet.group_vars["tensorslm_power"]
    run = fleet.run("site.yml", "--limit", "pi-01", check=False)
    assert run.result.returncode != 0
    assert "gets the policy" in run.stdout and "but no power source" in run.stdout
    assert not (fleet.pi("pi-01") / "etc/tensorslm/agent.yaml").exists()


def test_the_example_inventory_gives_every_group_a_power_source():
    inventory = yaml.safe_load((ANSIBLE / "inventory.example.yml").read_text())
    agents = inventory["all"]["children"]["tensorslm_agents"]
    assert agents["vars"]["tensorslm_policy_src"]
    for group in agents["children"].values():
        power = {**agents["vars"], **group.get("vars", {})}["tensorslm_power"]
        assert power["kind"] in ("ups", "fuel_gauge", "estimated", "simulated"), power


@pytest.mark.slow   # runs the playbooks against a fleet of local hosts
def test_a_policy_naming_a_rung_the_ladder_lacks_stops_the_rollout(fleet, tmp_path):
    import torch

    from tensorslm.rank_store.compress import compress_table
    from tensorslm.rank_store.rung_spec import parse_rung_specs
    from tensorslm.rank_store.store import RankStore, SourceInfo

    table = torch.randn(80, 24, generator=torch.Generator().manual_seed(0))
    store = tmp_path / "release" / "real"
    RankStore.create(store, SourceInfo("toy-model"), table,
                     compress_table(table, parse_rung_specs("2x2"), shape=(2, 3, 4),
                                    progress=False))
    policy = tmp_path / "policy.yaml"
    policy.write_text("points:\n  - {name: full, rung: full}\n  - {name: eco, rung: tt-9x9}\n")
    fleet.group_vars.update(tensorslm_ladder_src=str(store), tensorslm_ladder_version="real",
                            tensorslm_policy_src=str(policy),
                            tensorslm_check_cli=str(Path(sys.executable).parent / "tensorslm"))
    bad = fleet.run("site.yml", "--limit", "pi-01", check=False)
    assert bad.result.returncode != 0
    assert bad.events["tensorslm_agent : Policy fits the configured ladder"] == {"pi-01": ["fatal"]}
    assert "expected one of full, tt-2x2; got 'tt-9x9'" in bad.stdout

    policy.write_text("points:\n  - {name: full, rung: full}\n  - {name: eco, rung: tt-2x2}\n")
    good = fleet.run("site.yml", "--limit", "pi-01")
    assert good.events["tensorslm_agent : Policy fits the configured ladder"] == {"pi-01": ["ok"]}
