"""Train: SAE architectures (one module per family), the registry of presets, the one-pass trainer."""
