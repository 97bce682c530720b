"""Benchmark: LM forward with an SAE spliced in vs the clean forward of the same batches (issue 5, target >= 0.8).

Both arms run the full model (with the LM head, as evaluation must) on the same packed
held-out rows; the spliced arm replaces ``blocks.L.hook_resid_post`` with the SAE's
reconstruction through the same hook evaluation uses. Best of ``--repeats`` each.
Also prints the end-to-end ``evaluate_saes`` rate (clean + ablation + spliced groups and
all metrics) for reference. Run on an idle machine:

    .venv/bin/python bench/eval_throughput.py --sae demo-out/runs/layer8/topk

``--compare`` (issue 14) times ``evaluate_saes`` on the reference path (one batched HF
forward of all groups, full logits) and on the fast path (evaluate/branch.py: branch
splice, chunked head statistics) back to back on the same tokens, prints both tokens/s,
their ratio (target >= 2 for 4 SAEs), the largest absolute difference over every metric of
the core JSON (target <= 1e-4) and a per-op profile table of each path. Without ``--sae``
it builds four random-init SAEs (topk, standard, tiered_hsae, batchtopk; d_sae 2048) at
``--layer`` of the embedded Gemma 3 270M (throughput does not depend on training):

    .venv/bin/python bench/eval_throughput.py --compare --rows 8

``--dtype float32`` evaluates as the benchmark does (``lm_dtype float32``; default ``auto``, the CLI's
default: bfloat16 where the CPU computes it natively, else float32); ``--arms fast`` times one path only. Measured with ``--rows 8 --repeats 3`` on a
2-core machine, benchmark queue paused (2026-12-05, docs/results/bench/README.md): float32 2.12x median
of five rounds (1.92x with ``SAESTRATA_NATIVE=0``, torch's ops for the head statistics), bfloat16
1.79x. On a shared machine both wall and CPU seconds inflate.
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import auto_dtype, best_time, machine

from saestrata.allocator import tune_allocator
from saestrata.evaluate.branch import OpTimer
from saestrata.evaluate.core import EvalConfig, evaluate_saes
from saestrata.evaluate.splice import sae_replacement, splice
from saestrata.harvest.model import EMBEDDED_MODEL, layer_of_hook, load_model
from saestrata.harvest.packing import pack_documents
from saestrata.harvest.text import iter_documents
from saestrata.train.registry import build
from saestrata.train.sae_io import load_sae, save_sae

RANDOM_ARCHS = ("topk", "standard", "tiered_hsae", "batchtopk")


def _leaves(obj, prefix=""):
    """``{dotted key: number}`` of every numeric leaf of a nested dict/list (the core JSON's metrics)."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _leaves(val, f"{prefix}{key}.").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _leaves(val, f"{prefix}{i}.").items()}
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return {prefix[:-1]: float(obj)}
    return {}


def compare(args) -> None:
    """Reference vs fast ``evaluate_saes`` on the same rows: tokens/s, ratio, max metric difference, profiles."""
    lm = load_model(EMBEDDED_MODEL, device="cpu", dtype=args.dtype)
    saes = args.sae
    tmp = None
    if not saes:
        tmp = tempfile.TemporaryDirectory()
        meta = {"model_id": EMBEDDED_MODEL, "hook_name": f"blocks.{args.layer}.hook_resid_post",
                "layer": args.layer, "context_length": args.ctx}
        saes = [save_sae(build(arch, lm.d_model, 2048, seed=i), Path(tmp.name) / arch, meta)
                for i, arch in enumerate(RANDOM_ARCHS)]
    cfg = EvalConfig(tokens=args.rows * args.ctx, batch_rows=args.batch_rows, context_length=args.ctx)
    n_tok = args.rows * args.ctx
    arms = {name: name == "reference" for name in args.arms.split(",")}
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    cpu: dict[str, list[float]] = {name: [] for name in arms}
    timers: dict[str, OpTimer] = {}
    results: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for name, reference in arms.items():
            timer = OpTimer()
            t0, c0 = time.perf_counter(), time.process_time()
            out = evaluate_saes(saes, cfg, lm=lm, progress=False, reference=reference, timer=timer)
            seconds[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            if seconds[name][-1] == min(seconds[name]):
                timers[name], results[name] = timer, out
            print(f"{name:<9}: {n_tok / seconds[name][-1]:7.2f} tokens/s ({seconds[name][-1]:.1f} s wall, "
                  f"{cpu[name][-1]:.1f} s CPU of this process)", flush=True)
    best = {name: min(t) for name, t in seconds.items()}
    print(f"\n{len(saes)} SAEs, {args.rows} rows x {args.ctx} tokens = {n_tok} tokens, batch_rows {args.batch_rows}, "
          f"LM dtype {args.dtype}, torch threads {torch.get_num_threads()}, "
          f"best of {args.repeats} (end-to-end evaluate_saes wall time, SAE loading included)")
    for name in arms:
        print(f"{name:<9}: {n_tok / best[name]:7.2f} tokens/s")
    if len(arms) == 2:
        print(f"ratio    : {best['reference'] / best['fast']:.2f}x  (fast / reference tokens/s, wall; target >= 2)")
        # On a shared machine the wall ratio depends on what else ran during each arm; the process's
        # CPU seconds (all its threads) measure the work each path does.
        print(f"CPU ratio: {min(cpu['reference']) / min(cpu['fast']):.2f}x  (reference / fast CPU seconds of this process)")
        worst, where, past = 0.0, "", []
        for i, (ref_r, fast_r) in enumerate(zip(results["reference"], results["fast"])):
            for part in ("eval_result_metrics", "eval_result_unstructured"):
                a, b = _leaves(ref_r[part]), _leaves(fast_r[part])
                for key in a:
                    if key.endswith("eval_tokens_per_s") or math.isnan(a[key]):
                        continue
                    diff = abs(a[key] - b.get(key, math.inf))
                    if diff > worst:
                        worst, where = diff, key
                    if diff > 1e-4 and diff > 1e-4 * abs(a[key]):  # past 1e-4 both absolute and relative
                        past.append(f"  SAE {i} {key}: reference {a[key]:.6g}, fast {b.get(key):.6g}, "
                                    f"|diff| {diff:.3g} ({diff / max(abs(a[key]), 1e-30):.2e} relative)")
        print(f"max |metric difference| over every metric of {len(saes)} core JSONs: {worst:.2e} ({where}; target <= 1e-4)")
        # bf16 on an AMX CPU: oneDNN picks kernels by matmul shape, and the two paths' shapes differ
        # (docs/results/bench/README.md, twenty-eighth session): list what moved, not just the worst.
        print(f"metrics past 1e-4 absolute and relative: {len(past)}", *past, sep="\n")
    for name in arms:
        print(f"\nprofile, {name} path (seconds summed over batches, best run):")
        print(timers[name].table(best[name]))
    if tmp is not None:
        tmp.cleanup()


def main() -> None:
    """Print clean and spliced tokens/s and their ratio (or, with --compare, reference vs fast evaluation)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sae", type=Path, action="append", help="SAE folder; repeat for several (--compare)")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --compare)")
    ap.add_argument("--compare", action="store_true", help="reference vs fast evaluate_saes (issue 14)")
    ap.add_argument("--layer", type=int, default=8, help="--compare without --sae: layer of the random SAEs")
    ap.add_argument("--ctx", type=int, default=128, help="--compare: context length")
    ap.add_argument("--batch-rows", type=int, default=4, help="--compare: rows per batch")
    ap.add_argument("--dtype", default="auto",
                    help="LM dtype; auto: what `evaluate --dtype auto` picks here (bf16 only where it is native; "
                         "the benchmark evaluates with lm_dtype float32)")
    ap.add_argument("--arms", default="reference,fast", help="--compare: which paths to time, comma-separated")
    args = ap.parse_args()
    if args.dtype == "auto":
        args.dtype = auto_dtype()
    print(machine(), f"; LM dtype {args.dtype}", sep="", flush=True)
    if args.compare:
        args.repeats = args.repeats or 1
        compare(args)
        return
    if not args.sae or len(args.sae) != 1:
        ap.error("give exactly one --sae (or --compare)")
    args.repeats = args.repeats or 3
    sae, cfg = load_sae(args.sae[0])
    layer = layer_of_hook(cfg["hook_name"])
    lm = load_model(cfg["saestrata"]["model_id"], device="cpu", dtype=args.dtype)
    ctx = cfg["saestrata"].get("context_length") or 128
    rows = list(itertools.islice(pack_documents(iter_documents("wiki-vital", "eval"), lm.tokenizer, ctx), args.rows))
    ids = torch.from_numpy(np.stack([r.token_ids for r in rows])).long()
    keep = torch.isin(ids, torch.tensor(sorted(set(lm.tokenizer.all_special_ids))))
    n_tok = ids.numel()

    def clean():
        """One clean forward of the rows (timed by the caller)."""
        with torch.inference_mode():
            lm.model(input_ids=ids, use_cache=False)

    def spliced():
        """One forward with the SAE spliced in (timed by the caller)."""
        with torch.inference_mode(), splice(lm.layers, {layer: [sae_replacement(sae)]}, keep):
            lm.model(input_ids=ids, use_cache=False)

    clean()  # warm-up
    t_clean, t_spliced = best_time(clean, args.repeats), best_time(spliced, args.repeats)
    print(f"clean forward    : {n_tok / t_clean:8.0f} tokens/s")
    print(f"spliced forward  : {n_tok / t_spliced:8.0f} tokens/s")
    print(f"ratio            : {t_clean / t_spliced:.2f}  (target >= 0.8)")
    t0 = time.perf_counter()
    evaluate_saes([args.sae[0]], EvalConfig(tokens=n_tok, context_length=ctx), lm=lm, progress=False)
    print(f"evaluate_saes    : {n_tok / (time.perf_counter() - t0):8.0f} tokens/s (3 groups + all core metrics)")


if __name__ == "__main__":
    tune_allocator()  # as the CLI does: the benches measure what users run
    main()
