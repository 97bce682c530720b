"""``saestrata benchmark`` end to end on the tiny model: stages, matched rows, resumability."""

import json

from saestrata.benchmark import Benchmark, BenchmarkConfig


def _cfg(tiny_model_dir, tmp_path, **kw):
    base = dict(out=tmp_path / "out", work=tmp_path / "work", layer=1, model=str(tiny_model_dir),
                train_tokens=4096, tokens_per_sae=4096, d_sae=64, batch_size=256, targets=(3.0, 12.0),
                variants=["topk", "standard"], seeds=2, eval_tokens=256, eval_group=4, unlearn=False, device="cpu")
    base.update(kw)
    return BenchmarkConfig(**base)


def test_benchmark_runs_every_stage_and_resumes(tiny_model_dir, tmp_path):
    lines: list[str] = []
    cfg = _cfg(tiny_model_dir, tmp_path, stages=("store", "lr"))
    Benchmark(cfg, lines.append).run()  # interrupted after the lr sweep
    sweep = json.loads((cfg.out / "lr_sweep.json").read_text())
    assert set(sweep["archs"]) == {"topk", "standard"}
    assert all(len(a["runs"]) == 3 for a in sweep["archs"].values())  # 0.5x, 1x, 2x the default lr

    lines.clear()
    cfg = _cfg(tiny_model_dir, tmp_path, targets=(3.0, 12.0), seeds=2)
    bench = Benchmark(cfg, lines.append)
    bench.run()
    trained = [l for l in lines if l.strip().startswith("trained")]
    assert not any(" lr-" in l for l in trained)  # the finished sweep was not redone
    names = {l.split()[1] for l in trained}
    assert {"topk-l0=3", "topk-l0=12", "standard-l0=3", "standard-l0=12", "standard-published"} <= names
    topk = json.loads((cfg.out / "saes" / "topk-l0=3" / "cfg.json").read_text())
    assert topk["saestrata"]["hparams"]["k"] == 3
    std = json.loads((cfg.out / "saes" / "standard-l0=3" / "cfg.json").read_text())
    assert std["saestrata"]["target_l0"] == 3 and "sparsity_multiplier" in std["saestrata"]["final_counters"]
    assert std["saestrata"]["lr"] == sweep["archs"]["standard"]["lr"]  # the swept rate is used
    assert (cfg.out / "core" / "topk-l0=3.json").exists()
    # Extra init seeds for topk at the targets nearest 32 from each side (here only 12 is below it).
    assert (cfg.out / "core" / "topk-l0=12-seed1.json").exists()
    assert not (cfg.out / "core" / "topk-l0=3-seed1.json").exists()
    matched = (cfg.out / "matched.md").read_text()
    assert "| topk | 32 | not bracketed" in matched  # L0 3 and 12 do not bracket 32: no extrapolation
    assert (cfg.out / "claims.md").exists() and (cfg.out / "report" / "report.md").exists()

    lines.clear()
    Benchmark(cfg, lines.append).run()  # everything done: nothing is trained or evaluated again
    assert not [l for l in lines if l.strip().startswith(("trained", "evaluated"))]


def test_matched_rows_interpolate_between_bracketing_points(tiny_model_dir, tmp_path):
    from saestrata.benchmark_report import _matched

    cfg = _cfg(tiny_model_dir, tmp_path, targets=(16.0, 48.0), variants=["topk"], seeds=1,
               stages=("store", "matched", "evaluate"))
    bench = Benchmark(cfg, lambda _: None)
    bench.run()
    row = _matched(bench, "topk", 32.0)
    lo, hi = (json.loads((cfg.out / "core" / f"topk-l0={t}.json").read_text())["eval_result_metrics"]
              for t in (16, 48))
    a, b = (m["model_performance_preservation"]["ce_loss_score"] for m in (lo, hi))
    assert min(a, b) <= row["ce_loss_score"] <= max(a, b)
    assert "topk-l0=16" in row["between"] and "topk-l0=48" in row["between"]


def test_finished_saes_of_other_settings_are_not_reused(tiny_model_dir, tmp_path):
    """A rerun with another budget must not silently reuse SAEs trained with the old one."""
    import pytest

    cfg = _cfg(tiny_model_dir, tmp_path, variants=["topk"], targets=(3.0,), seeds=1, stages=("store", "lr"))
    Benchmark(cfg, lambda _: None).run()
    bigger = _cfg(tiny_model_dir, tmp_path, variants=["topk"], targets=(3.0,), seeds=1, stages=("lr",),
                  tokens_per_sae=8192)
    with pytest.raises(ValueError, match="tokens 1024 != 2048"):
        Benchmark(bigger, lambda _: None).run()
