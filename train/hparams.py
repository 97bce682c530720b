"""Declared types and allowed ranges of every architecture's hyperparameters (``--set``, presets, cfg.json).

One place for all archs, so ``--set k=abc``, ``k=0`` or ``k=100000`` is refused before
anything is read or written, with one line naming the arch and the allowed values:

- the *type* of each hyperparameter comes from its arch class's ``__init__`` signature
  (the annotation, else the default's type), following ``**kwargs`` up the MRO, so a
  hyperparameter added to an arch is typed with no change here;
- the *range* comes from :data:`RANGES` (by name), else from a name pattern
  (:func:`_pattern_range`: ``*_coeff`` / ``lambda*`` >= 0, ``*_frac`` in [0, 1],
  ``*_every`` / ``*_iters`` >= 1), else none (any finite number). ``"d_sae"`` as a bound
  means the run's number of latents. The ranges restate the conditions the arch modules
  check themselves (e.g. batchtopk.py ``_check_batchtopk_args``) and what their values mean
  in the seed papers (a coefficient of a loss term is never negative).

Sequence hyperparameters (``rates``, ``tier_ratios`` ...) are written ``1:2:4`` on the
command line (``,`` separates sweep values). ``none`` gives None where the default allows it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace

from .arch_info import ArchError

D_SAE = "d_sae"  # a bound meaning "the run's d_sae"


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: its kind, whether None is allowed, and its range.

    ``kind`` is ``int``, ``float``, ``bool``, ``str``, ``seq`` (a list of ``elem``) or ``any``
    (not checked). ``lo``/``hi`` are numbers or :data:`D_SAE`; ``*_open`` excludes the bound.
    For ``seq`` the range applies to every element and ``length`` fixes the number of entries.
    """

    name: str
    kind: str
    optional: bool = False
    lo: float | str | None = None
    hi: float | str | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple | None = None
    elem: str | None = None
    elem_optional: bool = False
    length: int | None = None
    default: object = inspect.Parameter.empty  # the __init__ default (checked too: k=32 needs d_sae >= 32)

    def describe(self, d_sae: int | None) -> str:
        """The allowed values in words, e.g. ``an integer in [1, d_sae=512]``."""
        if self.kind == "seq":
            item = replace(self, kind=self.elem or "any", optional=self.elem_optional, elem=None)
            n = f"{self.length} " if self.length else ""
            text = f"a list of {n}{_plural(item.describe(d_sae))}, written like 1:2:4"
        elif self.choices:
            text = "one of " + ", ".join(map(str, self.choices))
        else:
            text = {"int": "an integer", "float": "a finite number", "bool": "true or false",
                    "str": "text", "any": "any value"}[self.kind] + self._range(d_sae)
        return text + (" or none" if self.optional else "")  # seq: the elements' "or none" comes first

    def _range(self, d_sae: int | None) -> str:
        if self.kind not in ("int", "float") or (self.lo is None and self.hi is None):
            return ""
        show = lambda b: f"d_sae={d_sae}" if b == D_SAE and d_sae is not None else str(b)  # noqa: E731
        if self.hi is None:
            return f" {'>' if self.lo_open else '>='} {show(self.lo)}"
        if self.lo is None:
            return f" {'<' if self.hi_open else '<='} {show(self.hi)}"
        return f" in {'(' if self.lo_open else '['}{show(self.lo)}, {show(self.hi)}{')' if self.hi_open else ']'}"


def _plural(text: str) -> str:
    for one, many in (("an integer", "integers"), ("a finite number", "finite numbers"), ("text", "texts")):
        if text.startswith(one):
            return many + text[len(one):]
    return text


def _r(lo=None, hi=None, lo_open=False, hi_open=False, **extra) -> dict:
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, **extra}


_POSITIVE = _r(0, lo_open=True)
_NONNEG = _r(0)
_FRACTION = _r(0, 1)
_KERNELS = ("dense", "sparse")  # train/kernels.py KERNELS

# Ranges by hyperparameter name (every arch using the name shares it). Sources: the arch
# modules' own checks, and the papers' meaning of each value (cited in those modules).
RANGES: dict[str, dict] = {
    # TopK family (topk.py, batchtopk.py, matryoshka.py; Gao et al. 2024, Bussmann et al. 2024)
    "k": _r(1, D_SAE), "aux_k": _r(1), "aux_coeff": _NONNEG, "threshold_lr": _r(0, 1, lo_open=True),
    "kernels": {"choices": _KERNELS}, "prefix_fractions": _r(0, 1, lo_open=True, elem="float"),
    # JumpReLU (jumprelu.py: each "must be positive"); standard (April update decoder norm)
    "l0_coeff": _NONNEG, "bandwidth": _POSITIVE, "init_threshold": _POSITIVE, "init_dec_norm": _POSITIVE,
    "target_l0": _r(0, D_SAE, lo_open=True),
    # seed 000: taps look kernel_size * rate tokens back; beyond the default 128-token row they see only
    # padding, and the taps tensor [n_rates, kernel_size, d_sae] must stay allocatable (kernel_size 6e7 = 48 GB)
    "rates": _r(1, 1024, elem="int"), "kernel_size": _r(1, 128), "mask_init": {},
    # seed 001
    "n_groups": _r(1, D_SAE), "n_coarse": _r(1, D_SAE), "n_fine": _r(1, D_SAE), "alpha": _NONNEG,
    "alpha_l1": _NONNEG, "alpha_l2": _NONNEG,
    "alpha_range": _r(0, elem="float", length=2), "d_key": _r(1, 4096), "temperature": _POSITIVE,
    "contrast_temperature": _POSITIVE, "contrast_over": {"choices": ("groups", "tokens")}, "view_noise": _NONNEG,
    # seed 002
    "n_clusters": _r(1, D_SAE), "min_cluster_size": _r(1), "importance_weights": _r(0, elem="float", length=3),
    "memory": _r(0, 1, hi_open=True), "threshold": _NONNEG, "prune_rate": _FRACTION,
    "target_rate": _r(0, 1, lo_open=True, hi_open=True), "profile_tokens": _r(1),
    # seed 003 (tier_clip entries may be none: no clip)
    "tier_ratios": _r(0, lo_open=True, elem="float"), "tier_init": _r(0, lo_open=True, elem="float"),
    "tier_clip": _r(0, lo_open=True, elem="float", elem_optional=True), "curriculum_frac": _FRACTION,
    # seed 004
    "groups": _r(1, D_SAE), "gamma": _POSITIVE,
}

# Optimiser keys a preset or --set may carry (registry.OPTIMIZER_HPARAMS); Adam needs lr > 0.
OPTIMIZER = {"lr": HParam("lr", "float", lo=0, lo_open=True), "weight_decay": HParam("weight_decay", "float", lo=0)}


def _pattern_range(name: str) -> dict:
    """Range implied by a name when :data:`RANGES` has no entry (new hyperparameters of new archs)."""
    if name.endswith("_coeff") or name.startswith("lambda"):
        return _NONNEG  # weight of a loss term
    if name.endswith("_frac"):
        return _FRACTION
    if name.endswith(("_every", "_iters", "_steps")):
        return _r(1)
    return {}


def _kind_of(annotation, default) -> tuple[str, bool]:
    """``(kind, optional)`` from an ``__init__`` annotation (a string under ``from __future__ import annotations``)."""
    if annotation is inspect.Parameter.empty:
        if default is None or default is inspect.Parameter.empty:
            return "any", default is None
        for typ, kind in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str"), ((tuple, list), "seq")):
            if isinstance(default, typ):
                return kind, False
        return "any", False
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = [p.strip() for p in text.split("|")]
    optional = "None" in parts
    names = [p.split("[")[0] for p in parts if p != "None"]
    for name in names:
        if name in ("int", "float", "bool", "str"):
            return name, optional
        if name in ("tuple", "list", "Sequence"):
            return "seq", optional
    return "any", optional


def _elem_kind(default) -> str:
    items = [v for v in (default or ()) if v is not None]
    if items and all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        return "int"
    return "float" if items else "any"


def declared(arch_cls: type) -> dict[str, HParam]:
    """Every hyperparameter ``arch_cls.__init__`` takes (after ``d_in, d_sae, seed``), typed and ranged.

    ``**kwargs`` is followed to the parent class's ``__init__``, whose parameters the child forwards.
    """
    params: dict[str, inspect.Parameter] = {}
    for klass in arch_cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        forwards = False
        for p in list(inspect.signature(init).parameters.values())[1:]:
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            elif p.kind is not inspect.Parameter.VAR_POSITIONAL:
                params.setdefault(p.name, p)
        if not forwards:
            break
    out = {}
    for name, p in params.items():
        if name in ("d_in", "d_sae", "seed"):
            continue
        kind, optional = _kind_of(p.annotation, p.default)
        extra = dict(RANGES.get(name, _pattern_range(name)))
        if kind == "seq":
            extra.setdefault("elem", _elem_kind(p.default))
        out[name] = HParam(name, kind, optional=optional or p.default is None, default=p.default, **extra)
    return out


class _Refused(Exception):
    """Internal: a value outside its declaration."""


def _scalar(kind: str, value, finite: bool):
    if kind == "int":
        if isinstance(value, bool):
            raise _Refused
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise _Refused from None
        raise _Refused
    if kind == "float":
        if isinstance(value, bool):
            raise _Refused
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise _Refused from None
        if not isinstance(value, (int, float)):
            raise _Refused
        value = float(value)
        if finite and not math.isfinite(value):
            raise _Refused
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        raise _Refused
    if kind == "str":
        if not isinstance(value, str):
            raise _Refused
        return value.strip()
    return value


def _in_range(spec: HParam, value, d_sae: int | None) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return True  # non-numbers have no range; non-finite floats were refused or allowed by _scalar
    for bound, is_lo, is_open in ((spec.lo, True, spec.lo_open), (spec.hi, False, spec.hi_open)):
        if bound is None or (bound == D_SAE and d_sae is None):
            continue
        b = d_sae if bound == D_SAE else bound
        if (value < b or (is_open and value == b)) if is_lo else (value > b or (is_open and value == b)):
            return False
    return True


def _is_none(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() == "none")


def coerce(spec: HParam, value, d_sae: int | None, finite: bool = True):
    """``value`` converted to ``spec``'s kind (``"16"`` -> 16, ``"1:2:4"`` -> [1, 2, 4]) and checked against its range.

    Raises:
        _Refused: the value has the wrong type, is outside the range or not one of the choices.
    """
    if _is_none(value):
        if spec.optional:
            return None
        raise _Refused
    if spec.kind == "seq":
        if isinstance(value, str):
            items = [v for v in value.split(":")]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]  # --set rates=1 -> [1]
        if not items or (spec.length is not None and len(items) != spec.length):
            raise _Refused
        elem = replace(spec, kind=spec.elem or "any", optional=spec.elem_optional, elem=None, length=None)
        return [coerce(elem, v, d_sae, finite) for v in items]
    out = _scalar(spec.kind, value, finite)
    if spec.choices and out not in spec.choices:
        raise _Refused
    if not _in_range(spec, out, d_sae):
        raise _Refused
    return out


def check_hparams(arch: str, hparams: dict, d_sae: int | None, finite: bool = True, defaults: bool = True) -> dict:
    """``hparams`` (module and optimiser keys) of arch or preset ``arch``, converted to their declared kinds.

    Args:
        arch: an arch or preset name (resolved by :func:`~saestrata.train.registry.resolve`).
        hparams: values as parsed from ``--set`` (int/float/bool/str), a preset or a cfg.json.
        d_sae: the run's number of latents (bounds such as ``k <= d_sae``); None skips those bounds.
        finite: refuse NaN/inf floats (the CLI). The library passes False: a non-finite
            coefficient then reaches the trainer, which stops that SAE at its first
            non-finite loss and keeps its last good weights.
        defaults: also check the ``__init__`` defaults ``hparams`` leaves in place.

    Returns:
        a new dict with the same keys and converted values.

    Defaults of the arch's ``__init__`` that ``hparams`` leaves in place are checked too
    (they may not fit ``d_sae``) unless ``defaults`` is False.

    Raises:
        ArchError: one line naming the arch, the hyperparameter, the value and the allowed values,
            or the hyperparameters the arch takes when it has no such name.
    """
    from .registry import ARCHS, resolve

    base, _ = resolve(arch)
    specs = declared(ARCHS[base].cls)
    out = {}
    for name, value in hparams.items():
        spec = OPTIMIZER.get(name) or specs.get(name)
        if spec is None:
            takes = ", ".join(specs) or "none"
            raise ArchError(f"{arch} has no hyperparameter {name!r}: it takes {takes} (and lr, weight_decay)")
        try:
            out[name] = coerce(spec, value, d_sae, finite)
        except _Refused:
            shown = value if isinstance(value, str) and value.isprintable() and value.strip() else repr(value)
            raise ArchError(f"{arch}: {name}={shown} is refused: {name} takes {spec.describe(d_sae)}") from None
    for name, spec in specs.items():  # defaults left in place must fit too (topk's k=32 with d_sae=16)
        if not defaults or name in hparams or spec.default is inspect.Parameter.empty:
            continue
        try:
            coerce(spec, spec.default, d_sae, finite)
        except _Refused:
            raise ArchError(f"{arch}: its default {name}={spec.default!r} does not fit: {name} takes "
                            f"{spec.describe(d_sae)}; pass --set {name}=...") from None
    return out
