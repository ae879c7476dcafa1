"""What a first ``tensorslm compress`` meets: an existing output directory is refused before
the model is loaded, recipe rungs show a progress bar, an unreachable hub is one line."""
from __future__ import annotations

import logging
import time

import pytest
import torch
from click.testing import CliRunner

from tensorslm.cli import cli
from tensorslm.rank_store import models
from tensorslm.rank_store.compress import compress_table
from tensorslm.rank_store.errors import StoreExistsError
from tensorslm.rank_store.ladder import build_ladder
from tensorslm.rank_store.rung_spec import parse_rung_specs


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load a model fails the test: the check must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr(models, "load_model", refuse)


def test_compress_into_an_existing_directory_names_overwrite(tmp_path, no_model_loading):
    out = tmp_path / "store"
    out.mkdir()
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["compress", "smollm2-135m", "-o", str(out), "--ranks", "8x8"])
    assert result.exit_code == 2
    assert f"{out} already exists; give --overwrite to replace it" in result.output
    assert time.monotonic() - started < 2


def test_build_ladder_checks_the_destination_before_loading(tmp_path, no_model_loading):
    out = tmp_path / "not-a-store"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(StoreExistsError, match="already exists; pass overwrite=True"):
        build_ladder("smollm2-135m", out, parse_rung_specs(ranks="8x8"))
    with pytest.raises(StoreExistsError, match="is not a rank store"):
        build_ladder("smollm2-135m", out, parse_rung_specs(ranks="8x8"), overwrite=True)


def test_recipe_rungs_show_a_progress_bar(capsys):
    table = torch.randn(256, 24, generator=torch.Generator().manual_seed(0))
    specs = parse_rung_specs(recipes="tt-max+mean+int8,row+int8")
    compress_table(table, specs, shape=(2, 3, 4), progress=True)
    err = capsys.readouterr().err
    assert "rungs: 100%" in err and "2/2" in err and "row_int8" in err   # the spec name
    compress_table(table, specs, shape=(2, 3, 4), progress=False)
    assert "rungs" not in capsys.readouterr().err


def test_an_unreachable_hub_is_one_line_at_once(monkeypatch, caplog):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")   # .invalid never resolves
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG):
        result = CliRunner().invoke(cli, ["compress", "someorg/somemodel", "-o",
                                          "/nonexistent/out", "--ranks", "8x8"])
    assert time.monotonic() - started < 10
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: could not fetch 'someorg/somemodel': the Hugging Face hub "
                               "is unreachable here (hub.invalid:443: ")
    assert "aliases gemma3-270m, smollm2-135m" in lines[0]
    assert not [r for r in caplog.records if r.name.startswith(("huggingface_hub", "transformers"))]
