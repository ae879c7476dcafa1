"""TTEmbedding forward on 1 x 1024 ids as a share of a full SmolLM2 forward on the same batch.

    python bench/bench_forward_share.py [--model smollm2-135m] [--ranks 6x8,4x6,2x2] [--repeats 50]

Builds the store in a temporary directory (or uses --store), then times, with torch's default
threads, the median of ``--repeats`` TTEmbedding forwards per rung and of a few full-model
forwards. Timings on a shared machine are noisy: run it twice and compare.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rank_store.embedding import TTEmbedding  # noqa: E402
from rank_store.ladder import build_ladder  # noqa: E402
from rank_store.models import load_model  # noqa: E402
from rank_store.rung_spec import parse_rung_specs  # noqa: E402
from rank_store.store import RankStore  # noqa: E402

TARGET_MS = 2.0
TARGET_SHARE = 0.05


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ranks", default="6x8,4x6,2x2")
    parser.add_argument("--store", type=Path, help="use this store instead of building one")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--model-repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    loaded = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        if args.store:
            store = RankStore.open(args.store)
        else:
            store = build_ladder(args.model, Path(tmp) / "store", parse_rung_specs(ranks=args.ranks),
                                 loaded=loaded, progress=False)
        rungs = [name for name in store.rung_names if name != "full"]
        embedding = TTEmbedding.from_store(store, rungs=rungs, active=rungs[0])
        ids = torch.randint(0, loaded.vocab_size, (1, 1024), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            model_ms = median_ms(lambda: loaded.model(input_ids=ids), args.model_repeats, warmup=1)
            dense = loaded.model.get_input_embeddings()
            dense_ms = median_ms(lambda: dense(ids), args.repeats)
            print(f"{args.model}: full forward on 1x1024 ids: {model_ms:.1f} ms (median of "
                  f"{args.model_repeats}); dense nn.Embedding lookup {dense_ms:.3f} ms; "
                  f"torch threads {torch.get_num_threads()}")
            print(f"{'rung':<12}{'lookup ms':>10}{'share':>9}  target < {TARGET_MS} ms and < {TARGET_SHARE:.0%}")
            for name in rungs:
                embedding.set_rung(name)
                ms = median_ms(lambda: embedding(ids), args.repeats)
                share = ms / model_ms
                ok = "ok" if ms < TARGET_MS and share < TARGET_SHARE else "MISSED"
                print(f"{name:<12}{ms:>10.3f}{share:>9.2%}  {ok}")
    print("command: python bench/bench_forward_share.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
