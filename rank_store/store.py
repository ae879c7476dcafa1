"""The ladder on disk: a directory with one ``manifest.json`` and one safetensors file per rung.

Layout::

    store/
      manifest.json        format, format_version, source model, tensor shape, rungs
      full.safetensors     the dense fp32 table (tensor ``weight`` (V, d)), the top rung
      tt-6x8.safetensors   one file per compressed rung (see tensorslm.rank_store.rung for its tensors)

For every rung the manifest holds its file, the file's size and sha256, the ranks, dtype,
parameter count, bytes, compression ratio against the fp32 table, relative Frobenius error
||W - W_hat||_F / ||W||_F, and evaluation results once measured. The source records the sha256
of the fp32 embedding table the store was built from (``embedding_sha256``), which
:func:`tensorslm.rank_store.embedding.install` checks against the model it is installed in.
:meth:`RankStore.open` checks the format version, the source model (when expected), the
presence, size and sha256 of every file, and every manifest field a file's header also states
(vocabulary size, width, shapes, kind, rung metadata) before returning;
:meth:`RankStore.load_rung` checks its file's hash again on the very bytes it then parses and
the fields only the tensors state (ranks, groups, dtype, parameters, bytes, ratio). Nothing is
half-loaded: an error leaves no object.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import logging
import math
import mmap
import os
import re
import shutil
import struct
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from tensorslm.constants import FULL_RUNG as FULL

from .errors import (
    ResultsFormatError,
    RungFormatError,
    StoreCorruptError,
    StoreExistsError,
    StoreNotFoundError,
    StoreSourceMismatchError,
    StoreVersionError,
    UnknownRungError,
)
from .hashing import file_sha256
from .rung import Rung, reconstruct_rows

log = logging.getLogger(__name__)

FORMAT = "tensorslm-rank-store"
#: 2: rungs hold a 1-byte group map, packed int4/int6 cores and a column scale (version 1 stored
#: per-group token ids); a store of another version is refused with 'rebuild the store'
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ERROR_BLOCK = 8192


@dataclass(frozen=True)
class SourceInfo:
    """Where a table came from: model alias or id, its revision or file hash, architecture, sizes."""

    model: str
    revision: str | None = None
    file_sha256: str | None = None
    architecture: str | None = None
    vocab_size: int | None = None
    dim: int | None = None
    embedding_sha256: str | None = None   # of the (V, d) fp32 table, C order (weights_sha256)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SourceInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def mismatches(self, expected: SourceInfo) -> list[str]:
        """Fields set in ``expected`` that differ here, as 'field: have X, expected Y'."""
        out = []
        for f in dataclasses.fields(self):
            want = getattr(expected, f.name)
            if want is not None and getattr(self, f.name) != want:
                out.append(f"{f.name}: store has {getattr(self, f.name)!r}, expected {want!r}")
        return out


@dataclass(frozen=True)
class RungInfo:
    """One rung's manifest entry."""

    name: str
    file: str
    sha256: str
    file_size: int
    kind: str
    shape: tuple[int, ...]
    ranks: tuple[int, ...] | None
    groups: list[dict[str, Any]]
    dtype: str
    num_params: int
    nbytes: int
    ratio: float
    rel_error: float
    results: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> RungInfo:
        return cls(
            name=name, file=data["file"], sha256=data["sha256"], file_size=int(data["file_size"]),
            kind=data["kind"], shape=tuple(data["shape"]),
            ranks=None if data.get("ranks") is None else tuple(data["ranks"]),
            groups=list(data.get("groups", [])), dtype=data["dtype"], num_params=int(data["num_params"]),
            nbytes=int(data["bytes"]), ratio=float(data["ratio"]), rel_error=float(data["rel_error"]),
            results=dict(data.get("results", {})), meta=dict(data.get("meta", {})),
        )


def weights_sha256(weight: Tensor) -> str:
    """sha256 of a (V, d) table's float32 bytes in C order: what identifies a store's source
    weights whatever the model is called."""
    table = weight.detach().float().contiguous().cpu()  # (V, d)
    return hashlib.sha256(memoryview(table.numpy()).cast("B")).hexdigest()


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32,
           "I64": torch.int64, "BOOL": torch.bool}


def _safetensors_views(data: mmap.mmap, *, copy_misaligned: bool = True
                       ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors of a safetensors file mapped as ``data`` (writable: a private map), as views
    of it where aligned for their type (pages read when touched), and its metadata. A tensor
    misaligned for its type is copied, or refused (ValueError) without ``copy_misaligned``."""
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(bytes(data[8:8 + header_size]))
    meta = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, entry in header.items():
        dtype = _DTYPES[entry["dtype"]]
        begin, end = (8 + header_size + int(o) for o in entry["data_offsets"])
        shape = [int(n) for n in entry["shape"]]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        count = math.prod(shape)
        if end - begin != count * itemsize or end > len(data):
            raise ValueError(f"tensor {name!r} of shape {shape} does not fit bytes {begin}..{end}")
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        elif begin % itemsize == 0:
            tensors[name] = torch.frombuffer(data, dtype=dtype, count=count, offset=begin).view(shape)
        elif copy_misaligned:
            tensors[name] = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype).view(shape)
        else:
            raise ValueError(f"tensor {name!r} at byte {begin} is not aligned for {entry['dtype']}")
    return tensors, meta


def _read_hashed(handle: Any, count: int, digest: Any) -> bytes:
    data = handle.read(count)
    if len(data) != count:
        raise ValueError(f"the file ends {count - len(data)} bytes early")
    digest.update(data)
    return data


def safetensors_header(file: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the byte where its tensor data starts (the
    header's ``data_offsets`` count from there); a few kB read, no tensor data."""
    with file.open("rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        if size > 100_000_000:
            raise ValueError(f"header of {size} bytes")
        return json.loads(handle.read(size)), 8 + size


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def relative_error(rung: Rung, weight: Tensor) -> float:
    """||W - W_hat||_F / ||W||_F, rebuilt in vocabulary blocks."""
    err = total = 0.0
    for start in range(0, weight.shape[0], _ERROR_BLOCK):
        ids = torch.arange(start, min(start + _ERROR_BLOCK, weight.shape[0]))
        exact = weight[ids].double()  # (b, d)
        err += float(((reconstruct_rows(rung, ids).double() - exact) ** 2).sum())
        total += float((exact**2).sum())
    return (err / total) ** 0.5 if total else 0.0


def _rung_entry(name: str, rung: Rung, file: Path, rel_error: float) -> dict[str, Any]:
    return {
        "file": file.name,
        "sha256": file_sha256(file),
        "file_size": file.stat().st_size,
        "kind": "dense" if name == FULL else rung.meta.get("kind", "tt"),
        "shape": list(rung.shape),
        "ranks": None if rung.ranks is None else list(rung.ranks),
        "groups": [{"ranks": list(g.ranks[1:-1]), "tokens": g.size} for g in rung.groups] if len(rung.groups) > 1 else [],
        "dtype": rung.dtype,
        "num_params": rung.num_params,
        "bytes": rung.nbytes,
        "ratio": rung.ratio,
        "rel_error": rel_error,
        "meta": dict(rung.meta),
        "results": {},
    }


class RankStore:
    """A verified store directory. Build with :meth:`create` or :meth:`open`, not the constructor."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._lock = threading.Lock()
        self._maps: dict[str, mmap.mmap] = {}   # rung name -> the private map its tensors view
        self._bases: dict[str, int] = {}   # rung name -> the address its map starts at

    # -- creation -----------------------------------------------------------------------------
    @classmethod
    def check_destination(cls, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Raise StoreExistsError unless a store may be written at ``path`` (call it before
        the expensive part: loading a model, compressing)."""
        path = Path(path)
        if path.exists():
            if not overwrite:
                raise StoreExistsError(f"{path} already exists; pass overwrite=True to replace the store")
            if not (path / MANIFEST).exists() and any(path.iterdir()):
                raise StoreExistsError(f"{path} exists and is not a rank store (no {MANIFEST}); refusing to replace it")

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        source: SourceInfo,
        dense_weight: Tensor,
        rungs: Mapping[str, Rung],
        *,
        overwrite: bool = False,
    ) -> RankStore:
        """Write the dense table as rung ``full`` and every rung, then the manifest; return the opened store.

        The directory is assembled beside ``path`` and moved into place at the end, so a failure
        leaves no partial store. ``overwrite`` replaces an existing store (never a directory
        that is not a store).
        """
        path = Path(path)
        weight = torch.as_tensor(dense_weight).detach().float().contiguous()  # (V, d)
        if weight.dim() != 2:
            raise RungFormatError(f"dense_weight must have shape (V, d), got {tuple(weight.shape)}")
        vocab, dim = weight.shape
        digest = weights_sha256(weight)
        if source.embedding_sha256 not in (None, digest):
            raise StoreSourceMismatchError(
                f"source.embedding_sha256 is {source.embedding_sha256[:16]}..., the dense table given "
                f"hashes to {digest[:16]}...: they are not the same weights")
        source = dataclasses.replace(source, embedding_sha256=digest)
        for name, rung in rungs.items():
            if name == FULL or not _NAME.match(name):
                raise RungFormatError(
                    f"rung name {name!r} is not valid: use letters, digits, '.', '_' and '-', not starting "
                    f"with a symbol; {FULL!r} is reserved for the dense table"
                )
            if (rung.vocab_size, rung.dim) != (vocab, dim):
                raise RungFormatError(
                    f"rung {name!r} is for a {rung.vocab_size}x{rung.dim} table, the dense table is {vocab}x{dim}"
                )
        cls.check_destination(path, overwrite=overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        tmp.mkdir()
        try:
            all_rungs = {FULL: Rung.dense(weight, spec=FULL, kind="dense"), **rungs}
            entries = {}
            for name, rung in all_rungs.items():
                file = tmp / f"{name}.safetensors"
                if name == FULL:
                    save_file({"weight": weight}, str(file), metadata={"format": "tensorslm-dense"})
                    error = 0.0
                else:
                    save_file(rung.tensors(), str(file), metadata=rung.metadata())
                    error = relative_error(rung, weight)
                entries[name] = _rung_entry(name, rung, file, error)
                log.info("wrote rung %s: %d bytes, %.3fx, rel error %.4f", name, rung.nbytes, rung.ratio, error)
            order = [FULL] + sorted((n for n in entries if n != FULL), key=lambda n: -entries[n]["bytes"])
            compressed = [r for n, r in rungs.items()]
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "source": source.to_dict(),
                "vocab_size": vocab,
                "dim": dim,
                "tensor_shape": list(compressed[0].shape) if compressed else [dim],
                "rungs": {n: entries[n] for n in order},
            }
            _write_json_atomic(tmp / MANIFEST, manifest)
            if path.exists():
                trash = path.parent / f".{path.name}.{uuid.uuid4().hex}.old"
                os.replace(path, trash)
                os.replace(tmp, path)
                shutil.rmtree(trash)
            else:
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return cls.open(path)

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, expect_source: SourceInfo | None = None,
             verify: bool = True) -> RankStore:
        """Open and verify a store: format version, source, and size and sha256 of every file."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not path.is_dir():
            raise StoreNotFoundError(f"no rank store at {path}: the directory does not exist")
        if not manifest_path.exists():
            raise StoreNotFoundError(
                f"{manifest_path} is missing; a rank store holds {MANIFEST} and one .safetensors file per rung"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreCorruptError(f"{manifest_path} is not valid JSON: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise StoreCorruptError(f"{manifest_path}: format {found!r}, expected {FORMAT!r}")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreVersionError(
                f"{manifest_path}: format version {version!r}, this tensorslm reads version {FORMAT_VERSION}; "
                f"rebuild the store with `tensorslm compress`"
            )
        try:
            source = SourceInfo.from_dict(manifest["source"])
            rungs = manifest["rungs"]
            infos = {name: RungInfo.from_dict(name, entry) for name, entry in rungs.items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StoreCorruptError(f"{manifest_path}: malformed manifest ({type(exc).__name__}: {exc})") from None
        if FULL not in infos:
            raise StoreCorruptError(f"{manifest_path}: no rung {FULL!r} (the dense table)")
        if expect_source is not None:
            problems = source.mismatches(expect_source)
            if problems:
                raise StoreSourceMismatchError(
                    f"{manifest_path}: the store was built from another model ({'; '.join(problems)})"
                )
        store = cls(path, manifest)
        if verify:
            for info in infos.values():
                store._verify_file(info)
            store._check_headers(infos, source)
        return store

    def _check_headers(self, infos: Mapping[str, RungInfo], source: SourceInfo) -> None:
        """Every manifest field that a file's header also states must agree with it: a
        manifest edited by hand (vocab_size 99999) is refused, not adopted."""
        where = self.path / MANIFEST
        problems: list[str] = []

        def same(field_name: str, manifest_value: Any, file_value: Any, file: str) -> None:
            if manifest_value != file_value:
                problems.append(f"{field_name} is {manifest_value!r} in the manifest, {file_value!r} in {file}")

        headers: dict[str, dict[str, Any]] = {}
        for name, info in infos.items():
            try:
                headers[name], _ = safetensors_header(self._file(info))
            except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
                raise StoreCorruptError(f"{self._file(info)}: cannot read the safetensors header ({exc})") from None
        full = headers[FULL].get("weight", {})
        full_shape = [int(n) for n in full.get("shape", [])]
        try:
            vocab, dim = int(self.manifest["vocab_size"]), int(self.manifest["dim"])
            tensor_shape = [int(n) for n in self.manifest["tensor_shape"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreCorruptError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from None
        same("vocab_size, dim", [vocab, dim], full_shape, infos[FULL].file)
        for field_name, value in (("source.vocab_size", source.vocab_size), ("source.dim", source.dim)):
            if value is not None:
                same(field_name, value, full_shape[0 if field_name.endswith("vocab_size") else 1], infos[FULL].file)
        same(f"rungs.{FULL}.shape", list(infos[FULL].shape), full_shape[1:], infos[FULL].file)
        file_shapes = []
        for name, info in infos.items():
            if name == FULL:
                continue
            meta = headers[name].get("__metadata__", {})
            file_shape = [int(n) for n in str(meta.get("shape", "")).split("x") if n.isdigit()]
            file_shapes.append(file_shape)
            same(f"rungs.{name}.shape", list(info.shape), file_shape, info.file)
            same(f"rungs.{name}.vocab_size", vocab, int(meta.get("vocab_size", -1)), info.file)
            try:
                file_meta = json.loads(meta.get("meta", "{}"))
            except ValueError:
                file_meta = None
            same(f"rungs.{name}.meta", info.meta, file_meta, info.file)
            same(f"rungs.{name}.kind", info.kind, (file_meta or {}).get("kind", "tt"), info.file)
        # tensor_shape is the first compressed rung's shape (rungs differ: TT n1xn2xn3, rows (d,))
        if tensor_shape not in (file_shapes or [[dim]]):
            problems.append(f"tensor_shape is {tensor_shape!r} in the manifest, no rung file has "
                            f"that shape ({', '.join(map(str, file_shapes or [[dim]]))})")
        if problems:
            raise StoreCorruptError(f"{where} disagrees with the rung files (edited or mixed up): "
                                    + "; ".join(problems))

    def check_rungs(self) -> None:
        """Load every compressed rung once: each file's hash and every manifest field only its
        tensors state (ranks, groups, dtype, parameters, bytes, ratio) are checked."""
        for name in self.rung_names:
            if name != FULL:
                self.load_rung(name)

    def check_source_weights(self, weight: Tensor) -> None:
        """Raise :class:`StoreSourceMismatchError` unless ``weight`` (V, d) is the table this store
        was built from (``source.embedding_sha256``). A store that did not record it is
        identified by its model name only, and says so in the log."""
        self.check_source_digest(weights_sha256(weight))

    def check_source_digest(self, digest: str) -> None:
        """:meth:`check_source_weights` for a table known by its sha256 (``weights_sha256``)."""
        recorded = self.source.embedding_sha256
        if recorded is None:
            log.warning("%s records no embedding_sha256: it cannot be checked against the model's "
                        "weights (rebuild it with `tensorslm compress` to record it)", self.path)
            return
        if digest != recorded:
            raise StoreSourceMismatchError(
                f"{self.path / MANIFEST}: built from an embedding table with sha256 {recorded[:16]}..., "
                f"the model's table hashes to {digest[:16]}... (store source {self.source.model!r}); "
                "build a store from this model")

    def _file(self, info: RungInfo) -> Path:
        if Path(info.file).name != info.file:
            raise StoreCorruptError(f"{self.path / MANIFEST}: rung {info.name!r} names file {info.file!r} outside the store")
        return self.path / info.file

    def _verify_file(self, info: RungInfo, data: bytes | None = None) -> None:
        file = self._file(info)
        if data is None:
            if not file.exists():
                raise StoreNotFoundError(f"{file}: file of rung {info.name!r} is missing (listed in {MANIFEST})")
            size = file.stat().st_size
        else:
            size = len(data)
        if size != info.file_size:
            raise StoreCorruptError(
                f"{file}: rung {info.name!r} is {size} bytes, the manifest says {info.file_size} (truncated or replaced)"
            )
        digest = hashlib.sha256(data).hexdigest() if data is not None else file_sha256(file)
        if digest != info.sha256:
            raise StoreCorruptError(
                f"{file}: sha256 {digest[:16]}... does not match the manifest's {info.sha256[:16]}... "
                f"(the file of rung {info.name!r} was changed or corrupted)"
            )

    # -- reading ------------------------------------------------------------------------------
    @property
    def source(self) -> SourceInfo:
        return SourceInfo.from_dict(self.manifest["source"])

    @property
    def rung_names(self) -> list[str]:
        """``full`` first, then the compressed rungs by bytes, largest first."""
        rungs = self.manifest["rungs"]
        return [FULL] + sorted((n for n in rungs if n != FULL), key=lambda n: -rungs[n]["bytes"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def tensor_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["tensor_shape"])

    def info(self, name: str) -> RungInfo:
        if name not in self.manifest["rungs"]:
            raise UnknownRungError(f"{self.path}: no rung {name!r}; the store holds {', '.join(self.rung_names)}")
        return RungInfo.from_dict(name, self.manifest["rungs"][name])

    def load_rung(self, name: str) -> Rung:
        """Read, verify (size and sha256 of the bytes read) and build one rung.

        ``full`` is memory-mapped instead (:meth:`map_dense`): its pages are read from the file
        only when touched, so a process serving a compressed rung keeps no dense table resident."""
        info = self.info(name)
        if name == FULL:
            return Rung.dense(self.map_dense(), spec=FULL, kind="dense")
        file = self._file(info)
        tensors, meta = self._map_verified(info, f"file of rung {name!r}")
        try:
            rung = Rung.from_tensors(tensors, meta)
        except RungFormatError as exc:
            raise StoreCorruptError(f"{file}: {exc}") from None
        stated = {"ranks": info.ranks, "dtype": info.dtype, "num_params": info.num_params,
                  "bytes": info.nbytes, "ratio": info.ratio, "shape": info.shape}
        built = {"ranks": None if rung.ranks is None else tuple(rung.ranks), "dtype": rung.dtype,
                 "num_params": rung.num_params, "bytes": rung.nbytes, "ratio": rung.ratio,
                 "shape": tuple(rung.shape)}
        stated["groups"] = info.groups
        built["groups"] = ([{"ranks": list(g.ranks[1:-1]), "tokens": g.size} for g in rung.groups]
                           if len(rung.groups) > 1 else [])
        wrong = [f"{key} is {stated[key]!r} in the manifest, {built[key]!r} in the file"
                 for key in stated if (abs(stated[key] - built[key]) > 1e-9 * abs(built[key])
                                       if key == "ratio" else stated[key] != built[key])]
        if wrong:
            raise StoreCorruptError(f"{self.path / MANIFEST}: rung {name!r} disagrees with {file.name}: "
                                    + "; ".join(wrong))
        return rung

    def load_dense(self) -> Tensor:
        """The original table (V, d) float32, memory-mapped (see :meth:`map_dense`)."""
        return self.map_dense()

    def map_dense(self) -> Tensor:
        """The ``full`` table (V, d) float32 as a private (copy-on-write) memory map of its file,
        after checking the file's size and sha256 (streamed, nothing kept). Rows are paged in
        when read (a lookup, a rescored candidate, or every row when ``full`` serves)."""
        info = self.info(FULL)
        tensors, _ = self._map_verified(info, f"file of rung {FULL!r}", copy_misaligned=False)
        weight = tensors.get("weight")
        if set(tensors) != {"weight"} or weight.dtype != torch.float32 or weight.dim() != 2:
            found = {name: (str(t.dtype), tuple(t.shape)) for name, t in tensors.items()}
            raise StoreCorruptError(f"{self._file(info)}: cannot map the dense table (expected one "
                                    f"2-D F32 tensor 'weight', found {found})")
        return weight  # (V, d), pages read on touch

    # -- body precisions ----------------------------------------------------------------------
    @property
    def body_precisions(self) -> list[str]:
        """Body precisions precomputed in this store (see :mod:`tensorslm.rank_store.body`)."""
        return list(self.manifest.get("bodies", {}))

    def add_body(self, precision: str, tensors: Mapping[str, Tensor], meta: Mapping[str, str]
                 ) -> None:
        """Write the body's linears at ``precision`` as ``body-<precision>.safetensors`` and
        record its size and sha256 in the manifest (replacing an earlier one)."""
        if not _NAME.match(precision):
            raise RungFormatError(f"body precision name {precision!r} is not valid")
        file = self.path / f"body-{precision}.safetensors"
        tmp = file.with_name(f".{file.name}.{uuid.uuid4().hex}.tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "tensorslm-body", **dict(meta)})
        os.replace(tmp, file)
        entry = {"file": file.name, "sha256": file_sha256(file), "file_size": file.stat().st_size,
                 "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                 "meta": dict(meta)}
        with self._lock:
            self.manifest.setdefault("bodies", {})[precision] = entry
            _write_json_atomic(self.path / MANIFEST, self.manifest)
        log.info("wrote body %s: %d bytes", precision, entry["bytes"])

    def load_body(self, precision: str) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Read and verify (size and sha256 of the bytes read) the body at ``precision``:
        its tensors and metadata. A changed file is refused with :class:`StoreCorruptError`."""
        return self._read_verified(self._body_info(precision), "body file")

    def _body_info(self, precision: str) -> RungInfo:
        bodies = self.manifest.get("bodies", {})
        if precision not in bodies:
            raise UnknownRungError(f"{self.path}: no body precision {precision!r}; the store "
                                   f"holds {', '.join(bodies) or 'none'} (rebuild it with "
                                   f"`tensorslm compress MODEL -o STORE --bodies "
                                   f"{','.join([*bodies, precision])} --overwrite`)")
        entry = bodies[precision]
        return RungInfo(name=f"body-{precision}", file=entry["file"], sha256=entry["sha256"],
                        file_size=int(entry["file_size"]), kind="body", shape=(), ranks=None,
                        groups=[], dtype=precision, num_params=0, nbytes=int(entry["bytes"]),
                        ratio=1.0, rel_error=0.0)

    def map_body(self, precision: str) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The body at ``precision`` as views of a private memory map of its file, after the
        file's size and sha256 (streamed) match the manifest: pages are resident only once
        read, and a packer hands each linear's back with :meth:`release_range` (name
        ``body-<precision>``) once it holds its own copy, so the stored body and the packed one
        are never resident whole together. :meth:`load_body` reads it into memory instead."""
        return self._map_verified(self._body_info(precision), "body file")

    def _map_verified(self, info: RungInfo, what: str, *, copy_misaligned: bool = True
                      ) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The tensors and metadata of one listed safetensors file, after its size and sha256
        (streamed) match the manifest, as views of a private memory map of the file: a page is
        resident only once touched, and :meth:`release_pages` hands the touched ones back."""
        file = self._file(info)
        if not file.exists():
            raise StoreNotFoundError(f"{file}: {what} is missing (listed in {MANIFEST})")
        self._verify_file(info)
        with file.open("rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            tensors, meta = _safetensors_views(mapped, copy_misaligned=copy_misaligned)
        except Exception as exc:  # safetensors raises its own error types; report them as corruption
            raise StoreCorruptError(f"{file}: cannot parse safetensors ({type(exc).__name__}: {exc})") from None
        self._maps[info.name] = mapped
        self._bases[info.name] = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
        return tensors, meta

    def release_pages(self, name: str) -> None:
        """Drop the resident pages of rung ``name``'s memory map (after a head has packed its
        own copy of the codes): later reads, a lookup's few rows, page them in again."""
        mapped = self._maps.get(name)
        if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapped.madvise(mmap.MADV_DONTNEED)

    def release_range(self, name: str, view: Tensor) -> None:
        """Drop the resident pages lying wholly inside ``view``, a contiguous view of rung
        ``name``'s memory map (a block of rows a packer has read): what a head packing a
        rung's rows calls block by block, so the rung's pages and the packed copy are never
        resident whole at once. The map is private and never written, so a dropped page is
        read from the file again if touched. A tensor outside the map (a copy) is left alone."""
        mapped = self._maps.get(name)
        if mapped is None or not hasattr(mmap, "MADV_DONTNEED") or not view.numel() \
                or not view.is_contiguous():
            return
        start = view.data_ptr() - self._bases[name]
        stop = start + view.numel() * view.element_size()
        if start < 0 or stop > len(mapped):
            return
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, stop // page * page
        if last > first:
            mapped.madvise(mmap.MADV_DONTNEED, first, last - first)

    def _read_verified(self, info: RungInfo, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The tensors and metadata of one listed safetensors file, each read into memory of its
        own (aligned, nothing keeps the file's bytes alive) while the file's sha256 is computed
        over the same bytes; refused unless size and sha256 match the manifest. A missing or
        unparsable file is a store error naming it."""
        file = self._file(info)
        try:
            handle = file.open("rb")
        except FileNotFoundError:
            raise StoreNotFoundError(f"{file}: {what} is missing (listed in {MANIFEST})") from None
        with handle:
            size = os.fstat(handle.fileno()).st_size
            if size != info.file_size:
                self._verify_file(info)   # raises, naming the sizes
            digest = hashlib.sha256()
            tensors: dict[str, Tensor] = {}
            problem: str | None = None
            try:
                head = _read_hashed(handle, 8, digest)
                (header_size,) = struct.unpack("<Q", head)
                header = json.loads(_read_hashed(handle, header_size, digest))
                meta = header.pop("__metadata__", {}) or {}
                at = 8 + header_size
                for name, entry in sorted(header.items(), key=lambda e: e[1]["data_offsets"][0]):
                    begin, end = (8 + header_size + int(o) for o in entry["data_offsets"])
                    if begin < at:
                        raise ValueError(f"tensor {name!r} overlaps the one before it")
                    _read_hashed(handle, begin - at, digest)   # a gap, if any
                    tensor = torch.empty([int(n) for n in entry["shape"]], dtype=_DTYPES[entry["dtype"]])
                    raw = tensor.view(-1).view(torch.uint8) if tensor.numel() else tensor
                    if raw.numel() != end - begin:
                        raise ValueError(f"tensor {name!r} of shape {entry['shape']} does not fit "
                                         f"bytes {begin}..{end}")
                    if raw.numel():
                        view = memoryview(raw.numpy()).cast("B")
                        if handle.readinto(view) != len(view):
                            raise ValueError(f"tensor {name!r} is cut short")
                        digest.update(view)
                    tensors[name] = tensor
                    at = end
            except Exception as exc:  # any damage: hash the rest, then report what applies
                problem = f"{type(exc).__name__}: {exc}"
                tensors, meta = {}, {}
            while block := handle.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() != info.sha256:
            raise StoreCorruptError(
                f"{file}: sha256 {digest.hexdigest()[:16]}... does not match the manifest's "
                f"{info.sha256[:16]}... (the {what} was changed or corrupted)")
        if problem is not None:
            raise StoreCorruptError(f"{file}: cannot parse safetensors ({problem})")
        return tensors, meta

    # -- writing results ----------------------------------------------------------------------
    def record_results(self, name: str, results: Mapping[str, Any]) -> None:
        """Merge evaluation results into rung ``name``'s entry; the manifest is rewritten atomically."""
        self.info(name)
        try:
            json.dumps(dict(results))
        except (TypeError, ValueError) as exc:
            raise ResultsFormatError(f"results for rung {name!r} must be JSON-serialisable: {exc}") from None
        with self._lock:
            self.manifest["rungs"][name].setdefault("results", {}).update(results)
            _write_json_atomic(self.path / MANIFEST, self.manifest)

    def __repr__(self) -> str:
        return f"RankStore({str(self.path)!r}, rungs={self.rung_names})"
