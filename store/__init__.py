"""Zarr v3 activation store: layout, commit-protocol writer, readers. Imports nothing else of saestrata."""

from .format import StoreError
from .reader import ActivationStore, shuffled_batches
from .writer import StoreWriter

__all__ = ["ActivationStore", "StoreError", "StoreWriter", "shuffled_batches"]
