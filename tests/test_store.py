from __future__ import annotations

import json

import pytest
import torch

from tensorslm.rank_store.compress import compress_table
from tensorslm.rank_store.errors import (
    ResultsFormatError,
    StoreCorruptError,
    StoreExistsError,
    StoreNotFoundError,
    StoreSourceMismatchError,
    StoreVersionError,
    UnknownRungError,
)
from tensorslm.rank_store.rung import reconstruct_rows
from tensorslm.rank_store.rung_spec import parse_rung_specs
from tensorslm.rank_store.store import RankStore, SourceInfo

SOURCE = SourceInfo("toy-model", revision="abc123", architecture="LlamaForCausalLM", vocab_size=80, dim=24)


@pytest.fixture
def table():
    return torch.randn(80, 24, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def store(tmp_path, table):
    rungs = compress_table(table, parse_rung_specs("2x2,max", None, "0.3"), shape=(2, 3, 4), progress=False)
    return RankStore.create(tmp_path / "store", SOURCE, table, rungs)


def test_round_trip_bit_exact(store, table, tmp_path):
    rungs = compress_table(table, parse_rung_specs("2x2,max", None, "0.3"), shape=(2, 3, 4), progress=False)
    again = RankStore.open(tmp_path / "store", expect_source=SourceInfo("toy-model"))
    assert again.rung_names == ["full", "tt-max", "eps-0.3", "tt-2x2"]
    assert torch.equal(again.load_dense(), table)
    for name, rung in rungs.items():
        loaded = again.load_rung(name)
        assert loaded.tensors().keys() == rung.tensors().keys()
        assert all(torch.equal(loaded.tensors()[k], t) for k, t in rung.tensors().items())


def test_manifest_fields(store, table):
    manifest = json.loads((store.path / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["tensor_shape"] == [2, 3, 4]
    assert manifest["source"]["revision"] == "abc123"
    info = store.info("tt-2x2")
    rung = store.load_rung("tt-2x2")
    assert info.ranks == (2, 2) and info.dtype == "float32"
    assert info.nbytes == rung.nbytes and info.num_params == rung.num_params
    assert info.ratio == pytest.approx(80 * 24 * 4 / rung.nbytes)
    rows = reconstruct_rows(rung, torch.arange(80))
    assert info.rel_error == pytest.approx(float((rows - table).norm() / table.norm()), rel=1e-5)
    assert store.info("full").rel_error == 0.0 and store.info("full").ratio == 1.0
    eps = store.info("eps-0.3")
    assert eps.ranks is None and sum(g["tokens"] for g in eps.groups) == 80


def test_record_results_atomic_and_merged(store):
    store.record_results("tt-2x2", {"perplexity": 31.5})
    store.record_results("tt-2x2", {"latency_ms": 0.4})
    assert RankStore.open(store.path).info("tt-2x2").results == {"perplexity": 31.5, "latency_ms": 0.4}
    assert not [p for p in store.path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ResultsFormatError, match="must be JSON-serialisable"):
        store.record_results("tt-2x2", {"bad": object()})
    with pytest.raises(UnknownRungError, match="no rung 'tt-9x9'; the store holds full, tt-max"):
        store.record_results("tt-9x9", {})


def test_create_refuses_existing(store, table):
    with pytest.raises(StoreExistsError, match="already exists; pass overwrite=True"):
        RankStore.create(store.path, SOURCE, table, {})
    replaced = RankStore.create(store.path, SOURCE, table, {}, overwrite=True)
    assert replaced.rung_names == ["full"]
    assert sorted(p.name for p in store.path.iterdir()) == ["full.safetensors", "manifest.json"]


def _edit_manifest(path, **changes):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, error, message",
    [
        (lambda p: _flip_byte(p / "tt-2x2.safetensors"), StoreCorruptError,
         r"tt-2x2.safetensors: sha256 .* does not match the manifest's .*rung 'tt-2x2' was changed or corrupted"),
        (lambda p: (p / "tt-max.safetensors").unlink(), StoreNotFoundError,
         r"tt-max.safetensors: file of rung 'tt-max' is missing"),
        (lambda p: _edit_manifest(p, format_version=99), StoreVersionError,
         r"manifest.json: format version 99, this tensorslm reads version 2; rebuild the store with `tensorslm compress`"),
        (lambda p: (p / "eps-0.3.safetensors").write_bytes((p / "eps-0.3.safetensors").read_bytes()[:100]),
         StoreCorruptError, r"eps-0.3.safetensors: rung 'eps-0.3' is 100 bytes, the manifest says \d+ \(truncated"),
        (lambda p: (p / "manifest.json").write_text("{not json"), StoreCorruptError, r"manifest.json is not valid JSON"),
        (lambda p: (p / "manifest.json").unlink(), StoreNotFoundError, r"manifest.json is missing"),
    ],
)
def test_corruption_detected_at_open(store, damage, error, message):
    damage(store.path)
    with pytest.raises(error, match=message):
        RankStore.open(store.path)


def test_other_model(store):
    with pytest.raises(StoreSourceMismatchError, match=r"another model \(model: store has 'toy-model', expected 'gemma"):
        RankStore.open(store.path, expect_source=SourceInfo("gemma3-270m"))
    with pytest.raises(StoreSourceMismatchError, match=r"revision: store has 'abc123', expected 'def'"):
        RankStore.open(store.path, expect_source=SourceInfo("toy-model", revision="def"))


def test_load_rung_verifies_again_and_builds_nothing(store, monkeypatch):
    import tensorslm.rank_store.store as store_module

    _flip_byte(store.path / "tt-2x2.safetensors")  # changed after open
    parsed = []
    monkeypatch.setattr(store_module, "_safetensors_views", lambda data: parsed.append(data))
    with pytest.raises(StoreCorruptError, match="sha256"):
        store.load_rung("tt-2x2")
    assert parsed == []  # nothing was parsed or built from the bad bytes


def test_missing_directory(tmp_path):
    with pytest.raises(StoreNotFoundError, match="directory does not exist"):
        RankStore.open(tmp_path / "nowhere")


# -- a manifest edited by hand is refused, never adopted --------------------------------------

def _edit(manifest: dict, path: str, value) -> None:
    *parents, last = path.split("/")
    for key in parents:
        manifest = manifest[key]
    manifest[last] = value


@pytest.mark.parametrize("field, value, message", [
    ("vocab_size", 99999, "vocab_size, dim is [99999, 24] in the manifest, [80, 24] in full.safetensors"),
    ("dim", 25, "vocab_size, dim is [80, 25] in the manifest"),
    ("tensor_shape", [4, 3, 2], "tensor_shape is [4, 3, 2] in the manifest, no rung file has that shape ([2, 3, 4]"),
    ("source/vocab_size", 81, "source.vocab_size is 81 in the manifest, 80 in full.safetensors"),
    ("source/dim", 23, "source.dim is 23 in the manifest, 24"),
    ("rungs/full/shape", [25], "rungs.full.shape is [25] in the manifest, [24]"),
    ("rungs/tt-2x2/shape", [3, 2, 4], "rungs.tt-2x2.shape is [3, 2, 4] in the manifest"),
    ("rungs/tt-2x2/kind", "dense", "rungs.tt-2x2.kind is 'dense' in the manifest, 'ranks' in"),
    ("rungs/tt-2x2/meta", {"kind": "tt", "spec": "9x9"}, "rungs.tt-2x2.meta is"),
])
def test_a_manifest_field_the_headers_contradict_is_refused_on_open(store, field, value, message):
    path = store.path / "manifest.json"
    manifest = json.loads(path.read_text())
    _edit(manifest, field, value)
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreCorruptError, match="disagrees with the rung files") as info:
        RankStore.open(store.path)
    assert message in str(info.value)


@pytest.mark.parametrize("field, value, message", [
    ("rungs/tt-2x2/ranks", [3, 3], "ranks is (3, 3) in the manifest, (2, 2) in the file"),
    ("rungs/tt-2x2/num_params", 1, "num_params is 1 in the manifest"),
    ("rungs/tt-2x2/bytes", 10, "bytes is 10 in the manifest"),
    ("rungs/tt-2x2/ratio", 999.0, "ratio is 999.0 in the manifest"),
    ("rungs/tt-2x2/dtype", "int4", "dtype is 'int4' in the manifest, 'float32' in the file"),
    ("rungs/eps-0.3/groups", [], "groups is [] in the manifest"),
])
def test_a_manifest_field_the_tensors_contradict_is_refused_on_load(store, field, value, message):
    path = store.path / "manifest.json"
    manifest = json.loads(path.read_text())
    _edit(manifest, field, value)
    path.write_text(json.dumps(manifest))
    opened = RankStore.open(store.path)
    with pytest.raises(StoreCorruptError, match="disagrees with") as info:
        opened.check_rungs()
    assert message in str(info.value)


def test_inspect_exits_non_zero_on_a_tampered_manifest(store):
    from click.testing import CliRunner

    from tensorslm.cli.store_commands import inspect

    path = store.path / "manifest.json"
    manifest = json.loads(path.read_text())
    assert CliRunner().invoke(inspect, [str(store.path)]).exit_code == 0
    manifest["vocab_size"] = 99999
    path.write_text(json.dumps(manifest))
    result = CliRunner().invoke(inspect, [str(store.path)])
    assert result.exit_code != 0 and "vocab_size, dim is [99999, 24]" in result.output


def test_the_store_records_its_source_weights_and_install_checks_them(store, table):
    from tensorslm.rank_store.embedding import TTEmbedding, install
    from tensorslm.rank_store.store import weights_sha256

    assert store.source.embedding_sha256 == weights_sha256(table)

    class Model(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.emb = torch.nn.Embedding.from_pretrained(weight.clone())

        def get_input_embeddings(self):
            return self.emb

        def set_input_embeddings(self, module):
            self.emb = module

        def get_output_embeddings(self):
            return None

    install(Model(table), TTEmbedding.from_store(store, ["tt-2x2"]))   # the same table: fine
    other = table.clone()
    other[3, 5] += 1e-3
    with pytest.raises(StoreSourceMismatchError, match="the model's table hashes to"):
        install(Model(other), TTEmbedding.from_store(store, ["tt-2x2"]))


def test_a_ladder_from_other_weights_of_the_same_model_name_is_not_adopted(store, table, tmp_path):
    other = table.clone()
    other[0, 0] += 1.0
    rungs = compress_table(other, parse_rung_specs("2x2", None, None), shape=(2, 3, 4), progress=False)
    RankStore.create(tmp_path / "other", SOURCE, other, rungs)
    with pytest.raises(StoreSourceMismatchError, match="embedding_sha256"):
        RankStore.open(tmp_path / "other", expect_source=store.source)
