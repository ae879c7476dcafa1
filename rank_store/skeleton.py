"""A model's structure without its large weights, and the checkpoint they stay in.

Serving never runs the Hugging Face forward: the engine packs the body's linears itself (from
the store, or quantized one linear at a time), and with a ladder installed the input table is
the store's. Loading the whole fp32 model first would put every weight in memory at start-up
(SmolLM2: 540 MB, Gemma-3-270m: 1.07 GB) only to drop most of it, and that start-up peak is
the process's peak. :func:`build_skeleton` instead builds the model's shell
(:class:`~tensorslm.rank_store.shell.ModelShell`: the module tree with every parameter on
torch's ``meta`` device, no transformers import) and reads from the safetensors checkpoint
only what it is told to keep: the norms always, the body linears and the input table when
asked. :class:`Checkpoint` reads any other tensor later, one at a time, and hashes the input
table without holding it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import ModelLoadError
from .shell import ModelShell

log = logging.getLogger(__name__)

#: parameter names of the body's linear layers (what the engine packs)
BODY_LINEAR = re.compile(r"(^|\.)layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
_HASH_ROWS = 4096   # rows of the input table hashed per read (tables not stored as F32)
_HASH_BYTES = 1 << 20


class Checkpoint:
    """The safetensors files of a Hugging Face directory, read one tensor at a time."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: self.directory / file for name, file in weight_map.items()}
        else:
            single = self.directory / "model.safetensors"
            if not single.is_file():
                raise ModelLoadError(f"{self.directory} has no model.safetensors (or index): the "
                                     "weights cannot be read one tensor at a time")
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as handle:
                self._files = {name: single for name in handle.keys()}

    @classmethod
    def usable(cls, directory: Path) -> bool:
        return ((directory / "model.safetensors").is_file()
                or (directory / "model.safetensors.index.json").is_file())

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def read(self, name: str) -> Tensor:
        """The tensor ``name`` as fp32, in memory of its own (not a view of the file)."""
        from safetensors import safe_open

        if name not in self._files:
            raise ModelLoadError(f"{self.directory}: the checkpoint has no tensor {name!r}")
        with safe_open(str(self._files[name]), framework="pt") as handle:
            tensor = handle.get_tensor(name)
        return tensor.to(torch.float32).clone()  # a copy: the file's map closes with the handle

    def rows_sha256(self, name: str) -> str:
        """sha256 of a 2-D tensor's fp32 bytes in C order (what
        :func:`tensorslm.rank_store.store.weights_sha256` computes), read a block of rows at a
        time so the table is never held whole."""
        from safetensors import safe_open

        digest = hashlib.sha256()
        file = self._files[name]
        start, stop, dtype = _extent(file, name)
        if dtype == "F32":   # the bytes are already fp32 little-endian in C order: read, not map
            with file.open("rb") as handle:
                handle.seek(start)
                left = stop - start
                while left:
                    block = handle.read(min(left, _HASH_BYTES))
                    if not block:
                        raise ModelLoadError(f"{file}: tensor {name!r} is cut short")
                    digest.update(block)
                    left -= len(block)
            return digest.hexdigest()
        with safe_open(str(file), framework="pt") as handle:
            rows = handle.get_slice(name)
            count = rows.get_shape()[0]
            for first in range(0, count, _HASH_ROWS):
                block = rows[first:min(first + _HASH_ROWS, count)].to(torch.float32).contiguous()
                digest.update(memoryview(block.numpy()).cast("B"))
        return digest.hexdigest()


def _extent(file: Path, name: str) -> tuple[int, int, str]:
    """Byte range and dtype of tensor ``name`` in safetensors ``file``."""
    from .store import safetensors_header

    header, data_start = safetensors_header(file)
    entry = header[name]
    begin, end = (data_start + int(o) for o in entry["data_offsets"])
    return begin, end, str(entry["dtype"])


def build_skeleton(directory: Path, *, body: bool, table: bool) -> tuple[ModelShell, Checkpoint]:
    """The shell of the causal LM of ``directory`` with its parameters read from the checkpoint
    except the body linears (unless ``body``) and the input table (unless ``table``), which stay
    on the meta device; and the checkpoint for reading them later."""
    checkpoint = Checkpoint(directory)
    model = ModelShell.from_directory(directory)
    table_param = model.get_input_embeddings().weight
    skipped = 0
    for name, param in model.named_parameters():   # a tied head is listed once, as the table
        if (not body and BODY_LINEAR.search(name)) or (not table and param is table_param):
            skipped += param.numel()
            continue
        value = checkpoint.read(name)
        if tuple(value.shape) != tuple(param.shape):
            raise ModelLoadError(f"{directory}: checkpoint tensor {name} has shape "
                                 f"{tuple(value.shape)}, the model declares {tuple(param.shape)}")
        torch.utils.swap_tensors(param, nn.Parameter(value, requires_grad=False))
    log.info("built the shell of %s with %.1f M parameters left in the checkpoint",
             model.architecture, skipped / 1e6)
    return model, checkpoint
