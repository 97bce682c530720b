"""Names of every SAE architecture, its class, its presets and its source.

A *preset* is a named set of hyperparameters for one architecture (e.g. a seed
paper's settings). ``saestrata train --list-archs`` prints this table.
"""

from __future__ import annotations

import importlib

from .arch_info import ArchError, ArchInfo
from .base import SAE

# One module per family; each defines ``ARCHS: dict[str, ArchInfo]``.
_MODULES = [
    "standard", "topk", "batchtopk", "jumprelu", "matryoshka",
    "seed000_hsae", "seed001_grouped", "seed002_importance", "seed003_tiered", "seed004_groups",
]


def _collect() -> dict[str, ArchInfo]:
    archs: dict[str, ArchInfo] = {}
    for name in _MODULES:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"{__package__}.{name}":
                continue  # family not written yet
            raise
        archs.update(module.ARCHS)
    return archs


ARCHS: dict[str, ArchInfo] = _collect()


def resolve(name: str) -> tuple[str, dict]:
    """Map an arch or preset name to ``(arch, preset hyperparameters)``; a preset wins over an arch of the same name.

    ``-`` and ``_`` are interchangeable (``group-sparsity`` = ``group_sparsity``).

    Raises:
        ArchError: the name is neither an arch nor a preset.
    """
    key = _canonical(name)
    # Presets first: a preset may carry its arch's name (seed001_static_hier) and must then apply.
    for arch, info in ARCHS.items():
        for preset, hparams in info.presets.items():
            if _canonical(preset) == key:
                return arch, dict(hparams)
    for arch in ARCHS:
        if _canonical(arch) == key:
            return arch, {}
    known = sorted(set(ARCHS) | {p for info in ARCHS.values() for p in info.presets})
    raise ArchError(f"unknown arch {name!r}: choose from {', '.join(known)} (see saestrata train --list-archs)")


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "_")


# Preset/--set keys that configure the optimiser, not the SAE module (seed papers give both).
OPTIMIZER_HPARAMS = ("lr", "weight_decay")


def optimizer_hparams(arch: str, hparams: dict | None = None) -> dict:
    """``{"lr", "weight_decay"}`` set by the preset of ``arch`` or by ``hparams`` (overrides win); may be empty."""
    _, preset = resolve(arch)
    merged = {**preset, **(hparams or {})}
    return {k: merged[k] for k in OPTIMIZER_HPARAMS if k in merged}


def build(arch: str, d_in: int, d_sae: int, seed: int = 0, **hparams) -> SAE:
    """Instantiate architecture ``arch`` (an arch or preset name) with overrides ``hparams``.

    Optimiser keys (:data:`OPTIMIZER_HPARAMS`) are ignored here; the trainer reads
    them with :func:`optimizer_hparams`.

    Every value is checked and converted against its declared type and range first
    (:func:`~saestrata.train.hparams.check_hparams`; non-finite floats pass, see there).

    Raises:
        ArchError: unknown arch, a hyperparameter the arch does not take, or a value outside
            its declared range (one line naming the arch and the allowed values).
    """
    from .hparams import check_hparams

    base, preset = resolve(arch)
    module_hparams = {k: v for k, v in {**preset, **hparams}.items() if k not in OPTIMIZER_HPARAMS}
    module_hparams = check_hparams(arch, module_hparams, d_sae, finite=False)
    try:
        return ARCHS[base].cls(d_in, d_sae, seed=seed, **module_hparams)
    except TypeError as err:
        raise ArchError(f"bad hyperparameter for {arch}: {err}") from err


def every_variant() -> list[str]:
    """One name per distinct SAE: archs without presets by arch name, the others by each preset.

    This is the set ``--arch all`` trains (the comparison table of the README).
    """
    names = []
    for arch, info in ARCHS.items():
        names += list(info.presets) if info.presets else [arch]
    return names


def expand_names(names: list[str]) -> list[str]:
    """Replace ``all`` by :func:`every_variant` and check every name (ArchError on an unknown one)."""
    out = []
    for name in names:
        out += every_variant() if name == "all" else [name]
    for name in out:
        resolve(name)
    return out

