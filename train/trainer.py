"""``saestrata train``: many SAEs trained from one pass over an activation store.

Every batch is read once and fed to every SAE (``dictionary_learning``'s
"several trainers, one buffer"). Each SAE has its own Adam optimiser, learning
rate schedule (linear warmup, constant, linear decay to 0 over the last
``decay_frac`` of steps), sparsity-coefficient warmup and dead-latent tracking.
Matmuls run under bf16 autocast with fp32 master weights where the device has native bf16 matmuls
(``autocast=None``, the default: :func:`~saestrata.device.native_bf16`), else in fp32.

A non-finite loss or gradient stops only that SAE: its update is not applied,
so its weights stay the last good ones and are saved with a ``failed`` note;
the others go on.

Checkpoints (``checkpoint_every``) and ``resume`` continue an interrupted run exactly:
the resumed run gives bit-identical SAEs and the same logs as an uninterrupted one
(:mod:`saestrata.train.checkpoint`) on the same CPU build (tested). On CUDA some kernels the
step uses (``index_add_``, the backward of ``gather``) sum floats with atomics in no fixed
order, so there a resumed run equals an uninterrupted one only to fp32 rounding (never run
on a GPU here).
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from ..device import native_bf16, resolve_device, to_device
from ..store import ActivationStore, StoreError, sequence_batches, shuffled_batches
from ..store.location import as_location
from . import optim
from .base import SAE
from .checkpoint import (CheckpointError, checkpoint_path, read_checkpoint, rng_state, run_identity,
                         saved_identity, set_rng_state, truncate_log, write_checkpoint)
from .native import load_native
from .registry import ARCHS, build, optimizer_hparams, resolve
from .sae_io import save_sae

LOG_FILE = "train_log.jsonl"


@dataclass
class SAESpec:
    """One SAE to train: ``name`` is its folder in the run dir, ``arch`` an arch or preset name.

    ``target_l0`` (tokens' mean active latents) calibrates sparsity (see :class:`L0Controller`), whose
    multiplier on the arch's sparsity coefficients starts at ``l0_start`` (> 0; ``--set l0_start=``);
    ``seed`` offsets the initialisation seed (``TrainConfig.seed + seed``); the batch stream
    depends on ``TrainConfig.seed`` only, so every SAE of a pass sees the same batches.
    """

    name: str
    arch: str
    hparams: dict = field(default_factory=dict)
    lr: float | None = None
    target_l0: float | None = None
    seed: int = 0
    l0_start: float = 1.0


@dataclass
class TrainConfig:
    """Training settings shared by every SAE of one pass.

    ``tokens`` is the total training budget per SAE (steps = tokens // batch_size);
    ``d_sae`` defaults to ``expansion * d_model``.

    ``checkpoint_every`` (steps; 0 = off) writes ``<out>/checkpoint.pt`` atomically; it is
    removed once the run finishes. ``resume`` continues from that checkpoint (same
    settings required). ``stop_after_step`` stops once that many steps are done,
    without saving the SAEs: it simulates an interruption (tests, planned pauses).
    """

    store: Path
    layer: int
    out: Path
    specs: list[SAESpec]
    d_sae: int | None = None
    expansion: int = 8
    batch_size: int = 1024
    tokens: int = 600 * 1024
    lr: float | None = None  # every SAE's rate unless --set lr= gives its own; None: the preset's, else default_lr
    warmup_frac: float = 0.05
    decay_frac: float = 0.2
    sparsity_warmup_frac: float = 0.05
    seed: int = 0
    device: str = "auto"
    autocast: bool | None = None  # None: bf16 autocast iff native_bf16(device); a resumed run keeps its own
    log_every: int = 25
    dead_window_tokens: int | None = None  # None: a tenth of the budget (see dead_window)
    # Gradient-norm clip for EVERY arch (one rule for a fair comparison; the reference TopK/BatchTopK
    # trainers and Anthropic's April update clip to 1). None: each arch's own ``max_grad_norm``.
    # Archs whose paper prescribes its own clipping (``SAE.clips_own_grads``: seed 003) keep only that.
    max_grad_norm: float | None = 1.0
    allow_partial: bool = False
    checkpoint_every: int = 100
    sae_threads: int = 1  # SAEs stepped concurrently (>1: one intra-op thread each, see _sae_pool)
    resume: bool = False
    stop_after_step: int | None = None
    storage_options: dict | None = None  # fsspec/s3fs options when ``store`` is an object-store URL


def default_lr(d_sae: int) -> float:
    """``2e-4 / sqrt(d_sae / 2**14)``: 4e-4 at 4,096 latents, 5.7e-4 at 2,048.

    The 1/sqrt(n_latents) law is read off Gao et al. 2024, Fig. 3 (optimal learning rate
    vs number of latents), with the constant the dictionary_learning TopK/BatchTopK
    trainers use, so both libraries start from the same rate (bench/vs_dictionary_learning.py).
    """
    return 2e-4 / math.sqrt(d_sae / 2**14)


def _optimizer(spec: SAESpec, sae: SAE, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam, or AdamW when the preset (or ``--set weight_decay=``) asks for decoupled weight decay.

    Learning rate: ``--set lr=`` (``spec.lr``) > ``--lr`` (``cfg.lr``) > the preset's ``lr`` > :func:`default_lr`:
    a rate the user typed always wins (an explicit ``--lr`` once lost silently to a preset's 3e-4). The
    seed presets carry their papers' AdamW settings (registry.OPTIMIZER_HPARAMS); weight decay
    applies to every parameter, as ``torch.optim.AdamW`` does by default.
    """
    opt = optimizer_hparams(spec.arch, spec.hparams)
    lr = spec.lr or cfg.lr or opt.get("lr") or default_lr(sae.d_sae)
    # torch's fused kernel: same update rule in one pass over each tensor; 2.3 ms vs 6.4 ms (foreach)
    # per step for a 640 x 4096 SAE on this CPU (measured in the session of 2026-11-22).
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in sae.parameters())
    rows = sae.optimizer_unit_rows()  # the optimiser keeps W_dec's unit norm (fused with Adam on the CPU)
    if opt.get("weight_decay"):
        return optim.AdamW(sae.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=opt["weight_decay"], fused=fused,
                           unit_rows=rows)
    return optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), fused=fused, unit_rows=rows)


def lr_factor(step: int, steps: int, warm: int, decay: int) -> float:
    """Learning-rate multiplier of 0-based ``step`` of ``steps``: linear warmup over ``warm`` steps,
    constant, then linear decay over the last ``decay`` steps reaching exactly 0 at the last step.

    (Anthropic April 2024 update / dictionary_learning's schedule: decay to zero.)
    """
    return min((step + 1) / warm, 1.0, max(0.0, (steps - 1 - step) / decay))


def dead_window(cfg: TrainConfig) -> int:
    """Tokens without firing after which a latent counts as dead (AuxK's window, ``dead_frac``).

    ``cfg.dead_window_tokens``, or a tenth of the per-SAE budget: Gao et al. 2024 (app. A.2) call a
    latent dead after 10M tokens of runs of billions; a window that is most of a short run
    would leave AuxK idle (issue 10, defect 6). At least one batch.
    """
    return max(cfg.batch_size, cfg.dead_window_tokens or cfg.tokens // 10)


class L0Controller:
    """``--target-l0`` for penalty archs: a multiplier on every sparsity term, steered to the target.

    The trainer sets ``sae.sparsity_scale = warmup(step) * multiplier``; every penalty arch
    scales all its sparsity terms by ``sparsity_scale`` (train/base.py), so one generic knob
    calibrates them all. Between ``start`` and ``stop`` each step feeds the batch's error
    ``e = clip(log((L0 + 1) / (target + 1)), -1, 1)`` to a PI controller in log space:
    ``integral += gain * e``, ``log(multiplier) = integral + proportional * e``; after ``stop``
    the multiplier is frozen at ``exp(integral)``. The trainer controls from the end of the
    sparsity warmup to the last step: the lr decays to 0, so late changes of the penalty barely
    move the weights, while freezing it when the decay starts (the rule before 2026-12-01) let L0
    drift 20-60% off the target in the last 20% of steps (the L0 a fixed penalty gives moves as
    the SAE learns). The proportional term damps the loop: the SAE answers a new penalty only
    after a lag of ~1/lr steps, and a pure integral controller (``proportional=0``) oscillated in
    256-step runs at low lr (benchmark lr sweep: batch L0 swinging 5-130 around a target of 32 at
    0.5x the default lr). Measured (standard, 256 steps, target 32, last log line): old rule
    L0 50.3 / 96.3 / 32.0 at 0.5x / 1x / 2x the default lr; this rule 30.5 / 33.1 / 31.6.
    The final L0 lands near, not at, the target: the benchmark trains points on both sides of
    each target and interpolates in log L0 (``report --matched-l0``). TopK-family archs
    (``sparsity_control == "k"``) take ``k = round(target)`` instead; JumpReLU (``"target"``) gets the
    target as a hyperparameter for its own two-sided L0 loss, and this controller on that loss's weight
    (train/jumprelu.py).

    Where the multiplier starts decides how L0 first meets the target (``SAESpec.l0_start``, default 1 = the
    arch's own coefficient): a start above the penalty the target needs collapses L0 in the warmup and kills
    latents; a start below it costs little. The benchmark starts every penalty run below its own calibration
    (``benchmark.calibrated_start``, whose comment and the README's "Where the L0 controller starts" have the
    measurements); the default here stays 1.

    Args:
        target: mean active latents per token wanted (> 0).
        start, stop: 0-based steps between which the multiplier moves.
        start_log_mult: ``log(multiplier)`` before ``start`` (0: the arch's own coefficient). The trainer
            passes ``log(SAESpec.l0_start)``.
        gain: integral step size in log space; default ``max(0.05, 8 / (stop - start))``, so that even a
            short run can move the multiplier by e^8 (a 10x miss moves it e^1 in <= 20 steps). The
            floor sets how closely L0 follows a target whose penalty keeps drifting as the SAE learns
            (a PI loop lags a ramp by ramp / gain): measured on standard, 1024 steps, target 40,
            lr 32x the default, final L0 47.7 with a floor of 0.02, 43.4 with 0.05.
        proportional: weight of the instantaneous error (log units per unit of ``e``).
        floor: lowest ``log(multiplier)`` (and integral). -30 for penalty archs; 0 for archs with their own
            two-sided L0 loss (``sparsity_control == "target"``, JumpReLU), whose loss already pushes L0 up
            below the target: winding the multiplier down there only delays the push once L0 overshoots.
            Measured (jumprelu, target 80, 1M tokens, floor -30): L0 fell to 29 by step 100, the
            multiplier to e^-10, and L0 then overshot to 153 before the integral recovered.
    """

    def __init__(self, target: float, start: int, stop: int, gain: float | None = None,
                 proportional: float = 1.0, floor: float = -30.0, start_log_mult: float = 0.0):
        self.target, self.start, self.stop, self.floor = float(target), start, stop, floor
        self.gain = gain if gain is not None else max(0.05, 8.0 / max(1, stop - start))
        self.proportional = proportional
        self.integral = float(start_log_mult)
        self.log_mult = float(start_log_mult)
        self.updates = 0

    @property
    def multiplier(self) -> float:
        """Current factor on the sparsity terms (``exp(start_log_mult)`` at the start)."""
        return math.exp(self.log_mult)

    def update(self, step: int, l0: float) -> None:
        """Feed the batch L0 of 0-based ``step``; moves the multiplier inside ``[start, stop)``, freezes it after."""
        if self.start <= step < self.stop and math.isfinite(l0):
            err = max(-1.0, min(1.0, math.log((l0 + 1.0) / (self.target + 1.0))))
            self.integral = min(30.0, max(self.floor, self.integral + self.gain * err))
            self.log_mult = max(self.floor, self.integral + self.proportional * err)
            self.updates += 1
        elif step >= self.stop:
            self.log_mult = self.integral  # frozen without the last batch's (noisy) proportional part

    def state(self) -> dict:
        """Checkpointable state."""
        return {"log_mult": self.log_mult, "integral": self.integral, "updates": self.updates}

    def load(self, state: dict) -> None:
        """Restore :meth:`state`."""
        self.log_mult, self.updates = state["log_mult"], state["updates"]
        self.integral = state.get("integral", self.log_mult)


class _Slot:
    """One SAE being trained: its module, optimiser, schedule, log and status."""

    def __init__(self, spec: SAESpec, sae: SAE, cfg: TrainConfig, steps: int):
        self.spec, self.sae, self.steps = spec, sae, steps
        self.max_grad_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else sae.max_grad_norm
        if sae.clips_own_grads:  # the paper's own clipping replaces the global one (base.SAE.clips_own_grads)
            self.max_grad_norm = float("inf")
        self.opt = _optimizer(spec, sae, cfg)
        warm, decay = max(1, int(cfg.warmup_frac * steps)), max(1, int(cfg.decay_frac * steps))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, steps, warm, decay))
        self.sparsity_warm = max(1, int(cfg.sparsity_warmup_frac * steps))
        self.l0_control = None
        if spec.target_l0 is not None and sae.sparsity_control in ("penalty", "target"):
            # to the end: see L0Controller; "target" archs (jumprelu) get it on top of their own two-sided loss
            self.l0_control = L0Controller(spec.target_l0, self.sparsity_warm, steps,
                                           floor=0.0 if sae.sparsity_control == "target" else -30.0,
                                           start_log_mult=math.log(spec.l0_start))
        self.failed: str | None = None
        self.folder = Path(cfg.out) / spec.name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = open(self.folder / LOG_FILE, "a" if cfg.resume else "w")  # resume: load_state cuts it
        self.seconds = 0.0
        self.steps_done = 0
        self.last: dict = {}
        self._window: list[dict] = []

    def record(self, metrics: dict) -> None:
        """Keep a step's metrics for the next log line."""
        self.last = metrics
        self.steps_done += 1
        self._window.append(metrics)

    def write_log(self, step: int, batch_size: int) -> None:
        """Append one JSONL line: metrics averaged over the steps since the last line.

        Single batches are noisy (rare huge-norm tokens move the MSE 2-3x), so curves
        use the window mean; ``window`` says how many steps it covers.
        """
        mean = {k: sum(m[k] for m in self._window) / len(self._window) for k in self._window[-1]}
        line = {"step": step, "tokens": (step + 1) * batch_size, "window": len(self._window),
                "tokens_per_s": self.steps_done * batch_size / max(self.seconds, 1e-9), **mean,
                "counters": self.counters()}
        self.log.write(json.dumps(line) + "\n")
        self.log.flush()
        self._window = []

    def counters(self) -> dict:
        """The SAE's mechanism counters (:meth:`SAE.counters`) plus the L0 controller's state."""
        out = dict(self.sae.counters())
        if self.l0_control is not None:
            out.update(sparsity_multiplier=self.l0_control.multiplier, l0_control_updates=self.l0_control.updates)
        return out

    def state(self) -> dict:
        """Everything needed to continue this SAE exactly (tensors are live references; save at once).

        Keys: ``sae`` (state_dict: parameters and buffers), ``extra`` (:meth:`SAE.extra_state`),
        ``opt``, ``sched``, ``failed``, ``seconds``, ``steps_done``, ``last``, ``window`` and
        ``log_bytes`` (size of the flushed ``train_log.jsonl``).
        """
        self.log.flush()
        os.fsync(self.log.fileno())
        return {"sae": self.sae.state_dict(), "extra": self.sae.extra_state(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(), "failed": self.failed, "seconds": self.seconds,
                "steps_done": self.steps_done, "last": self.last, "window": self._window,
                "log_bytes": os.fstat(self.log.fileno()).st_size,
                "l0_control": self.l0_control.state() if self.l0_control else None}

    def load_state(self, state: dict) -> None:
        """Restore :meth:`state` and cut the log back to its length at the checkpoint.

        Raises:
            CheckpointError: the log is missing or shorter than at the checkpoint.
            RuntimeError: the saved tensors do not fit this SAE (``load_state_dict``).
        """
        self.sae.load_state_dict(state["sae"])
        self.sae.load_extra_state(state["extra"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.failed, self.seconds, self.steps_done = state["failed"], state["seconds"], state["steps_done"]
        self.last, self._window = state["last"], list(state["window"])
        if self.l0_control is not None:
            self.l0_control.load(state["l0_control"])
        self.log.close()
        truncate_log(self.folder / LOG_FILE, state["log_bytes"])
        self.log = open(self.folder / LOG_FILE, "a")

    def step(self, x: torch.Tensor, step: int, autocast: bool, rows: tuple | None = None) -> dict | None:
        """One optimiser step on normalised ``x [batch, d_in]``; returns metrics, or None if it failed.

        Sequence SAEs train on their own stream ``rows = (acts [R, T, d_in], doc_index [R, T],
        valid [R, T])`` instead and their metrics cover ``acts[valid]``; token SAEs get the same
        shuffled ``x`` whether or not a sequence SAE shares the pass (issue 10, defect 2).
        """
        if self.sae.needs_sequences:
            x = rows[0][rows[2]]
        t0 = time.perf_counter()
        mult = self.l0_control.multiplier if self.l0_control else 1.0
        self.sae.sparsity_scale = min(1.0, (step + 1) / self.sparsity_warm) * mult
        lr = self.opt.param_groups[0]["lr"]  # the rate this step uses (logged)
        # No weight-cast cache: torch keeps one cache for all threads and empties it whenever any thread leaves its
        # outermost autocast region, so a weight used twice in one forward (seed 001's contrastive second view) was
        # cast once or twice depending on what a concurrent SAE's step was doing, and its gradient summed in bf16 or
        # in fp32 (found 2026-12-07; tests/test_train_pool.py). Uncached, every use casts on its own: one result.
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
            out = self.sae.forward_seq(*rows) if self.sae.needs_sequences else self.sae(x)
        loss = out.loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        own_rows = self.opt.unit_rows is None  # else the optimiser projects and renormalises W_dec itself
        if own_rows:
            self.sae.remove_parallel_grad()
        grad_norm = self.opt.clip_grad_norm_(self.max_grad_norm, known=self.sae.grad_sq_norms())
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            self.failed = f"non-finite {'loss' if not torch.isfinite(loss) else 'gradient'} at step {step}"
            return None
        self.opt.step()
        self.sched.step()
        if own_rows:
            self.sae.normalize_decoder()
        self.sae.after_step(step, self.steps)
        self.sae.update_firing(out)
        self.seconds += time.perf_counter() - t0
        metrics = _metrics(x, out, loss, self.sae, lr)
        if self.l0_control is not None:
            self.l0_control.update(step, metrics["l0"])
        return metrics


def total_variance(xf: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the rows of ``xf [batch, d_in]`` (fp32) from their mean: the FVU denominator
    (DESIGN.md, "explained variance"), a float64 scalar.

    Computed as mean ||x||^2 - ||mean x||^2 from fp32 row norms combined in float64: two reading passes and no
    ``[batch, d_in]`` temporaries (the subtract-square-sum form wrote two; issue 14: the profile's "other" time fell
    ~0.2 ms/step, the TopK step's median did not change measurably, docs/results/bench/README.md). Raises nothing.
    The subtraction cancels when the mean dominates: relative error ~4e-9 x ||mean x||^2 / var (3e-6 at a ratio of
    900 in tests/test_trainer.py). Gemma 3 270M's layer-8 residual batches have a ratio of 0.4-0.5, where both forms
    err by 1-3e-7 against float64.
    """
    sq_norms = torch.linalg.vector_norm(xf, dim=-1).double().pow(2)
    return sq_norms.mean() - xf.mean(0).double().pow(2).sum()


def _metrics(x: torch.Tensor, out, loss: torch.Tensor, sae: SAE, lr: float) -> dict:
    """Batch metrics: loss terms, L0, FVU (DESIGN.md explained-variance denominator), dead fraction."""
    with torch.no_grad():
        xf = x.float()
        resid = out.sq_error if out.sq_error is not None else (xf - out.x_hat.float()).pow(2).sum(-1).mean()
        var = total_variance(xf)
        return {
            "loss": float(loss), **{k: float(v) for k, v in out.losses.items()},
            "l0": out.l0(), "fvu": float(resid / var),
            "dead_frac": float((sae.tokens_since_fired >= sae_dead_window(sae)).float().mean()), "lr": lr,
        }


def sae_dead_window(sae: SAE) -> int:
    """Tokens without firing after which a latent counts as dead (trainer setting stored on the SAE)."""
    return getattr(sae, "dead_window_tokens", 250_000)


def _feed(store: ActivationStore, hook: str, cfg: TrainConfig, scale: float, device: torch.device,
          sequences: bool) -> Iterator[tuple[torch.Tensor, tuple | None]]:
    """Endless ``(x [N, d_in], rows)`` batches, scaled and on ``device``.

    ``x`` = shuffled tokens for every token SAE: the same stream whatever else shares the
    pass. ``rows`` is None unless a sequence SAE trains in the pass; then it is a separate
    stream of whole context rows ``(acts [R, T, d_in], doc_index [R, T], valid [R, T])``
    (``R = batch_size // context_length``; ``valid`` = not BOS) for the sequence SAEs only.
    """
    tokens = (to_device(x, device).float() * scale for x in shuffled_batches(store, hook, cfg.batch_size, seed=cfg.seed))
    if not sequences:
        for x in tokens:
            yield x, None
        return
    n_rows = max(1, cfg.batch_size // int(store.attrs["context_length"]))
    bos = store.attrs.get("bos_token_id")
    for x, (acts, doc_index, token_ids) in zip(tokens, sequence_batches(store, hook, n_rows, seed=cfg.seed)):
        acts = to_device(acts, device).float() * scale
        valid = to_device(token_ids != bos if bos is not None else torch.ones_like(token_ids, dtype=torch.bool), device)
        yield x, (acts, to_device(doc_index, device), valid)


def _hparams(spec: SAESpec, d_sae: int) -> dict:
    """``spec.hparams`` plus how a target L0 reaches the arch (``SAE.sparsity_control``).

    TopK family (``"k"``): ``k = round(target_l0)``; archs that steer themselves (``"target"``, JumpReLU):
    ``target_l0``; penalty archs: nothing here (the trainer's :class:`L0Controller`).

    Raises:
        ValueError: ``target_l0`` together with an explicit ``k`` / ``target_l0`` hyperparameter, a target
            outside ``[1, d_sae]``, or ``l0_start`` not a positive number.
    """
    if not (spec.l0_start > 0 and math.isfinite(spec.l0_start)):
        raise ValueError(f"{spec.name}: l0_start must be a positive number (the L0 controller's first multiplier)")
    hp = dict(spec.hparams)
    control = ARCHS[resolve(spec.arch)[0]].cls.sparsity_control
    if spec.target_l0 is None or control not in ("k", "target"):
        return hp
    key = "k" if control == "k" else "target_l0"
    if key in hp:
        raise ValueError(f"{spec.name}: give --target-l0 or {key}, not both")
    k = int(round(spec.target_l0))
    if not 1 <= k <= d_sae:
        raise ValueError(f"{spec.name}: --target-l0 {spec.target_l0} needs {key} in [1, {d_sae}]")
    return {**hp, key: k if control == "k" else float(spec.target_l0)}


def _check_config(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` (one line) for an empty or duplicated spec list or a negative interval."""
    if not cfg.specs:
        raise ValueError("no SAE to train: pass --arch")
    names = [s.name for s in cfg.specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate SAE names in one run: {names}")
    if cfg.checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0 (0 = off), got {cfg.checkpoint_every}")


def _train_step(slots: list[_Slot], x: torch.Tensor, rows: tuple | None, step: int, cfg: TrainConfig,
                pool: ThreadPoolExecutor | None = None) -> None:
    """Feed batch ``x [N, d_in]`` (``rows`` for sequence SAEs) to every live SAE; log when due.

    With a ``pool`` the SAEs step concurrently (they share only the read-only batch);
    messages and logs are still written here, in slot order.
    """
    live = [slot for slot in slots if not slot.failed]
    run = lambda slot: slot.step(x, step, cfg.autocast, rows)  # noqa: E731
    results = list(pool.map(run, live)) if pool else [run(slot) for slot in live]
    for slot, metrics in zip(live, results):
        if metrics is None:
            tqdm.write(f"{slot.spec.name}: stopped, {slot.failed}; keeping its last good weights")
            continue
        slot.record(metrics)
        if step % cfg.log_every == 0 or step == slot.steps - 1:
            slot.write_log(step, cfg.batch_size)


@contextmanager
def _sae_pool(cfg: TrainConfig, n_saes: int, device: torch.device):
    """A thread pool stepping SAEs concurrently, or None (one SAE, a GPU, or ``sae_threads=1``).

    On CPU each SAE step is a chain of mid-sized ops whose intra-op parallelism costs
    thread synchronisation (and stalls badly when another process holds a core); several
    SAEs stepped side by side with one intra-op thread each keep every core busy instead
    (bench/one_pass.py). Measured there (4 SAEs x 100 steps, d_sae 4096, medians of 3
    interleaved rounds on an idle machine): side by side 18.5 s, one after another 18.8 s
    (26.9 vs 22.5 s in a noisier earlier run); under load from other processes side by side
    was 4x faster (6-7 s vs 26-29 s for 10 steps in a contended probe). So it is opt-in: ``sae_threads=1`` (default) steps them one after another with all cores,
    ``0`` uses as many threads as cores (at most one per SAE). torch's intra-op thread
    count is restored afterwards. Results are
    deterministic for a given ``sae_threads`` (each SAE's ops run in one thread), but
    differ in the last bits from a sequential run.
    """
    cores = torch.get_num_threads()
    threads = cfg.sae_threads or (min(n_saes, cores) if device.type == "cpu" else 1)
    if threads <= 1 or n_saes <= 1:
        yield None
        return
    per_thread = max(1, cores // threads)
    torch.set_num_threads(per_thread)
    try:
        # Set in every pool thread too: OpenMP's thread count is per calling thread, and a
        # thread left at the default would make an SAE's numerics depend on which thread ran it.
        with ThreadPoolExecutor(threads, thread_name_prefix="sae", initializer=torch.set_num_threads,
                                initargs=(per_thread,)) as pool:
            yield pool
    finally:
        torch.set_num_threads(cores)


def _save_checkpoint(cfg: TrainConfig, identity: dict, done: int, slots: list[_Slot]) -> None:
    """Write ``<out>/checkpoint.pt`` after ``done`` completed steps (atomic; see :mod:`.checkpoint`)."""
    write_checkpoint(cfg.out, {"identity": identity, "step": done, "rng": rng_state(),
                               "slots": {slot.spec.name: slot.state() for slot in slots}})


def _restore(ckpt: dict, slots: list[_Slot]) -> int:
    """Load a checkpoint read by :func:`read_checkpoint` into ``slots``; returns the completed steps.

    Raises:
        CheckpointError: the log of an SAE is missing or shorter than at the checkpoint.
    """
    for slot in slots:
        slot.load_state(ckpt["slots"][slot.spec.name])
    set_rng_state(ckpt["rng"])
    return int(ckpt["step"])


def _save_all(cfg: TrainConfig, store: ActivationStore, hook: str, scale: float, steps: int,
              slots: list[_Slot]) -> dict[str, Path]:
    """Fold the input scale into every SAE and save it with its provenance; returns ``{name: folder}``."""
    meta = {
        "model_id": store.attrs.get("model_id"), "weights_hash": store.attrs.get("weights_hash"),
        "hook_name": hook, "layer": cfg.layer, "context_length": store.attrs.get("context_length"),
        "dataset": store.attrs.get("dataset"), "store": as_location(cfg.store).identity(),
        "train_tokens": steps * cfg.batch_size, "batch_size": cfg.batch_size, "input_scale": scale,
        "special_token_ids": store.attrs.get("special_token_ids", []), "autocast": cfg.autocast,
    }
    folders = {}
    for slot in slots:
        slot.log.close()
        # Counters in training units, as every train-log line: weight-norm counters (seed 000's
        # enc_norm_level1 / skip_norm) would change by the input scale once it is folded in.
        counters = slot.counters()
        slot.sae.fold_input_scale(scale)
        extra = {"failed": slot.failed, "final_train_metrics": slot.last, "target_l0": slot.spec.target_l0,
                 "l0_start": slot.spec.l0_start, "final_counters": counters, "lr": slot.opt.param_groups[0]["initial_lr"],
                 "train_tokens_per_s": slot.steps_done * cfg.batch_size / max(slot.seconds, 1e-9)}
        folders[slot.spec.name] = save_sae(slot.sae.cpu().eval(), slot.folder, {**meta, **extra})
    return folders


def _resolve_autocast(cfg: TrainConfig, device: torch.device) -> bool:
    """``cfg.autocast``, or for None: the interrupted run's own setting when resuming (so a checkpoint
    resumes on any machine), else bf16 autocast iff ``device`` has native bf16 matmuls (emulated bf16
    ran ~5x slower than fp32: :func:`~saestrata.device.native_bf16`)."""
    if cfg.autocast is not None:
        return cfg.autocast
    saved = saved_identity(cfg.out) if cfg.resume else None
    if saved is not None and isinstance(saved.get("autocast"), bool):
        return saved["autocast"]
    return native_bf16(device)


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Path]:
    """Train every SAE in ``cfg.specs`` on one pass of shuffled batches; returns ``{name: folder}``.

    With ``cfg.resume`` it continues from ``<out>/checkpoint.pt``: the batch stream is
    re-created with the same seed and fast-forwarded, logs are cut back to the checkpoint
    and appended to. Returns ``{}`` when ``cfg.stop_after_step`` interrupts the run.

    Raises:
        StoreError: store missing, half-written (without ``allow_partial``) or lacking the layer.
        ArchError: unknown arch or hyperparameter.
        CheckpointError: ``resume`` without a checkpoint, or one written with other settings.
        ValueError: empty spec list, duplicate names, too few tokens or a negative ``checkpoint_every``.
    """
    _check_config(cfg)
    store = ActivationStore(cfg.store, allow_partial=cfg.allow_partial, storage_options=cfg.storage_options)
    hook = store.hook_for_layer(cfg.layer)
    d_in = store.d_model
    d_sae = cfg.d_sae or cfg.expansion * d_in
    # Inputs scaled to mean norm sqrt(d_in) (Gao et al. 2024 sec. 2.1); folded back at save.
    scale = math.sqrt(d_in) / store.stats(hook)["mean_norm"]
    device = resolve_device(cfg.device)
    cfg = replace(cfg, autocast=_resolve_autocast(cfg, device))
    steps = cfg.tokens // cfg.batch_size
    if steps < 1:
        raise ValueError(f"--tokens {cfg.tokens} is less than one batch of {cfg.batch_size}")
    identity = run_identity(cfg, store, d_sae)
    ckpt = read_checkpoint(cfg.out, identity) if cfg.resume else None  # refuse before touching anything
    if ckpt is None:
        checkpoint_path(cfg.out).unlink(missing_ok=True)  # a fresh run must not leave an old one to resume
    torch.manual_seed(cfg.seed)
    slots = []
    for spec in cfg.specs:
        # The init seed depends on the run seed and the spec, never on the SAE's position in the pass.
        sae = build(spec.arch, d_in, d_sae, seed=cfg.seed + spec.seed, **_hparams(spec, d_sae)).to(device).train()
        sae.dead_window_tokens = dead_window(cfg)
        slots.append(_Slot(spec, sae, cfg, steps))
    start = _restore(ckpt, slots) if ckpt is not None else 0
    if device.type == "cpu":  # build the compiled kernels (once per machine, ~1 min) before any step's clock runs
        load_native()

    batches = _feed(store, hook, cfg, scale, device, any(s.sae.needs_sequences for s in slots))
    for _ in range(start):  # fast-forward: the stream is deterministic given the seed
        next(batches)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"train {len(slots)} SAE(s) on {hook}",
               unit="step", disable=not progress)
    with _sae_pool(cfg, len(slots), device) as pool:
        for step in bar:
            x, rows = next(batches)
            if step == 0:
                for slot in slots:
                    slot.sae.init_from_batch(rows[0][rows[2]] if slot.sae.needs_sequences else x)
            _train_step(slots, x, rows, step, cfg, pool)
            done = step + 1
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < steps:
                _save_checkpoint(cfg, identity, done, slots)
            if cfg.stop_after_step is not None and done >= cfg.stop_after_step and done < steps:
                bar.close()
                for slot in slots:
                    slot.log.close()
                return {}
            live = [s for s in slots if not s.failed]
            if live:
                bar.set_postfix({s.spec.name: f"L0 {s.last['l0']:.0f} fvu {s.last['fvu']:.3f}" for s in live[:3]})

    folders = _save_all(cfg, store, hook, scale, steps, slots)
    checkpoint_path(cfg.out).unlink(missing_ok=True)  # the saved SAEs supersede it
    return folders


__all__ = ["CheckpointError", "SAESpec", "StoreError", "TrainConfig", "train"]
