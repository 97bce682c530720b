"""Tables of ``saestrata benchmark``: matched-L0 rows, seed spread, as-published points, seed claims.

Writes into the benchmark's ``out`` folder: ``matched.md`` (every variant at L0 32 and 64),
``published.md``, ``claims.md``, ``mechanisms.md``, ``probing.md`` (sparse probing of each variant's
two SAEs bracketing L0 32, interpolated), ``provenance.md`` (which code version trained and evaluated
which SAE), ``summary.json`` (all rows, machine-readable) and
``report/`` (:func:`~saestrata.evaluate.report.write_report`: core/unlearning tables and the
Pareto plots of EV and CE loss score against L0). Every number is copied or interpolated from
a JSON under ``out`` that its row names; interpolation is linear in log L0 between the two
results bracketing the L0 (:func:`~saestrata.evaluate.report.matched_l0_rows`), never
extrapolated.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

from .benchmark_speed import read_speed, sae_speed
from .evaluate.report import METRICS_AT_L0, log_l0_weight, matched_l0_rows, write_report

MATCHED_AT = (32.0, 64.0)
SPEED_AT = 32.0  # the speed stage times each variant's two SAEs bracketing this L0 (benchmark_speed.py)


def _num(v, fmt: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _core_row(bench, name: str, variant: str) -> dict | None:
    """Metrics of one evaluated SAE (None if not evaluated yet)."""
    r = bench.core(name)
    if r is None:
        return None
    m = r["eval_result_metrics"]
    cfg = json.loads((bench.cfg.out / "saes" / name / "cfg.json").read_text())["saestrata"]
    return {"sae": name, "arch": variant, "l0": m["sparsity"]["l0"],
            "explained_variance": m["reconstruction_quality"]["explained_variance"],
            "ce_loss_score": m["model_performance_preservation"]["ce_loss_score"],
            "kl_div_score": m["model_behavior_preservation"]["kl_div_score"],
            "kl_div_with_sae": m["model_behavior_preservation"]["kl_div_with_sae"],
            "dead_frac": 1.0 - m["misc_metrics"]["frac_alive"], "alive": round(m["misc_metrics"]["frac_alive"] * r["sae_cfg_dict"]["d_sae"]),
            "train_tokens_per_s": cfg.get("train_tokens_per_s"), "failed": cfg.get("failed"),
            "counters": _final_counters(bench.cfg.out / "saes" / name), "code": r.get("saestrata_benchmark", {}).get("code"),
            "train_code": _train_code(bench, name),
            "diagnostics": r["eval_result_unstructured"].get("diagnostics") or {},
            "file": f"core/{name}.json"}


def _train_code(bench, name: str) -> str | None:
    """Code fingerprint that trained SAE ``name`` (its ``saes/<name>/job.json``; None for SAEs trained before
    job files recorded it)."""
    path = bench.cfg.out / "saes" / name / "job.json"
    return _code_of(path) if path.exists() else None


LOOSE_RETAIN = 0.95  # the looser retain bar of unlearning_score_retain95 (SAEBench's own bar: 0.99)


def _unlearning(bench, name: str | None, retain: float | None = None) -> float | None:
    """SAEBench's ``unlearning_score`` of SAE ``name`` (None if not run); with ``retain``, the same rule
    (1 - forget accuracy of the best selected-latent setting) with a looser retain-accuracy bar.

    SAEBench keeps only settings with retain accuracy >= 0.99: with 579 known retain questions (850
    asked) a setting may lose 5, one wrong answer more fails it, so most SAEs here score 0.0 while their
    clamps do lower forget accuracy. ``retain=0.95`` (reported as its own column, not under SAEBench's key) shows that.
    """
    if not name:
        return None
    path = bench.cfg.out / "unlearning" / f"{name}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if retain is None:
        return data["eval_result_metrics"]["unlearning"]["unlearning_score"]
    ok = [1.0 - d["forget_accuracy"] for d in data["eval_result_details"]
          if d["kind"] == "selected" and d["retain_accuracy"] >= retain]
    return max(ok, default=0.0)


def _unlearning_known(bench, name: str | None) -> str:
    """``"known/asked"`` retain questions of SAE ``name``'s unlearning result (``"-"`` if none): how many wrong
    answers SAEBench's 0.99 retain bar tolerates (one in 133 known of 200 asked; ~5 in ~560 known of all 850)."""
    path = bench.cfg.out / "unlearning" / f"{name}.json" if name else None
    if path is None or not path.exists():
        return "-"
    m = json.loads(path.read_text())["eval_result_metrics"]["unlearning"]
    return f"{m['retain_known']}/{m['retain_questions']}"


MATCHED_METRICS = METRICS_AT_L0 + ("dead_frac",)  # interpolated in log L0 like every metric at matched L0


def _matched(bench, variant: str, l0: float, seed: int = 0, metrics: tuple[str, ...] = MATCHED_METRICS) -> dict | None:
    """``variant`` interpolated at ``l0`` from its matched-stage results (seed 0 = the main runs);
    ``metrics``: the :func:`_core_row` keys to interpolate (default: the matched table's, dead fraction
    included). ``train_tokens_per_s`` is the variant's throughput from stage ``speed`` (``speed.json``: its two SAEs'
    rates interpolated like the other columns; at ``l0`` 32 only, the pair the stage times; None before it ran or
    when one of the two was not timed; not the SAEs' own step clocks, which shared the machine); ``train_codes`` the
    fingerprints that trained them (two when the pair mixes code versions)."""
    suffix = f"-seed{seed}" if seed else ""
    rows = [r for r in (_core_row(bench, f"{variant}-l0={t:g}{suffix}", variant) for t in bench.cfg.targets) if r]
    if l0 == SPEED_AT:  # stage speed (one run, not the SAEs' step clocks) timed the two SAEs bracketing L0 32 only
        rate = _speed_rate(bench)
        for r in rows:
            r["speed_tokens_per_s"] = rate(r)
        metrics = metrics + ("speed_tokens_per_s",)
    hit = matched_l0_rows(rows, l0, metrics)
    if not hit:
        return None
    row = hit[0]
    used = [r for r in rows if r["sae"] in row["between"]]
    row["train_tokens_per_s"] = row.pop("speed_tokens_per_s", None)
    row["files"] = ", ".join(r["file"] for r in used)
    row["train_codes"] = sorted({r["train_code"] or "?" for r in used})
    return row


def _speed_rate(bench):
    """``fn(core row) -> tokens/s`` of that SAE in stage speed's ``speed.json`` (read once here), or None."""
    speed = read_speed(bench.cfg.out)
    return lambda row: (sae_speed(speed, row["sae"]) or {}).get("tokens_per_s")


def _from_cell(row: dict) -> str:
    """The matched table's "from" cell: the two SAEs, and the training code of each when they differ."""
    codes = row.get("train_codes") or []
    return row["between"] + (f"; trained by different code: {' / '.join(c[:4] for c in codes)} (provenance.md)"
                             if len(codes) > 1 else "")


def swept_lr(bench, variant: str) -> str:
    """The lr ``variant``'s matched SAEs were trained with, as a multiple of the default (``"x4"``), read from
    their ``saes/<name>/job.json``; ``" (edge)"`` when it is at an edge of the variant's own finished sweep
    (the sweep stopped at its limit with the best rate still there). Before any matched SAE is recorded,
    the sweep's choice; ``"-"`` before the sweep finished. Several rates (SAEs trained before per-variant
    sweeps, with another variant's choice) are all listed.
    """
    from .train.trainer import default_lr

    base = default_lr(bench.cfg.d_sae)
    _, best = bench.lr_jobs(variant)
    used = sorted({json.loads(p.read_text())["lr"] for t in bench.cfg.targets
                   if (p := bench.cfg.out / "saes" / f"{variant}-l0={t:g}" / "job.json").exists()})
    if not used:
        if best is None:
            return "-"
        used = [best["best"]["lr"]]
    grid = [r["lr"] for r in best["runs"]] if best else []
    edge = bool(grid) and any(math.isclose(lr, g) for lr in used for g in (min(grid), max(grid)))
    return "/".join(f"x{lr / base:.3g}" for lr in used) + (" (edge)" if edge else "")


def _nearest_reached(bench, variant: str, l0: float) -> str | None:
    """``"L0 56.9, <sae>"``: the evaluated matched SAE of ``variant`` nearest ``l0`` and its eval L0, for a
    row its trained points do not bracket (issue 10: "or the nearest each arch can reach, said so"); None
    when none is evaluated."""
    name = bench.nearest_to(variant, l0)
    if name is None:
        return None
    return f"L0 {bench.core(name)['eval_result_metrics']['sparsity']['l0']:.1f}, {name}"


def matched_table(bench) -> tuple[str, list[dict]]:
    """Markdown table: every variant at L0 32 and 64 (ablations at 32 only; as-published-only presets get one row
    pointing to ``published.md``), plus its unlearning score (SAE nearest L0 32) and swept lr."""
    from .benchmark import ABLATIONS, PUBLISHED_ONLY

    rows = []
    for v in bench.reported_variants:
        if v in PUBLISHED_ONLY:  # never trained at a target L0: no pending row that would never fill
            rows.append({"variant": v, "l0": None, "only_published": True})
            continue
        lr = swept_lr(bench, v)
        unl_sae = bench.nearest_to(v, 32.0)
        for l0 in MATCHED_AT:
            if v in ABLATIONS and l0 != 32.0:  # ablations are trained only at the targets bracketing 32
                continue
            m = _matched(bench, v, l0)
            rows.append({"variant": v, "l0": l0, **({k: m[k] for k in ("explained_variance", "ce_loss_score",
                                                                           "kl_div_score", "dead_frac",
                                                                           "train_tokens_per_s", "between", "files",
                                                                           "train_codes")}
                                                    if m else {}),
                         "lr": lr, "unlearning_score": _unlearning(bench, unl_sae) if l0 == 32.0 else None,
                         "unlearning_score_retain95": _unlearning(bench, unl_sae, LOOSE_RETAIN) if l0 == 32.0 else None,
                         "unlearning_retain_known": _unlearning_known(bench, unl_sae) if l0 == 32.0 else "",
                         "unlearning_sae": unl_sae if l0 == 32.0 else None, "evaluated": unl_sae is not None,
                         "nearest": None if m else _nearest_reached(bench, v, l0)})
    lines = ["| variant | L0 | EV | CE loss score | KL score | dead frac | unlearning (SAE nearest L0 32) | "
             "unlearning at retain >= 0.95 | retain questions known/asked | lr (x default, own sweep) | train tok/s | "
             "from |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("only_published"):
            lines.append(f"| {r['variant']} | - | as published only (`published.md`): it differs from its base preset "
                         "only in the sparsity weight, which the L0 target replaces | | | | | | | | | |")
            continue
        if "ce_loss_score" not in r:
            # A variant with no evaluated matched SAE is pending, not failing to reach a target.
            why = (f"not bracketed by its trained points (nearest: {r['nearest']})" if r["evaluated"]
                   else "not evaluated yet")
            lines.append(f"| {r['variant']} | {r['l0']:g} | {why} | | | | | | | {r['lr']} | | |")
            continue
        lines.append(f"| {r['variant']} | {r['l0']:g} | {_num(r['explained_variance'])} | {_num(r['ce_loss_score'])} | "
                     f"{_num(r['kl_div_score'])} | {_num(r['dead_frac'])} | {_num(r['unlearning_score'])} | "
                     f"{_num(r['unlearning_score_retain95'])} | {r['unlearning_retain_known']} | {r['lr']} | "
                     f"{_num(r['train_tokens_per_s'], ',.0f')} | {_from_cell(r)} |")
    lines += ["", COLUMNS_NOTE, "", UNLEARNING_CAVEAT]
    return "\n".join(lines), rows


COLUMNS_NOTE = ("Columns: EV, CE loss score, KL score and dead frac are interpolated linearly in log L0 at the row's L0 "
                "between the two SAEs in \"from\" (never extrapolated); train tok/s is the variant's training throughput from "
                "the benchmark's speed stage (speed.json: every variant timed in one run on an otherwise idle "
                "machine, each of the two SAEs in \"from\" trained again with its own settings, steps 150-199 of its run "
                "(after the sparsity warm-up), the median of 3 rounds, today's code; the two rates interpolated in log L0 "
                "like the other columns, since a step's cost grows with L0 (a ReLU SAE's pairs step, TopK's k); in the "
                "L0 32 rows only; \"-\" before that stage ran; the timed steps' own L0 is speed.json's l0_timed), not "
                "its SAEs' own step clocks, which ran beside other jobs; "
                "the unlearning columns are the SAE nearest L0 32 in log L0 (one unlearning run per variant).")


# Under every matched table: the 0.99 column is SAEBench's rule but, at this benchmark's size, not a ranking.
UNLEARNING_CAVEAT = ("Unlearning: SAEBench's rule keeps only settings whose retain accuracy stays >= 0.99, so a setting "
                     "may lose at most 1% of the retain questions the model knows (the known/asked column: 5 of 579 "
                     "for Gemma 3 270M on the embedded split) and a handful of answers decides the column; in this "
                     "project's benchmark, retraining alone moved batchtopk from 0.321 to 0.000 and matryoshka from "
                     "0.296 to 0.000 (200 asked; README). Compare variants on the retain >= 0.95 column.")


def seed_spread(bench) -> tuple[str, list[dict]]:
    """Markdown: matched-L0-32 metrics per init seed for topk and the best seed variant, mean and spread."""
    rows, lines = [], ["| variant | seeds | EV at L0 32 (mean ± sd) | CE loss score (mean ± sd) | KL score (mean ± sd) | per seed CE |",
                       "|---|---|---|---|---|---|"]
    for v in ("topk", bench.best_seed_variant()):
        if not v:
            continue
        seeds = [(s, m) for s in range(bench.cfg.seeds) if (m := _matched(bench, v, 32.0, s))]
        per = [m for _, m in seeds]
        if not per:
            continue

        def ms(key):
            """``(mean, sample sd)`` of metric ``key`` over the seeds that have it; ``(None, None)`` if none."""
            vals = [p[key] for p in per if p[key] is not None]
            return (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0) if vals else (None, None)

        row = {"variant": v, "n": len(per), **{k: ms(k) for k in ("explained_variance", "ce_loss_score", "kl_div_score")},
               "per_seed_ce": [p["ce_loss_score"] for p in per]}
        rows.append(row)
        fmt = lambda t: f"{_num(t[0])} ± {_num(t[1])}"  # noqa: E731
        mixed = [f"seed {s}" for s, p in seeds if len(p.get("train_codes") or []) > 1]
        row["mixed_code"] = mixed
        lines.append(f"| {v} | {len(per)} | {fmt(row['explained_variance'])} | {fmt(row['ce_loss_score'])} | "
                     f"{fmt(row['kl_div_score'])} | {', '.join(_num(c) for c in row['per_seed_ce'])}"
                     f"{' (' + ', '.join(mixed) + ': its two SAEs trained by different code, provenance.md)' if mixed else ''} |")
    return "\n".join(lines), rows


PROBE_KS = (1, 2, 5, 10, 20, 50)  # the k columns of probing.md (sparse_probing.K_VALUES)


def _interpolate(lo: dict, hi: dict, w: float) -> dict:
    """``lo + w * (hi - lo)`` for every numeric key of both dicts (nested dicts recursively); other keys dropped."""
    out = {}
    for k, a in lo.items():
        b = hi.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out[k] = _interpolate(a, b, w)
        elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            out[k] = a if a == b else a + w * (b - a)
    return out


# Archs whose ``latent_groups()`` are learned in training, so group ``i`` of two SAEs names unrelated latents:
# seed 001's attention hierarchies and (with ``adaptive``) its k-means regrouping, seed 002's k-means clusters.
# Listed here, not asked of the arch classes, because the report also reads results of older code versions.
LEARNED_GROUP_ARCHS = {"seed001_dynamic_hier", "seed001_contrastive_hier", "importance_tracking"}


def _groups_learned(bench, name: str) -> bool:
    """True when SAE ``name``'s latent groups are learned (:data:`LEARNED_GROUP_ARCHS`, or seed 001's
    ``seed001_grouped_ortho`` with ``adaptive``), from its ``saes/<name>/cfg.json``; False without one."""
    path = bench.cfg.out / "saes" / name / "cfg.json"
    if not path.exists():
        return False
    cfg = json.loads(path.read_text())["saestrata"]
    if cfg.get("arch") == "seed001_grouped_ortho":
        return bool((cfg.get("hparams") or {}).get("adaptive"))
    return cfg.get("arch") in LEARNED_GROUP_ARCHS


def _same_groups(a: dict, b: dict) -> bool:
    """Whether two probed SAEs' latent groups are the same slots: neither grouping learned, same names and
    latent counts.

    Fixed groupings (levels, tiers, index blocks, Matryoshka prefixes) pass and are interpolated like the
    whole-SAE numbers; learned ones (:func:`_groups_learned`) do not, even where balanced clustering gives both
    SAEs equal group sizes (seed001_adaptive_ortho32/64 did until 2026-12-05): their group ``i`` in two SAEs
    are unrelated sets of latents. ``a`` and ``b`` are :func:`_probe_point` results.
    """
    ga, gb = a["groups"], b["groups"]
    return (not a["groups_learned"] and not b["groups_learned"] and ga.keys() == gb.keys()
            and all(ga[g].get("n_latents") == gb[g].get("n_latents") for g in ga))


def _nearest_point(pts: list[dict], l0: float) -> dict:
    """The probed point whose L0 is nearest ``l0`` in log space (unknown L0 counts as far)."""
    return min(pts, key=lambda p: abs(math.log(max(p["l0"] or 1e-9, 1e-9) / l0)))


def _point_files(p: dict) -> list[str]:
    """A probed point's probing JSON and, when it has one, its core JSON (the source of its L0)."""
    return [p["file"]] + ([p["l0_file"]] if p["l0_file"] else [])


def _probe_point(bench, name: str) -> dict | None:
    """One probed SAE: its L0 (``core/<name>.json``), ``sae`` / ``llm`` metrics, per-group metrics, code."""
    path = bench.probing_path(name)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    core = bench.core(name)
    return {"sae": name, "l0": core["eval_result_metrics"]["sparsity"]["l0"] if core else None,
            "metrics": data["eval_result_metrics"]["sae"], "llm": data["eval_result_metrics"]["llm"],
            "groups": {g: {k: x for k, x in m.items() if k not in ("per_class", "selected")}
                       for g, m in data["eval_result_unstructured"].get("latent_groups", {}).items()},
            "code": data.get("saestrata_benchmark", {}).get("code"), "groups_learned": _groups_learned(bench, name),
            "file": f"probing/{name}.json", "l0_file": f"core/{name}.json" if core else None}


def probing_table(bench, l0: float = 32.0) -> tuple[str, list[dict]]:
    """Markdown: SAEBench sparse probing of every variant at L0 ``l0`` (the benchmark's ``probe`` stage).

    One row per variant (ablations and as-published-only presets excluded, as in the stage), from
    its matched SAEs bracketing ``l0`` (:meth:`~saestrata.benchmark.Benchmark.bracketing`): with both
    probed, each accuracy is interpolated linearly in log L0 at ``l0``, as
    :func:`~saestrata.evaluate.report.matched_l0_rows` does the core metrics (top-k probing
    accuracy grows with L0, so a variant probed at L0 25 must not sit beside one probed at 41);
    with one, that SAE's own numbers at its L0 (said so in the row). Columns: the mean over topics of
    ``sae_top_{k}_test_accuracy`` for k in :data:`PROBE_KS` and ``sae_test_accuracy`` (all
    latents) from ``probing/<sae>.json``; "not probed yet" without one. Then the raw residual
    (``llm_top_{k}_test_accuracy`` / ``llm_test_accuracy``, one row per distinct set of values,
    naming the JSONs it is in), and a second table with each structured SAE's ``latent_groups``
    top-1 / top-5 accuracies, interpolated the same way where both SAEs have the same groups
    (:func:`_same_groups`), else the nearest SAE's own groups (learned groupings; said so in the row).

    Returns:
        ``(markdown, rows)``; each row ``{"variant", "sae" (the SAE names, " + "-joined), "probed": True,
        "interpolated", "l0" (``l0`` if interpolated, else the SAE's), "metrics" (``eval_result_metrics["sae"]``),
        "llm" (``["llm"]``), "groups" ({group: accuracies, n_latents}), "code" (", "-joined), "files",
        "points" (each SAE's own numbers), and with learned groups "group_sae" / "group_files"}``;
        ``"probed": False`` rows carry only variant and SAE (None if unevaluated).
    """
    from .benchmark import ABLATIONS, PUBLISHED_ONLY

    rows = []
    for v in bench.reported_variants:
        if v in ABLATIONS | PUBLISHED_ONLY:
            continue
        names = bench.bracketing(v, l0)
        pts = [p for p in (_probe_point(bench, n) for n in names) if p]
        if not pts:
            rows.append({"variant": v, "sae": " + ".join(names) or None, "probed": False})
            continue
        row = {"variant": v, "probed": True, "points": pts, "llm": pts[0]["llm"],
               "code": ", ".join(sorted({p["code"] or "?" for p in pts})),
               "files": [p["file"] for p in pts] + [p["l0_file"] for p in pts if p["l0_file"]]}
        lo, hi = pts[0], pts[-1]
        if len(pts) == 2 and lo["l0"] and hi["l0"] and lo["l0"] < hi["l0"]:
            w = log_l0_weight(lo["l0"], hi["l0"], l0)
            row.update(sae=f"{lo['sae']} (L0 {lo['l0']:.1f}) + {hi['sae']} (L0 {hi['l0']:.1f})", interpolated=True,
                       l0=l0, metrics=_interpolate(lo["metrics"], hi["metrics"], w))
            if _same_groups(lo, hi):
                row.update(groups=_interpolate(lo["groups"], hi["groups"], w))
            else:  # learned groupings: group i of one SAE is not group i of the other, so no interpolation
                one = _nearest_point(pts, l0)
                row.update(groups=one["groups"], group_sae=f"{one['sae']} (L0 {one['l0']:.1f}; its own groups: the "
                           "bracketing SAEs' groups differ)", group_files=_point_files(one))
        else:
            one = _nearest_point(pts, l0)
            note = "" if len(names) == 1 else " (other bracketing SAE not probed yet)"
            row.update(sae=f"{one['sae']}{note}", interpolated=False, l0=one["l0"], metrics=one["metrics"],
                       groups=one["groups"], files=_point_files(one))
        rows.append(row)

    def cells(metrics: dict, prefix: str) -> str:
        """``prefix``'s top-k accuracies at :data:`PROBE_KS` and its all-features accuracy, 3 decimals."""
        keys = [f"{prefix}_top_{k}_test_accuracy" for k in PROBE_KS] + [f"{prefix}_test_accuracy"]
        return " | ".join(_num(metrics.get(k)) for k in keys)

    ks = " | ".join(f"k={k}" for k in PROBE_KS)
    lines = [f"| variant | SAE(s) (bracketing L0 {l0:g}) | L0 | {ks} | all | from |",
             "|---|---|---|" + "---|" * (len(PROBE_KS) + 2)]
    blank = " | ".join([""] * (len(PROBE_KS) + 1))
    for r in rows:
        if not r["probed"]:
            lines.append(f"| {r['variant']} | {r['sae'] or '-'} | not probed yet | {blank} | |")
            continue
        at = f"{l0:g} (interpolated)" if r["interpolated"] else _num(r["l0"], ".1f")
        lines.append(f"| {r['variant']} | {r['sae']} | {at} | {cells(r['metrics'], 'sae')} | {', '.join(r['files'])} |")
    residual: dict[tuple, list[str]] = {}
    for r in rows:
        for p in r.get("points", []):
            residual.setdefault(tuple(sorted(p["llm"].items())), []).append(p["file"])
    for key, files in residual.items():
        where = ", ".join(files) if len(files) <= 2 else f"the same in {len(files)} JSONs ({files[0]}, ...)"
        lines.append(f"| raw residual (d_in channels) | - | - | {cells(dict(key), 'llm')} | {where} |")
    glines = ["| variant / latent group | SAE | latents | top-1 | top-5 | from |", "|---|---|---|---|---|---|"]
    for r in rows:
        for g, m in (r.get("groups") or {}).items():
            glines.append(f"| {r['variant']} / {g} | {r.get('group_sae', r['sae'])} | {m.get('n_latents', '-')} | "
                          f"{_num(m.get('sae_top_1_test_accuracy'))} | {_num(m.get('sae_top_5_test_accuracy'))} | "
                          f"{', '.join(r.get('group_files', r['files']))} |")
    md = "\n".join(lines)
    if len(glines) > 2:
        md += "\n\n### Per latent group (structured SAEs: top-k restricted to the group)\n\n" + "\n".join(glines)
    return md, rows


def published_table(bench) -> tuple[str, list[dict]]:
    """Markdown: each variant at its paper's own settings (its preset's sparsity weights and optimiser)."""
    rows = [r for r in (_core_row(bench, j.name, j.arch) for j in bench.published_jobs(bench.reported_variants)) if r]
    lines = ["| SAE | L0 | EV | CE loss score | KL score | dead frac | unlearning | failed | from |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        r["unlearning_score"] = _unlearning(bench, r["sae"])
        lines.append(f"| {r['sae']} | {_num(r['l0'], '.1f')} | {_num(r['explained_variance'])} | "
                     f"{_num(r['ce_loss_score'])} | {_num(r['kl_div_score'])} | {_num(r['dead_frac'])} | "
                     f"{_num(r['unlearning_score'])} | {r['failed'] or ''} | {r['file']} |")
    return "\n".join(lines), rows


# --------------------------------------------------------------------------- seed claims
def _pub(bench, variant: str) -> dict | None:
    return _core_row(bench, f"{variant}-published", variant)


def _near(bench, variant: str) -> dict | None:
    name = bench.nearest_to(variant, 32.0)
    return _core_row(bench, name, variant) if name else None


def _at32(bench, variant: str, fn) -> float | None:
    """``fn(core row)`` of ``variant`` at L0 32, interpolated in log L0 between its two matched SAEs that
    bracket 32 (:func:`~saestrata.evaluate.report.matched_l0_rows`, the matched table's rule); None when
    they do not bracket 32 or a value is missing. ``fn`` returns a number or None."""
    rows = [r for r in (_core_row(bench, f"{variant}-l0={t:g}", variant) for t in bench.cfg.targets) if r]
    for r in rows:
        r["_value"] = fn(r)
    hit = matched_l0_rows(rows, 32.0, ("_value",))
    return hit[0]["_value"] if hit else None


def _sae_label(row: dict | None) -> str:
    """``"(<sae>, L0 24.9)"`` for a claims cell that gives one SAE's own value."""
    return f"({row['sae']}, L0 {row['l0']:.1f})" if row else ""


def _tokens_to_fvu(bench, name: str, fvu: float) -> int | None:
    """Training tokens until the logged (window-mean) FVU first reaches ``fvu``; None if never."""
    path = bench.cfg.out / "saes" / name / "train_log.jsonl"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("fvu", math.inf) <= fvu:
            return r["tokens"]
    return None


def _diag(row: dict | None, *keys):
    d = (row or {}).get("diagnostics") or {}
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _counter(row: dict | None, word: str):
    hits = {k: v for k, v in ((row or {}).get("counters") or {}).items() if word in k}
    return ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in hits.items()) or None


def _fmt_pair(a, b, fmt=".3f") -> str:
    return f"{_num(a, fmt)} vs {_num(b, fmt)}"


def claims(bench) -> list[dict]:
    """The seeds' checkable claims: paper's value, measured at the paper's settings, measured at matched L0."""
    d_sae = bench.cfg.d_sae
    out = []

    def add(claim, source, paper, published, matched, note=""):
        """Append one claims row (strings as shown in claims.md)."""
        out.append({"claim": claim, "source": source, "paper": paper, "published": published, "matched": matched,
                    "note": note})

    ce_of = lambda r: r.get("ce_loss_score")  # noqa: E731
    hsae_p, std_p = _pub(bench, "seed000_hsae"), _pub(bench, "standard")
    hsae_m, std_m = _near(bench, "seed000_hsae"), _near(bench, "standard")
    sparsity = lambda r: None if r is None else 1 - r["l0"] / d_sae  # noqa: E731
    add("activation sparsity (share of zero latents), HSAE vs standard SAE", "000, sec. 1 and 6", "60% vs 40%",
        _fmt_pair(sparsity(hsae_p), sparsity(std_p)),
        _fmt_pair(_at32(bench, "seed000_hsae", sparsity), _at32(bench, "standard", sparsity)),
        "at matched L0 both are ~1 - 32/d_sae by construction (interpolated in log L0)")
    t_h, t_s = _tokens_to_fvu(bench, "seed000_hsae-published", 0.5), _tokens_to_fvu(bench, "standard-published", 0.5)
    t_hm = _tokens_to_fvu(bench, hsae_m["sae"], 0.5) if hsae_m else None
    t_sm = _tokens_to_fvu(bench, std_m["sae"], 0.5) if std_m else None
    add("faster initial convergence: training tokens to train FVU 0.5, HSAE vs standard", "000, sec. 1",
        "40% faster", _fmt_pair(t_h, t_s, ",d"), f"{_fmt_pair(t_hm, t_sm, ',d')} {_sae_label(hsae_m)} {_sae_label(std_m)}",
        "matched: each variant's SAE nearest L0 32 (a training curve is not interpolated)")
    rate = _speed_rate(bench)
    a_t, s_t = _at32(bench, "seed000_adaptive", rate), _at32(bench, "standard", rate)
    overhead = f"; overhead {round(100 * (s_t / a_t - 1)):+d}%" if a_t and s_t else ""  # "+0%", never "-0%"
    add("adaptive feature selection: computational overhead (train tok/s), adaptive vs standard", "000, sec. 6",
        "+35% overhead", "-", _fmt_pair(a_t, s_t, ",.0f") + overhead,
        "speed stage (speed.json: each variant's two SAEs bracketing L0 32 timed with their own settings, median of "
        "3 rounds, interpolated at L0 32 in log L0 as the matched table; each SAE's spread between rounds is in "
        "speed.json); seed000_adaptive is a ReLU SAE with learnable importance masks (sec. 5), so standard is "
        "it without them, and both train on the same step (train/relu_pairs.py's pairs step, from the "
        "twenty-seventh session; before it both dense), whose cost grows with L0, hence matched L0; "
        "the paper does not say what its 35% is relative to")
    for base, ablation, what in (("seed000_hsae", "seed000_hsae_no_separation", "without the feature separation loss"),
                                 ("seed000_temporal", "seed000_temporal_single_scale", "single-scale temporal")):
        add(f"ablation {what}: sparsity kept, no unlearning gain (CE loss score at L0 32, base vs ablation)",
            "000, sec. 6", "kept; no gain", "-",
            _fmt_pair(_at32(bench, base, ce_of), _at32(bench, ablation, ce_of)),
            "at matched L0 the sparsity is equal by construction; ablations get no unlearning run (the base "
            "variants score 0.000), so the CE loss score shows what the removed part buys")
    for seed, variants in (("000", ("seed000_hsae", "seed000_hsae_no_separation", "seed000_temporal",
                                    "seed000_temporal_single_scale", "seed000_adaptive")),
                           ("001", tuple(v for v in bench.reported_variants if v.startswith("seed001"))),
                           ("002", tuple(v for v in bench.reported_variants if v.startswith("seed002")))):
        pub = [(v, _unlearning(bench, f"{v}-published")) for v in variants]
        near = {v: bench.nearest_to(v, 32.0) for v in variants}
        mat = [(v, _unlearning(bench, near[v])) for v in variants]
        fmt = lambda pairs, sae=None: ", ".join(  # noqa: E731
            f"{v.split('_', 1)[-1]} {_num(s)}" + (f" ({sae[v].rsplit('-', 1)[-1]})" if sae else "")
            for v, s in pairs if s is not None) or "-"
        add("unlearning score on the (embedded wiki) unlearning benchmark", f"{seed}, abstract", "0.0 for every variant",
            fmt(pub), fmt(mat, near), "embedded wiki benchmark, not WMDP-bio (DESIGN.md); matched: each variant's SAE "
            "nearest L0 32, named by its target (the matched table's unlearning column)")
    diag = lambda *keys: lambda r: _diag(r, *keys)  # noqa: E731
    dyn_p, dyn_m = _pub(bench, "seed001_dynamic_hier"), _near(bench, "seed001_dynamic_hier")
    lat = (dyn_m or {}).get("counters", {}).get("latent_entropy_fine")
    add("group assignment entropy of the dynamic hierarchy (nats)", "001, sec. 6", "2.3",
        _num(_diag(dyn_p, "group_entropy", "nats")), _num(_at32(bench, "seed001_dynamic_hier", diag("group_entropy", "nats"))),
        "entropy of eval-token activity over the coarse groups (argmax of each latent's assignment); the paper does "
        "not define its 2.3 ('mean entropy')"
        + (f"; each latent's own fine assignment ends at {lat:.4f} nats of ln 64 = {math.log(64):.4f} (uniform: "
           f"train-log latent_entropy_fine, {_sae_label(dyn_m)}; docs/results/benchmark_findings.md)" if lat else ""))
    st_p, fx_p = _pub(bench, "seed001_static_hier"), _pub(bench, "seed001_fixed_ortho")
    corr = diag("inter_group_correlation", "mean_abs")
    add("inter-group correlation (mean |corr|), static 8x8 vs fixed orthogonality", "001, sec. 6",
        "15% lower", _fmt_pair(corr(st_p), corr(fx_p)),
        _fmt_pair(_at32(bench, "seed001_static_hier", corr), _at32(bench, "seed001_fixed_ortho", corr)))
    hier_p = _pub(bench, "seed002-hierarchical")
    add("average silhouette of the 32 latent clusters", "002, sec. 6", "0.72",
        _num(_diag(hier_p, "silhouette", "value")), _num(_at32(bench, "seed002-hierarchical", diag("silhouette", "value"))))
    pr_p, pr_m = _pub(bench, "seed002-pruning"), _near(bench, "seed002-pruning")
    c_p = _pub(bench, "seed002-contrastive")
    ce = lambda r: r.get("ce_loss_score")  # noqa: E731
    add("pruning: latents pruned; CE loss score pruning vs contrastive-only", "002, sec. 5-6",
        "no unlearning gain", f"{_counter(pr_p, 'prun') or '-'}; CE {_fmt_pair((pr_p or {}).get('ce_loss_score'), (c_p or {}).get('ce_loss_score'))}",
        f"{_counter(pr_m, 'prun') or '-'} {_sae_label(pr_m)}; CE "
        f"{_fmt_pair(_at32(bench, 'seed002-pruning', ce), _at32(bench, 'seed002-contrastive', ce))}",
        "matched: the counters of the pruning SAE nearest L0 32, CE of both at L0 32")
    t_p = _pub(bench, "seed003-tiered")
    t_rows = [r for r in (_core_row(bench, f"seed003-tiered-l0={t:g}", "seed003-tiered") for t in bench.cfg.targets) if r]
    add("tiered HSAE training: NaN losses, explained variance", "003, sec. 6", "NaN; EV -0.785",
        f"{'failed: ' + t_p['failed'] if t_p and t_p['failed'] else 'finite'}; EV {_num((t_p or {}).get('explained_variance'))}",
        f"{'failed' if any(r['failed'] for r in t_rows) else 'finite' if t_rows else '-'}; "
        f"EV {_num(_at32(bench, 'seed003-tiered', lambda r: r['explained_variance']))}",
        "matched: finite/failed over every matched SAE of the variant")
    _seed004_claims(bench, add)
    return out


# Seed 004's own baseline (sec. 5: "a standard sparse autoencoder with uniform L1 penalty lambda=0.04",
# identical architecture and training) is seed004-uniform, not the benchmark's `standard` SAE.
SEED004_K = (("seed004-uniform", 1), ("seed004-k3", 3), ("seed004-groups", 5), ("seed004-k7", 7))
SEED004_GAMMA = (("seed004-uniform", 1.0), ("seed004-gamma1.25", 1.25), ("seed004-groups", 1.5), ("seed004-gamma2", 2.0))


def _last_log_line(folder: Path) -> dict:
    """The last line of an SAE folder's ``train_log.jsonl`` ({} without a log)."""
    path = folder / "train_log.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else {}


def _final_loss(bench, name: str) -> float | None:
    """Last logged training loss of SAE ``name`` (train-log units), None if it has no log."""
    return _last_log_line(bench.cfg.out / "saes" / name).get("loss")


def _seed004_claims(bench, add) -> None:
    """Seed 004's claims (sec. 1, 6, 6.2) beside its own uniform-L1 baseline, at its settings and at L0 32.

    Matched values are interpolated at L0 32 in log L0 (:func:`_matched`); the K and gamma sweeps
    include K = 1 / gamma = 1 (seed004-uniform), which sec. 6.2 leaves out.
    """
    d_sae = bench.cfg.d_sae
    metrics = ("explained_variance", "ce_loss_score", "kl_div_score", "kl_div_with_sae")
    pub = {v: _pub(bench, v) for v, _ in SEED004_K + SEED004_GAMMA}
    mat = {v: _matched(bench, v, 32.0, metrics=metrics) for v in pub}
    u_p, g_p = pub["seed004-uniform"], pub["seed004-groups"]
    fmt_d = lambda a, b: _fmt_pair(a, b, "d" if a is not None and b is not None else "")  # noqa: E731
    alive = lambda r: r.get("alive")  # noqa: E731
    at = lambda v: None if (x := _at32(bench, v, alive)) is None else round(x)  # noqa: E731
    add("alive latents, uniform L1 (lambda 0.04) -> group sparsity", "004, sec. 1 and 6, Table 1", "85 -> 1,247",
        fmt_d((u_p or {}).get("alive"), (g_p or {}).get("alive")), fmt_d(at("seed004-uniform"), at("seed004-groups")),
        f"of {d_sae} latents; the paper's baseline is seed004-uniform (sec. 5); matched: interpolated at L0 32 "
        "and rounded")
    ev = lambda r: (r or {}).get("explained_variance")  # noqa: E731
    add("explained variance, uniform L1 (lambda 0.04) -> group sparsity", "004, sec. 6, Table 1", "0.31 -> 0.926",
        _fmt_pair(ev(u_p), ev(g_p)), _fmt_pair(ev(mat["seed004-uniform"]), ev(mat["seed004-groups"])))

    def sweep(pairs, key, label, fmt=".3f"):
        """``label=value`` of ``key`` per sweep point, at the paper's settings and interpolated at L0 32."""
        cell = lambda rows: ", ".join(f"{label}{x:g} {_num((rows[v] or {}).get(key), fmt)}" for v, x in pairs)  # noqa: E731
        return cell(pub), cell(mat)

    add("group count K: K = 5 optimal (CE loss score per K)", "004, sec. 6.2", "K = 5 best of 3 / 5 / 7",
        *sweep(SEED004_K, "ce_loss_score", "K="), "K=1 is the uniform baseline; at the paper's lambda L0 differs per K")
    add("progression factor gamma: KL div 0.31 / 0.047 / 0.99 at gamma 1.25 / 1.5 / 2.0", "004, sec. 6.2",
        "gamma 1.5 best", *sweep(SEED004_GAMMA, "kl_div_with_sae", "gamma="),
        "KL(clean || spliced) per token (SAEBench's kl_div_with_sae); gamma=1 is the uniform baseline")
    l_g, l_06 = _final_loss(bench, "seed004-groups-published"), _final_loss(bench, "seed004-lambda0.06-published")
    ratio = f"{l_06 / l_g - 1:+.0%} ({_fmt_pair(l_06, l_g)})" if l_g and l_06 else "-"
    add("base penalty lambda 0.06 vs 0.04: training loss", "004, sec. 6.2", "+23%", ratio, "-",
        "last logged training loss (MSE + penalty); matched L0 replaces lambda, so no matched point")


def _final_counters(folder: Path) -> dict:
    """Counters of an SAE's last train-log line (training units), over its ``cfg.json`` ``final_counters``.

    Trainers before 2026-12-02 read ``final_counters`` after folding the input scale into the
    weights, so weight-norm counters (seed 000's ``enc_norm_level1``, ``skip_norm``) were in raw-activation
    units there; every log line is in training units.
    """
    cfg = json.loads((folder / "cfg.json").read_text())["saestrata"]
    return {**(cfg.get("final_counters") or {}), **_last_log_line(folder).get("counters", {})}


def auxk_unexplained(folder: Path, counters: dict) -> dict:
    """``{"auxk_unexplained": r}`` for an SAE with AuxK and dead latents, else ``{}``.

    ``r`` = the last train-log window's ``auxk`` term over its coefficient ``aux_coeff`` (``cfg.json``), i.e.
    ``||e_hat - e||^2 / ||e||^2`` of AuxK's reconstruction of the residual (Gao et al. 2024, app. A.2): 1 means
    AuxK reconstructs none of it (inert although ``auxk_dead`` > 0; docs/results/benchmark_findings.md), and
    its gradient then revives no latent.
    """
    hparams = json.loads((folder / "cfg.json").read_text())["saestrata"].get("hparams", {})
    last = _last_log_line(folder)
    if not counters.get("auxk_dead") or not hparams.get("aux_coeff") or "auxk" not in last:
        return {}
    return {"auxk_unexplained": last["auxk"] / hparams["aux_coeff"]}


def mechanisms_table(bench) -> tuple[str, list[dict]]:
    """Markdown: every variant's mechanism counters (``SAE.counters``, final train-log values) at its SAE nearest L0 32.

    The evidence that each mechanism a paper describes acted in the benchmark (issue 10): e.g. seed 002's
    ``latents_pruned`` / ``unlearn_kl_steps``, seed 000's per-level dead fractions, AuxK's ``auxk_dead`` with
    :func:`auxk_unexplained`, the L0 controller's multiplier. Counter names and meanings: each arch module's ``counters`` docstring.
    """
    rows = []
    for v in bench.reported_variants:
        name = bench.nearest_to(v, 32.0)
        path = bench.cfg.out / "saes" / (name or "") / "cfg.json"
        if not name or not path.exists():
            continue
        counters = _final_counters(path.parent)
        rows.append({"variant": v, "sae": name, "counters": {**counters, **auxk_unexplained(path.parent, counters)},
                     "file": f"saes/{name}/train_log.jsonl"})
    fmt = lambda c: "; ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items()) or "(none)"  # noqa: E731
    lines = ["| variant | SAE (nearest L0 32) | final counters | from |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['sae']} | {fmt(r['counters'])} | {r['file']} |" for r in rows]
    return "\n".join(lines), rows


def claims_table(rows: list[dict]) -> str:
    """Markdown of :func:`claims`."""
    lines = ["| claim (seed file, section) | paper | measured at the paper's settings | measured at matched L0 32 "
             "(interpolated in log L0 as the matched table; a cell naming an SAE: that SAE's own value) | note |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['claim']} ({r['source']}) | {r['paper']} | {r['published']} | {r['matched']} | {r['note']} |"
              for r in rows]
    return "\n".join(lines)


def _mixed_code_warning(out: Path, codes: list[str]) -> str:
    """Markdown warning when results come from several code versions, naming the files that differ.

    Manifests come from ``out/code/<fingerprint>.json`` (``benchmark.code_manifest``); without all of
    them the warning cannot say where the versions differ and asks for a rerun.
    """
    if len(codes) < 2:
        return ""
    from .benchmark import code_diff

    paths = {c: out / "code" / f"{c}.json" for c in codes}
    manifests = {c: json.loads(p.read_text()) for c, p in paths.items() if p.exists()}
    head = f"\n\n**Warning: these results come from {len(codes)} code versions ({', '.join(codes)})"
    if len(manifests) < len(codes):
        return head + "; rerun the stale ones before citing.**"
    files = code_diff(manifests) or []
    return head + f", which differ only in {', '.join(f'`{f}`' for f in files)}: read each row with the code its JSON names.**"


def _code_of(path: Path) -> str:
    """The ``saestrata_benchmark.code`` fingerprint a result JSON (or ``code`` of a ``job.json``) records; "?" if none."""
    data = json.loads(path.read_text())
    return data.get("saestrata_benchmark", {}).get("code") or data.get("code") or "?"


# A benchmark job name: (variant part, setting part), e.g. ("lr-topk", "x2-start0.0341"), ("topk", "l0=24-seed1").
_JOB_NAME = re.compile(r"^(.+?)-(x[0-9.]+(?:-start.+)?|l0=[0-9.]+(?:-seed[0-9]+)?|published)$")


def provenance_table(bench) -> tuple[str, list[dict]]:
    """Markdown: for each code fingerprint, where it comes from and which SAEs it trained and evaluated.

    Training: each ``saes/<name>/job.json`` (lr-sweep runs included); results: ``core/``, ``unlearning/`` and
    ``probing/`` JSONs. The origin column reads ``code/commits.json`` (``{fingerprint: text}``, written by
    ``code/find_commits.py`` from the repository's history: the commit with that fingerprint, or the
    nearest commit and the files that differ from it); "?" where it has no entry.
    """
    out = bench.cfg.out
    origins_path = out / "code" / "commits.json"
    origins = json.loads(origins_path.read_text()) if origins_path.exists() else {}
    uses: dict[str, dict[str, list[str]]] = {}
    kinds = (("trained", sorted((out / "saes").glob("*/job.json")), lambda p: p.parent.name),
             ("core", sorted((out / "core").glob("*.json")), lambda p: p.stem),
             ("unlearning", sorted((out / "unlearning").glob("*.json")), lambda p: p.stem),
             ("probing", sorted((out / "probing").glob("*.json")), lambda p: p.stem))
    for kind, paths, name in kinds:
        for path in paths:
            uses.setdefault(_code_of(path), {}).setdefault(kind, []).append(name(path))

    def compact(names: list[str]) -> str:
        """``topk l0=24/l0=40, lr-topk x1/x2-start0.03``: names grouped by variant (benchmark job names)."""
        groups: dict[str, list[str]] = {}
        for n in names:
            m = _JOB_NAME.match(n)
            head, tail = (m.group(1), m.group(2)) if m else (n, "")
            groups.setdefault(head, []).append(tail)
        return ", ".join(f"{h} {'/'.join(t for t in ts if t)}".strip() for h, ts in groups.items())

    rows = [{"code": c, "origin": origins.get(c, "?"), **{k: u.get(k, []) for k, *_ in kinds}} for c, u in sorted(uses.items())]
    lines = ["| code | origin | trained (saes/*/job.json) | evaluated (core) | unlearning | probing |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['code']} | {r['origin']} | {compact(r['trained']) or '-'} | {compact(r['core']) or '-'} | "
              f"{compact(r['unlearning']) or '-'} | {compact(r['probing']) or '-'} |" for r in rows]
    return "\n".join(lines), rows


README_BLOCKS = ("matched", "probing")  # <!-- benchmark:NAME --> ... <!-- /benchmark:NAME --> in the README


def _first_table(md: str) -> str:
    """The first markdown table of ``md`` (its lines from the first ``|`` line to the next non-table line)."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def update_readme(path: Path, blocks: dict[str, str]) -> None:
    """Replace the text between ``<!-- benchmark:NAME -->`` and ``<!-- /benchmark:NAME -->`` in ``path`` by ``blocks[NAME]``.

    Everything outside the markers is kept byte for byte; the file is replaced atomically.

    Raises:
        ValueError: a marker pair is missing or out of order (one line naming it; the file is left as it was).
    """
    text = path.read_text()
    for name, body in blocks.items():
        begin, end = f"<!-- benchmark:{name} -->", f"<!-- /benchmark:{name} -->"
        i, j = text.find(begin), text.find(end)
        if i < 0 or j < i:
            raise ValueError(f"{path} has no '{begin}' ... '{end}' pair: put the markers (each on its own line) "
                             f"where the {name} table goes, or drop --readme")
        text = text[: i + len(begin)] + "\n" + body.strip("\n") + "\n" + text[j:]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _quick_banner(bench) -> str:
    """The line that heads every table of a ``--quick`` run (``cfg.quick``), so its numbers are never cited as
    the benchmark's."""
    c = bench.cfg
    return (f"**Short version (`saestrata benchmark --quick`): {c.tokens_per_sae:,} training tokens per SAE, "
            f"{c.eval_tokens:,} eval tokens, {len(bench.variants)} variants. Not the benchmark's numbers: do not "
            "cite them or set them beside it.**")


def write_benchmark_report(bench) -> Path:
    """Write every table and the report of a benchmark run into ``bench.cfg.out``; returns ``matched.md``.

    With ``bench.cfg.readme`` set, also the matched table, the init-seed spread, the claims table and the
    probing table (its first table) into that README (:func:`update_readme`; markers ``matched``,
    ``seeds``, ``claims``, ``probing``).

    Raises:
        ValueError: ``cfg.readme`` lacks a marker pair (the files in ``out`` are written first).
    """
    out = bench.cfg.out
    matched_md, matched_rows = matched_table(bench)
    spread_md, spread_rows = seed_spread(bench)
    pub_md, pub_rows = published_table(bench)
    claim_rows = claims(bench)
    claims_md = claims_table(claim_rows)
    mech_md, mech_rows = mechanisms_table(bench)
    prov_md, prov_rows = provenance_table(bench)
    probe_md, probe_rows = probing_table(bench)
    if bench.cfg.quick:
        b = _quick_banner(bench)
        matched_md, pub_md, claims_md, mech_md, probe_md = (
            f"{b}\n\n{md}" for md in (matched_md, pub_md, claims_md, mech_md, probe_md))
    probe_codes = sorted({p["code"] or "?" for r in probe_rows for p in r.get("points", [])})
    codes = sorted({json.loads(p.read_text()).get("saestrata_benchmark", {}).get("code", "?")
                    for p in (out / "core").glob("*.json")}) if (out / "core").exists() else []
    mixed = _mixed_code_warning(out, codes)
    (out / "matched.md").write_text(f"# Every variant at matched L0\n\nCode {', '.join(codes) or '-'}.{mixed}\n\n"
                                    f"{matched_md}\n\n## Init seeds\n\n{spread_md}\n")
    (out / "published.md").write_text(f"# At each paper's own settings\n\n{pub_md}\n")
    (out / "claims.md").write_text(f"# The seeds' claims, checked\n\n{claims_md}\n")
    (out / "mechanisms.md").write_text("# Mechanisms seen acting (final train-log counters)\n\n"
                                       f"Counter meanings: each arch module's `counters` docstring.\n\n{mech_md}\n")
    (out / "probing.md").write_text(
        "# Sparse probing (SAEBench `sparse_probing`) of each variant at L0 32\n\n"
        "Each accuracy is interpolated linearly in log L0 between the variant's two SAEs bracketing L0 32, as the "
        "matched core metrics are; a row naming one SAE gives that SAE's own numbers at its L0.\n\n"
        "Mean test accuracy over the one-vs-rest probes of the embedded corpus's 12 article topics (chance 0.5): "
        "a logistic regression on the top-k latents by |mean difference| on the train split, scored on the eval "
        "split; \"all\" = every latent (every residual channel for the raw residual). Protocol and deviations from "
        "SAEBench: docs/results/sparse_probing.md and each JSON's `eval_config`.\n\n"
        f"Code {', '.join(probe_codes) or '-'}.{_mixed_code_warning(out, probe_codes)}\n\n{probe_md}\n")
    (out / "provenance.md").write_text(
        "# Which code produced which result\n\nEach result JSON and each SAE's job.json record the fingerprint of the "
        "code that produced them (`benchmark.code_fingerprint`: the .py files of train/, evaluate/, store/, "
        "harvest/); `code/<fingerprint>.json` lists each version's file hashes.\n\n" + prov_md + "\n")
    (out / "summary.json").write_text(json.dumps({"codes": codes, "matched": matched_rows, "seeds": spread_rows,
                                                  "published": pub_rows, "claims": claim_rows,
                                                  "mechanisms": mech_rows, "probing": probe_rows,
                                                  "provenance": prov_rows},
                                                 indent=2, default=str))
    inputs = [p for p in (out / "core", out / "unlearning", out / "saes") if p.exists()]
    if inputs:
        write_report(inputs, out / "report", matched_l0=32.0)
    if bench.cfg.readme is not None:  # last: a README without markers must not cost the files above
        update_readme(Path(bench.cfg.readme), {"matched": matched_md, "seeds": spread_md,
                                               "claims": claims_md, "probing": _first_table(probe_md)})
    return out / "matched.md"
