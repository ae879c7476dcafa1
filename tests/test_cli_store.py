"""``tensorslm compress / evaluate / inspect`` through click's CliRunner, on a tiny model."""
from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner

from tensorslm.cli import cli
from tests.test_evaluate import tiny_llama, word_tokenizer

WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture
def tiny_model_dir(tmp_path):
    path = tmp_path / "tiny-llama"
    tiny_llama(context=32, vocab=len(WORDS) + 2).save_pretrained(path)
    word_tokenizer(WORDS).save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(" ".join(WORDS[(i * 7) % len(WORDS)] for i in range(400)))
    return path


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("args, message", [
    (["--ranks", "6x8", "--ratios", "2"], "give exactly one of --ranks, --ratios, --tolerance; got --ranks and --ratios"),
    ([], "give exactly one of --ranks, --ratios, --tolerance; got none"),
    (["--ranks", "6y8"], "ranks: '6y8' is not a rank list; expected inner TT ranks joined by 'x'"),
    (["--tolerance", "1.5"], "tolerances: '1.5' must be in (0, 1)"),
    (["--ranks", "2x2", "--shape", "8xa"], "'8xa' is not a tensor shape; expected positive integers"),
])
def test_compress_rejects_bad_rung_options(args, message, tiny_model_dir, tmp_path):
    result = run("compress", tiny_model_dir, "-o", tmp_path / "store", *args)
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "store").exists()


def test_compress_unknown_model(tmp_path):
    result = run("compress", "smollm3", "-o", tmp_path / "store", "--ranks", "2x2")
    assert result.exit_code == 1
    assert "Error: unknown model 'smollm3': expected one of the aliases gemma3-270m, smollm2-135m" in result.output


@pytest.mark.parametrize("command", [["inspect"], ["evaluate", "--text", "TEXT"]])
def test_missing_store(command, tmp_path, text_file):
    args = [a if a != "TEXT" else text_file for a in command]
    result = run(*args[:1], tmp_path / "no-store", *args[1:])
    assert result.exit_code == 1 and result.output.startswith("Error: ")
    assert "no-store" in result.output


def test_compress_inspect_evaluate(tiny_model_dir, text_file, tmp_path):
    store = tmp_path / "store"
    result = run("compress", tiny_model_dir, "-o", store, "--ranks", "max,1x1")
    assert result.exit_code == 0, result.output
    assert "tt-max" in result.output and "tt-1x1" in result.output
    assert "body w8a8:" in result.output   # the agent's default body, precomputed with its hash
    # calibrated on text the model wrote itself (no --body-calibration given)
    assert "self-written" in result.output
    from tensorslm.rank_store.store import RankStore

    meta = RankStore.open(store).manifest["bodies"]["w8a8"]["meta"]
    assert re.fullmatch(r"smoothquant:\d+ tokens sha256:[0-9a-f]{12} self-written",
                        meta["calibration"])

    result = run("evaluate", store, "--text", text_file, "--tokens", 200, "--json",
                 tmp_path / "out.json", "--plot", tmp_path / "plot.png",
                 "--body", "fp32,bf16,int8")   # int4 needs in_features a multiple of 32
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out.json").read_text())
    by_name = {r["name"]: r for r in report["results"]}
    assert set(by_name) == {"fp32", "fp16", "int8", "int4", "tt-max", "tt-1x1"}
    assert all(r["tokens"] == 200 and r["head"] == "dense" for r in by_name.values())
    assert by_name["tt-max"]["perplexity"] == pytest.approx(by_name["fp32"]["perplexity"], rel=1e-4)
    assert by_name["tt-1x1"]["rel_error"] > by_name["tt-max"]["rel_error"]
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    # perplexity per body precision, the dense embedding; fp32 through the engine is the model
    body = {name: float(value) for name, value in
            re.findall(r"body (\w+): perplexity ([0-9.]+)", result.output)}
    assert set(body) == {"fp32", "bf16", "int8"}
    assert body["fp32"] == pytest.approx(by_name["fp32"]["perplexity"], rel=1e-4)

    result = run("inspect", store)
    assert result.exit_code == 0, result.output
    assert "ppl dense" in result.output and "(int4)" in result.output
    for name in ("tt-1x1", "int4"):
        assert f"{by_name[name]['perplexity']:.2f}" in result.output


def test_evaluate_missing_text(tiny_model_dir, tmp_path):
    run("compress", tiny_model_dir, "-o", tmp_path / "store", "--ranks", "max")
    result = run("evaluate", tmp_path / "store", "--text", tmp_path / "nothing.txt")
    assert result.exit_code == 1
    assert "text file" in result.output and "nothing.txt does not exist" in result.output


def test_calibration_text_spends_the_budget_on_the_tokens_it_uses(tiny_model_dir, tmp_path):
    from tensorslm.rank_store.rung import reconstruct_rows
    from tensorslm.rank_store.store import RankStore

    calibration = tmp_path / "calibration.txt"
    calibration.write_text(" ".join(WORDS[-6:] * 50))  # the highest ids: the Zipf prior's least used
    used = [len(WORDS) + 2 - 6 + i for i in range(6)]  # their token ids (after <unk>, <s>)
    errors = {}
    for name, extra in (("prior", []), ("calibrated", ["--calibration", calibration])):
        store_dir = tmp_path / name
        result = run("compress", tiny_model_dir, "-o", store_dir, "--recipes", "budget-4+mean+norm+rows", *extra)
        assert result.exit_code == 0, result.output
        store = RankStore.open(store_dir)
        dense = store.load_dense()[used]
        rows = reconstruct_rows(store.load_rung("budget-4_mean_norm_rows"), torch.tensor(used))
        errors[name] = float((rows - dense).norm() / dense.norm())
    assert errors["calibrated"] < 0.5 * errors["prior"], errors  # int8 rows for them instead of int4


def test_calibration_text_must_hold_tokens(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run("compress", tiny_model_dir, "-o", tmp_path / "s", "--recipes", "budget-4+mean+norm+rows",
                 "--calibration", empty)
    assert result.exit_code == 1 and "calibration text" in result.output and "holds no tokens" in result.output
