"""Zarr v3 activation store: layout, commit-protocol writer, readers. Imports nothing else of saestrata."""

from .audit import list_stores, store_info, verify_store
from .format import IdentityMismatch, StoreError
from .reader import ActivationStore, RowBatch, ordered_batches, sequence_batches, shuffled_batches
from .writer import StoreWriter

__all__ = [
    "ActivationStore", "IdentityMismatch", "RowBatch", "StoreError", "StoreWriter", "list_stores", "ordered_batches",
    "sequence_batches",
    "shuffled_batches", "store_info", "verify_store",
]
