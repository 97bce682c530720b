"""``saestrata train``: many SAEs trained from one pass over an activation store.

Every batch is read once and fed to every SAE (``dictionary_learning``'s
"several trainers, one buffer"). Each SAE has its own Adam optimiser, learning
rate schedule (linear warmup, constant, linear decay to 0 over the last
``decay_frac`` of steps), sparsity-coefficient warmup and dead-latent tracking.
Matmuls run under bf16 autocast (AMX on this CPU) with fp32 master weights.

A non-finite loss or gradient stops only that SAE: its update is not applied,
so its weights stay the last good ones and are saved with a ``failed`` note;
the others go on.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from ..device import resolve_device
from ..store import ActivationStore, StoreError, sequence_batches, shuffled_batches
from .base import SAE
from .registry import build
from .sae_io import save_sae

LOG_FILE = "train_log.jsonl"


@dataclass
class SAESpec:
    """One SAE to train: ``name`` is its folder in the run dir, ``arch`` an arch or preset name."""

    name: str
    arch: str
    hparams: dict = field(default_factory=dict)
    lr: float | None = None


@dataclass
class TrainConfig:
    """Training settings shared by every SAE of one pass.

    ``tokens`` is the total training budget per SAE (steps = tokens // batch_size);
    ``d_sae`` defaults to ``expansion * d_model``.
    """

    store: Path
    layer: int
    out: Path
    specs: list[SAESpec]
    d_sae: int | None = None
    expansion: int = 8
    batch_size: int = 1024
    tokens: int = 600 * 1024
    lr: float = 4e-4
    warmup_frac: float = 0.05
    decay_frac: float = 0.2
    sparsity_warmup_frac: float = 0.05
    seed: int = 0
    device: str = "auto"
    autocast: bool = True
    log_every: int = 25
    dead_window_tokens: int = 250_000
    allow_partial: bool = False


class _Slot:
    """One SAE being trained: its module, optimiser, schedule, log and status."""

    def __init__(self, spec: SAESpec, sae: SAE, cfg: TrainConfig, steps: int):
        self.spec, self.sae, self.steps = spec, sae, steps
        self.opt = torch.optim.Adam(sae.parameters(), lr=spec.lr or cfg.lr, betas=(0.9, 0.999))
        warm, decay = max(1, int(cfg.warmup_frac * steps)), max(1, int(cfg.decay_frac * steps))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min((s + 1) / warm, 1.0, max(0.0, (steps - s) / decay))
        )
        self.sparsity_warm = max(1, int(cfg.sparsity_warmup_frac * steps))
        self.failed: str | None = None
        self.folder = Path(cfg.out) / spec.name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = open(self.folder / LOG_FILE, "w")
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
                "tokens_per_s": self.steps_done * batch_size / max(self.seconds, 1e-9), **mean}
        self.log.write(json.dumps(line) + "\n")
        self.log.flush()
        self._window = []

    def step(self, x: torch.Tensor, step: int, autocast: bool, rows: tuple | None = None) -> dict | None:
        """One optimiser step on normalised ``x [batch, d_in]``; returns metrics, or None if it failed.

        Sequence SAEs train on ``rows = (acts [R, T, d_in], doc_index [R, T], valid [R, T])``
        instead, where ``x == acts[valid]``, so metrics cover the same tokens for every SAE.
        """
        t0 = time.perf_counter()
        self.sae.sparsity_scale = min(1.0, (step + 1) / self.sparsity_warm)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = self.sae.forward_seq(*rows) if self.sae.needs_sequences else self.sae(x)
        loss = out.loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sae.remove_parallel_grad()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.sae.max_grad_norm)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            self.failed = f"non-finite {'loss' if not torch.isfinite(loss) else 'gradient'} at step {step}"
            return None
        self.opt.step()
        self.sched.step()
        self.sae.normalize_decoder()
        self.sae.after_step(step, self.steps)
        self.sae.update_firing(out.f)
        self.seconds += time.perf_counter() - t0
        return _metrics(x, out, loss, self.sae, self.opt.param_groups[0]["lr"])


def _metrics(x: torch.Tensor, out, loss: torch.Tensor, sae: SAE, lr: float) -> dict:
    """Batch metrics: loss terms, L0, FVU (DESIGN.md explained-variance denominator), dead fraction."""
    with torch.no_grad():
        xf = x.float()
        resid = (xf - out.x_hat.float()).pow(2).sum(-1).mean()
        var = (xf - xf.mean(0)).pow(2).sum(-1).mean()
        return {
            "loss": float(loss), **{k: float(v) for k, v in out.losses.items()},
            "l0": float((out.f > 0).sum(-1).float().mean()), "fvu": float(resid / var),
            "dead_frac": float((sae.tokens_since_fired >= sae_dead_window(sae)).float().mean()), "lr": lr,
        }


def sae_dead_window(sae: SAE) -> int:
    """Tokens without firing after which a latent counts as dead (trainer setting stored on the SAE)."""
    return getattr(sae, "dead_window_tokens", 250_000)


def _feed(store: ActivationStore, hook: str, cfg: TrainConfig, scale: float, device: torch.device,
          sequences: bool) -> Iterator[tuple[torch.Tensor, tuple | None]]:
    """Endless ``(x [N, d_in], rows)`` batches, scaled and on ``device``; every SAE gets the same batch.

    Token SAEs only: ``x`` = shuffled tokens, ``rows`` None. With a sequence SAE: whole
    context rows ``rows = (acts, doc_index, valid)`` (``batch_size // context_length``
    rows; ``valid`` = not BOS) and ``x = acts[valid]``, the same tokens flattened.
    """
    if not sequences:
        for x in shuffled_batches(store, hook, cfg.batch_size, seed=cfg.seed):
            yield x.to(device).float() * scale, None
        return
    n_rows = max(1, cfg.batch_size // int(store.attrs["context_length"]))
    bos = store.attrs.get("bos_token_id")
    for acts, doc_index, token_ids in sequence_batches(store, hook, n_rows, seed=cfg.seed):
        acts = acts.to(device).float() * scale
        valid = (token_ids != bos if bos is not None else torch.ones_like(token_ids, dtype=torch.bool)).to(device)
        yield acts[valid], (acts, doc_index.to(device), valid)


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Path]:
    """Train every SAE in ``cfg.specs`` on one pass of shuffled batches; returns ``{name: folder}``.

    Raises:
        StoreError: store missing, half-written (without ``allow_partial``) or lacking the layer.
        ArchError: unknown arch or hyperparameter.
        ValueError: empty spec list or duplicate names.
    """
    if not cfg.specs:
        raise ValueError("no SAE to train: pass --arch")
    names = [s.name for s in cfg.specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate SAE names in one run: {names}")
    store = ActivationStore(cfg.store, allow_partial=cfg.allow_partial)
    hook = store.hook_for_layer(cfg.layer)
    d_in = store.d_model
    d_sae = cfg.d_sae or cfg.expansion * d_in
    # Inputs scaled to mean norm sqrt(d_in) (Gao et al. 2024 sec. 2.1); folded back at save.
    scale = math.sqrt(d_in) / store.stats(hook)["mean_norm"]
    device = resolve_device(cfg.device)
    steps = cfg.tokens // cfg.batch_size
    if steps < 1:
        raise ValueError(f"--tokens {cfg.tokens} is less than one batch of {cfg.batch_size}")
    torch.manual_seed(cfg.seed)
    slots = []
    for i, spec in enumerate(cfg.specs):
        sae = build(spec.arch, d_in, d_sae, seed=cfg.seed + i, **spec.hparams).to(device).train()
        sae.dead_window_tokens = cfg.dead_window_tokens
        slots.append(_Slot(spec, sae, cfg, steps))

    batches = _feed(store, hook, cfg, scale, device, any(s.sae.needs_sequences for s in slots))
    bar = tqdm(range(steps), desc=f"train {len(slots)} SAE(s) on {hook}", unit="step", disable=not progress)
    for step in bar:
        x, rows = next(batches)
        if step == 0:
            for slot in slots:
                slot.sae.init_b_dec(x)
        for slot in slots:
            if slot.failed:
                continue
            metrics = slot.step(x, step, cfg.autocast, rows)
            if metrics is None:
                tqdm.write(f"{slot.spec.name}: stopped, {slot.failed}; keeping its last good weights")
                continue
            slot.record(metrics)
            if step % cfg.log_every == 0 or step == steps - 1:
                slot.write_log(step, cfg.batch_size)
        live = [s for s in slots if not s.failed]
        if live:
            bar.set_postfix({s.spec.name: f"L0 {s.last['l0']:.0f} fvu {s.last['fvu']:.3f}" for s in live[:3]})

    meta = {
        "model_id": store.attrs.get("model_id"), "weights_hash": store.attrs.get("weights_hash"),
        "hook_name": hook, "layer": cfg.layer, "context_length": store.attrs.get("context_length"),
        "dataset": store.attrs.get("dataset"), "store": str(Path(cfg.store).resolve()),
        "train_tokens": steps * cfg.batch_size, "batch_size": cfg.batch_size, "input_scale": scale,
        "special_token_ids": store.attrs.get("special_token_ids", []),
    }
    folders = {}
    for slot in slots:
        slot.log.close()
        slot.sae.fold_input_scale(scale)
        extra = {"failed": slot.failed, "final_train_metrics": slot.last,
                 "train_tokens_per_s": slot.steps_done * cfg.batch_size / max(slot.seconds, 1e-9)}
        folders[slot.spec.name] = save_sae(slot.sae.cpu().eval(), slot.folder, {**meta, **extra})
    return folders


__all__ = ["SAESpec", "StoreError", "TrainConfig", "train"]
