"""Head modes for tied models: resident memory and perplexity of head ``dense`` vs ``tied``.

    python bench/bench_head_modes.py [--models smollm2-135m,gemma3-270m] [--ranks 6x8,4x6]
                                     [--tokens 4096] [--text ../shared/data/wikitext-2-raw/wiki.test.raw]

``dense``: the LM head keeps the original (V, d) fp32 matrix, only the input embedding is a
rung. ``tied``: the head uses the active rung's reconstruction too, so no dense table is held.
Each (model, configuration) runs in its own child process so resident memory is not polluted
by the previous one: the child loads the model (from the converted cache), installs one rung
(the original weight dropped), and reports its resident set (VmRSS and its anonymous part RssAnon after install, VmRSS again after the perplexity
run: weights mmapped from safetensors are only resident once used), its peak
(VmHWM after the perplexity run), the bytes of the tensors the model holds, the perplexity on
the first ``--tokens`` tokens and the seconds that took. Memory and timing on a shared machine
are noisy; the tensor bytes are exact.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tensorslm.constants import HEAD_MODES  # noqa: E402
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def tensor_bytes(module) -> int:
    """Bytes of every distinct parameter and buffer storage the module holds."""
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def child(model_ref: str, store_dir: str | None, rung: str, head: str, text: str, tokens: int) -> dict:
    import torch

    from tensorslm.rank_store.evaluate import encode_text, loaded_perplexity
    from tensorslm.rank_store.models import load_model

    torch.set_grad_enabled(False)
    loaded = load_model(model_ref)
    rung_bytes = 0
    if rung != "original":
        from tensorslm.rank_store.embedding import TTEmbedding, install
        from tensorslm.rank_store.store import RankStore

        embedding = TTEmbedding.from_store(RankStore.open(store_dir), rungs=[rung], active=rung)
        install(loaded.model, embedding, head=head)
        rung_bytes = embedding.rung(rung).nbytes  # rungs live outside parameters and buffers
    gc.collect()
    rss = status_kib("VmRSS")
    anon = status_kib("RssAnon")
    held = tensor_bytes(loaded.model) + rung_bytes
    ids = encode_text(loaded.tokenizer, Path(text).read_text(encoding="utf-8"), tokens)
    started = time.perf_counter()
    ppl = loaded_perplexity(loaded, ids, progress=False)
    seconds = time.perf_counter() - started
    gc.collect()
    rss_after = status_kib("VmRSS")  # weights may be mmapped from safetensors: paged in by use
    return {"model": model_ref, "rung": rung, "head": head, "rss_mib": rss / 1024,
            "anon_mib": anon / 1024, "rss_after_mib": rss_after / 1024,
            "peak_mib": status_kib("VmHWM") / 1024, "tensor_mib": held / 2**20,
            "perplexity": ppl, "seconds": seconds, "tokens": int(ids.numel())}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m")
    parser.add_argument("--ranks", default="6x8,4x6")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--text", default=str(TEXT))
    parser.add_argument("--child", nargs=6, metavar=("MODEL", "STORE", "RUNG", "HEAD", "TEXT", "TOKENS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, store, rung, head, text, tokens = args.child
        print(json.dumps(child(model, store, rung, head, text, int(tokens))))
        return

    from tensorslm.rank_store.ladder import build_ladder
    from tensorslm.rank_store.rung_spec import parse_rung_specs

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            store = Path(tmp) / model
            build_ladder(model, store, parse_rung_specs(ranks=args.ranks), progress=False)
            rows.append(run_child(model, str(store), "original", "-", args.text, str(args.tokens)))
            for rung in [s.name for s in parse_rung_specs(ranks=args.ranks)]:
                for head in HEAD_MODES:
                    rows.append(run_child(model, str(store), rung, head, args.text, str(args.tokens)))
                    print(f"  measured {model} {rung} {head}", file=sys.stderr)
    print(f"| model | rung | head | tensors MiB | RSS MiB | anon RSS MiB | RSS after run MiB | peak RSS MiB | perplexity ({args.tokens} tok) | ppl seconds |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['rung']} | {r['head']} | {r['tensor_mib']:.1f} | {r['rss_mib']:.0f} | {r['anon_mib']:.0f} | {r['rss_after_mib']:.0f} | "
              f"{r['peak_mib']:.0f} | {r['perplexity']:.2f} | {r['seconds']:.1f} |")
    print("command: python bench/bench_head_modes.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
