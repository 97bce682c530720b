"""Feature dashboards from the store, without re-running the LM (issue 11): ``saestrata inspect``.

Notebook API::

    from saestrata.dashboards import load_dashboard, open_store, ordered_batches
    dash = load_dashboard("inspect-out")          # a folder written by saestrata inspect
    dash.latent(12)["top"][0]["tokens"]           # strings of latent 12's best context window
    store = open_store("demo-out/store-train")    # ActivationStore (store/reader.py)
    for batch in ordered_batches(store, store.hooks[0], rows_per_batch=8):
        batch.acts, batch.token_ids               # torch [n, d_model], numpy [n]

Modules: :mod:`.segtopk` (running top-k), :mod:`.collect` (per-latent bookkeeping),
:mod:`.logits` (logit effects), :mod:`.structure` (levels / groups / tiers, parents),
:mod:`.run` (the pass), :mod:`.export` / :mod:`.files` (files), :mod:`.html` (browser).
"""

from ..store import ActivationStore as _Store
from ..store import ordered_batches
from ..train.sae_io import load_sae
from .files import Dashboard, load_dashboard
from .run import InspectConfig, inspect_sae


def open_store(path, allow_partial: bool = False) -> _Store:
    """Open an activation store read-only (:class:`saestrata.store.ActivationStore`)."""
    return _Store(path, allow_partial=allow_partial)


__all__ = ["Dashboard", "InspectConfig", "inspect_sae", "load_dashboard", "load_sae", "open_store", "ordered_batches"]
