"""Report (evaluate/report.py) from synthetic result JSONs and a training log."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from saestrata.cli import main
from saestrata.evaluate.report import ReportError, collect, write_report


def _core(arch: str, l0: float, ce: float, ev: float) -> dict:
    return {"eval_type_id": "core", "sae_cfg_dict": {"saestrata": {"arch": arch}},
            "eval_result_metrics": {"sparsity": {"l0": l0}, "model_performance_preservation": {"ce_loss_score": ce},
                                    "reconstruction_quality": {"explained_variance": ev},
                                    "model_behavior_preservation": {"kl_div_score": 0.5}},
            "eval_result_unstructured": {"log10_feature_density_histogram": {
                "counts": [1, 5, 2], "edges": [-3.0, -2.0, -1.0, 0.0], "n_dead": 4}}}


def _unlearning() -> dict:
    details = [{"kind": "selected", "forget_accuracy": 0.6, "retain_accuracy": 0.995},
               {"kind": "random", "forget_accuracy": 0.97, "retain_accuracy": 0.98}]
    return {"eval_type_id": "unlearning", "sae_cfg_dict": {"architecture": "topk"},
            "eval_result_metrics": {"unlearning": {"unlearning_score": 0.4, "random_latent_control_score": 0.0}},
            "eval_result_details": details}


@pytest.fixture
def run_dir(scratch):
    for name, arch, l0, ce, ev in [("topk", "topk", 32.0, 0.913, 0.876), ("standard", "standard", 61.5, 0.842, 0.801)]:
        folder = scratch / "run" / name
        folder.mkdir(parents=True)
        (folder / "core_eval.json").write_text(json.dumps(_core(arch, l0, ce, ev)))
        (folder / "cfg.json").write_text("{}")  # not a result: ignored
        (folder / "train_log.jsonl").write_text("\n".join(json.dumps({"step": s, "tokens": 1024 * (s + 1),
                                                                        "fvu": 1.0 / (s + 1)}) for s in range(5)))
    (scratch / "run" / "topk" / "unlearning_eval.json").write_text(json.dumps(_unlearning()))
    return scratch / "run"


def test_report_writes_page_plots_and_traceable_numbers(run_dir, scratch):
    md = write_report([run_dir], scratch / "out")
    text = md.read_text()
    for number, source in [("0.913", "topk/core_eval.json"), ("0.842", "standard/core_eval.json"),
                           ("0.4", "topk/unlearning_eval.json")]:
        line = next(ln for ln in text.splitlines() if source in ln and f"| {number} |" in ln)
        assert line  # the number sits in the row naming its file
    for png in ["l0_vs_ce_loss_score.png", "l0_vs_explained_variance.png", "training_curves.png",
                "density_histograms.png", "unlearning.png"]:
        assert (scratch / "out" / png).stat().st_size > 1000
        assert png in text
    assert "<table" in (scratch / "out" / "report.html").read_text()


def test_collect_sorts_inputs(run_dir):
    found = collect([run_dir])
    assert len(found.core) == 2 and len(found.unlearning) == 1 and len(found.train_logs) == 2


def test_report_errors(scratch):
    (scratch / "empty").mkdir()
    with pytest.raises(ReportError, match="no core/unlearning"):
        collect([scratch / "empty"])
    with pytest.raises(FileNotFoundError):
        collect([scratch / "missing"])


def test_report_cli(run_dir, scratch):
    result = CliRunner().invoke(main, ["report", str(run_dir), "--out", str(scratch / "cli")])
    assert result.exit_code == 0, result.output
    assert (scratch / "cli" / "report.html").exists()
    bad = CliRunner().invoke(main, ["report", str(scratch / "nothing"), "--out", str(scratch / "x")])
    assert bad.exit_code != 0 and "does not exist" in bad.output


def test_scoring_setting_is_lowest_forget_among_retained():
    from saestrata.evaluate.report import _scoring_setting

    details = [
        {"kind": "selected", "forget_accuracy": 0.9, "retain_accuracy": 0.995, "retain_ok": True},
        {"kind": "selected", "forget_accuracy": 0.5, "retain_accuracy": 0.90, "retain_ok": False},
        {"kind": "selected", "forget_accuracy": 0.8, "retain_accuracy": 0.991, "retain_ok": True},
        {"kind": "random", "forget_accuracy": 0.1, "retain_accuracy": 0.999, "retain_ok": True},
    ]
    assert _scoring_setting(details)["forget_accuracy"] == 0.8
    none_ok = [dict(d, retain_ok=False) for d in details[:3]]
    assert _scoring_setting(none_ok)["retain_accuracy"] == 0.995


def test_matched_l0_interpolates_in_log_l0_between_bracketing_results():
    from saestrata.evaluate.report import matched_l0_rows

    def row(sae, arch, l0, ev):
        return {"sae": sae, "arch": arch, "l0": l0, "explained_variance": ev, "ce_loss_score": ev / 2,
                "kl_div_score": None, "file": sae}

    rows = [row("a-8", "a", 8.0, 0.5), row("a-128", "a", 128.0, 0.9), row("a-1000", "a", 1000.0, 0.99),
            row("b-64", "b", 64.0, 0.7), row("b-100", "b", 100.0, 0.8),  # b never reaches L0 32: no row
            row("c-32", "c", 32.0, 0.6)]
    out = {r["arch"]: r for r in matched_l0_rows(rows, 32.0)}
    assert set(out) == {"a", "c"}
    # log2: 8 -> 3, 32 -> 5, 128 -> 7: halfway, so EV halfway between 0.5 and 0.9 (by hand).
    assert out["a"]["explained_variance"] == pytest.approx(0.7)
    assert out["a"]["ce_loss_score"] == pytest.approx(0.35)
    assert out["a"]["kl_div_score"] is None
    assert "a-8" in out["a"]["between"] and "a-128" in out["a"]["between"]
    assert out["c"]["explained_variance"] == pytest.approx(0.6)  # an exact hit needs no neighbour


def test_report_cli_matched_l0(run_dir, scratch):
    out = scratch / "report-matched"
    result = CliRunner().invoke(main, ["report", str(run_dir), "--out", str(out), "--matched-l0", "32"])
    assert result.exit_code == 0, result.output
    assert "At matched L0 32" in (out / "report.md").read_text()


def test_a_plot_of_many_saes_keeps_its_axes_and_puts_the_legend_beside_them(tmp_path, monkeypatch):
    """With 25 SAEs (50 legend entries) the legend inside the axes made tight_layout squash the unlearning plot's
    axes to a thin strip (the benchmark's report/unlearning.png until 2026-12-05)."""
    import matplotlib.pyplot as plt

    from saestrata.evaluate import report

    closed = []
    monkeypatch.setattr(plt, "close", closed.append)
    details = [{"kind": kind, "retain_accuracy": 0.5 + 0.01 * j, "forget_accuracy": 0.9 - 0.01 * j}
               for kind in ("selected", "random") for j in range(5)]
    results = [(tmp_path / f"sae{i}.json", {"eval_result_details": details}) for i in range(25)]
    assert report._unlearning_plot(results, tmp_path / "u.png") == tmp_path / "u.png"
    (fig,) = closed
    (ax,) = fig.axes
    assert ax.get_position().height > 0.6
    legend_box = ax.get_legend().get_window_extent(fig.canvas.get_renderer())
    assert legend_box.x0 >= ax.get_window_extent(fig.canvas.get_renderer()).x1  # beside, not over the points
