"""Names of every SAE architecture, its class, its presets and its source.

A *preset* is a named set of hyperparameters for one architecture (e.g. a seed
paper's settings). ``saestrata train --list-archs`` prints this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import SAE
from .standard import StandardSAE
from .topk import TopKSAE


class ArchError(ValueError):
    """Raised for an unknown architecture, preset or hyperparameter."""


@dataclass(frozen=True)
class ArchInfo:
    """One architecture: its class, where it comes from, and its named presets."""

    cls: type[SAE]
    source: str
    presets: dict[str, dict] = field(default_factory=dict)


ARCHS: dict[str, ArchInfo] = {
    "standard": ArchInfo(StandardSAE, "Conerly et al., Anthropic Circuits Update, April 2024"),
    "topk": ArchInfo(TopKSAE, "Gao et al. 2024, Scaling and evaluating sparse autoencoders"),
}


def register(name: str, info: ArchInfo) -> None:
    """Add an architecture to the registry (used by the arch modules)."""
    ARCHS[name] = info


def resolve(name: str) -> tuple[str, dict]:
    """Map an arch or preset name to ``(arch, preset hyperparameters)``.

    Raises:
        ArchError: the name is neither an arch nor a preset.
    """
    if name in ARCHS:
        return name, {}
    for arch, info in ARCHS.items():
        if name in info.presets:
            return arch, dict(info.presets[name])
    known = sorted(set(ARCHS) | {p for info in ARCHS.values() for p in info.presets})
    raise ArchError(f"unknown arch {name!r}: choose from {', '.join(known)} (see saestrata train --list-archs)")


def build(arch: str, d_in: int, d_sae: int, seed: int = 0, **hparams) -> SAE:
    """Instantiate architecture ``arch`` (an arch or preset name) with overrides ``hparams``.

    Raises:
        ArchError: unknown arch or a hyperparameter the arch does not take.
    """
    base, preset = resolve(arch)
    try:
        return ARCHS[base].cls(d_in, d_sae, seed=seed, **{**preset, **hparams})
    except TypeError as err:
        raise ArchError(f"bad hyperparameter for {arch}: {err}") from err
