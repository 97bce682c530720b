"""Trainer checkpoints: one file per run directory, written atomically, refused on other settings.

``<out>/checkpoint.pt`` (``torch.save``) holds::

    {"version": 1, "identity": {...}, "step": int, "rng": {...}, "slots": {name: {...}}}

``step`` is the number of completed steps (the next step to run). ``identity``
(:func:`run_identity`) names everything that decides the batch stream and the
training result; a resume under a different identity is refused. ``rng`` holds the
global torch generator state (some archs draw noise from it). Each slot entry is
written by the trainer: the SAE's ``state_dict`` (parameters and buffers), its
:meth:`SAE.extra_state`, optimiser and scheduler state, bookkeeping, and the byte
length of its ``train_log.jsonl`` at the checkpoint, so lines logged after it can
be cut on resume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..store.location import as_location

CHECKPOINT_FILE = "checkpoint.pt"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or belongs to a run with other settings."""


def checkpoint_path(out: str | Path) -> Path:
    """The checkpoint file of run directory ``out``."""
    return Path(out) / CHECKPOINT_FILE


def run_identity(cfg, store, d_sae: int) -> dict:
    """Settings a checkpoint must share with the run that resumes it (JSON-serialisable dict).

    Args:
        cfg: the :class:`~saestrata.train.trainer.TrainConfig`.
        store: the opened :class:`~saestrata.store.ActivationStore`.
        d_sae: the resolved number of latents.
    """
    specs = [{"name": s.name, "arch": s.arch, "hparams": s.hparams, "lr": s.lr,
              "target_l0": s.target_l0, "seed": s.seed} for s in cfg.specs]
    return {
        "store": as_location(cfg.store).identity(), "identity_key": store.attrs.get("identity_key"),
        "n_tokens": int(store.n_tokens), "layer": cfg.layer, "specs": specs, "d_sae": d_sae,
        "batch_size": cfg.batch_size, "tokens": cfg.tokens, "seed": cfg.seed, "lr": cfg.lr,
        "warmup_frac": cfg.warmup_frac, "decay_frac": cfg.decay_frac,
        "sparsity_warmup_frac": cfg.sparsity_warmup_frac, "autocast": cfg.autocast, "log_every": cfg.log_every,
        "dead_window_tokens": cfg.dead_window_tokens, "max_grad_norm": cfg.max_grad_norm,
    }


def identity_diff(saved: dict, wanted: dict) -> list[str]:
    """Names of the identity fields that differ (compared as canonical JSON, so NaN equals NaN)."""
    canon = lambda v: json.dumps(v, sort_keys=True, default=str)  # noqa: E731
    return [k for k in sorted(set(saved) | set(wanted)) if canon(saved.get(k)) != canon(wanted.get(k))]


def write_checkpoint(out: str | Path, payload: dict) -> Path:
    """Save ``payload`` as ``<out>/checkpoint.pt`` via a temp file and an atomic rename; returns the path.

    A crash mid-write leaves the previous checkpoint intact (at worst a stale ``.tmp``).
    """
    path = checkpoint_path(out)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save({"version": VERSION, **payload}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def saved_identity(out: str | Path) -> dict | None:
    """The settings ``<out>/checkpoint.pt`` was written with, or None when there is no readable checkpoint
    (then :func:`read_checkpoint` says why). Used to resolve settings left to the machine (autocast)."""
    try:
        ckpt = torch.load(checkpoint_path(out), map_location="cpu", weights_only=True)
        return ckpt["identity"] if isinstance(ckpt, dict) and isinstance(ckpt.get("identity"), dict) else None
    except Exception:  # missing, corrupt or foreign: read_checkpoint reports it in one line
        return None


def read_checkpoint(out: str | Path, identity: dict) -> dict:
    """Load ``<out>/checkpoint.pt`` (tensors on CPU) and check it was written for ``identity``.

    Raises:
        CheckpointError: no checkpoint, an unreadable or foreign file, or other settings (one line
            naming the differing fields).
    """
    path = checkpoint_path(out)
    if not path.exists():
        raise CheckpointError(f"nothing to resume: {path} does not exist (run without --resume)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}") from err
    if not isinstance(ckpt, dict) or ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a saestrata checkpoint of version {VERSION}")
    diff = identity_diff(ckpt["identity"], identity)
    if diff:
        raise CheckpointError(f"cannot resume: {path} was written with other settings ({', '.join(diff)}); "
                              "use the original settings or a new --out")
    return ckpt


def rng_state() -> dict:
    """The global CPU generator's state: ``{"cpu": ByteTensor}``.

    Not the CUDA generators': no training draw uses them (every random draw of the SAEs and the reader takes
    an explicit, seeded CPU ``torch.Generator``), reading them creates a CUDA context on every visible GPU
    even for a CPU run, and restoring them would raise IndexError on a machine with fewer GPUs (torch's
    ``set_rng_state_all`` sets one state per saved GPU index; read in its code, not run: no GPU here).
    """
    return {"cpu": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`; a ``"cuda"`` entry (checkpoints of earlier versions) is ignored."""
    torch.set_rng_state(state["cpu"])


def truncate_log(path: Path, size: int) -> None:
    """Cut ``path`` back to ``size`` bytes (lines logged after the checkpoint).

    Raises:
        CheckpointError: the log is missing or shorter than at the checkpoint.
    """
    if not path.exists() or path.stat().st_size < size:
        raise CheckpointError(f"cannot resume: {path} is missing or shorter than at the checkpoint")
    os.truncate(path, size)
