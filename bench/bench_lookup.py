"""TTEmbedding lookup speed and resident memory of loaded rungs, on the real SmolLM2 table.

Run:  python bench/bench_lookup.py [--ranks 6x8,4x6,4x4,2x2] [--tokens 1024] [--threads 2]
Builds a temporary store (deleted afterwards), then for each rung prints the median forward
time for a (1, tokens) batch of random ids, and the resident memory a freshly started process
gains by loading the rung, against the rung's bytes on disk.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _smollm2_table import gguf_path, load_table  # noqa: E402

from tensorslm.constants import AUTO_LADDER_BUDGETS  # noqa: E402
from tensorslm.rank_store.compress import compress_table  # noqa: E402
from tensorslm.rank_store.embedding import TTEmbedding  # noqa: E402
from tensorslm.rank_store.rung_spec import parse_rung_specs  # noqa: E402
from tensorslm.rank_store.store import RankStore, SourceInfo  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_rss(store_path: str, name: str) -> None:
    """Child process: print the RSS gained by loading one rung.

    A tiny rung with every part (groups, int4 cores, whole rows, scales) goes through the same
    loading code first, so the torch kernels that code touches the first time (about 7 MB of
    code pages, once per process) are not counted as the rung's memory.
    """
    from tensorslm.rank_store.recipes import build
    from tensorslm.rank_store.rung import Rung

    warm = build(torch.randn(3000, 64), "budget-10+mean+norm+rows+shape4x4x4")
    Rung.from_tensors(warm.tensors(), warm.metadata())
    store = RankStore.open(store_path, verify=False)
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    gc.collect()
    trim(0)  # freed heap goes back to the OS, so the rung cannot reuse it unseen
    before = rss_bytes()
    rung = store.load_rung(name)
    gc.collect()
    trim(0)  # and the loader's freed temporaries are not counted as the rung's
    print(rss_bytes() - before, rung.nbytes)


def time_forwards(embedding: TTEmbedding, ids: torch.Tensor, repeat: int, rounds: int = 10) -> dict[str, list[float]]:
    """Seconds of each forward, per rung. The rungs take turns (``repeat / rounds`` calls each per
    round), so a slow spell of a shared machine falls on every rung alike, not on whichever ran then."""
    times: dict[str, list[float]] = {name: [] for name in embedding.rung_names}
    for name in times:  # warm-up
        embedding.set_rung(name)
        for _ in range(20):
            embedding(ids)
    per_round = max(1, repeat // rounds)
    for _ in range(rounds):
        for name, spent in times.items():
            embedding.set_rung(name)
            for _ in range(per_round):
                start = time.perf_counter()
                embedding(ids)
                spent.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="6x8,4x6,4x4,2x2")
    parser.add_argument("--tolerances", default="0.5")
    parser.add_argument("--recipes", default=",".join(f"auto-{b}" for b in AUTO_LADDER_BUDGETS),
                        help="ladder recipes too (the default auto ladder's rungs; '' for none)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--rss-of", nargs=2, metavar=("STORE", "RUNG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_of:
        measure_rss(*args.rss_of)
        return
    table = load_table()
    specs = parse_rung_specs(args.ranks, None, args.tolerances or None, recipes=args.recipes or None)
    rungs = compress_table(table, specs, progress=False)
    ids = torch.randint(0, table.shape[0], (1, args.tokens), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        store = RankStore.create(Path(tmp) / "smollm2", SourceInfo("smollm2-135m", file_sha256=None,
                                 vocab_size=table.shape[0], dim=table.shape[1]), table, rungs)
        del rungs, table
        embedding = TTEmbedding.from_store(store)
        print(f"SmolLM2 table from {gguf_path().name}; forward of (1, {args.tokens}) ids, "
              f"{args.threads} threads, median and min of {args.repeat}, rungs taking turns in 10 rounds")
        print(f"  {'rung':10s} {'groups':>6s} {'ratio':>7s} {'median ms':>10s} {'min ms':>7s} {'disk MB':>9s} {'RSS MB':>8s} {'RSS/disk':>9s}")
        times = time_forwards(embedding, ids, args.repeat)
        for name in embedding.rung_names:
            median, fastest = statistics.median(times[name]), min(times[name])
            child = subprocess.run([sys.executable, __file__, "--rss-of", str(store.path), name],
                                   capture_output=True, text=True, check=True)
            rss, _ = map(int, child.stdout.split())
            disk = store.info(name).file_size
            print(f"  {name:10s} {len(embedding.rung(name).groups):6d} {store.info(name).ratio:6.2f}x {median * 1e3:10.3f} {fastest * 1e3:7.3f} {disk / 1e6:9.1f} "
                  f"{rss / 1e6:8.1f} {rss / disk:9.2f}")
    command = f"python bench/bench_lookup.py --ranks {args.ranks} --tolerances {args.tolerances} " \
              f"--recipes '{args.recipes}' --tokens {args.tokens} --threads {args.threads} --repeat {args.repeat}"
    print("targets: forward < 2 ms; RSS/disk <= 1.5")
    print(f"command: {command}")


if __name__ == "__main__":
    main()
