"""Benchmark: ``inspect``'s top examples read from the store vs the peers' way, re-running the LM (issue 11).

Peers (SAE-Vis / SAEDashboard, Neuronpedia's pipeline, delphi's latent cache) rebuild each
latent's top activating examples by running the language model over the text again. Here both
ways run on the same tokens, the first ``--tokens`` of ``--store`` in store order:

- **inspect**: dashboards/run.py ``collect`` (the streaming pass of ``saestrata inspect``: an SAE
  encode of the stored activations plus all its bookkeeping: top-k windows, quantile reservoirs,
  histograms), top examples of every latent;
- **LM re-run**: the store's own ``token_ids`` rows through the model (harvest/hooks.py
  ``residuals``, in the dtype the store was computed in, ``batch_rows`` of the store, rounded to
  the stored dtype as the harvest does), the same SAE encode, a running top-k per latent.

Prints both times (LM arm without the model load, which is reported apart), their ratio, and the
agreement of the top ``--top-k`` examples (token indices) of ``--latents`` latents chosen at random
(seeded) among those firing at least ``top_k`` times: mean and min overlap, and the largest
activation difference on shared examples. Special tokens (BOS ...) are excluded in both arms.

    python bench/inspect_vs_lm.py --sae RUN/topk --store STORE --tokens 98304
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def inspect_arm(args) -> tuple[float, torch.Tensor, torch.Tensor]:
    """``(seconds, values [d_sae, k], token index [d_sae, k])`` from ``saestrata inspect``'s pass."""
    from saestrata.dashboards.run import InspectConfig, collect

    t0 = time.perf_counter()
    coll, _ = collect(InspectConfig(sae=args.sae, store=args.store, out=Path("."), tokens=args.tokens,
                                    top_k=args.top_k, batch_rows=args.batch_rows))
    values, payload = coll.top_examples()
    return time.perf_counter() - t0, values, payload["index"]


def lm_arm(args) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """``(load seconds, pass seconds, values [d_sae, k], token index [d_sae, k])`` by re-running the model."""
    from saestrata.dashboards.run import InspectConfig, encode_batch, open_inputs, special_ids
    from saestrata.harvest.hooks import residuals
    from saestrata.harvest.model import layer_of_hook, load_model

    sae, sae_cfg, store, hook = open_inputs(InspectConfig(sae=args.sae, store=args.store, out=Path(".")))
    layer = layer_of_hook(hook)
    compute = store.attrs.get("compute_dtype", store.attrs["dtype"])
    t0 = time.perf_counter()
    lm = load_model(args.model, "cpu", compute) if args.model else load_model(device="cpu", dtype=compute)
    load_s = time.perf_counter() - t0
    ctx, specials = int(store.attrs["context_length"]), special_ids(store)
    stop = min(args.tokens or store.n_tokens, store.n_tokens) // ctx * ctx
    tok = torch.from_numpy(store.aligned("token_ids")[:stop].astype("int64")).reshape(-1, ctx)
    doc = torch.from_numpy(store.aligned("doc_index")[:stop]).reshape(-1, ctx)
    rows_per = int(store.attrs.get("batch_rows", args.batch_rows))
    special = torch.tensor(specials, dtype=torch.int64)
    best_v = torch.full((sae.d_sae, args.top_k), -float("inf"))
    best_i = torch.full((sae.d_sae, args.top_k), -1, dtype=torch.int64)
    t0 = time.perf_counter()
    with torch.no_grad():
        for r in range(0, len(tok), rows_per):
            ids = tok[r : r + rows_per]
            acts = residuals(lm, ids, [layer])[layer].to(getattr(torch, store.attrs["dtype"])).reshape(-1, store.d_model)
            f = encode_batch(sae, acts, doc[r : r + rows_per].reshape(-1), ids.reshape(-1), ctx, specials).T  # [d_sae, n]
            f[:, torch.isin(ids.reshape(-1), special)] = 0.0
            f[f <= 0] = -float("inf")
            index = torch.arange(r * ctx, r * ctx + f.shape[1]).expand_as(f)
            v, pick = torch.cat([best_v, f], 1).topk(args.top_k, dim=1)
            best_v, best_i = v, torch.cat([best_i, index], 1).gather(1, pick)
    return load_s, time.perf_counter() - t0, best_v, best_i


def agreement(args, a_val, a_idx, b_val, b_idx) -> dict:
    """Overlap of the two arms' top-k token indices on ``args.latents`` seeded random latents with >= k examples."""
    full = (a_val > 0).all(1) & (b_val > 0).all(1)
    pool = torch.nonzero(full).flatten()
    gen = torch.Generator().manual_seed(args.seed)
    chosen = pool[torch.randperm(len(pool), generator=gen)[: args.latents]]
    overlaps, diffs, ties = [], [], 0
    for lat in chosen.tolist():
        ia = dict(zip(a_idx[lat].tolist(), a_val[lat].tolist()))
        ib = dict(zip(b_idx[lat].tolist(), b_val[lat].tolist()))
        shared = set(ia) & set(ib)
        overlaps.append(len(shared) / args.top_k)
        diffs += [abs(ia[i] - ib[i]) / max(abs(ia[i]), 1e-12) for i in shared]
        if len(shared) < args.top_k:  # a tie at the k-th value: both arms are right, they break it differently
            kth_a, kth_b = min(ia.values()), min(ib.values())
            ties += kth_a == kth_b and all(ia[i] == kth_a for i in set(ia) - shared) and all(
                ib[i] == kth_b for i in set(ib) - shared)
    return {"latents_compared": len(chosen), "eligible_latents": len(pool),
            "mean_overlap": sum(overlaps) / max(len(overlaps), 1), "min_overlap": min(overlaps, default=float("nan")),
            "identical_top_k_fraction": sum(o == 1.0 for o in overlaps) / max(len(overlaps), 1),
            "differing_latents_explained_by_ties": ties, "differing_latents": sum(o < 1.0 for o in overlaps),
            "max_rel_activation_diff_shared": max(diffs, default=float("nan"))}


def main() -> None:
    """Run both arms and print the comparison."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sae", type=Path, required=True)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=98_304)
    p.add_argument("--latents", type=int, default=100)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--batch-rows", type=int, default=32, help="inspect's rows per encode batch")
    p.add_argument("--model", default=None, help="model name/folder (default: the embedded Gemma 3 270M)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = p.parse_args()
    torch.manual_seed(0)
    t_inspect, a_val, a_idx = inspect_arm(a)
    load_s, t_lm, b_val, b_idx = lm_arm(a)
    result = {"tokens": a.tokens, "inspect_s": t_inspect, "lm_rerun_s": t_lm, "lm_load_s": load_s,
              "lm_over_inspect": t_lm / t_inspect, **agreement(a, a_val, a_idx, b_val, b_idx),
              "threads": torch.get_num_threads()}
    print(f"{a.tokens:,} tokens: inspect {t_inspect:.1f} s, LM re-run {t_lm:.1f} s (+ {load_s:.1f} s model load): "
          f"re-running the LM takes {t_lm / t_inspect:.1f}x as long")
    print(f"top-{a.top_k} agreement on {result['latents_compared']} latents: mean overlap {result['mean_overlap']:.3f}, "
          f"min {result['min_overlap']:.3f}, identical {result['identical_top_k_fraction']:.0%} "
          f"({result['differing_latents_explained_by_ties']} of {result['differing_latents']} others differ only in a tie "
          f"at the k-th value), "
          f"max relative activation difference on shared examples {result['max_rel_activation_diff_shared']:.2e}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
