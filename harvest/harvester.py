"""``saestrata harvest``: text -> packed rows -> residual stream -> Zarr store.

One forward pass per batch of rows, stopped after the deepest requested block;
activations are buffered until a whole shard is full, then the shard is written
and committed (store/writer.py). Activation statistics over non-BOS tokens are
recorded in the store metadata at the end (trainers normalise with them).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..store import StoreWriter
from ..store.format import to_stored
from .hooks import residuals
from .model import EMBEDDED_MODEL, LoadedModel, check_layers, hook_name, load_model
from .packing import Row, pack_documents
from .text import EMBEDDED_DATASET, SPLIT_RULE, DatasetError, iter_documents


@dataclass
class HarvestConfig:
    """What to harvest. ``tokens`` is rounded up to whole context rows."""

    layers: list[int]
    tokens: int
    out: Path
    model: str = EMBEDDED_MODEL
    dataset: str = EMBEDDED_DATASET
    split: str = "train"
    context_length: int = 128
    batch_rows: int = 16
    seed: int = 0
    text_field: str = "text"
    device: str = "auto"
    dtype: str = "bfloat16"
    rows_per_chunk: int = 8
    chunks_per_shard: int = 8
    extra_attrs: dict = field(default_factory=dict)


class _Stats:
    """Running per-hook statistics of non-BOS activations (float64 accumulators)."""

    def __init__(self):
        self.n, self.norm_sum, self.sq_sum, self.max_abs = 0, 0.0, 0.0, 0.0

    def update(self, acts: torch.Tensor) -> None:
        acts = acts.float()
        norms = acts.norm(dim=-1)
        self.n += len(acts)
        self.norm_sum += float(norms.double().sum())
        self.sq_sum += float((norms.double() ** 2).sum())
        if len(acts):
            self.max_abs = max(self.max_abs, float(acts.abs().max()))

    def as_dict(self) -> dict:
        n = max(self.n, 1)
        return {"n": self.n, "mean_norm": self.norm_sum / n, "rms_norm": math.sqrt(self.sq_sum / n), "max_abs": self.max_abs}


def harvest(cfg: HarvestConfig, lm: LoadedModel | None = None, progress: bool = True) -> Path:
    """Write activations of ``cfg.layers`` for ``cfg.tokens`` tokens into a new store at ``cfg.out``.

    Args:
        cfg: what to harvest.
        lm: an already loaded model (else loaded from ``cfg.model``).
        progress: show a tqdm bar.

    Returns:
        the store path.

    Raises:
        ModelError: layer out of range / model not loadable.
        DatasetError: the source yields no full context row.
        StoreError: ``cfg.out`` exists and is not empty.
        FloatingPointError: the model produced NaN/Inf activations (nothing of that shard is written).
    """
    lm = lm or load_model(cfg.model, cfg.device, cfg.dtype)
    layers = check_layers(cfg.layers, lm.n_layers, cfg.model)
    hooks = [hook_name(layer) for layer in layers]
    ctx = cfg.context_length
    n_rows = max(1, -(-cfg.tokens // ctx))
    rows_iter = pack_documents(iter_documents(cfg.dataset, cfg.split, cfg.seed, cfg.text_field), lm.tokenizer, ctx)
    first = list(itertools.islice(rows_iter, min(n_rows, cfg.batch_rows)))
    if not first:
        raise DatasetError(f"dataset {cfg.dataset!r} split {cfg.split!r} gave no full row of {ctx} tokens: it is empty")
    rows_iter = itertools.chain(first, rows_iter)

    shard_rows = cfg.rows_per_chunk * cfg.chunks_per_shard
    writer = StoreWriter(
        cfg.out, hooks, lm.d_model, n_rows * ctx, shard_tokens=shard_rows * ctx,
        chunk_tokens=cfg.rows_per_chunk * ctx, dtype=cfg.dtype, attrs=_identity_attrs(cfg, lm, layers, hooks),
    )
    stats = {h: _Stats() for h in hooks}
    bos = lm.tokenizer.bos_token_id
    done_rows = 0
    bar = tqdm(total=n_rows * ctx, unit="tok", desc=f"harvest {cfg.split}", disable=not progress)
    for shard in itertools.count():
        rows = list(itertools.islice(rows_iter, min(shard_rows, n_rows - done_rows)))
        if not rows:
            break
        acts = _forward_rows(lm, rows, layers, cfg.batch_rows)
        token_ids = np.concatenate([r.token_ids for r in rows])
        not_bos = torch.from_numpy(token_ids != bos)
        for layer, hook in zip(layers, hooks):
            if not torch.isfinite(acts[layer]).all():
                raise FloatingPointError(f"non-finite activations at {hook} in shard {shard}: check --dtype / the model")
            stats[hook].update(acts[layer][not_bos])
        writer.write_shard(
            shard,
            {hook: to_stored(acts[layer]) for layer, hook in zip(layers, hooks)},
            {"token_ids": token_ids, "doc_index": np.concatenate([r.doc_index for r in rows]),
             "position": np.concatenate([r.position for r in rows])},
        )
        done_rows += len(rows)
        bar.update(len(rows) * ctx)
        if done_rows == n_rows:
            break
    bar.close()
    if done_rows < n_rows:
        writer.truncate(done_rows * ctx)
        print(f"note: {cfg.dataset} {cfg.split} ran out after {done_rows * ctx} of {n_rows * ctx} tokens")
    writer.finish({"activation_stats": {h: s.as_dict() for h, s in stats.items()}})
    return Path(cfg.out)


def _forward_rows(lm: LoadedModel, rows: list[Row], layers: list[int], batch_rows: int) -> dict[int, torch.Tensor]:
    """Residuals ``{layer: [len(rows) * ctx, d_model]}`` (CPU, model dtype) for packed rows."""
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for b in range(0, len(rows), batch_rows):
        ids = torch.from_numpy(np.stack([r.token_ids for r in rows[b : b + batch_rows]])).long()
        for layer, acts in residuals(lm, ids, layers).items():
            out[layer].append(acts.reshape(-1, acts.shape[-1]).cpu())
    return {layer: torch.cat(parts) for layer, parts in out.items()}


def _identity_attrs(cfg: HarvestConfig, lm: LoadedModel, layers: list[int], hooks: list[str]) -> dict:
    """Metadata that makes the store self-describing (DESIGN.md, "Store format")."""
    tok = lm.tokenizer
    return {
        **cfg.extra_attrs,
        "model_id": cfg.model,
        "weights_hash": lm.weights_hash,
        "model_class": type(lm.model).__name__,
        "n_layers": lm.n_layers,
        "layers": layers,
        "dataset": cfg.dataset,
        "split": cfg.split,
        "split_rule": SPLIT_RULE,
        "text_field": cfg.text_field,
        "order_seed": cfg.seed,
        "context_length": cfg.context_length,
        "bos_handling": "every row and every document starts with BOS",
        "bos_token_id": tok.bos_token_id,
        "special_token_ids": sorted(set(tok.all_special_ids)),
        "tokenizer": getattr(tok, "name_or_path", type(tok).__name__),
        "tokenizer_vocab_size": len(tok),
        "tokens_requested": cfg.tokens,
        "software": f"saestrata {__version__}",
    }
