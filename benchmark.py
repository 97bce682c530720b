"""``saestrata benchmark``: every SAE variant on the same activations, compared at matched L0.

One resumable command (issue 10; DESIGN.md "Comparing variants fairly"):

1. **store**: harvest the whole embedded wiki train split (or ``--train-tokens``) for ``--layer``
   (the harvester resumes a half-written store and reuses a finished one).
2. **lr sweep**: per variant (every preset and ablation its own), the same small sweep
   ``lr = default_lr(d_sae) * {0.5, 1, 2}`` at target L0 32 on a quarter of the budget, plain
   Adam, the same gradient clip (1.0) for all, extended by factors of 2 past an edge while the
   best rate sits on it (:data:`LR_EXTENSIONS`). Each run is scored by its training FVU and L0
   averaged over its last 10% of steps; the rate with the lowest FVU among the runs whose L0
   landed within 25% of the target (all runs when none did) is that variant's rate. Sweep runs
   see each token once, so their training FVU is a held-out estimate.
3. **matched**: every variant at each target L0 of ``--targets`` (default 24, 40, 48, 80: two
   points bracketing L0 32 and two bracketing 64), the variant's swept lr, plain Adam (weight decay 0),
   ``k = target`` for the TopK family, the trainer's L0 controller for penalty archs
   (:class:`~saestrata.train.trainer.L0Controller`). A paper's ablations (:data:`ABLATIONS`)
   only at the two targets bracketing 32; :data:`PUBLISHED_ONLY` presets skip this stage.
4. **published**: each seed variant (and ``standard``) once more at its paper's own settings
   (the preset's sparsity weights and AdamW lr / weight decay): the "as published" point.
5. **seeds**: ``--seeds`` init seeds for ``topk`` and for the seed-paper variant with the best
   matched-L0-32 CE loss score, at the two targets bracketing 32 (spread reported).
6. **evaluate**: SAEBench core metrics of every SAE on the eval split (different articles).
7. **unlearn**: the embedded wiki unlearning benchmark for every variant's SAE nearest L0 32 (run
   right after that variant's evaluation) and for every published seed point.
8. **probe**: SAEBench sparse probing (:mod:`~saestrata.evaluate.sparse_probing`, the embedded
   corpus's 12 article topics) of each variant's two matched SAEs whose L0s bracket 32
   (:meth:`Benchmark.bracketing`; ablations excluded), right after its unlearning:
   ``out/probing/<sae>.json``; the report interpolates their accuracies at L0 32 (log L0), as it
   does the core metrics: top-k accuracies depend on L0, so SAEs at L0 25 and 41 are not comparable. The LM
   forward over the labelled articles (the expensive part) is done once and cached in
   ``work/probe-residuals/<key>/`` (:func:`~saestrata.evaluate.sparse_probing.cached_residuals`);
   each SAE then costs an encode of the cached residuals and the probes.
9. **speed**: every variant's training throughput, timed again in one process (:mod:`.benchmark_speed`:
   each of its two matched SAEs bracketing L0 32 with its own settings, steps 150-199 of its run, the median
   of 3 rounds; the report interpolates the two rates at L0 32), because
   the SAEs' own step clocks ran beside other jobs over many sessions; ``speed.json``, the matched table's
   train tok/s column. Run it on an otherwise idle machine.
10. **report**: ``report.md``/``report.html``/PNGs with matched-L0 rows at 32 and 64, the
   matched table ``matched.md``, the claims table ``claims.md`` (paper's value | at the paper's
   settings | at matched L0) and the probing table ``probing.md``, every number naming the JSON it
   came from.

Stages 2, 3, 6, 7 and 8 run arch by arch (its sweep, its variants' matched SAEs, their evaluation,
unlearning and probing), and the published points in groups of ``eval_group`` trained then evaluated: a
session that stops leaves evaluated results, not weights a fresh machine would lack. Every SAE
trains alone (one SAE per pass: interrupting loses at most the steps since its last checkpoint);
it is skipped once its weights exist in ``work``, or once its ``cfg.json``/log are in ``out``
and no pending result needs its weights (:meth:`Benchmark.train_job`); a JSON result is skipped
once written (atomically). Each result records the fingerprint of the code that produced it
(:func:`code_fingerprint`); the report says when results of different code are mixed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent
TOKENS_ALL = 2_000_000  # more than the embedded train split holds: the harvester stops at its end
LR_MULTIPLIERS = (0.5, 1.0, 2.0)
# When the best rate is at an edge of the grid, the grid grows by a factor 2 on that side, at most
# this many times (so the sweep can reach 32x or 1/32x the default): a rate at the edge is not tuned.
# (2 was too few: standard's best rate was still the largest, 8x, on 2026-12-01.)
LR_EXTENSIONS = 4
TAIL_FRAC = 0.1  # sweep runs are scored on their last 10% of steps: one log window is too noisy
SWEEP_TARGET = 32.0
PUBLISHED = ("standard",)  # baselines that also get an "as published" point (their default settings)
# A paper's ablations: matched only at the two targets bracketing L0 32 (their claims are about one setting).
ABLATIONS = {"seed000_hsae_no_separation", "seed000_temporal_single_scale", "seed004-uniform", "seed004-k3",
             "seed004-k7", "seed004-gamma1.25", "seed004-gamma2"}
# Differs from seed004-groups only in the sparsity weight, which --target-l0 replaces: as published only.
PUBLISHED_ONLY = {"seed004-lambda0.06"}


@dataclass
class BenchmarkConfig:
    """Sizes and scope of a benchmark run (defaults: the full benchmark of issue 10).

    ``out`` receives the committed results (JSONs, logs, report); ``work`` the store and the SAE
    weights (large, not committed). ``variants`` None = every arch/preset
    (:func:`~saestrata.train.registry.every_variant`). ``tokens_per_sae`` is each SAE's
    training budget (>= 1M tokens in the full run; the store is re-read past one epoch).
    """

    out: Path = Path("docs/results/benchmark")
    work: Path = Path("benchmark-work")
    layer: int = 8
    train_tokens: int = TOKENS_ALL
    tokens_per_sae: int = 1_048_576
    d_sae: int = 2048
    batch_size: int = 1024
    targets: tuple[float, ...] = (24.0, 40.0, 48.0, 80.0)
    variants: list[str] | None = None
    lr_sweep_frac: float = 0.25
    seeds: int = 3
    eval_tokens: int = 8192
    eval_group: int = 6
    unlearn: bool = True
    # None: every retain question of the embedded eval split (850, ~560 known to the model). With the 200 sampled
    # until 2026-12-03 (~133 known) SAEBench's 0.99 retain bar tolerated one wrong answer and decided the score
    # (standard 0.506 vs every TopK-family SAE 0.000 by 1 vs 4 of 133; benchmark_findings.md).
    unlearn_retain_questions: int | None = None
    device: str = "auto"
    model: str | None = None  # None: the embedded Gemma 3 270M; any name/folder load_model takes
    # One numeric setting for every stage and session, whatever the machine: the LM computes in
    # ``lm_dtype`` (store rounded to bf16), SAEs train in fp32 unless ``autocast``. float32 by
    # default: on CPUs without native bf16 (this one reports AVX2 only) bf16 matmuls run ~6x slower.
    lm_dtype: str = "float32"
    autocast: bool = False
    # Sparse probing (stage "probe"): articles per topic of the train / eval split (``saestrata probe``'s defaults).
    probe_train_per_class: int = 100
    probe_test_per_class: int = 50
    # Also write the matched-L0 and probing tables into this file (the project README) at the report
    # stage, between its ``<!-- benchmark:matched -->`` / ``<!-- benchmark:probing -->`` markers.
    readme: Path | None = None
    quick: bool = False  # set by quick_config: every table of the report then says it is the short version
    stages: tuple[str, ...] = ("store", "lr", "matched", "published", "evaluate", "seeds", "unlearn", "probe",
                               "speed", "report")


def quick_config(out: Path, work: Path) -> BenchmarkConfig:
    """A short version: 5 variants, 2 targets around L0 32, 256k tokens each, no unlearning and no probing.

    Its lr sweep runs are as long as the full benchmark's (262,144 tokens), so each variant's rate is
    chosen with the same care: with the full run's quarter-budget fraction they were 64 steps, too few for
    a penalty arch's L0 controller, and `standard` got 2x the default rate (EV 0.52 at L0 32) where its
    256-step sweep picks 16x (2026-12-03, this machine). Measured here (idle, 2 cores): see README "Cost on
    this machine".
    """
    return BenchmarkConfig(out=out, work=work, train_tokens=262_144, tokens_per_sae=262_144, lr_sweep_frac=1.0,
                           targets=(24.0, 40.0), variants=["topk", "batchtopk", "standard", "seed004-groups",
                                                            "seed000_adaptive"],
                           seeds=1, eval_tokens=2048, unlearn=False, quick=True,
                           stages=tuple(s for s in BenchmarkConfig.stages if s != "probe"))


# FVU ~ L0^-0.5 near L0 32: the measured exponent ln(FVU_24 / FVU_40) / ln(L0_40 / L0_24) of the
# benchmark's matched SAEs (25 variants, 2026-12-03) has median 0.47, range 0.42-0.58.
SWEEP_FVU_L0_EXPONENT = 0.5


def _l0_corrected_fvu(run: dict) -> float:
    """A sweep run's FVU scaled to L0 32 with FVU ~ L0^-:data:`SWEEP_FVU_L0_EXPONENT` (inf if not finite).

    A penalty arch's controller lags at a high lr, so a short run may end at L0 35 instead of 32;
    its raw FVU is then lower only because it uses more latents. Scored raw, that picked 32x over 16x
    for seven variants (seed002-selection: FVU 0.0888 at L0 35.3 vs 0.0905 at L0 31.2), and at the full
    budget 32x was the worse rate (seed002-selection at L0 24: FVU 0.079 / dead 0.15 at 32x, 0.068 /
    0.06 at 16x; a `saestrata train --set lr=` control of 2026-12-03, README "The lr sweep").
    """
    if not (math.isfinite(run["fvu"]) and run["l0"] > 0):
        return math.inf
    return run["fvu"] * (run["l0"] / SWEEP_TARGET) ** SWEEP_FVU_L0_EXPONENT


# A penalty arch's L0 controller starts at most 1 / START_MARGIN of the multiplier its sweep calibrated at its
# rate, and never above the arch's own coefficient (``SAESpec.l0_start``). Controls of 2026-12-03 (target 24, 1M
# tokens; README "Where the L0 controller starts"): started at its default, 11x above calibration,
# seed001_fixed_ortho collapsed to L0 1.5 in the warmup and kept 19% dead latents (tail FVU 0.0907); started
# 4.7x below, 2% dead, FVU 0.0774. seed004-uniform: 8.5x below (its default) FVU 0.0742, 2x below 0.0759.
START_MARGIN = 4.0
# A calibrated sweep run can start too LOW: the collapsed first run's controller ends far below the penalty the
# target needs, and from there the redo's L0 stays above the band for its whole quarter budget (seen on the
# fresh machine of 2026-12-04: seed001_adaptive_ortho64 x8 started at 0.000269, ended at 0.0162 with L0 46.2,
# so x4 was chosen without x8 ever being measured at the target; the edge rates x32 of standard,
# seed001_fixed_ortho and seed001_adaptive_ortho32 alike). Such a run is redone from its own calibration while
# that is more than RECALIBRATE_FACTOR above where it started, at most MAX_RECALIBRATIONS times per rate.
RECALIBRATE_FACTOR = 2.0
MAX_RECALIBRATIONS = 2


def calibrated_start(multiplier: float | None) -> float:
    """``SAESpec.l0_start`` for a penalty run whose arch needed ``multiplier`` at this rate and target L0 32.

    ``min(1, multiplier / START_MARGIN)``; 1 (the arch's own coefficient) when ``multiplier`` is unknown.
    """
    if multiplier is None or not (math.isfinite(multiplier) and multiplier > 0):
        return 1.0
    return min(1.0, multiplier / START_MARGIN)


def _near_target(run: dict) -> bool:
    """True when a sweep run's tail L0 is within 25% of :data:`SWEEP_TARGET` (the runs :func:`_choose` prefers)."""
    return abs(run["l0"] - SWEEP_TARGET) <= 0.25 * SWEEP_TARGET


def _has_results(out: Path, variant: str) -> bool:
    """True when ``out`` holds a matched or as-published result of ``variant``: a core JSON, or a recorded SAE
    (``saes/<variant>-l0=*``; sweep runs ``lr-...`` do not count)."""
    return (any((out / "core").glob(f"{variant}-l0=*.json")) or (out / "core" / f"{variant}-published.json").exists()
            or any((out / "saes").glob(f"{variant}-l0=*")))


def _choose(runs: list[dict]) -> dict:
    """The sweep rule: lowest L0-corrected FVU (:func:`_l0_corrected_fvu`) among runs whose L0 is within 25%
    of :data:`SWEEP_TARGET` (all finite runs when none is).

    Returns ``{"best": run, "runs": runs, "rule": text}``.
    """
    finite = [r for r in runs if math.isfinite(r["fvu"])]
    near = [r for r in finite if _near_target(r)]
    pool = near or finite or runs
    best = min(pool, key=_l0_corrected_fvu)
    scaled = f"FVU x (L0/32)^{SWEEP_FVU_L0_EXPONENT:g}"
    rule = (f"lowest {scaled} among runs with L0 within 25% of 32" if near
            else f"lowest {scaled} (no run within 25% of L0 32)")
    return {"best": best, "runs": runs, "rule": rule}


CODE_DIRS = ("train", "evaluate", "store", "harvest")  # the package parts that can change a result


def code_fingerprint(root: Path = ROOT) -> str:
    """sha256 (first 16 hex digits) of every ``.py`` file of the package (under ``root``) that can change a result."""
    h = hashlib.sha256()
    for sub in CODE_DIRS:
        for path in sorted((root / sub).glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def code_manifest(root: Path = ROOT) -> dict[str, str]:
    """``{"train/base.py": sha256[:16], ...}`` of the files :func:`code_fingerprint` hashes.

    Written once per fingerprint to ``out/code/<fingerprint>.json``, so a report mixing results of
    several code versions can name the files in which they differ (:func:`code_diff`).
    """
    return {f"{sub}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for sub in CODE_DIRS for p in sorted((root / sub).glob("*.py"))}


def code_diff(manifests: dict[str, dict[str, str]]) -> list[str] | None:
    """Files whose hash differs between the code versions ``{fingerprint: manifest}`` (added/removed files too).

    Returns None when fewer than two manifests are given (nothing to compare).
    """
    if len(manifests) < 2:
        return None
    files = set().union(*manifests.values())
    return sorted(f for f in files if len({m.get(f) for m in manifests.values()}) > 1)


def _write_json(path: Path, data) -> None:
    """Write ``data`` as JSON atomically (temp file + rename): a result is either whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _read_log(folder: Path) -> list[dict]:
    path = folder / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def tail_metrics(log: list[dict], frac: float = TAIL_FRAC) -> dict:
    """Step-weighted mean ``fvu`` and ``l0`` over the last ``frac`` of a run's steps.

    Args:
        log: train_log.jsonl lines (each a mean over ``window`` steps ending at ``step``).
        frac: share of the run's steps to average (at least the last line).

    Returns:
        ``{"fvu", "l0", "steps"}`` (``steps`` = steps averaged); NaN values when ``log`` is empty.
    """
    if not log:
        return {"fvu": math.nan, "l0": math.nan, "steps": 0}
    need, got, acc = max(1, round(frac * (log[-1]["step"] + 1))), 0, {"fvu": 0.0, "l0": 0.0}
    for line in reversed(log):
        w = line.get("window", 1)
        for k in acc:
            acc[k] += w * line[k]
        got += w
        if got >= need:
            break
    return {"fvu": acc["fvu"] / got, "l0": acc["l0"] / got, "steps": got}


class SettingsMismatch(ValueError):
    """An SAE in ``--work`` was trained with other settings than the run now asks of it (:meth:`Benchmark._check_same_job`)."""


@dataclass
class Job:
    """One SAE to train: its name (folder), the SAESpec fields and the stage it belongs to."""

    name: str
    arch: str
    stage: str
    hparams: dict = field(default_factory=dict)
    lr: float | None = None
    target_l0: float | None = None
    seed: int = 0
    tokens: int = 0
    l0_start: float = 1.0  # SAESpec.l0_start (:func:`calibrated_start`); job.json files older than it mean 1.0


class Benchmark:
    """The benchmark's state on disk: which SAEs and results exist, and how to make the missing ones.

    Args:
        cfg: the run's :class:`BenchmarkConfig`.
        echo: where progress lines go (one line per finished unit of work).
    """

    def __init__(self, cfg: BenchmarkConfig, echo: Callable[[str], None] = print):
        from .train.registry import every_variant, expand_names

        self.cfg, self.echo = cfg, echo
        self.variants = expand_names(cfg.variants) if cfg.variants else every_variant()
        self.store = cfg.work / "store-train"
        self.code = code_fingerprint()
        self._lm = None
        self.skipped: dict[str, str] = {}  # variant -> why (SettingsMismatch); left out of this run's work

    # -- paths ------------------------------------------------------------------------
    def sae_dir(self, name: str) -> Path:
        """Folder of SAE ``name`` (weights, cfg.json, train_log.jsonl)."""
        return self.cfg.work / "runs" / name / name

    @property
    def reported_variants(self) -> list[str]:
        """The variants the report's tables cover: this run's, plus every other variant with a result in ``out``.

        A run narrowed by ``--variants`` into the shared results folder once rewrote matched.md and the README
        tables with its own variants only, dropping every other variant's rows (2026-12-04: the queue's items
        left a README listing 7 of 28 variants). Order: :func:`~.train.registry.every_variant`'s, then names
        outside it (an arch given by name).
        """
        from .train.registry import every_variant

        known = every_variant()
        return ([v for v in known if v in self.variants or _has_results(self.cfg.out, v)]
                + [v for v in self.variants if v not in known])

    def done(self, name: str) -> bool:
        """True once SAE ``name``'s weights are saved in ``work`` (``save_sae`` writes cfg.json last)."""
        return (self.sae_dir(name) / "cfg.json").exists()

    def recorded(self, name: str) -> bool:
        """True once SAE ``name``'s cfg.json, log and job.json are copied to ``out`` (they outlive the weights)."""
        return all((self.cfg.out / "saes" / name / f).exists() for f in ("cfg.json", "train_log.jsonl", "job.json"))

    # -- stage 1 ----------------------------------------------------------------------
    def harvest_store(self) -> None:
        """Harvest (or resume, or reuse) the train store of ``cfg.layer``."""
        from .harvest.harvester import HarvestConfig, harvest

        kw = {"model": self.cfg.model} if self.cfg.model else {}
        harvest(HarvestConfig(layers=[self.cfg.layer], tokens=self.cfg.train_tokens, out=self.store,
                              device=self.cfg.device, compute_dtype=self.cfg.lm_dtype, **kw), lm=self.lm())

    # -- training ---------------------------------------------------------------------
    def train_job(self, job: Job, need_weights: bool = True) -> Path:
        """Train one SAE alone (resuming its checkpoint if one exists); copy its cfg.json and log to ``out``.

        Skipped when its weights exist, or when ``need_weights`` is False and ``out`` already records it
        (a fresh machine has ``out`` from git but not the weights: finished, evaluated SAEs are not redone).
        """
        from .train.checkpoint import CheckpointError, checkpoint_path
        from .train.trainer import SAESpec, TrainConfig, train

        run_dir = self.cfg.work / "runs" / job.name
        self._check_same_job(job)
        if not need_weights and not self.done(job.name) and self.recorded(job.name):
            return self.sae_dir(job.name)
        if not self.done(job.name):
            spec = SAESpec(job.name, job.arch, dict(job.hparams), job.lr, job.target_l0, job.seed, job.l0_start)
            tc = TrainConfig(store=self.store, layer=self.cfg.layer, out=run_dir, specs=[spec], d_sae=self.cfg.d_sae,
                             batch_size=self.cfg.batch_size, tokens=job.tokens, device=self.cfg.device,
                             checkpoint_every=200, resume=checkpoint_path(run_dir).exists(), autocast=self.cfg.autocast)
            t0 = time.perf_counter()
            try:
                train(tc, progress=False)
            except CheckpointError as err:  # settings changed since the checkpoint: start this SAE afresh
                self.echo(f"  {job.name}: {err}; retraining from scratch")
                checkpoint_path(run_dir).unlink(missing_ok=True)
                tc.resume = False
                train(tc, progress=False)
            self._drop_stale_results(job.name)
            log = _read_log(self.sae_dir(job.name))
            last = log[-1] if log else {}
            self.echo(f"  trained {job.name} ({job.stage}): L0 {last.get('l0', float('nan')):.1f} "
                      f"fvu {last.get('fvu', float('nan')):.3f} in {time.perf_counter() - t0:.0f} s")
        dest = self.cfg.out / "saes" / job.name
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("cfg.json", "train_log.jsonl"):
            shutil.copyfile(self.sae_dir(job.name) / f, dest / f)
        _write_json(dest / "job.json", {**asdict(job), "code": self.code})
        return self.sae_dir(job.name)

    def _drop_stale_results(self, name: str) -> None:
        """Remove results of SAE ``name`` computed from earlier weights (the stages recompute them from the new ones).

        An SAE is retrained when a pending result needs weights a fresh machine lacks; retraining is not
        bit-identical across machines (the re-harvested store's fp32 forward and statistics differ in the last
        bits, and training amplifies that: seed000_hsae-l0=24's final train L0 27.9 -> 26.5 on 2026-12-02), so
        a core result of the old weights must not sit beside an unlearning result of the new ones.
        """
        for path in (self.core_path(name), self.unlearning_path(name), self.probing_path(name)):
            if path.exists():
                path.unlink()
                self.echo(f"  {name}: retrained, so {path.relative_to(self.cfg.out)} (earlier weights) is recomputed")

    def _check_same_job(self, job: Job) -> None:
        """Refuse to reuse SAE ``job.name`` if it was trained with other settings (e.g. another ``--tokens-per-sae``).

        Raises:
            SettingsMismatch: the recorded job differs (names the fields); a mixed-budget table would be unfair.
        """
        path = self.cfg.out / "saes" / job.name / "job.json"
        if not (path.exists() and (self.done(job.name) or self.recorded(job.name))):
            return
        old = {"l0_start": 1.0, **{k: v for k, v in json.loads(path.read_text()).items() if k != "code"}}
        new = json.loads(json.dumps(asdict(job)))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise SettingsMismatch(f"{job.name} in {self.cfg.work} was trained with other settings "
                             f"({', '.join(f'{k} {old.get(k)} != {new.get(k)}' for k in diff)}): "
                             f"use a new --work and --out for a benchmark with other sizes")

    def _arch_of(self, variant: str) -> str:
        from .train.registry import resolve

        return resolve(variant)[0]

    def _sweep_job(self, variant: str, mult: float, l0_start: float = 1.0) -> Job:
        from .train.trainer import default_lr

        tokens = max(self.cfg.batch_size, int(self.cfg.tokens_per_sae * self.cfg.lr_sweep_frac))
        suffix = "" if l0_start == 1.0 else f"-start{l0_start:.3g}"
        return Job(f"lr-{variant}-x{mult:g}{suffix}", variant, "lr", {"weight_decay": 0.0},
                   default_lr(self.cfg.d_sae) * mult, SWEEP_TARGET, 0, tokens, l0_start)

    def _penalty_controlled(self, variant: str) -> bool:
        """True when ``--target-l0`` reaches ``variant`` through the trainer's L0 controller alone (penalty archs)."""
        from .train.registry import ARCHS

        return ARCHS[self._arch_of(variant)].cls.sparsity_control == "penalty"

    def _sweep_run(self, job: Job) -> dict | None:
        """A finished sweep run's score (:func:`tail_metrics` of its log in ``out``), or None.

        ``multiplier`` is the L0 controller's final multiplier (None for archs without one).

        Raises:
            SettingsMismatch: it was trained with other settings (:meth:`_check_same_job`).
        """
        if not self.recorded(job.name):
            return None
        self._check_same_job(job)
        log = _read_log(self.cfg.out / "saes" / job.name)
        mult = (log[-1].get("counters") or {}).get("sparsity_multiplier") if log else None
        return {"sae": job.name, "lr": job.lr, "l0_start": job.l0_start, "multiplier": mult, **tail_metrics(log)}

    def _calibrated_sweep_run(self, variant: str, mult: float) -> tuple[list[Job], dict | None]:
        """The sweep run at ``mult`` x the default rate that counts: ``(jobs, run)``, run None until finished.

        A penalty arch's run starts at its own coefficient; if that was less than :data:`START_MARGIN` below the
        multiplier it ended with (its default is too strong at this rate, so L0 fell through the target in the
        warmup), the run is redone from :func:`calibrated_start` of that multiplier, and the redo counts. A redo
        whose L0 missed the target band although its own calibration lies more than :data:`RECALIBRATE_FACTOR`
        above its start (it started too low to reach the target in its budget) is redone again from that
        calibration, at most :data:`MAX_RECALIBRATIONS` times; the last run counts.
        """
        first = self._sweep_job(variant, mult)
        run = self._sweep_run(first)
        if run is None or not self._penalty_controlled(variant):
            return [first], run
        jobs, start = [first], calibrated_start(run["multiplier"])
        if start >= 1.0:
            return jobs, run
        for attempt in range(MAX_RECALIBRATIONS + 1):
            jobs.append(self._sweep_job(variant, mult, start))
            run = self._sweep_run(jobs[-1])
            if run is None or _near_target(run) or attempt == MAX_RECALIBRATIONS:
                break
            nxt = calibrated_start(run["multiplier"])
            if not RECALIBRATE_FACTOR * start < nxt < 1.0:  # 1.0 would be the first run again
                break
            start = nxt
        return jobs, run

    def lr_jobs(self, variant: str) -> tuple[list[Job], dict | None]:
        """The lr sweep of ``variant`` as far as its finished runs decide it: ``(jobs, chosen)``.

        Every variant has its own sweep (same grid, rule and budget), never one shared with the other
        presets of its arch: with a shared sweep, the variant that stood for the arch (the first in
        ``variants``) and so each preset's lr depended on which variants a run was narrowed to (seen on
        2026-12-02/03: ``--variants seed002-selection`` swept and trained at 32x, while the README's lr
        column showed the shared sweep's 16x).

        Each rate's run that counts is :meth:`_calibrated_sweep_run`'s (a penalty arch's run that started above
        its calibration is redone from a calibrated start). Starts from :data:`LR_MULTIPLIERS`; while the best
        finished rate is the grid's largest
        (smallest), adds twice (half) that, at most :data:`LR_EXTENSIONS` times. ``chosen`` is None
        until every job listed has finished.
        """
        mults = list(LR_MULTIPLIERS)
        while True:
            jobs, runs = [], []
            for m in mults:
                more, run = self._calibrated_sweep_run(variant, m)
                jobs += more
                runs.append(run)
            if any(r is None for r in runs):
                return jobs, None
            best = _choose(runs)
            best_mult = mults[runs.index(best["best"])]
            if len(mults) - len(LR_MULTIPLIERS) >= LR_EXTENSIONS or min(mults) < best_mult < max(mults):
                return jobs, best
            mults.append(best_mult * 2 if best_mult == max(mults) else best_mult / 2)

    def chosen_lrs(self, write: bool = True) -> dict[str, dict]:
        """``{variant: {"lr", "fvu", "l0", "runs", "rule"}}`` for every variant whose sweep has finished.

        ``write``: also (re)write ``out/lr_sweep.json`` (key ``variants``), each entry stamped with this
        code's fingerprint (only a run that trains sweeps does: a report-only run must not restamp another
        code's results). Variants this run does not cover (``--variants`` narrowed) keep their entries; the
        per-arch entries of files written before per-variant sweeps stay under ``archs``.
        """
        chosen = {}
        for v in self.variants:
            if v in PUBLISHED_ONLY:  # trained only at its preset's own settings
                continue
            try:
                _, best = self.lr_jobs(v)
            except SettingsMismatch as err:  # as if unswept, for the others; the run names it at its end
                self.skipped.setdefault(v, str(err))
                continue
            if best is not None:
                b = best.pop("best")
                chosen[v] = {"lr": b["lr"], "fvu": b["fvu"], "l0": b["l0"], "sae": b["sae"],
                             "multiplier": b.get("multiplier"), **best}
        if write:
            path = self.cfg.out / "lr_sweep.json"
            kept, legacy = self._other_sweeps(path)
            _write_json(path, {"target_l0": SWEEP_TARGET,
                               "score": f"FVU and L0 averaged over the last {TAIL_FRAC:.0%} of steps",
                               "variants": {**kept, **{v: {**c, "code": self.code} for v, c in chosen.items()}},
                               **({"archs": legacy} if legacy else {})})
        return chosen

    def _other_sweeps(self, path: Path) -> tuple[dict[str, dict], dict[str, dict]]:
        """``(variants, archs)``: the ``lr_sweep.json`` entries of variants this run does not sweep, and the
        per-arch entries of files written before per-variant sweeps (both kept when the file is rewritten).

        Files written before per-arch stamps carry one top-level ``code``; their entries inherit it.
        """
        if not path.exists():
            return {}, {}
        old = json.loads(path.read_text())
        kept = {v: e for v, e in old.get("variants", {}).items() if v not in self.variants}
        return kept, {a: {"code": old.get("code"), **e} for a, e in old.get("archs", {}).items()}

    def matched_jobs(self, lrs: dict[str, dict]) -> list[Job]:
        """Every variant at every target L0 (ablations at the two bracketing 32), with its own swept lr and plain Adam."""
        from .train.trainer import default_lr

        jobs = []
        for v in self.variants:
            if v in PUBLISHED_ONLY:
                continue
            lr, start = lrs.get(v, {}).get("lr", default_lr(self.cfg.d_sae)), self._l0_start(v, lrs)
            jobs += [Job(f"{v}-l0={t:g}", v, "matched", {"weight_decay": 0.0}, lr, t, 0, self.cfg.tokens_per_sae,
                         start) for t in (self.bracket_32() if v in ABLATIONS else self.cfg.targets)]
        return jobs

    def _l0_start(self, variant: str, lrs: dict[str, dict]) -> float:
        """The L0 controller's start for ``variant``'s matched and seed SAEs: :func:`calibrated_start` of the
        multiplier its chosen sweep run ended with (penalty archs; 1 otherwise or while its sweep is unfinished)."""
        if not self._penalty_controlled(variant):
            return 1.0
        return calibrated_start(lrs.get(variant, {}).get("multiplier"))

    def bracket_32(self) -> list[float]:
        """The targets nearest L0 32 from below and above (those that exist)."""
        below = [t for t in self.cfg.targets if t <= SWEEP_TARGET]
        above = [t for t in self.cfg.targets if t >= SWEEP_TARGET]
        return [t for t in (max(below, default=None), min(above, default=None)) if t is not None]

    def published_jobs(self, variants: list[str] | None = None) -> list[Job]:
        """Each seed variant (and :data:`PUBLISHED` baselines) of ``variants`` (default: this run's) at its
        preset's own settings. The report passes :attr:`reported_variants`, so a run narrowed by ``--variants``
        keeps the other variants' published rows (2026-12-04: a narrowed run had dropped 9 of them)."""
        return [Job(f"{v}-published", v, "published", tokens=self.cfg.tokens_per_sae)
                for v in (self.variants if variants is None else variants) if v.startswith("seed") or v in PUBLISHED]

    def seed_jobs(self, best_seed_variant: str | None, lrs: dict[str, dict]) -> list[Job]:
        """Extra init seeds (1 .. seeds-1) for topk and the best seed variant at the targets bracketing 32."""
        from .train.trainer import default_lr

        jobs = []
        for v in [x for x in ("topk", best_seed_variant) if x and x in self.variants]:
            lr, start = lrs.get(v, {}).get("lr", default_lr(self.cfg.d_sae)), self._l0_start(v, lrs)
            for s in range(1, self.cfg.seeds):
                jobs += [Job(f"{v}-l0={t:g}-seed{s}", v, "seeds", {"weight_decay": 0.0}, lr, t, s,
                             self.cfg.tokens_per_sae, start) for t in self.bracket_32()]
        return jobs

    # -- evaluation ---------------------------------------------------------------------
    def lm(self):
        """The LM, loaded once per benchmark run."""
        if self._lm is None:
            from .harvest.model import load_model

            kw = {"device": self.cfg.device, "dtype": self.cfg.lm_dtype}
            self._lm = load_model(self.cfg.model, **kw) if self.cfg.model else load_model(**kw)
        return self._lm

    def core_path(self, name: str) -> Path:
        """Where SAE ``name``'s core result goes."""
        return self.cfg.out / "core" / f"{name}.json"

    def evaluate(self, names: list[str]) -> None:
        """Core metrics of every finished SAE in ``names`` lacking a result, ``eval_group`` SAEs per batched forward."""
        from .evaluate.core import EvalConfig, evaluate_saes

        todo = [n for n in names if self.done(n) and not self.core_path(n).exists()]
        for i in range(0, len(todo), self.cfg.eval_group):
            group = todo[i : i + self.cfg.eval_group]
            t0 = time.perf_counter()
            results = evaluate_saes([self.sae_dir(n) for n in group],
                                    EvalConfig(tokens=self.cfg.eval_tokens, batch_rows=1, device=self.cfg.device),
                                    lm=self.lm(), progress=False)
            for n, r in zip(group, results):
                r["saestrata_benchmark"] = {"sae": n, "code": self.code}
                _write_json(self.core_path(n), r)
            self.echo(f"  evaluated {', '.join(group)} in {time.perf_counter() - t0:.0f} s")

    def unlearn(self, names: list[str]) -> None:
        """The embedded wiki unlearning benchmark for every SAE in ``names`` lacking a result."""
        from .evaluate.unlearning import UnlearnConfig, run_unlearning

        for n in names:
            path = self.unlearning_path(n)
            if self.has_unlearning(n) or not self.done(n):
                continue
            if path.exists():
                had = self._unlearning_config(n).get("max_retain_questions")
                self.echo(f"  {n}: its unlearning result used {had or 'all'} retain questions, the benchmark uses "
                          f"{self.cfg.unlearn_retain_questions or 'all'}: recomputing")
            t0 = time.perf_counter()
            r = run_unlearning(UnlearnConfig(sae=self.sae_dir(n), max_retain_questions=self.cfg.unlearn_retain_questions,
                                             device=self.cfg.device), lm=self.lm(), progress=False)
            r["saestrata_benchmark"] = {"sae": n, "code": self.code}
            _write_json(path, r)
            self.echo(f"  unlearning {n}: score {r['eval_result_metrics']['unlearning']['unlearning_score']:.3f} "
                      f"in {time.perf_counter() - t0:.0f} s")

    def probe(self, names: list[str]) -> None:
        """SAEBench sparse probing of every finished SAE in ``names`` lacking a result: ``out/probing/<name>.json``.

        One :func:`~saestrata.evaluate.sparse_probing.run_sparse_probing` per SAE (the path of
        ``saestrata probe``: embedded wiki topics, ``probe_train_per_class`` / ``probe_test_per_class``
        articles per topic, context 128, k = 1, 2, 5, 10, 20, 50, seed 42, the LM in ``lm_dtype``), its
        residuals read from the cache in ``work/probe-residuals`` (filled by the first SAE's run:
        one LM forward over the articles per cache key, i.e. per model, layer and article list). Each JSON is
        written atomically and carries ``saestrata_benchmark`` ``{"sae", "code"}``; an existing one
        is kept (resumable).

        Raises:
            DatasetError: the embedded corpus is not installed.
            ModelError: the SAE does not fit the benchmark's model.
        """
        from .evaluate.sparse_probing import ProbeConfig, run_sparse_probing

        for n in names:
            path = self.probing_path(n)
            if path.exists() or not self.done(n):
                continue
            t0 = time.perf_counter()
            (r,) = run_sparse_probing(ProbeConfig(saes=[self.sae_dir(n)], train_per_class=self.cfg.probe_train_per_class,
                                                  test_per_class=self.cfg.probe_test_per_class, device=self.cfg.device,
                                                  dtype=self.cfg.lm_dtype, model=self.cfg.model),
                                      self.lm(), progress=False, cache=self.cfg.work / "probe-residuals")
            r["saestrata_benchmark"] = {"sae": n, "code": self.code}
            _write_json(path, r)
            m = r["eval_result_metrics"]["sae"]
            self.echo(f"  probed {n}: sae top-1 accuracy {m['sae_top_1_test_accuracy']:.3f}, "
                      f"all latents {m['sae_test_accuracy']:.3f} in {time.perf_counter() - t0:.0f} s")

    # -- selection helpers ----------------------------------------------------------------
    def unlearning_path(self, name: str) -> Path:
        """Where SAE ``name``'s unlearning result goes."""
        return self.cfg.out / "unlearning" / f"{name}.json"

    def _unlearning_config(self, name: str) -> dict:
        """The ``eval_config`` of SAE ``name``'s unlearning result ({} if none)."""
        path = self.unlearning_path(name)
        return json.loads(path.read_text()).get("eval_config", {}) if path.exists() else {}

    def has_unlearning(self, name: str) -> bool:
        """True if SAE ``name`` has an unlearning result computed with the benchmark's retain questions
        (``unlearn_retain_questions``); a result with another number is stale and recomputed."""
        config = self._unlearning_config(name)
        return bool(config) and config.get("max_retain_questions") == self.cfg.unlearn_retain_questions

    def probing_path(self, name: str) -> Path:
        """Where SAE ``name``'s sparse probing result goes (SAEBench's ``sparse_probing`` JSON layout)."""
        return self.cfg.out / "probing" / f"{name}.json"

    @staticmethod
    def _unlearned_published(job: Job) -> bool:
        """Published points that get unlearning: seeds 000-002 claim a WMDP-bio score of 0.0."""
        return job.arch.startswith(("seed000", "seed001", "seed002"))

    def _needs_weights(self, job: Job) -> bool:
        """True while a result that needs ``job``'s weights is missing (its core eval, its unlearning run or
        its sparse probing).

        A matched SAE's unlearning (probing) is pending while its variant has none and it may be the one
        nearest L0 32 (all unknown until every matched point of the variant is evaluated).
        """
        if not self.core_path(job.name).exists():
            return True
        unlearn = self.cfg.unlearn and "unlearn" in self.cfg.stages
        if job.stage == "published":
            return unlearn and self._unlearned_published(job) and not self.has_unlearning(job.name)
        if job.stage != "matched" or job.arch in ABLATIONS:
            return False
        return ((unlearn and self._nearest_result_pending(job, self.has_unlearning))
                or ("probe" in self.cfg.stages and self._bracket_probe_pending(job)))

    def _nearest_result_pending(self, job: Job, has: Callable[[str], bool]) -> bool:
        """True while no matched SAE ``name`` of ``job``'s variant has the result (``has(name)``) and ``job``'s SAE may
        be the variant's SAE nearest L0 32 (it is, or not every matched point is evaluated yet)."""
        if any(has(f"{job.arch}-l0={t:g}") for t in self.cfg.targets):
            return False
        return not self._all_evaluated(job.arch) or self.nearest_to(job.arch, SWEEP_TARGET) == job.name

    def _all_evaluated(self, variant: str) -> bool:
        """True once every matched-stage SAE of ``variant`` has its core result."""
        return all(self.core_path(f"{variant}-l0={t:g}").exists() for t in self.cfg.targets)

    def _bracket_probe_pending(self, job: Job) -> bool:
        """True while ``job``'s SAE lacks a probing result and may be one of the two bracketing L0 32
        (:meth:`bracketing`; unknown until every matched point of its variant is evaluated)."""
        if self.probing_path(job.name).exists():
            return False
        return not self._all_evaluated(job.arch) or job.name in self.bracketing(job.arch, SWEEP_TARGET)

    def core(self, name: str) -> dict | None:
        """The core result of SAE ``name``, or None."""
        path = self.core_path(name)
        return json.loads(path.read_text()) if path.exists() else None

    def nearest_to(self, variant: str, l0: float) -> str | None:
        """The evaluated matched-stage SAE of ``variant`` whose L0 is nearest ``l0`` (in log L0)."""
        best, dist = None, math.inf
        for t in self.cfg.targets:
            name = f"{variant}-l0={t:g}"
            r = self.core(name)
            if r is None:
                continue
            got = r["eval_result_metrics"]["sparsity"]["l0"]
            d = abs(math.log(max(got, 1e-9) / l0))
            if d < dist:
                best, dist = name, d
        return best

    def bracketing(self, variant: str, l0: float) -> list[str]:
        """The evaluated matched-stage SAEs of ``variant`` whose measured L0s bracket ``l0``: the one with the
        largest L0 <= ``l0`` and the one with the smallest L0 >= ``l0`` (one name if a single SAE sits at
        ``l0``). When no pair brackets it, only the nearest (:meth:`nearest_to`); [] when none is evaluated.
        Sparse probing runs on these so the report can interpolate at ``l0`` as it does the core metrics."""
        pts = sorted((r["eval_result_metrics"]["sparsity"]["l0"], n) for n in (f"{variant}-l0={t:g}" for t in self.cfg.targets)
                     if (r := self.core(n)) is not None)
        below, above = [n for x, n in pts if x <= l0], [n for x, n in pts if x >= l0]
        if below and above:
            return list(dict.fromkeys((below[-1], above[0])))
        nearest = self.nearest_to(variant, l0)
        return [nearest] if nearest else []

    def best_seed_variant(self) -> str | None:
        """The seed-paper variant with the highest CE loss score interpolated at L0 32, among every variant with
        results in ``out`` (:attr:`reported_variants`), not only this run's: a run narrowed by ``--variants`` to one
        seed variant had made that variant "the best" and put its one seed in the init-seeds table in place of
        the best variant's three (2026-12-04, ``--variants seed001_adaptive_ortho64``). :meth:`seed_jobs` still
        trains extra seeds only for a variant of this run."""
        from .evaluate.report import matched_l0_rows

        scores = {}
        for v in self.reported_variants:
            if not v.startswith("seed") or v in ABLATIONS | PUBLISHED_ONLY:
                continue
            rows = [self._core_row(f"{v}-l0={t:g}", v) for t in self.cfg.targets]
            rows = [r for r in rows if r]
            hit = matched_l0_rows(rows, SWEEP_TARGET)
            if hit and hit[0]["ce_loss_score"] is not None:
                scores[v] = hit[0]["ce_loss_score"]
        return max(scores, key=scores.get) if scores else None

    def _core_row(self, name: str, variant: str) -> dict | None:
        r = self.core(name)
        if r is None:
            return None
        m = r["eval_result_metrics"]
        return {"sae": name, "arch": variant, "l0": m["sparsity"]["l0"],
                "ce_loss_score": m["model_performance_preservation"]["ce_loss_score"],
                "explained_variance": m["reconstruction_quality"]["explained_variance"],
                "kl_div_score": m["model_behavior_preservation"]["kl_div_score"]}

    # -- the whole run ------------------------------------------------------------------------
    def run(self) -> Path:
        """Run every stage of ``cfg.stages`` in order, skipping finished work; returns ``out``.

        Raises:
            SettingsMismatch: after everything else ran, naming each variant skipped because SAEs of it in
                ``--work`` were trained with other settings.
        """
        cfg, stages = self.cfg, set(self.cfg.stages)
        cfg.out.mkdir(parents=True, exist_ok=True)
        if set(cfg.stages) - {"report", "speed"}:  # report / speed alone must not restamp the run's settings and code
            _write_json(cfg.out / "config.json", {**asdict(cfg), "code": self.code, "variants": self.variants})
            _write_json(cfg.out / "code" / f"{self.code}.json", code_manifest())
        if "store" in stages:
            self.echo("[1/10] store")
            self.harvest_store()
        # Variant by variant (its sweep, then its SAEs at every target, then their evaluation), so a
        # session that stops mid-run leaves whole, evaluated units of results behind.
        swept = [v for v in self.variants if v not in PUBLISHED_ONLY]
        for i, v in enumerate(swept, 1):
            # One variant whose saved SAEs disagree with today's settings must not stop the others' hours of
            # work (seen 2026-12-04: seed000_hsae aborted a 15-variant run); it is named again at the end.
            try:
                self._run_variant(v, i, len(swept), stages)
            except SettingsMismatch as err:
                self.skipped.setdefault(v, str(err))
            if v in self.skipped:
                self.echo(f"  {v}: SKIPPED, {self.skipped[v]}")
        self._run_rest(stages)
        if self.skipped:
            raise SettingsMismatch(f"{len(self.skipped)} variant(s) skipped, the rest finished: "
                                   + "; ".join(self.skipped.values()))
        return cfg.out

    def _run_variant(self, v: str, i: int, n: int, stages: set[str]) -> None:
        """Variant ``v``'s (``i`` of ``n``) stages: lr sweep, matched-L0 SAEs, evaluation, unlearning, probing.

        Raises:
            SettingsMismatch: one of its SAEs in ``--work`` was trained with other settings.
        """
        while "lr" in stages:
            sweep, _ = self.lr_jobs(v)
            pending = [j for j in sweep if not self.recorded(j.name)]
            if not pending:
                break
            self.echo(f"[2/10] lr sweep {i}/{n} {v}: {len(pending)} of {len(sweep)} short runs to do")
            for job in pending:
                self.train_job(job, need_weights=False)
        lrs = self.chosen_lrs("lr" in stages)
        if v in self.skipped:  # its sweep disagrees with --work: never fall back to the default rate
            return
        jobs = [j for j in self.matched_jobs(lrs) if j.arch == v]
        if "matched" in stages:
            self.echo(f"[3/10] matched L0 {i}/{n} {v}: {len(jobs)} SAEs")
            if v not in lrs:  # e.g. --stages matched alone, or a sweep that a new rule extended
                self.echo(f"  {v}: its lr sweep is not finished, so these SAEs take the default rate and "
                          "controller start (add the stage lr to sweep first)")
            # Decided before any retraining: a retrained SAE's core result is dropped, which would make the
            # later points look "maybe nearest L0 32" and retrain them too (a cascade seen on 2026-12-02).
            needs = [self._needs_weights(job) for job in jobs]
            for job, need in zip(jobs, needs):
                self.train_job(job, need)
        if "evaluate" in stages:
            self.evaluate([j.name for j in jobs])
        if v in ABLATIONS:  # a paper's ablations get neither unlearning nor probing
            return
        if "unlearn" in stages and self.cfg.unlearn and (nearest := self.nearest_to(v, SWEEP_TARGET)):
            self.unlearn([nearest])
        if "probe" in stages:  # both SAEs bracketing L0 32, so the report can interpolate at 32
            self.probe(self.bracketing(v, SWEEP_TARGET))

    def _run_rest(self, stages: set[str]) -> None:
        """The stages after the per-variant ones: the as-published points, the extra seeds, the report."""
        cfg = self.cfg
        lrs = self.chosen_lrs("lr" in stages)
        published = self.published_jobs()
        if "published" in stages:
            self.echo(f"[4/10] as published: {len(published)} SAEs")
        for g in range(0, len(published), cfg.eval_group):
            group = published[g : g + cfg.eval_group]
            if "published" in stages:
                for job in group:
                    self.train_job(job, self._needs_weights(job))
            if "evaluate" in stages:
                self.evaluate([j.name for j in group])
            if "unlearn" in stages and cfg.unlearn:
                self.unlearn([j.name for j in group if self._unlearned_published(j)])
        seeds = self.seed_jobs(self.best_seed_variant(), lrs)
        if "seeds" in stages:
            self.echo(f"[6/10] seeds: {len(seeds)} SAEs")
            for job in seeds:
                self.train_job(job, self._needs_weights(job))
            if "evaluate" in stages:
                self.evaluate([j.name for j in seeds])
        if "speed" in stages:
            self.echo("[9/10] speed: every variant's training step, timed in this process (keep the machine idle)")
            from .benchmark_speed import measure_speed

            measure_speed(self, self.reported_variants)
        if "report" in stages:
            self.echo("[10/10] report")
            from .benchmark_report import write_benchmark_report

            write_benchmark_report(self)


def run_benchmark(cfg: BenchmarkConfig, echo: Callable[[str], None] = print) -> Path:
    """Run (or resume) the benchmark described by ``cfg``; returns the results folder.

    Raises:
        ArchError: an unknown name in ``cfg.variants``.
        StoreError / ModelError / DatasetError: from the stages (one-line messages).
        SettingsMismatch: some variants were skipped (their saved SAEs have other settings); the rest finished.
    """
    return Benchmark(cfg, echo).run()
