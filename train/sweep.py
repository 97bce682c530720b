"""Expand ``--arch`` names and ``--set NAME=V1,V2`` options into one SAESpec per grid point."""

from __future__ import annotations

import itertools

from .trainer import SAESpec


def parse_value(text: str):
    """``"32"`` -> 32, ``"1.5"`` -> 1.5, ``"true"`` -> True, anything else stays a string."""
    low = text.strip().lower()
    if low in {"true", "false"}:
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_sets(sets: list[str]) -> dict[str, list]:
    """``["k=16,32", "lr=1e-4"]`` -> ``{"k": [16, 32], "lr": [0.0001]}``; raises ValueError on a bad item."""
    grid: dict[str, list] = {}
    for item in sets:
        name, sep, values = item.partition("=")
        if not sep or not name.strip() or not values.strip():
            raise ValueError(f"bad --set {item!r}: use NAME=V1,V2 (e.g. --set k=16,32)")
        grid[name.strip()] = [parse_value(v) for v in values.split(",")]
    return grid


def expand_specs(archs: list[str], sets: list[str], target_l0s: list[float] | None = None) -> list[SAESpec]:
    """One spec per arch x grid point x target L0; ``lr`` in the grid sets the learning rate, ``l0_start`` the
    L0 controller's first multiplier (:class:`~saestrata.train.trainer.SAESpec`), the rest are
    hyperparameters; each of ``target_l0s`` gives a spec calibrated to that L0 (``SAESpec.target_l0``).

    Names are the arch name, suffixed with ``-name=value`` for swept settings and ``-l0=L`` for
    several targets.
    """
    grid = parse_sets(sets)
    keys = list(grid)
    targets = list(target_l0s) if target_l0s else [None]
    specs = []
    for arch in archs:
        for values in itertools.product(*(grid[k] for k in keys)):
            for target in targets:
                point = dict(zip(keys, values))
                lr = point.pop("lr", None)
                l0_start = point.pop("l0_start", 1.0)  # the L0 controller's, not the arch's
                if isinstance(l0_start, bool) or not isinstance(l0_start, (int, float)):
                    raise ValueError(f"--set l0_start={l0_start}: give a positive number (the L0 controller's "
                                     "first multiplier on the arch's sparsity coefficients)")
                suffix = "".join(f"-{k}={v}" for k, v in zip(keys, values) if len(grid[k]) > 1)
                suffix += f"-l0={target:g}" if len(targets) > 1 else ""
                specs.append(SAESpec(name=arch + suffix, arch=arch, hparams=point, lr=lr, target_l0=target,
                                     l0_start=float(l0_start)))
    return specs
