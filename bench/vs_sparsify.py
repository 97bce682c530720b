"""Benchmark: our TopK trainer vs EleutherAI sparsify's SAE on the same store batches (issue 14).

Peer: ``eai-sparsify`` (PyPI), its :class:`sparsify.SparseCoder` (the fused TopK encoder with its
hand-written backward, and its sparse decoder: ``embedding_bag`` on CPU, Triton only on CUDA)
trained by the loop of sparsify's own trainer, Adam branch (``trainer.py``): FVU loss, its lr
rule ``2e-4 / sqrt(n_latents / 2**14)`` (the same as ours), linear warmup then linear decay to 0,
gradient parallel to decoder rows removed, decoder rows renormalised each step, no AuxK
(its default ``auxk_alpha = 0``). Its whole trainer needs a model forward and a ``datasets``
corpus, so the SAE and its kernels run on our batches instead. Two declared departures: its
warmup (1,000 steps by default, longer than these runs) is cut to ours (5% of steps), and it
gets our input normalisation (mean norm sqrt(d_in)), without which Gemma's residual norms
(~5,700 at block 8) make its lr meaningless; FVU does not depend on that scale.

Ours: ``saestrata.train`` with ``topk`` (k = ``--k``), fp32, no autocast, the same batches
(``shuffled_batches`` seed 0), steps, d_sae and lr. Both arms read the store the same way, so
tokens/s includes the same reader cost; ours also includes its bookkeeping and the final save.

Held-out FVU: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the first ``--eval-tokens``
non-BOS tokens of ``--eval-store`` (another split: articles neither SAE saw).

Setup (a bench-only site dir: the peer never touches the venv or the torch pin)::

    pip install --target bench/.peers --no-deps eai-sparsify==1.3.3 einops natsort simple-parsing \\
        schedulefree docstring-parser typing-inspect mypy-extensions
    PYTHONPATH=bench/.peers python bench/vs_sparsify.py --store STORE --eval-store EVAL_STORE --layer 8
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from _common import machine


def scale_of(store, hook: str, d_in: int) -> float:
    """Our input normalisation: mean norm -> sqrt(d_in) (train/trainer.py)."""
    return math.sqrt(d_in) / store.stats(hook)["mean_norm"]


def eval_tokens(args, hook: str) -> torch.Tensor:
    """fp32 ``[n, d_in]``: the first ``--eval-tokens`` non-BOS activations of the eval store (raw units)."""
    from saestrata.store import ActivationStore

    store = ActivationStore(args.eval_store)
    acts = store.activations(hook)[: args.eval_tokens * 2].float()
    tok = torch.as_tensor(store.aligned("token_ids")[: len(acts)])
    keep = tok != int(store.attrs["bos_token_id"])
    return acts[keep][: args.eval_tokens]


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained over all tokens and dims (the sparsify / SAELens definition)."""
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def ours(args, hook: str, x_eval: torch.Tensor) -> dict:
    """Train our topk once; tokens/s over the whole ``train`` call and held-out FVU."""
    from saestrata.train.sae_io import load_sae
    from saestrata.train.trainer import SAESpec, TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(store=args.store, layer=args.layer, out=Path(tmp), specs=[SAESpec("topk", "topk", {"k": args.k})],
                          d_sae=args.d_sae, batch_size=args.batch_size, tokens=args.steps * args.batch_size, device="cpu",
                          autocast=False, checkpoint_every=0, log_every=10**9)
        t0 = time.perf_counter()
        folder = train(cfg, progress=False)["topk"]
        seconds = time.perf_counter() - t0
        sae, _ = load_sae(folder)
        with torch.no_grad():
            got = fvu(x_eval, sae(x_eval).x_hat.float())
    return {"tokens_per_s": args.steps * args.batch_size / seconds, "seconds": seconds, "heldout_fvu": got}


def theirs(args, store, hook: str, x_eval: torch.Tensor) -> dict:
    """Train sparsify's SparseCoder with its trainer's Adam recipe on our batches."""
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.utils import decoder_impl
    from transformers import get_linear_schedule_with_warmup

    from saestrata.store import shuffled_batches
    from saestrata.train.trainer import default_lr

    torch.manual_seed(0)
    scale = scale_of(store, hook, store.d_model)
    sae = SparseCoder(store.d_model, SparseCoderConfig(num_latents=args.d_sae, k=args.k), device="cpu")
    opt = torch.optim.Adam(sae.parameters(), lr=default_lr(args.d_sae))
    sched = get_linear_schedule_with_warmup(opt, max(1, args.steps // 20), args.steps)
    batches = shuffled_batches(store, hook, args.batch_size, seed=0)
    t0 = time.perf_counter()
    first = next(batches).float() * scale
    with torch.no_grad():  # sparsify's trainer: b_dec starts at the first batch's mean
        sae.b_dec.copy_(first.mean(0))
    x = first
    for step in range(args.steps):
        if step:
            x = next(batches).float() * scale
        out = sae(x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        sae.set_decoder_norm_to_unit_norm()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        got = fvu(x_eval * scale, sae(x_eval * scale).sae_out.float())
    return {"tokens_per_s": args.steps * args.batch_size / seconds, "seconds": seconds, "heldout_fvu": got,
            "decoder": decoder_impl.__name__}


def main() -> None:
    """Run both arms ``--rounds`` times, interleaved; print medians and the ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--eval-store", type=Path, required=True, help="a store of another split (held-out FVU)")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    print(machine(), flush=True)
    from saestrata.store import ActivationStore

    store = ActivationStore(a.store)
    hook = store.hook_for_layer(a.layer)
    x_eval = eval_tokens(a, hook)
    runs = {"ours": [], "sparsify": []}
    for _ in range(a.rounds):
        runs["ours"].append(ours(a, hook, x_eval))
        runs["sparsify"].append(theirs(a, store, hook, x_eval))
    med = {arm: {k: sorted(r[k] for r in rs)[len(rs) // 2] for k in ("tokens_per_s", "heldout_fvu")}
           for arm, rs in runs.items()}
    result = {"config": {k: str(v) for k, v in vars(a).items()}, "machine": machine(), "threads": torch.get_num_threads(), "runs": runs,
              "median": med, "ours_over_sparsify_tokens_per_s": med["ours"]["tokens_per_s"] / med["sparsify"]["tokens_per_s"]}
    print(f"TopK k={a.k}, d_sae {a.d_sae}, {a.steps} steps of {a.batch_size}, {a.rounds} interleaved rounds (medians); "
          f"sparsify decoder: {runs['sparsify'][0]['decoder']}")
    for arm, m in med.items():
        print(f"  {arm:9s} {m['tokens_per_s']:9,.0f} tok/s   held-out FVU {m['heldout_fvu']:.4f}")
    print(f"  ours / sparsify throughput: {result['ours_over_sparsify_tokens_per_s']:.2f}x")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
