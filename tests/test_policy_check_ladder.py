"""``tensorslm policy check`` against the ladder the policy will drive (--store, --config):
a rung the ladder does not have is an error, as the agent would refuse it at start-up."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tensorslm.cli import cli
from tensorslm.rank_store.compress import compress_table
from tensorslm.rank_store.rung_spec import parse_rung_specs
from tensorslm.rank_store.store import RankStore, SourceInfo

ROOT = Path(__file__).resolve().parents[1]
POLICY = """\
points:
  - {name: full, rung: full}
  - {name: eco, rung: %s}
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    table = torch.randn(80, 24, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("ladder") / "store"
    RankStore.create(path, SourceInfo("toy-model"), table,
                     compress_table(table, parse_rung_specs("2x2"), shape=(2, 3, 4),
                                    progress=False))
    return path


def policy_file(tmp_path, rung: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY % rung)
    return path


def check(*args) -> "Result":
    return CliRunner().invoke(cli, ["policy", "check", *map(str, args)])


def test_a_rung_of_the_ladder_passes(tmp_path, store):
    result = check(policy_file(tmp_path, "tt-2x2"), "--store", store)
    assert result.exit_code == 0, result.output
    assert "OK against the ladder (full, tt-2x2)" in result.output


@pytest.mark.parametrize("via", ["--store", "--config"])
def test_a_rung_the_ladder_lacks_fails_naming_the_valid_ones(tmp_path, store, via):
    policy = policy_file(tmp_path, "r16")
    target = store
    if via == "--config":
        target = tmp_path / "agent.yaml"
        target.write_text(f"device: pi-1\nbroker: {{url: 'mqtt://h'}}\nlog: q.db\n"
                          f"model: {{ref: smollm2-135m, store: {store}}}\n")
    result = check(policy, via, target)
    assert result.exit_code == 1
    assert (f"{policy}, line 3, field 'points[1].rung': expected one of full, tt-2x2; got 'r16'"
            in result.output)


def test_without_a_ladder_the_rung_names_are_not_checked(tmp_path):
    assert check(policy_file(tmp_path, "r16")).exit_code == 0


def test_a_config_without_a_store_serves_only_full(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text("device: pi-1\nbroker: {url: 'mqtt://h'}\nlog: q.db\n"
                      "model: {ref: smollm2-135m}\n")
    result = check(policy_file(tmp_path, "tt-2x2"), "--config", config)
    assert result.exit_code == 1 and "expected one of full; got 'tt-2x2'" in result.output
    assert check(policy_file(tmp_path, "full"), "--config", config).exit_code == 0


def test_store_and_config_together_is_a_usage_error(tmp_path, store):
    result = check(policy_file(tmp_path, "full"), "--store", store, "--config", tmp_path / "a")
    assert result.exit_code == 2 and "give --store or --config, not both" in result.output


def test_a_missing_store_is_one_clear_error(tmp_path):
    result = check(policy_file(tmp_path, "full"), "--store", tmp_path / "nowhere")
    assert result.exit_code == 1 and "nowhere" in result.output
    assert "Traceback" not in result.output
