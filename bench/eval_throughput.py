"""Benchmark: LM forward with an SAE spliced in vs the clean forward of the same batches (issue 5, target >= 0.8).

Both arms run the full model (with the LM head, as evaluation must) on the same packed
held-out rows; the spliced arm replaces ``blocks.L.hook_resid_post`` with the SAE's
reconstruction through the same hook evaluation uses. Best of ``--repeats`` each.
Also prints the end-to-end ``evaluate_saes`` rate (clean + ablation + spliced groups and
all metrics) for reference. Run on an idle machine:

    .venv/bin/python bench/eval_throughput.py --sae demo-out/runs/layer8/topk
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch

from _common import best_time

from saestrata.allocator import tune_allocator
from saestrata.evaluate.core import EvalConfig, evaluate_saes
from saestrata.evaluate.splice import sae_replacement, splice
from saestrata.harvest.model import layer_of_hook, load_model
from saestrata.harvest.packing import pack_documents
from saestrata.harvest.text import iter_documents
from saestrata.train.sae_io import load_sae


def main() -> None:
    """Print clean and spliced tokens/s and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sae", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sae, cfg = load_sae(args.sae)
    layer = layer_of_hook(cfg["hook_name"])
    lm = load_model(cfg["saestrata"]["model_id"], device="cpu")
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
    evaluate_saes([args.sae], EvalConfig(tokens=n_tok, context_length=ctx), lm=lm, progress=False)
    print(f"evaluate_saes    : {n_tok / (time.perf_counter() - t0):8.0f} tokens/s (3 groups + all core metrics)")


if __name__ == "__main__":
    tune_allocator()  # as the CLI does: the benches measure what users run
    main()
