"""Benchmark: our trainer vs PyPI ``dictionary-learning`` 0.1.0 on the same activations (issue 4).

Target: ours >= 1.0x training throughput at equal or better held-out FVU at matched L0.

Both sides get exactly the same batches: one ``shuffled_batches`` stream (BOS excluded,
batch 1024) over the first ~90% of the store's tokens, scaled by our trainer's input
normalisation ``sqrt(d_model) / mean_norm``; every SAE of both sides is stepped on
each batch in lockstep, so machine contention hits both sides alike. Arms:

1. BatchTopK, k=32: our ``batchtopk`` vs their ``BatchTopKTrainer`` (L0 matched by
   construction in batch mode; their inference threshold is reported too).
2. Standard (ReLU + L1): our ``standard`` vs their ``StandardTrainer``, an L1 sweep on
   each side; FVU is compared at matched L0 by interpolating FVU against log L0.
3. TopK, k=32 (``--arms topk``): our ``topk`` vs their ``TopKTrainer`` (L0 = k on both sides).

Throughput = training tokens / wall time of each trainer's per-batch update call
(ours: the trainer's ``_train_step``, i.e. step + per-step metrics + logging; theirs:
``trainer.update``), data loading excluded for both. Ours is driven through the trainer's
per-SAE ``_Slot``/``_train_step`` rather than ``train()`` because ``TrainConfig`` has no
token range, and the held-out tokens must stay out of training. FVU and L0 are measured in fp32 on
the held-out last ~10% of the store (disjoint from training tokens).

    .venv/bin/pip install --no-deps dictionary-learning einops
    .venv/bin/python bench/vs_dictionary_learning.py --store demo-out/store-train --layer 8

``--no-deps`` matters: the package pins ``nnsight<0.4`` (and wandb, umap, ...), which
would replace torch; its trainer modules need only torch and einops.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from saestrata.allocator import tune_allocator
from saestrata.store import ActivationStore, shuffled_batches
from saestrata.train.batchtopk import batch_topk_relu
from saestrata.train.registry import build
from saestrata.train.trainer import SAESpec, TrainConfig, _Slot, _train_step

INSTALL_HINT = ("dictionary-learning is not installed: run `.venv/bin/pip install --no-deps dictionary-learning "
                "einops` (--no-deps keeps torch 2.13.0; nnsight is not needed)")


def load_dictionary_learning():
    """Import ``dictionary_learning.trainers`` without running the package ``__init__``.

    ``dictionary_learning/__init__.py`` imports ``buffer.py``, which imports ``nnsight``
    (pinned <0.4, which would downgrade torch and transformers); the trainers need only
    torch and einops. So we register an empty package module whose ``__path__`` points
    at the installed package folder and import the ``trainers`` subpackage from it.
    Returns the ``trainers`` module; exits with :data:`INSTALL_HINT` if it is missing.
    """
    name = "dictionary_learning"
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            sys.exit(INSTALL_HINT)
        package = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, None, is_package=True))
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = package
    try:
        return importlib.import_module(f"{name}.trainers")
    except ModuleNotFoundError as err:
        sys.exit(f"{INSTALL_HINT} (import failed: {err})")


@dataclass
class Runner:
    """One SAE under training: its update call, its encode/decode for evaluation and its timer."""

    side: str  # "ours" or "theirs"
    arm: str  # "topk", "batchtopk" or "standard"
    setting: str  # e.g. "k=32", "l1=5"
    precision: str
    update: Callable[[int, torch.Tensor], None]
    encode: Callable[[torch.Tensor], torch.Tensor]  # inference encoder, [N, d] -> [N, d_sae]
    decode: Callable[[torch.Tensor], torch.Tensor]
    encode_batch: Callable[[torch.Tensor], torch.Tensor] | None = None  # BatchTopK batch-mode encoder
    l1: float | None = None
    impl: str = ""  # trainer / architecture name on that side
    seconds: float = 0.0
    steps: int = 0
    results: dict = field(default_factory=dict)


def our_runner(arch: str, hparams: dict, setting: str, cfg: TrainConfig, d_in: int, d_sae: int, steps: int,
               seed: int) -> Runner:
    """Wrap one of our SAEs in the trainer's own per-SAE slot (optimiser, schedules, logging)."""
    sae = build(arch, d_in, d_sae, seed=seed, **hparams).train()
    sae.dead_window_tokens = cfg.dead_window_tokens
    slot = _Slot(SAESpec(f"{arch}-{setting}", arch, hparams), sae, cfg, steps)

    def update(step: int, x: torch.Tensor) -> None:
        """What ``train()`` does for this SAE on one batch (b_dec init at step 0, then ``_train_step``)."""
        if step == 0:
            sae.init_b_dec(x)
        _train_step([slot], x, None, step, cfg)
        if slot.failed:
            raise RuntimeError(f"ours {arch} {setting}: {slot.failed}")

    def encode_batch(x: torch.Tensor) -> torch.Tensor:
        """Training-mode BatchTopK latents (``k * len(x)`` kept across the batch)."""
        return batch_topk_relu(sae.pre_acts(x), sae.k)

    def encode(x: torch.Tensor) -> torch.Tensor:
        """Inference latents (eval mode: the global threshold for BatchTopK)."""
        sae.eval()
        try:
            return sae.encode(x)
        finally:
            sae.train()

    return Runner("ours", arch, setting, "bf16 autocast" if cfg.autocast else "fp32", update, encode, sae.decode,
                  encode_batch if arch == "batchtopk" else None, l1=hparams.get("l1_coeff"), impl=arch)


def their_runner(dl_trainers, arm: str, setting: str, l1: float | None, k: int, d_in: int, d_sae: int,
                 steps: int, seed: int, lm_name: str, layer: int, standard: str = "standard",
                 bias_init: bool = False) -> Runner:
    """Build a ``dictionary_learning`` trainer with step-based knobs scaled to our schedule fractions.

    Their step-count defaults (lr warmup 1000, sparsity warmup 2000, BatchTopK threshold
    start 1000) exceed this whole benchmark (their schedule asserts warmup < steps), so we use our
    fractions instead: lr warmup 5%, sparsity warmup 5%, linear decay over the last 20%.
    Everything else (lr, betas, auxk, threshold_beta, dead-feature window, fp32) is theirs.
    ``standard="april"`` uses ``StandardTrainerAprilUpdate`` (decoder-norm-weighted L1, free
    decoder norms, grad clip 1: the recipe of our ``standard``) instead of ``StandardTrainer``
    (plain L1 with unit-norm decoder columns, Towards Monosemanticity). ``bias_init`` (not
    as shipped) sets their Standard ``ae.bias`` to the first batch's mean, as our trainer
    does with ``b_dec``: they start it at 0, and on Gemma's residual stream the mean (one
    massive coordinate, ~23 of the ~25 normalised norm) is most of ``||x||``, while Adam moves
    the bias by at most ~lr (1e-3) per step, so the latents must carry the mean instead.
    """
    warm, decay_start = max(1, int(0.05 * steps)), steps - max(1, int(0.2 * steps))
    common = dict(steps=steps, activation_dim=d_in, dict_size=d_sae, layer=layer, lm_name=lm_name,
                  warmup_steps=warm, decay_start=decay_start, seed=seed, device="cpu")
    if arm == "batchtopk":
        trainer = dl_trainers.BatchTopKTrainer(k=k, threshold_start_step=warm, **common)
    elif arm == "topk":
        trainer = dl_trainers.TopKTrainer(k=k, threshold_start_step=warm, **common)
    else:
        if standard == "april":  # not re-exported by dictionary_learning.trainers
            cls = importlib.import_module("dictionary_learning.trainers.standard").StandardTrainerAprilUpdate
        else:
            cls = dl_trainers.StandardTrainer
        trainer = cls(l1_penalty=l1, sparsity_warmup_steps=warm, **common)
    ae = trainer.ae

    def update(step: int, x: torch.Tensor) -> None:
        """``trainer.update``; with ``bias_init`` the Standard bias is first set to the batch mean."""
        if bias_init and step == 0 and arm == "standard":
            with torch.no_grad():
                ae.bias.copy_(x.mean(0))
        trainer.update(step, x)

    def encode_batch(x: torch.Tensor) -> torch.Tensor:
        """Training-mode BatchTopK latents."""
        return ae.encode(x, use_threshold=False)

    impl = type(trainer).__name__ + ("+bias" if bias_init and arm == "standard" else "")
    return Runner("theirs", arm, setting, "fp32", update, ae.encode, ae.decode,
                  encode_batch if arm == "batchtopk" else None, l1=l1, impl=impl)


@torch.no_grad()
def evaluate(runner: Runner, holdout: torch.Tensor, batch_size: int) -> dict:
    """Held-out ``fvu``, ``l0`` and ``alive`` (fraction of latents firing) in fp32, normalised space.

    FVU = sum of squared errors / sum of squared deviations from the held-out mean.
    For BatchTopK also ``fvu_batch``/``l0_batch``: the training-mode encoder on batches of
    ``batch_size`` held-out rows (mean L0 = k by construction).
    """
    var = (holdout - holdout.mean(0)).pow(2).sum()
    out = {}
    modes = [("", runner.encode)] + ([("_batch", runner.encode_batch)] if runner.encode_batch else [])
    for suffix, encode in modes:
        sse, active, fired = 0.0, 0.0, None
        for lo in range(0, len(holdout), batch_size):
            x = holdout[lo:lo + batch_size]
            f = encode(x).float()
            sse += float((x - runner.decode(f).float()).pow(2).sum())
            active += float((f > 0).sum())
            hit = (f > 0).any(0)
            fired = hit if fired is None else fired | hit
        out[f"fvu{suffix}"] = sse / float(var)
        out[f"l0{suffix}"] = active / len(holdout)
        out[f"alive{suffix}"] = float(fired.float().mean())
    return out


def holdout_split(store: ActivationStore, frac: float) -> int:
    """First token of the held-out tail: ``(1 - frac)`` of the store, rounded down to a chunk boundary."""
    chunk = int(store.attrs["chunk_tokens"])
    split = int(store.n_tokens * (1 - frac)) // chunk * chunk
    if not 0 < split < store.n_tokens:
        raise SystemExit(f"--holdout-frac {frac} leaves no training or no held-out tokens")
    return split


def load_holdout(store: ActivationStore, hook: str, start: int, scale: float) -> torch.Tensor:
    """Held-out rows ``[start, n_tokens)`` without BOS, fp32, scaled like the training inputs."""
    acts = store.activations(hook, start).float()
    bos = store.attrs.get("bos_token_id")
    if bos is not None:
        acts = acts[torch.from_numpy(store.aligned("token_ids", start) != bos)]
    return acts * scale


def interpolate(points: list[tuple[float, float]], l0: float) -> float:
    """FVU at ``l0`` by linear interpolation in log L0 over ``(l0, fvu)`` points (no extrapolation)."""
    pts = sorted(points)
    xs = np.log([p[0] for p in pts])
    return float(np.interp(math.log(l0), xs, [p[1] for p in pts]))


def matched_l0_table(ours: list[tuple[float, float]], theirs: list[tuple[float, float]]) -> list[tuple]:
    """``(l0, fvu_ours, fvu_theirs)`` at every curve point lying inside both curves' L0 range.

    Points with L0 = 0 (every latent dead) have no log L0 and are left out.
    """
    ours, theirs = [p for p in ours if p[0] > 0], [p for p in theirs if p[0] > 0]
    if not ours or not theirs:
        return []
    lo = max(min(p[0] for p in ours), min(p[0] for p in theirs))
    hi = min(max(p[0] for p in ours), max(p[0] for p in theirs))
    grid = sorted({p[0] for p in ours + theirs if lo <= p[0] <= hi})
    return [(l0, interpolate(ours, l0), interpolate(theirs, l0)) for l0 in grid]


def parse_floats(text: str) -> list[float]:
    """``"2,5,10"`` -> ``[2.0, 5.0, 10.0]``."""
    return [float(v) for v in text.split(",") if v.strip()]


def print_results(runners: list[Runner], batch_size: int) -> None:
    """Print the per-SAE table, the BatchTopK comparison and the Standard matched-L0 comparison."""
    print(f"\n{'arm':<10} {'side':<7} {'trainer':<31} {'setting':<8} {'train precision':<15} {'tok/s':>8} "
          f"{'L0':>7} {'FVU':>7} {'alive':>6}  {'L0 batch':>8} {'FVU batch':>9}")
    for r in runners:
        res, rate = r.results, r.steps * batch_size / r.seconds
        batch = f"{res['l0_batch']:>8.1f} {res['fvu_batch']:>9.4f}" if "fvu_batch" in res else ""
        print(f"{r.arm:<10} {r.side:<7} {r.impl:<31} {r.setting:<8} {r.precision:<15} {rate:>8,.0f} {res['l0']:>7.1f} "
              f"{res['fvu']:>7.4f} {res['alive']:>6.3f}  {batch}")

    def rate(side: str, arm: str) -> float:
        """Aggregate tokens/s of one side over an arm's SAEs (total tokens / total update time)."""
        rs = [r for r in runners if r.side == side and r.arm == arm]
        return sum(r.steps for r in rs) * batch_size / sum(r.seconds for r in rs)

    arms = {r.arm for r in runners}
    if "topk" in arms:
        o, t = [next(r for r in runners if r.side == s and r.arm == "topk") for s in ("ours", "theirs")]
        print(f"\nTopK {o.setting}: throughput ours/theirs = {rate('ours', 'topk') / rate('theirs', 'topk'):.2f}x "
              f"(target >= 1.0x); FVU at L0 = k: ours {o.results['fvu']:.4f} vs theirs {t.results['fvu']:.4f} -> "
              f"ours/theirs {o.results['fvu'] / t.results['fvu']:.3f} (<= 1 is better)")
    if "batchtopk" in arms:
        o, t = [next(r for r in runners if r.side == s and r.arm == "batchtopk") for s in ("ours", "theirs")]
        speed = rate("ours", "batchtopk") / rate("theirs", "batchtopk")
        print(f"\nBatchTopK {o.setting}: throughput ours/theirs = {speed:.2f}x (target >= 1.0x)")
        print(f"  batch mode (L0 = k): FVU ours {o.results['fvu_batch']:.4f} vs theirs {t.results['fvu_batch']:.4f}"
              f" -> ours/theirs {o.results['fvu_batch'] / t.results['fvu_batch']:.3f} (<= 1 is better)")
        print(f"  inference threshold: ours L0 {o.results['l0']:.1f} FVU {o.results['fvu']:.4f}; "
              f"theirs L0 {t.results['l0']:.1f} FVU {t.results['fvu']:.4f}")
    if "standard" in arms:
        curves = {s: [(r.results["l0"], r.results["fvu"]) for r in runners if r.side == s and r.arm == "standard"]
                  for s in ("ours", "theirs")}
        print(f"\nStandard: throughput ours/theirs = {rate('ours', 'standard') / rate('theirs', 'standard'):.2f}x"
              " (target >= 1.0x)")
        for side in ("ours", "theirs"):
            pts = sorted((r.results["l0"], r.results["fvu"], r.l1) for r in runners
                         if r.side == side and r.arm == "standard")
            print(f"  curve {side:<6}: " + ", ".join(f"l1={l1:g}: L0 {l0:.1f} FVU {fvu:.4f}" for l0, fvu, l1 in pts))
        table = matched_l0_table(curves["ours"], curves["theirs"])
        if not table:
            print("  L0 ranges do not overlap: widen --our-l1 / --their-l1 to compare at matched L0")
        for l0, fo, ft in table:
            print(f"  matched L0 {l0:7.1f}: FVU ours {fo:.4f} vs theirs {ft:.4f} -> ours/theirs {fo / ft:.3f}"
                  " (<= 1 is better; log-L0 interpolation)")


def main() -> None:
    """Train both sides in lockstep on the same batches, evaluate on held-out tokens, print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32, help="TopK / BatchTopK (mean) active latents per token (both sides)")
    ap.add_argument("--our-l1", default="2,5,15", help="l1_coeff sweep of our 'standard'")
    ap.add_argument("--their-l1", default="0.3,1,3", help="l1_penalty sweep of their StandardTrainer")
    ap.add_argument("--arms", default="batchtopk,standard", help="comma-separated: topk, batchtopk, standard")
    ap.add_argument("--holdout-frac", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ours-fp32", action="store_true", help="train ours without bf16 autocast")
    ap.add_argument("--their-standard", choices=["standard", "april"], default="standard",
                    help="their Standard arm: StandardTrainer (default) or StandardTrainerAprilUpdate")
    ap.add_argument("--their-bias-init", action="store_true",
                    help="not as shipped: start their Standard bias at the first batch mean (ours does)")
    args = ap.parse_args()

    dl_trainers = load_dictionary_learning()
    store = ActivationStore(args.store)
    hook = store.hook_for_layer(args.layer)
    d_in = store.d_model
    scale = math.sqrt(d_in) / store.stats(hook)["mean_norm"]  # our trainer's normalisation, applied to both
    split = holdout_split(store, args.holdout_frac)
    holdout = load_holdout(store, hook, split, scale)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    lm_name = str(store.attrs.get("model_id", "unknown"))

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(store=args.store, layer=args.layer, out=Path(tmp), specs=[], d_sae=args.d_sae,
                          batch_size=args.batch_size, tokens=args.steps * args.batch_size, seed=args.seed,
                          device="cpu", autocast=not args.ours_fp32)
        runners: list[Runner] = []
        if "topk" in arms:
            runners.append(our_runner("topk", {"k": args.k}, f"k={args.k}", cfg, d_in, args.d_sae, args.steps,
                                      args.seed))
            runners.append(their_runner(dl_trainers, "topk", f"k={args.k}", None, args.k, d_in, args.d_sae,
                                        args.steps, args.seed, lm_name, args.layer))
        if "batchtopk" in arms:
            runners.append(our_runner("batchtopk", {"k": args.k}, f"k={args.k}", cfg, d_in, args.d_sae,
                                      args.steps, args.seed))
            runners.append(their_runner(dl_trainers, "batchtopk", f"k={args.k}", None, args.k, d_in, args.d_sae,
                                        args.steps, args.seed, lm_name, args.layer))
        if "standard" in arms:
            for l1 in parse_floats(args.our_l1):
                runners.append(our_runner("standard", {"l1_coeff": l1}, f"l1={l1:g}", cfg, d_in, args.d_sae,
                                          args.steps, args.seed))
            for l1 in parse_floats(args.their_l1):
                runners.append(their_runner(dl_trainers, "standard", f"l1={l1:g}", l1, args.k, d_in, args.d_sae,
                                            args.steps, args.seed, lm_name, args.layer, args.their_standard,
                                            args.their_bias_init))
        print(f"store {args.store} {hook}: train tokens [0, {split}), held-out [{split}, {store.n_tokens}) "
              f"= {len(holdout)} non-BOS rows; input scale {scale:.5f}; {len(runners)} SAEs, d_sae {args.d_sae}, "
              f"{args.steps} steps x {args.batch_size}; torch {torch.__version__}, {torch.get_num_threads()} threads")

        batches = shuffled_batches(store, hook, args.batch_size, seed=args.seed, token_range=(0, split))
        t_start = time.perf_counter()
        for step in range(args.steps):
            x = next(batches).float() * scale  # data loading + scaling: outside every timer
            for r in runners:
                t0 = time.perf_counter()
                r.update(step, x)
                r.seconds += time.perf_counter() - t0
                r.steps += 1
            if (step + 1) % max(1, args.steps // 10) == 0:
                print(f"  step {step + 1}/{args.steps} ({time.perf_counter() - t_start:.0f} s)", flush=True)
        for r in runners:
            r.results = evaluate(r, holdout, args.batch_size)
    print_results(runners, args.batch_size)
    print(f"\nThroughput excludes data loading; ours = {'fp32' if args.ours_fp32 else 'bf16-autocast'} step incl. "
          f"its per-step metrics and logging, theirs = fp32 trainer.update "
          f"({'as shipped except the bias init' if args.their_bias_init else 'as shipped'}). FVU/L0: held-out, fp32.")


if __name__ == "__main__":
    tune_allocator()  # as the CLI does: the benches measure what users run
    main()
