"""Turn a filled :class:`.collect.LatentCollector` plus logit effects and structure into the dashboard files.

The layout is documented in :mod:`.files`; this module decides what goes in each block and
the per-latent summary rows of ``index.json`` (what the browser's index table sorts and searches).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .collect import LatentCollector, bin_edges
from .files import FORMAT, FORMAT_VERSION, block_name, finite, write_block, write_json


def token_strings(tokenizer, ids: list[int]) -> dict[int, str]:
    """``{id: text}`` of single tokens, decoded one by one (so ``"▁the"`` reads ``" the"``)."""
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    return dict(zip(ids, texts))


def _used_ids(*tensors: torch.Tensor) -> list[int]:
    """Sorted distinct non-negative ids in ``tensors``."""
    ids = torch.cat([t.reshape(-1).long() for t in tensors]).unique()
    return ids[ids >= 0].tolist()


def _top_tokens(tokens: torch.Tensor, centre: int, vocab: dict[int, str], n: int = 3) -> list[str]:
    """Up to ``n`` distinct strings of the centre tokens of one latent's top examples ``[k, W]``, most frequent first."""
    ids = tokens[:, centre]
    ids = ids[ids >= 0]
    if not len(ids):
        return []
    uniq, counts = ids.unique(return_counts=True)
    order = torch.argsort(counts, descending=True, stable=True)
    return [vocab.get(int(t), "") for t in uniq[order][:n]]


def build(out: Path, coll: LatentCollector, quantiles: dict, logits: dict | None, structure: dict,
          tokenizer, facts: dict, block_size: int = 256) -> dict:
    """Write ``blocks/*``, ``vocab.json`` and ``index.json`` into ``out``; returns the index dict.

    Args:
        out: output folder (created).
        coll: the collector after the pass.
        quantiles: :meth:`LatentCollector.quantile_examples`.
        logits: :func:`.logits.logit_effects` or None (no model given).
        structure: :func:`.structure.latent_structure`.
        tokenizer: for token strings (``batch_decode``).
        facts: run facts copied into ``index.json`` (sae, store, hook, tokens, seconds ...).
        block_size: latents per block.
    """
    out.mkdir(parents=True, exist_ok=True)
    scores, top = coll.top_examples()
    d = coll.d_sae
    logit_ids = [logits["top_ids"], logits["bottom_ids"]] if logits else []
    vocab = token_strings(tokenizer, _used_ids(top["tokens"], quantiles["tokens"], *logit_ids))
    density, mean_firing, mean_all = coll.density(), coll.mean_firing(), coll.mean_all()
    max_act = scores[:, 0].clamp_min(0)  # -inf (never fired) -> 0
    hist = coll.histogram()
    rows, blocks = [], []
    for b, lo in enumerate(range(0, d, block_size)):
        hi = min(lo + block_size, d)
        empty = ~torch.isfinite(scores[lo:hi])
        tensors = {
            "top_index": top["index"][lo:hi].masked_fill(empty, -1), "top_value": top["value"][lo:hi],
            "top_tokens": top["tokens"][lo:hi], "top_acts": top["acts"][lo:hi],
            **{f"q_{k}": v[lo:hi] for k, v in quantiles.items()}, "hist": hist[lo:hi],
            **({f"logit_{k}": v[lo:hi] for k, v in logits.items()} if logits else {}),
        }
        latents = []
        for i in range(lo, hi):
            stats = {"density": finite(density[i]), "max": finite(max_act[i]), "mean_firing": finite(mean_firing[i]),
                     "mean_all": finite(mean_all[i]), "fire_count": int(coll.fire_count[i])}
            g = structure["group"][i]
            struct = {"group": structure["groups"][g] if g >= 0 else None, "parent": structure["parent"][i],
                      "children": structure["children"][i]}
            table = ({side: [[vocab[int(t)], finite(v)] for t, v in zip(logits[f"{side}_ids"][i].tolist(),
                                                                       logits[f"{side}_values"][i].tolist())]
                      for side in ("top", "bottom")} if logits else None)
            latents.append({"latent": i, "stats": stats, "structure": struct, "logits": table})
            rows.append({"latent": i, **stats, "group": struct["group"],
                         "top_tokens": _top_tokens(top["tokens"][i][torch.isfinite(scores[i])], coll.C, vocab),
                         "logit_top": [r[0] for r in table["top"][:3]] if table else []})
        write_block(out, b, tensors, {"first": lo, "last": hi - 1, "latents": latents})
        blocks.append({"block": b, "name": block_name(b), "first": lo, "last": hi - 1})
    write_json(out / "vocab.json", {str(k): v for k, v in vocab.items()})
    index = {"format": FORMAT, "format_version": FORMAT_VERSION, **facts, "d_sae": d, "top_k": coll.k,
             "context": coll.C, "window": coll.width, "block_size": block_size, "blocks": blocks,
             "hist_edges": [float(e) for e in bin_edges()], "structure_kind": structure["kind"],
             "groups": structure["groups"], "latents": rows}
    write_json(out / "index.json", index)
    return index
