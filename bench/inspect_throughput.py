"""Benchmark: ``inspect``'s streaming pass vs one plain encode pass over the same store (issue 11).

Both arms read the same whole context rows in store order (store/reader.py ``ordered_batches``,
the same batch size) and encode them with the same SAE (dashboards/run.py ``encode_batch``); the
inspect arm also feeds every batch to the per-latent bookkeeping (dashboards/collect.py: top-k
examples with context windows, quantile reservoirs, counts, histograms). Target: inspect
throughput >= 0.7x the plain pass. Arms run ``--rounds`` times interleaved in this process (best
time kept: the machine is shared). The fixed costs after the pass (quantile selection, logit
effects over the vocabulary, writing files) do not grow with the store and are timed once.

Peak memory is measured in fresh subprocesses at each ``--sizes`` token count, for both arms:
anonymous resident memory (``RssAnon`` of /proc/self/status, sampled every 20 ms, so the
memory-mapped store pages, which the page cache owns and which grow with the bytes read, are
not counted) and, for completeness, ``ru_maxrss`` (which includes those mapped pages).

    python bench/inspect_throughput.py --sae RUN/topk --store STORE --sizes 32768,98304 --allow-partial
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch


def _rss_anon_kib() -> int:
    """Current anonymous resident memory of this process in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def _arm(args, tokens: int, bookkeeping: bool) -> float:
    """Seconds of one pass over ``tokens`` tokens: encode only, or encode + the inspect bookkeeping."""
    from saestrata.dashboards.collect import LatentCollector
    from saestrata.dashboards.run import InspectConfig, encode_batch, open_inputs, special_ids
    from saestrata.store import ordered_batches

    cfg = InspectConfig(sae=args.sae, store=args.store, out=Path("."), allow_partial=args.allow_partial)
    sae, _, store, hook = open_inputs(cfg)
    ctx, specials = int(store.attrs["context_length"]), special_ids(store)
    coll = LatentCollector(sae.d_sae, ctx, args.top_k, args.context, special_ids=specials) if bookkeeping else None
    t0 = time.perf_counter()
    for batch in ordered_batches(store, hook, args.batch_rows, (0, tokens)):
        f = encode_batch(sae, batch.acts, batch.doc_index, batch.token_ids, ctx, specials)
        if coll is not None:
            coll.update(f, batch.start, batch.token_ids, batch.doc_index, batch.position)
    return time.perf_counter() - t0


def _child(args) -> None:
    """Subprocess body for ``--child``: run one arm, print its peak memory as one JSON line."""
    import resource

    peak = {"anon": _rss_anon_kib()}
    start_anon = peak["anon"]
    done = threading.Event()

    def sample():
        """Keep the largest RssAnon seen until the arm ends."""
        while not done.is_set():
            peak["anon"] = max(peak["anon"], _rss_anon_kib())
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    seconds = _arm(args, args.child_tokens, args.child == "inspect")
    done.set()
    thread.join()
    print(json.dumps({"arm": args.child, "tokens": args.child_tokens, "seconds": seconds,
                      "peak_rss_anon_mib": max(peak["anon"], _rss_anon_kib()) / 1024,
                      "rss_anon_before_mib": start_anon / 1024,
                      "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _memory(args, tokens: int, arm: str) -> dict:
    """Run one arm in a fresh interpreter; returns its JSON line."""
    cmd = [sys.executable, __file__, "--sae", str(args.sae), "--store", str(args.store), "--child", arm,
           "--child-tokens", str(tokens), "--batch-rows", str(args.batch_rows), "--top-k", str(args.top_k),
           "--context", str(args.context)] + (["--allow-partial"] if args.allow_partial else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Parse arguments; print throughput of both arms, their ratio, fixed costs and peak memory per size."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sae", type=Path, required=True)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--sizes", default="32768,98304", help="token counts for the memory runs (the largest is timed)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-rows", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--context", type=int, default=16)
    ap.add_argument("--allow-partial", action="store_true")
    ap.add_argument("--full", type=Path, help="also run the whole inspect (files, browser, logits) into this folder")
    ap.add_argument("--child", choices=["plain", "inspect"], help=argparse.SUPPRESS)
    ap.add_argument("--child-tokens", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    sizes = [int(s) for s in args.sizes.split(",")]
    tokens = max(sizes)
    print(f"torch threads {torch.get_num_threads()}; timing {tokens} tokens, {args.rounds} rounds interleaved")
    best = {"plain": float("inf"), "inspect": float("inf")}
    for _ in range(args.rounds):
        for arm in best:
            best[arm] = min(best[arm], _arm(args, tokens, arm == "inspect"))
    rate = {arm: tokens / s for arm, s in best.items()}
    print(f"plain encode pass: {rate['plain']:.0f} tok/s (best {best['plain']:.2f} s)")
    print(f"inspect pass:      {rate['inspect']:.0f} tok/s (best {best['inspect']:.2f} s)")
    print(f"ratio inspect / plain: {rate['inspect'] / rate['plain']:.2f}x (target >= 0.7x)")
    if args.full:
        from saestrata.dashboards.run import InspectConfig, inspect_sae

        t0 = time.perf_counter()
        index = inspect_sae(InspectConfig(sae=args.sae, store=args.store, out=args.full, tokens=tokens,
                                          top_k=args.top_k, context=args.context, batch_rows=args.batch_rows,
                                          allow_partial=args.allow_partial))
        print(f"whole inspect (model load, pass, quantiles, logit effects, files, browser): "
              f"{time.perf_counter() - t0:.1f} s; after the pass: {index['post_seconds']:.1f} s -> {args.full}")
    for size in sizes:
        for arm in ("plain", "inspect"):
            m = _memory(args, size, arm)
            print(f"memory {arm:7s} {size:>8d} tokens: peak RssAnon {m['peak_rss_anon_mib']:.0f} MiB "
                  f"(before the pass {m['rss_anon_before_mib']:.0f} MiB), ru_maxrss {m['ru_maxrss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
