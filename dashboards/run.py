"""``saestrata inspect``: one streaming SAE encode over a store, then dashboard files and the HTML browser.

The store already holds the activations and the aligned ``token_ids`` / ``doc_index`` /
``position`` (DESIGN.md, "Store format"), so the dashboards of SAE-Vis / Neuronpedia need no
language-model forward pass here: the pass reads whole context rows in store order
(store/reader.py :func:`ordered_batches`), encodes them, and feeds a
:class:`.collect.LatentCollector`, whose memory is ``O(d_sae x k)`` whatever the store size.
Only the unembedding and the tokenizer are taken from the model (logit effects, token strings).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..device import resolve_device, to_device
from ..harvest.model import layer_of_hook
from ..store import ActivationStore, ordered_batches
from ..store.location import is_url
from ..train.sae_io import load_sae
from .collect import LatentCollector


@dataclass
class InspectConfig:
    """Settings of one ``inspect`` run.

    Attributes:
        sae: saved SAE folder.
        store: activation store holding the SAE's hook: a folder, or an object-store URL
            (``s3://bucket/prefix``, read through whole-chunk prefetch like training).
        storage_options: fsspec options for a URL ``store`` (credentials, ``endpoint_url``).
        out: output folder (created; files in it are replaced).
        tokens: tokens to read from the start of the store (None = all; rounded down to whole rows).
        top_k: top examples per latent.
        context: tokens shown on each side of an example.
        batch_rows: context rows per encode batch.
        n_intervals, per_interval: activation-quantile intervals and examples per interval.
        block_size: latents per output block file.
        allow_partial: read the committed prefix of a half-written store.
        seed: reservoir-sampling seed.
        device: where the streaming encode runs (``"cpu"``, ``"cuda"``, ``"auto"``); the collector, the logit
            effects' bookkeeping and the files stay on the host.
    """

    sae: Path
    store: Path | str
    out: Path
    tokens: int | None = None
    top_k: int = 20
    context: int = 16
    batch_rows: int = 32
    n_intervals: int = 5
    per_interval: int = 4
    block_size: int = 256
    allow_partial: bool = False
    seed: int = 0
    storage_options: dict | None = None
    device: str = "cpu"


def open_inputs(cfg: InspectConfig):
    """``(sae, sae cfg dict, store, hook)``, checked against each other.

    Raises:
        StoreError: the store lacks the SAE's layer, or is half-written without ``allow_partial``.
        ValueError: the store's width is not the SAE's ``d_in``.
    """
    sae, sae_cfg = load_sae(cfg.sae)
    store = ActivationStore(cfg.store, allow_partial=cfg.allow_partial, storage_options=cfg.storage_options)
    hook = store.hook_for_layer(layer_of_hook(sae_cfg["hook_name"]))
    if store.d_model != sae.d_in:
        raise ValueError(f"store {cfg.store} has d_model {store.d_model} but the SAE takes d_in {sae.d_in}: "
                         "pass the store the SAE was trained on")
    return sae, sae_cfg, store, hook


def special_ids(store: ActivationStore) -> tuple[int, ...]:
    """Token ids excluded from statistics: the store's ``special_token_ids`` and ``bos_token_id``."""
    ids = set(int(t) for t in store.attrs.get("special_token_ids", []))
    if store.attrs.get("bos_token_id") is not None:
        ids.add(int(store.attrs["bos_token_id"]))
    return tuple(sorted(ids))


@torch.no_grad()
def encode_batch(sae, acts: torch.Tensor, doc_index, token_ids, context_length: int,
                 specials: tuple[int, ...]) -> torch.Tensor:
    """Latents fp32 ``[n, d_sae]``, on the CPU, of ``n`` tokens of whole rows (``acts [n, d_in]``, any float
    dtype, on the CPU), encoded on the SAE's device.

    Token SAEs encode each token; sequence SAEs (``needs_sequences``) get the rows
    ``[n / T, T, d_in]`` with their ``doc_index`` and ``valid = not special`` (as evaluate/splice.py).
    """
    dev = next(sae.parameters()).device
    x = to_device(acts, dev).float()
    if not getattr(sae, "needs_sequences", False):
        return sae.encode(x).float().cpu()
    rows = x.reshape(-1, context_length, x.shape[-1])
    doc = torch.as_tensor(doc_index).long().reshape(rows.shape[:2])
    tok = torch.as_tensor(token_ids).reshape(rows.shape[:2])
    valid = ~torch.isin(tok, torch.tensor(specials, dtype=tok.dtype))
    return sae.encode_seq(rows, doc.to(dev), valid.to(dev)).flatten(0, 1).float().cpu()


def collect(cfg: InspectConfig, progress=None, inputs=None) -> tuple[LatentCollector, dict]:
    """The streaming pass: returns the filled collector and run facts (``tokens``, ``seconds``, ``tokens_per_s``).

    Args:
        cfg: run settings.
        progress: optional callable ``(tokens done, tokens total)`` called after each batch.
        inputs: ``open_inputs(cfg)``'s result when the caller has it (an S3 store is then opened once).

    Raises:
        StoreError / ValueError: see :func:`open_inputs`; the range holds no whole row.
    """
    sae, _, store, hook = inputs if inputs is not None else open_inputs(cfg)
    ctx = int(store.attrs["context_length"])
    stop = store.n_tokens if cfg.tokens is None else min(cfg.tokens, store.n_tokens)
    if stop < ctx:
        raise ValueError(f"{stop} tokens is less than one context row of {ctx} tokens: read at least {ctx} "
                         "(--tokens), or all of the store")
    specials = special_ids(store)
    dev = resolve_device(cfg.device)
    if dev.type != "cpu":  # a copy: the caller's SAE stays on the CPU for the steps after the pass
        sae = copy.deepcopy(sae).to(dev)
    coll = LatentCollector(sae.d_sae, ctx, cfg.top_k, cfg.context, special_ids=specials, seed=cfg.seed)
    t0, done = time.perf_counter(), 0
    for batch in ordered_batches(store, hook, cfg.batch_rows, (0, stop)):
        f = encode_batch(sae, batch.acts, batch.doc_index, batch.token_ids, ctx, specials)
        coll.update(f, batch.start, batch.token_ids, batch.doc_index, batch.position)
        done += len(batch.token_ids)
        if progress is not None:
            progress(done, stop)
    seconds = time.perf_counter() - t0
    return coll, {"tokens": done, "counted_tokens": coll.n_tokens, "seconds": seconds,
                  "tokens_per_s": done / seconds if seconds else None}


def inspect_sae(cfg: InspectConfig, lm=None, model: str | None = None, device: str | None = None, progress=None) -> dict:
    """Run ``inspect``: the pass, logit effects, structure, dashboard files and the browser in ``cfg.out``.

    Args:
        cfg: run settings.
        lm: a loaded model (:class:`~saestrata.harvest.model.LoadedModel`) for the unembedding and
            tokenizer; else ``model`` (default: the model recorded in the SAE's cfg.json) is loaded.
        model, device: what to load when ``lm`` is None (``device`` default: ``cfg.device``).
        progress: see :func:`collect`.

    Returns:
        The ``index.json`` dict (run facts under ``"tokens"``, ``"seconds"``, ``"tokens_per_s"`` ...).

    Raises:
        StoreError / ValueError: see :func:`open_inputs`; ModelError: the model cannot be loaded.
    """
    from .export import build
    from .files import write_json
    from .html import write_browser
    from .logits import logit_effects, unembedding
    from .structure import latent_structure

    inputs = open_inputs(cfg)
    sae, sae_cfg, store, hook = inputs
    coll, facts = collect(cfg, progress, inputs)
    t0 = time.perf_counter()
    quantiles = coll.quantile_examples(cfg.n_intervals, cfg.per_interval, cfg.seed)
    if lm is None:
        from ..harvest.model import load_model

        ours = sae_cfg.get("saestrata") if isinstance(sae_cfg.get("saestrata"), dict) else {}
        lm = load_model(model or ours.get("model_id") or sae_cfg.get("model_name"), device or cfg.device, "auto")
    logits = logit_effects(sae, unembedding(lm.model).detach())
    facts = {**facts, "sae": str(Path(cfg.sae).resolve()), "sae_name": Path(cfg.sae).name,
             "arch": (sae_cfg.get("saestrata") or {}).get("arch", sae_cfg.get("architecture")),
             "store": cfg.store if is_url(cfg.store) else str(Path(cfg.store).resolve()),
             "store_name": str(cfg.store).rstrip("/").rsplit("/", 1)[-1], "hook": hook,
             "model": lm.model_id, "special_ids": list(special_ids(store))}
    index = build(Path(cfg.out), coll, quantiles, logits, latent_structure(sae), lm.tokenizer, facts, cfg.block_size)
    write_browser(Path(cfg.out), index)
    index["post_seconds"] = time.perf_counter() - t0  # quantiles, logits, files: not part of the pass
    write_json(Path(cfg.out) / "index.json", index)  # again, now with post_seconds (index.json stays last)
    return index
