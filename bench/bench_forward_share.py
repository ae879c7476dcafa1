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

from tensorslm.constants import FULL_RUNG  # noqa: E402
from tensorslm.rank_store.embedding import TTEmbedding  # noqa: E402
from tensorslm.rank_store.ladder import build_ladder  # noqa: E402
from tensorslm.rank_store.models import load_model  # noqa: E402
from tensorslm.rank_store.rung_spec import parse_rung_specs  # noqa: E402
from tensorslm.rank_store.store import RankStore  # noqa: E402

TARGET_MS = 2.0
TARGET_SHARE = 0.05


def median_ms(fn, repeats: int, warmup: int = 3) -> tuple[float, float]:
    """Median wall time and median process CPU time (all threads) of ``fn``, in ms. On a
    machine shared with other work the CPU time is the steadier of the two."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ranks", default="6x8,4x6,2x2")
    parser.add_argument("--store", type=Path, help="use this store instead of building one")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--model-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    loaded = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        if args.store:
            store = RankStore.open(args.store)
        else:
            store = build_ladder(args.model, Path(tmp) / "store", parse_rung_specs(ranks=args.ranks),
                                 loaded=loaded, progress=False)
        rungs = [name for name in store.rung_names if name != FULL_RUNG]
        embedding = TTEmbedding.from_store(store, rungs=rungs, active=rungs[0])
        ids = torch.randint(0, loaded.vocab_size, (1, 1024), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            model_ms, model_cpu = median_ms(lambda: loaded.model(input_ids=ids), args.model_repeats, warmup=1)
            dense = loaded.model.get_input_embeddings()
            dense_ms, dense_cpu = median_ms(lambda: dense(ids), args.repeats)
            print(f"{args.model}, torch threads {torch.get_num_threads()}, 1x1024 ids; medians, "
                  f"wall ms / process CPU ms")
            print(f"full model forward ({args.model_repeats} repeats): {model_ms:.1f} / {model_cpu:.1f}")
            print(f"dense nn.Embedding lookup: {dense_ms:.3f} / {dense_cpu:.3f}")
            print(f"{'rung':<10}{'wall ms':>9}{'cpu ms':>9}{'share wall':>12}{'share cpu':>11}"
                  f"  target < {TARGET_MS} ms and < {TARGET_SHARE:.0%}")
            for name in rungs:
                embedding.set_rung(name)
                ms, cpu = median_ms(lambda: embedding(ids), args.repeats)
                ok = "ok" if ms < TARGET_MS and ms / model_ms < TARGET_SHARE else "missed (wall)"
                print(f"{name:<10}{ms:>9.3f}{cpu:>9.3f}{ms / model_ms:>12.2%}{cpu / model_cpu:>11.2%}  {ok}")
    print("command: python bench/bench_forward_share.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
