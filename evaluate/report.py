"""``saestrata report``: one Markdown + HTML page and PNG plots from result JSONs and SAE folders.

Inputs are run directories, SAE folders or result files. Every number on the page is
copied from a file that the page names: core results (``eval_type_id == "core"``),
unlearning results (``"unlearning"``) and training logs (``train_log.jsonl`` beside an
SAE's ``cfg.json``). Plots (matplotlib, Agg backend):

- ``l0_vs_ce_loss_score.png`` and ``l0_vs_explained_variance.png``: one point per core
  result, coloured by architecture;
- ``training_curves.png``: ``fvu`` (or ``loss``) against tokens from each ``train_log.jsonl``;
- ``density_histograms.png``: ``log10_feature_density_histogram`` of each core result;
- ``unlearning.png``: forget vs retain accuracy of every setting of each unlearning result.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_text_atomic


class ReportError(ValueError):
    """Raised when the inputs hold no result or log to report on."""


@dataclass
class Inputs:
    """Result JSONs by eval type and training logs, each with the path it came from."""

    core: list[tuple[Path, dict]] = field(default_factory=list)
    unlearning: list[tuple[Path, dict]] = field(default_factory=list)
    train_logs: list[tuple[Path, list[dict]]] = field(default_factory=list)


def _read_json(path: Path) -> dict | None:
    """A result dict if ``path`` is a JSON object with ``eval_type_id``; None otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "eval_type_id" in data else None


def _read_log(path: Path) -> list[dict]:
    """Records of a ``train_log.jsonl`` (malformed lines skipped)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in out if isinstance(r, dict)]


def collect(paths: list[Path]) -> Inputs:
    """Find result JSONs and training logs in ``paths`` (files or directories, searched recursively).

    Raises:
        FileNotFoundError: a path does not exist.
        ReportError: nothing to report.
    """
    found = Inputs()
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        files += [p] if p.is_file() else sorted(p.rglob("*.json")) + sorted(p.rglob("train_log.jsonl"))
    for f in dict.fromkeys(files):
        if f.name == "train_log.jsonl":
            found.train_logs.append((f, _read_log(f)))
        elif (data := _read_json(f)) is not None and data["eval_type_id"] in ("core", "unlearning"):
            getattr(found, data["eval_type_id"]).append((f, data))
    if not (found.core or found.unlearning or found.train_logs):
        raise ReportError(f"no core/unlearning result JSON or train_log.jsonl under {', '.join(map(str, paths))}")
    return found


def _arch(result: dict) -> str:
    cfg = result.get("sae_cfg_dict") or {}
    return (cfg.get("saestrata") or {}).get("arch") or cfg.get("architecture") or "?"


def _label(path: Path) -> str:
    """Short name: the SAE folder name (a result inside an SAE folder) or the file stem."""
    return path.parent.name if path.stem in ("core_eval", "unlearning_eval", "train_log") else path.stem


def core_rows(inputs: Inputs) -> list[dict]:
    """One row per core result: label, arch, l0, ce_loss_score, explained_variance, kl_div_score, file."""
    rows = []
    for path, r in inputs.core:
        m = r.get("eval_result_metrics", {})
        rows.append({"sae": _label(path), "arch": _arch(r), "l0": m.get("sparsity", {}).get("l0"),
                     "ce_loss_score": m.get("model_performance_preservation", {}).get("ce_loss_score"),
                     "explained_variance": m.get("reconstruction_quality", {}).get("explained_variance"),
                     "kl_div_score": m.get("model_behavior_preservation", {}).get("kl_div_score"),
                     "file": str(path)})
    return rows


def _scoring_setting(details: list[dict]) -> dict:
    """The selected-latent setting that sets the score: lowest forget accuracy among those keeping retain.

    Falls back to the setting with the highest retain accuracy when none keeps it (score 0).
    """
    selected = [d for d in details if d.get("kind") == "selected"]
    if not selected:
        return {}
    ok = [d for d in selected if d.get("retain_ok")]
    if ok:
        return min(ok, key=lambda d: d.get("forget_accuracy", 1.0))
    return max(selected, key=lambda d: d.get("retain_accuracy", 0.0))


def unlearning_rows(inputs: Inputs) -> list[dict]:
    """One row per unlearning result: score, control, and forget/retain accuracy of the scoring setting."""
    rows = []
    for path, r in inputs.unlearning:
        m = r.get("eval_result_metrics", {}).get("unlearning", {})
        best = _scoring_setting(r.get("eval_result_details", []))
        rows.append({"sae": _label(path), "arch": _arch(r), "unlearning_score": m.get("unlearning_score"),
                     "random_latent_control_score": m.get("random_latent_control_score"),
                     "forget_acc": best.get("forget_accuracy"), "retain_acc": best.get("retain_accuracy"),
                     "forget_known": m.get("forget_known"), "retain_known": m.get("retain_known"), "file": str(path)})
    return rows


METRICS_AT_L0 = ("explained_variance", "ce_loss_score", "kl_div_score")


def log_l0_weight(lo: float, hi: float, l0: float) -> float:
    """Weight ``w`` of the point at L0 ``hi`` when interpolating at ``l0`` linearly in log L0 between measured
    L0s ``lo <= l0 <= hi`` (all > 0, active latents per token): value = a + w (b - a); 0.0 when ``lo == hi``."""
    span = math.log(hi) - math.log(lo)
    return 0.0 if span == 0 else (math.log(l0) - math.log(lo)) / span


def matched_l0_rows(rows: list[dict], l0: float, metrics: tuple[str, ...] = METRICS_AT_L0) -> list[dict]:
    """Each arch's metrics at a common ``l0``, interpolated linearly in log L0 (SAEBench-style comparison).

    For every arch, the two core results nearest to ``l0`` on either side (L0 below and
    above it, or equal) give ``metrics`` (default :data:`METRICS_AT_L0`) at ``l0``; an arch whose results do not
    bracket ``l0`` gets no row (no extrapolation). Results of one arch family (e.g. several
    presets of ``importance_tracking``) share one curve. Each row names the two results used.
    """
    out = []
    for arch in sorted({r["arch"] for r in rows}):
        pts = sorted((r for r in rows if r["arch"] == arch and isinstance(r["l0"], (int, float)) and r["l0"] > 0),
                     key=lambda r: r["l0"])
        below = [r for r in pts if r["l0"] <= l0]
        above = [r for r in pts if r["l0"] >= l0]
        if not below or not above:
            continue
        lo, hi = below[-1], above[0]
        w = log_l0_weight(lo["l0"], hi["l0"], l0)
        row = {"arch": arch, "l0": l0}
        for key in metrics:
            a, b = lo.get(key), hi.get(key)
            row[key] = a + w * (b - a) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        row["between"] = f"{lo['sae']} (L0 {lo['l0']:.1f}), {hi['sae']} (L0 {hi['l0']:.1f})"
        out.append(row)
    return out


# ----------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


LEGEND_INSIDE = 8  # series; a longer legend goes beside the axes ...
LEGEND_ROWS = 24  # ... in columns of this many entries


def _save(fig, ax, out: Path, drawn: int, xlabel: str, ylabel: str, **legend) -> Path | None:
    """Label, save and close ``fig``; None (nothing written) when no series was drawn.

    ``legend``: placement keywords for ``ax.legend``; without them a legend of more than :data:`LEGEND_INSIDE`
    series is placed beside the axes (the saved image grows to hold it), so the axes keep their size.
    """
    plt = _plt()
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    many = drawn > LEGEND_INSIDE and not legend  # inside, tight_layout squashed the axes to a strip
    if many:
        legend = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "ncol": math.ceil(drawn / LEGEND_ROWS)}
    ax.legend(fontsize=6 if many else 7, **legend)
    if not many:
        fig.tight_layout()
    fig.savefig(out, dpi=100, bbox_inches="tight" if legend else None)
    plt.close(fig)
    return out


def _scatter(rows: list[dict], y: str, out: Path) -> Path | None:
    """``l0`` vs ``y`` per arch; None when no row has both numbers."""
    pts = [r for r in rows if isinstance(r["l0"], (int, float)) and isinstance(r[y], (int, float))]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    markers = "osD^v<>Pp*Xh"  # colour x marker keeps up to 120 archs distinguishable
    for i, arch in enumerate(sorted({r["arch"] for r in pts})):
        sel = sorted((r for r in pts if r["arch"] == arch), key=lambda r: r["l0"])
        # Several results of one arch (a sweep) are joined into its L0 trade-off curve.
        ax.plot([r["l0"] for r in sel], [r[y] for r in sel], label=arch, color=f"C{i % 10}",
                marker=markers[(i // 10) % len(markers)], linestyle="-" if len(sel) > 1 else "none",
                linewidth=0.8)
    ax.set_xscale("log")
    return _save(fig, ax, out, len(pts), "L0 (active latents per token)", y,
                 loc="center left", bbox_to_anchor=(1.01, 0.5))


def _training_plot(logs: list[tuple[Path, list[dict]]], out: Path) -> Path | None:
    """``fvu`` (else ``loss``) against ``tokens`` for each log; None without usable logs."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    for path, recs in logs:
        key = "fvu" if any("fvu" in r for r in recs) else "loss"
        pts = [(r["tokens"], r[key]) for r in recs if "tokens" in r and isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), label=f"{_label(path)} ({key})")
            drawn += 1
    ax.set_yscale("log")
    return _save(fig, ax, out, drawn, "training tokens", "fvu / loss")


def _density_plot(core: list[tuple[Path, dict]], out: Path) -> Path | None:
    """Step plot of each ``log10_feature_density_histogram``; None if no result has one."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    for path, r in core:
        h = (r.get("eval_result_unstructured") or {}).get("log10_feature_density_histogram") or {}
        if h.get("counts") and len(h.get("edges", [])) == len(h["counts"]) + 1:
            ax.stairs(h["counts"], h["edges"], label=f"{_label(path)} (dead {h.get('n_dead', '?')})")
            drawn += 1
    return _save(fig, ax, out, drawn, "log10 firing frequency", "latents")


def _unlearning_plot(results: list[tuple[Path, dict]], out: Path) -> Path | None:
    """Forget vs retain accuracy per setting (o selected latents, x random control)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    for i, (path, r) in enumerate(results):
        for kind, marker in (("selected", "o"), ("random", "x")):
            pts = [(d["retain_accuracy"], d["forget_accuracy"]) for d in r.get("eval_result_details", [])
                   if d.get("kind", "selected") == kind and "retain_accuracy" in d]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=f"C{i}", label=f"{_label(path)} {kind}")
                drawn += 1
    ax.axvline(0.99, color="grey", ls="--", lw=1)
    return _save(fig, ax, out, drawn, "retain accuracy (known questions)", "forget accuracy (known questions)")


# ----------------------------------------------------------------------------- page
def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return "_none_\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _html_table(rows: list[dict]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r[k]))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table border=1 cellpadding=3><tr>{head}</tr>{body}</table>"


def write_report(paths: list[Path], out: Path, matched_l0: float | None = None) -> Path:
    """Write ``out/report.md``, ``out/report.html`` and the PNG plots; returns the Markdown path.

    ``matched_l0`` adds a section with every arch's metrics at that L0 (:func:`matched_l0_rows`).

    Raises:
        FileNotFoundError: an input path does not exist.
        ReportError: nothing to report.
    """
    inputs = collect(paths)
    out.mkdir(parents=True, exist_ok=True)
    core, unl = core_rows(inputs), unlearning_rows(inputs)
    plots = {
        "L0 vs CE-loss score": _scatter(core, "ce_loss_score", out / "l0_vs_ce_loss_score.png"),
        "L0 vs explained variance": _scatter(core, "explained_variance", out / "l0_vs_explained_variance.png"),
        "Training curves": _training_plot(inputs.train_logs, out / "training_curves.png"),
        "Latent density histograms": _density_plot(inputs.core, out / "density_histograms.png"),
        "Unlearning: forget vs retain accuracy per setting": _unlearning_plot(inputs.unlearning,
                                                                              out / "unlearning.png"),
    }
    logs = [{"sae": _label(p), "steps": len(r), "last_tokens": r[-1].get("tokens") if r else None,
             "last_fvu": r[-1].get("fvu") if r else None, "file": str(p)} for p, r in inputs.train_logs]
    sections = [("Core metrics", core), ("Unlearning", unl), ("Training logs", logs)]
    if matched_l0 is not None:
        sections.insert(1, (f"At matched L0 {matched_l0:g} (linear in log L0 between the two results "
                            "bracketing it; archs not bracketing it are left out)", matched_l0_rows(core, matched_l0)))
    md = ["# saestrata report\n", "Every number below is copied from the file named in its row.\n"]
    page = ["<html><head><meta charset='utf-8'><title>saestrata report</title></head><body>",
            "<h1>saestrata report</h1><p>Every number below is copied from the file named in its row.</p>"]
    for title, rows in sections:
        md += [f"## {title}\n", _md_table(rows)]
        page += [f"<h2>{html.escape(title)}</h2>", _html_table(rows)]
    md.append("## Plots\n")
    page.append("<h2>Plots</h2>")
    for title, png in plots.items():
        if png is not None:
            md.append(f"### {title}\n\n![{title}]({png.name})\n")
            page.append(f"<h3>{html.escape(title)}</h3><img src='{html.escape(png.name)}'>")
    page.append("</body></html>")
    write_text_atomic(out / "report.html", "\n".join(page))  # atomic: Ctrl-C keeps the previous page
    write_text_atomic(out / "report.md", "\n".join(md))
    return out / "report.md"
