"""Harvest: LM loading, text sources, packing, hooks and the store writer loop."""
