"""The record each architecture module exports in its ``ARCHS`` dict (see registry.py)."""

from __future__ import annotations

from dataclasses import dataclass, field


class ArchError(ValueError):
    """Raised for an unknown architecture, preset or hyperparameter."""


@dataclass(frozen=True)
class ArchInfo:
    """One architecture: its SAE class, its source (paper + section or seed file) and named presets.

    ``presets`` maps a preset name to hyperparameter overrides, e.g. a seed paper's settings.
    """

    cls: type
    source: str
    presets: dict[str, dict] = field(default_factory=dict)
