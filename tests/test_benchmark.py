"""``saestrata benchmark`` end to end on the tiny model: stages, matched rows, resumability."""

import json
import math

import pytest
from dataclasses import asdict

from saestrata.benchmark import LR_EXTENSIONS, START_MARGIN, Benchmark, BenchmarkConfig, calibrated_start


def _cfg(tiny_model_dir, tmp_path, **kw):
    base = dict(out=tmp_path / "out", work=tmp_path / "work", layer=1, model=str(tiny_model_dir),
                train_tokens=4096, tokens_per_sae=4096, d_sae=64, batch_size=256, targets=(3.0, 12.0),
                variants=["topk", "standard"], seeds=2, eval_tokens=256, eval_group=4, unlearn=False, device="cpu",
                probe_train_per_class=3, probe_test_per_class=2)
    base.update(kw)
    return BenchmarkConfig(**base)


def test_benchmark_runs_every_stage_and_resumes(tiny_model_dir, tmp_path):
    lines: list[str] = []
    cfg = _cfg(tiny_model_dir, tmp_path, stages=("store", "lr"))
    Benchmark(cfg, lines.append).run()  # interrupted after the lr sweep
    sweep = json.loads((cfg.out / "lr_sweep.json").read_text())
    assert set(sweep["variants"]) == {"topk", "standard"}
    for a in sweep["variants"].values():  # 0.5x, 1x, 2x the default lr, more past an edge the best rate sits on
        lrs = sorted(r["lr"] for r in a["runs"])
        assert len(lrs) >= 3 and (len(lrs) == 3 + LR_EXTENSIONS or lrs[0] < a["lr"] < lrs[-1])

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
    assert std["saestrata"]["lr"] == sweep["variants"]["standard"]["lr"]  # the swept rate is used
    # ... and the L0 controller starts below the multiplier the chosen sweep run calibrated (or at 1)
    assert std["saestrata"]["l0_start"] == calibrated_start(sweep["variants"]["standard"]["multiplier"])
    assert (cfg.out / "core" / "topk-l0=3.json").exists()
    # Extra init seeds for topk at the targets nearest 32 from each side (here only 12 is below it).
    assert (cfg.out / "core" / "topk-l0=12-seed1.json").exists()
    assert not (cfg.out / "core" / "topk-l0=3-seed1.json").exists()
    matched = (cfg.out / "matched.md").read_text()
    assert "| topk | 32 | not bracketed" in matched  # L0 3 and 12 do not bracket 32: no extrapolation
    # ... and the row names the nearest point the variant did reach, with its eval L0
    top12 = json.loads((cfg.out / "core" / "topk-l0=12.json").read_text())["eval_result_metrics"]["sparsity"]["l0"]
    assert f"| topk | 32 | not bracketed by its trained points (nearest: L0 {top12:.1f}, topk-l0=12) |" in matched
    assert (cfg.out / "claims.md").exists() and (cfg.out / "report" / "report.md").exists()
    mech = (cfg.out / "mechanisms.md").read_text()  # counters of each variant's SAE nearest L0 32, from its cfg.json
    std_counters = json.loads((cfg.out / "saes" / "standard-l0=12" / "cfg.json").read_text())["saestrata"]["final_counters"]
    assert f"sparsity_multiplier {std_counters['sparsity_multiplier']:.4g}" in mech
    assert "| topk | topk-l0=12 | auxk_dead " in mech

    # probe: one SAEBench sparse_probing JSON per SAE bracketing L0 32 (here only the nearest: none is above 32).
    bracket = {v: bench.bracketing(v, 32.0) for v in ("topk", "standard")}
    assert bracket["topk"] == ["topk-l0=12"] and bracket["standard"] == [bench.nearest_to("standard", 32.0)]
    nearest = {v: n for v, (n,) in bracket.items()}
    assert sorted(p.name for p in (cfg.out / "probing").iterdir()) == sorted(f"{n}.json" for n in nearest.values())
    probed = [l.split()[1].rstrip(":") for l in lines if l.strip().startswith("probed")]
    assert sorted(probed) == sorted(nearest.values())
    caches = sorted((cfg.work / "probe-residuals").iterdir())  # train and test articles, one LM forward each
    assert len(caches) == 2 and all((c / "meta.json").exists() for c in caches)
    cache_times = [(c / "meta.json").stat().st_mtime_ns for c in caches]
    probing_md = (cfg.out / "probing.md").read_text()
    for v, n in nearest.items():
        r = json.loads((cfg.out / "probing" / f"{n}.json").read_text())
        assert r["eval_type_id"] == "sparse_probing" and r["saestrata_benchmark"]["sae"] == n
        assert set(r["eval_result_unstructured"]["residual_cache"].values()) == {c.name for c in caches}
        m = r["eval_result_metrics"]["sae"]
        row = next(l for l in probing_md.splitlines() if l.startswith(f"| {v} | {n} | "))
        assert f"{m['sae_top_1_test_accuracy']:.3f}" in row and f"probing/{n}.json, core/{n}.json" in row
        assert row.count("|") == 12  # 11 cells: variant, SAE, L0, k = 1 2 5 10 20 50, all, from
    assert "| raw residual (d_in channels) | - | - | " in probing_md

    lines.clear()
    Benchmark(cfg, lines.append).run()  # everything done: nothing is trained, evaluated or probed again
    assert not [l for l in lines if l.strip().startswith(("trained", "evaluated", "probed"))]

    import shutil

    shutil.rmtree(cfg.work / "runs")  # a fresh machine: out/ came from git, the weights did not
    lines.clear()
    Benchmark(cfg, lines.append).run()
    assert not [l for l in lines if l.strip().startswith(("trained", "evaluated", "probed"))]
    (cfg.out / "core" / "topk-l0=3.json").unlink()  # a result that needs the weights: only that SAE is redone
    lines.clear()
    Benchmark(cfg, lines.append).run()
    assert [l.split()[1] for l in lines if l.strip().startswith("trained")] == ["topk-l0=3"]
    # A missing probing result needs the weights of the variant's SAE nearest 32: only that SAE is retrained and
    # probed, from the cached residuals (the cache in work/ is not rewritten).
    (cfg.out / "probing" / "topk-l0=12.json").unlink()
    lines.clear()
    Benchmark(cfg, lines.append).run()
    assert [l.split()[1] for l in lines if l.strip().startswith("trained")] == ["topk-l0=12"]
    assert [l.split()[1] for l in lines if l.strip().startswith("probed")] == ["topk-l0=12:"]
    assert [(c / "meta.json").stat().st_mtime_ns for c in caches] == cache_times
    # A variant without a result is pending in probing.md.
    (cfg.out / "probing" / f"{nearest['standard']}.json").unlink()
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- benchmark:matched -->\nold table\n<!-- /benchmark:matched -->\nmiddle\n"
                      "<!-- benchmark:seeds -->\n<!-- /benchmark:seeds -->\n<!-- benchmark:claims -->\nold claims\n"
                      "<!-- /benchmark:claims -->\n<!-- benchmark:probing -->\n<!-- /benchmark:probing -->\nend\n")
    Benchmark(_cfg(tiny_model_dir, tmp_path, stages=("report",), readme=readme), lambda _: None).run()
    assert f"| standard | {nearest['standard']} | not probed yet |" in (cfg.out / "probing.md").read_text()
    # --readme: the tables of matched.md and probing.md between the markers, the rest of the file kept.
    text = readme.read_text()
    matched_md, probing_md = ((cfg.out / f).read_text().splitlines() for f in ("matched.md", "probing.md"))
    first = [l for l in matched_md if l.startswith("| variant | L0 |")][0]
    table = matched_md[matched_md.index(first):]
    table = table[: next(i for i, l in enumerate(table) if not l.startswith("|"))]
    assert "old table" not in text and "\n".join(table) in text
    assert text.startswith("intro\n<!-- benchmark:matched -->\n| variant") and "\nmiddle\n" in text
    assert f"| standard | {nearest['standard']} | not probed yet |" in text and text.endswith("-->\nend\n")
    assert "Per latent group" not in text  # only the first probing table
    assert "old claims" not in text and "| claim (seed file, section) |" in text  # the claims table, as claims.md's
    spread = (cfg.out / "matched.md").read_text().split("## Init seeds")[1].strip()
    assert spread.splitlines()[0].startswith("| variant | seeds |") and spread in text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="benchmark:matched"):
        Benchmark(_cfg(tiny_model_dir, tmp_path, stages=("report",), readme=readme), lambda _: None).run()
    assert readme.read_text() == "no markers\n" and (cfg.out / "matched.md").exists()

    # A retrained SAE's earlier results (other weights) are dropped and recomputed, never kept beside the new ones.
    shutil.rmtree(cfg.work / "runs")
    stale = cfg.out / "unlearning" / "topk-l0=12.json"
    stale.parent.mkdir(exist_ok=True)
    stale.write_text("{}")
    core, probing = cfg.out / "core" / "topk-l0=12.json", cfg.out / "probing" / "topk-l0=12.json"
    assert probing.exists()
    bench = Benchmark(cfg, lines.append)
    job = next(j for j in bench.matched_jobs(bench.chosen_lrs(write=False)) if j.name == "topk-l0=12")
    bench.train_job(job, need_weights=True)
    assert not stale.exists() and not core.exists() and not probing.exists()
    lines.clear()
    Benchmark(cfg, lines.append).run()
    assert any(l.strip().startswith("evaluated") and "topk-l0=12" in l for l in lines) and core.exists()
    assert probing.exists()


def test_matched_rows_interpolate_between_bracketing_points(tiny_model_dir, tmp_path, monkeypatch):
    from saestrata import benchmark_speed
    from saestrata.benchmark_report import _at32, _from_cell, _matched, provenance_table

    cfg = _cfg(tiny_model_dir, tmp_path, targets=(16.0, 48.0), variants=["topk"], seeds=1,
               stages=("store", "matched", "evaluate"))
    lines: list[str] = []
    bench = Benchmark(cfg, lines.append)
    bench.run()
    assert any("topk: its lr sweep is not finished" in l for l in lines)  # no stage lr: the default rate, said so
    row = _matched(bench, "topk", 32.0)
    lo, hi = (json.loads((cfg.out / "core" / f"topk-l0={t}.json").read_text())["eval_result_metrics"]
              for t in (16, 48))
    a, b = (m["model_performance_preservation"]["ce_loss_score"] for m in (lo, hi))
    assert min(a, b) <= row["ce_loss_score"] <= max(a, b)
    assert "topk-l0=16" in row["between"] and "topk-l0=48" in row["between"]
    # Every metric column, dead fraction included, at the same log-L0 weight (until 2026-12-05 the dead
    # fraction was the two SAEs' plain mean, which the table did not say). The tiny SAEs keep every latent
    # alive, so one result's alive fraction is set by hand: the report is a function of the JSONs.
    path = cfg.out / "core" / "topk-l0=48.json"
    data = json.loads(path.read_text())
    data["eval_result_metrics"]["misc_metrics"]["frac_alive"] = 0.25
    path.write_text(json.dumps(data))
    row = _matched(bench, "topk", 32.0)
    hi = data["eval_result_metrics"]
    w = math.log(32.0 / lo["sparsity"]["l0"]) / math.log(hi["sparsity"]["l0"] / lo["sparsity"]["l0"])
    dead = [1.0 - m["misc_metrics"]["frac_alive"] for m in (lo, hi)]
    assert dead[0] != dead[1] and abs(w - 0.5) > 0.05  # so the mean (the old rule) would not pass
    assert row["dead_frac"] == pytest.approx(dead[0] + w * (dead[1] - dead[0]), rel=1e-12)
    assert row["ce_loss_score"] == pytest.approx(a + w * (b - a), rel=1e-12)
    assert _at32(bench, "topk", lambda r: r["dead_frac"]) == pytest.approx(row["dead_frac"], rel=1e-12)  # claims' rule
    assert row["train_codes"] == [bench.code] and "different code" not in _from_cell(row)
    # A pair trained by two code versions says so in its row, and provenance.md names both versions' SAEs.
    job = cfg.out / "saes" / "topk-l0=48" / "job.json"
    job.write_text(json.dumps({**json.loads(job.read_text()), "code": "0123456789abcdef"}))
    row = _matched(bench, "topk", 32.0)
    assert row["train_codes"] == sorted([bench.code, "0123456789abcdef"])
    assert "trained by different code" in _from_cell(row) and "0123" in _from_cell(row)
    md, rows = provenance_table(bench)
    by_code = {r["code"]: r for r in rows}
    assert by_code["0123456789abcdef"]["trained"] == ["topk-l0=48"]
    assert "topk-l0=16" in by_code[bench.code]["trained"] and "topk-l0=48" in by_code[bench.code]["core"]
    assert "| 0123456789abcdef | ? | topk l0=48 |" in md  # no commits.json entry: origin unknown, said so

    # train tok/s: not the SAEs' own step clocks (they share the machine with anything else running) but
    # stage speed's, which times the variant's two SAEs bracketing 32 again with their settings (benchmark_speed.py).
    assert row["train_tokens_per_s"] is None  # before the stage ran: "-"
    for name in ("topk-l0=16", "topk-l0=48"):  # clocks as a paused run would leave them
        path = cfg.out / "saes" / name / "cfg.json"
        data = json.loads(path.read_text())
        data["saestrata"]["train_tokens_per_s"] = 1.0
        path.write_text(json.dumps(data))
    cfg.stages = ("speed",)
    lines.clear()
    Benchmark(cfg, lines.append).run()
    speed = json.loads((cfg.out / "speed.json").read_text())
    # Both SAEs the matched row interpolates between are timed, each with its own settings (k 16 and k 48 cost
    # differently; until the twenty-ninth session only the SAE nearest 32 was, at L0 24 or 40 for every variant).
    assert speed["code"] == bench.code and len(speed["native"]) == 16
    assert set(speed["saes"]) == set(bench.bracketing("topk", 32.0)) == {"topk-l0=16", "topk-l0=48"}
    for name, got in speed["saes"].items():
        assert got["variant"] == "topk" and len(got["rounds"]) == 3
        for r in got["rounds"]:
            assert r["tokens_per_s"] == pytest.approx(cfg.batch_size / (r["step_ms_mean"] / 1e3))
            assert r["steps_timed"] == 16 - r["warmup"] and r["tokens_per_s"] > 100  # 4096 tokens / 256: 16 steps
            assert 0.0 <= r["others_cpu"] <= 1.0
        assert got["tokens_per_s"] == sorted(r["tokens_per_s"] for r in got["rounds"])[1]  # the median round
        k = json.loads((cfg.out / "saes" / name / "job.json").read_text())["target_l0"]
        for r in got["rounds"]:  # what the timed steps ran: topk's L0 at most its k (ReLU after the top-k); AuxK's counters
            assert 0 < r["l0_timed"] <= k and {"auxk_dead", "auxk_pairs"} <= r["counters"]["end"].keys()
            assert r["counters"]["start"].keys() == r["counters"]["end"].keys()
        assert sum(l.startswith(f"  speed {name} (round ") for l in lines) == 3
    assert max(r["l0_timed"] for r in speed["saes"]["topk-l0=16"]["rounds"]) <= 16 < min(
        r["l0_timed"] for r in speed["saes"]["topk-l0=48"]["rounds"])  # each timed with its own k
    lo_l0, hi_l0 = (json.loads((cfg.out / "core" / f"{n}.json").read_text())["eval_result_metrics"]["sparsity"]["l0"]
                    for n in ("topk-l0=16", "topk-l0=48"))
    w = math.log(32.0 / lo_l0) / math.log(hi_l0 / lo_l0)
    lo_t, hi_t = (speed["saes"][n]["tokens_per_s"] for n in ("topk-l0=16", "topk-l0=48"))
    assert _matched(bench, "topk", 32.0)["train_tokens_per_s"] == pytest.approx(lo_t + w * (hi_t - lo_t), rel=1e-12)
    assert _matched(bench, "topk", 20.0)["train_tokens_per_s"] is None  # timed for the L0-32 rows only
    lines.clear()
    Benchmark(cfg, lines.append).run()  # timed once: a rerun skips it
    assert not any(l.startswith("  speed topk") for l in lines)
    assert json.loads((cfg.out / "speed.json").read_text()) == speed
    # Sessions land on different machines: rounds of another CPU must not join this one's median.
    assert speed["cpu"] == benchmark_speed.cpu_model() != ""
    monkeypatch.setattr(benchmark_speed, "cpu_model", lambda: "Another CPU (avx2)")
    lines.clear()
    Benchmark(cfg, lines.append).run()
    again = json.loads((cfg.out / "speed.json").read_text())
    assert sum(l.startswith("  speed topk-l0=") for l in lines) == 6
    assert again["cpu"] == "Another CPU (avx2)" and all(len(g["rounds"]) == 3 for g in again["saes"].values())


def test_speed_times_the_steps_after_its_warmup():
    """200 steps with a warm-up of 150 time steps 150-199 (the twenty-seventh session's code timed 100-199: its
    min(warmup, n // 2) guard, meant for runs shorter than the warm-up, cut every run's warm-up to half)."""
    from saestrata.benchmark_speed import warmup_steps

    assert warmup_steps(200, 150) == 150 and warmup_steps(151, 150) == 150
    assert warmup_steps(150, 150) == 75 and warmup_steps(16, 150) == 8  # a run the store ended early


def test_speed_says_which_path_its_timed_steps_took():
    """A ReLU SAE's timing names its mean L0 and how many timed steps took the pairs step (the counters at the
    window's two ends), so the column cannot silently time the dense step."""
    from saestrata.benchmark_speed import _acted, window_state

    log = [{"step": s, "l0": 600.0 if s < 3 else 30.0 + s, "counters": {"sparse_steps": max(0, s - 2),
                                                                      "sparsity_multiplier": 0.1 * s}}
           for s in range(8)]
    got = window_state(log, 4)
    assert got["l0_timed"] == pytest.approx((34 + 35 + 36 + 37) / 4)
    assert got["counters"] == {"start": log[3]["counters"], "end": log[7]["counters"]}
    assert _acted({**got, "steps_timed": 4}) == "; L0 36, pairs step on 4 of 4 timed steps"
    assert window_state(log, 0)["counters"]["start"] == {}
    gram = {"steps_timed": 4, "l0_timed": 30.0, "counters": {"start": {"sparse_gram": 10}, "end": {"sparse_gram": 18}}}
    assert _acted(gram) == "; L0 30, 8 Grams from the code's non-zeros in the timed steps"  # seed 000: two a step
    with pytest.raises(ValueError, match="leaves none"):
        window_state(log, 8)


def test_speed_recovers_each_steps_time_from_the_cumulative_log():
    from saestrata.benchmark_speed import step_seconds, summarise

    truth = [0.5, 0.1, 0.1, 0.2, 30.0, 0.1]  # step 4 stopped for 30 s (a paused process)
    clock, log = 0.0, []
    for step, dt in enumerate(truth):
        clock += dt
        log.append({"step": step, "tokens_per_s": (step + 1) * 256 / clock})  # the trainer's cumulative rate
    assert step_seconds(log, 256) == pytest.approx(truth)
    s = summarise(truth, 1, 256)
    assert s["steps_timed"] == 5 and s["step_ms_median"] == pytest.approx(100.0)
    assert s["step_ms_mean"] == pytest.approx(1e3 * sum(truth[1:]) / 5) and s["step_ms_p90"] == pytest.approx(3e4)
    with pytest.raises(ValueError, match="one line per step"):
        step_seconds(log[::2], 256)
    with pytest.raises(ValueError, match="leave none"):
        summarise(truth, 6, 256)


def test_finished_saes_of_other_settings_are_not_reused(tiny_model_dir, tmp_path):
    """A rerun with another budget must not silently reuse SAEs trained with the old one."""
    import pytest

    cfg = _cfg(tiny_model_dir, tmp_path, variants=["topk"], targets=(3.0,), seeds=1, stages=("store", "lr"))
    Benchmark(cfg, lambda _: None).run()
    bigger = _cfg(tiny_model_dir, tmp_path, variants=["topk"], targets=(3.0,), seeds=1, stages=("lr",),
                  tokens_per_sae=8192)
    with pytest.raises(ValueError, match="tokens 1024 != 2048"):
        Benchmark(bigger, lambda _: None).run()


def test_a_variant_with_saes_of_other_settings_is_skipped_and_the_others_still_run(tiny_model_dir, tmp_path):
    """One variant's stale SAE (seed000_hsae, 2026-12-04) must not abort the other variants' work."""
    from saestrata.benchmark import SettingsMismatch

    kw = dict(variants=["topk", "standard"], targets=(3.0,), seeds=1)
    Benchmark(_cfg(tiny_model_dir, tmp_path, stages=("store", "lr"), **kw), lambda _: None).run()
    job_json = next((tmp_path / "out" / "saes").glob("lr-topk-x*")) / "job.json"
    job_json.write_text(json.dumps({**json.loads(job_json.read_text()), "lr": 0.125}))
    lines: list[str] = []
    bench = Benchmark(_cfg(tiny_model_dir, tmp_path, stages=("lr", "matched"), **kw), lines.append)
    with pytest.raises(SettingsMismatch, match=r"1 variant\(s\) skipped.*lr-topk-x.*lr 0.125 !="):
        bench.run()
    assert any("topk: SKIPPED" in line for line in lines)
    assert [j.name for j in bench.matched_jobs(bench.chosen_lrs(False)) if j.arch == "standard"]
    assert all(bench.done(j.name) for j in bench.matched_jobs(bench.chosen_lrs(False)) if j.arch == "standard")
    assert not any(bench.done(j.name) for j in bench.matched_jobs(bench.chosen_lrs(False)) if j.arch == "topk")


def _record(bench, name: str, fvu: float, l0: float = 32.0, multiplier: float | None = None,
            l0_start: float = 1.0) -> None:
    """Fake a finished sweep run in ``out`` (what a fresh machine finds in git); ``multiplier``: the L0
    controller's final one (None: an arch without a controller)."""
    folder = bench.cfg.out / "saes" / name
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text("{}")
    variant, mult = name[len("lr-"):].split("-start")[0].rsplit("-x", 1)
    (folder / "job.json").write_text(json.dumps(asdict(bench._sweep_job(variant, float(mult), l0_start))))
    lines = [{"step": s, "window": 25, "fvu": 9.9, "l0": 500.0} for s in (24, 49, 74)]  # early: ignored
    counters = {} if multiplier is None else {"counters": {"sparsity_multiplier": multiplier}}
    lines.append({"step": 99, "window": 25, "fvu": fvu, "l0": l0, **counters})
    (folder / "train_log.jsonl").write_text("\n".join(json.dumps(l) for l in lines))


def test_lr_sweep_grows_past_the_edge_the_best_rate_sits_on(tiny_model_dir, tmp_path):
    bench = Benchmark(_cfg(tiny_model_dir, tmp_path, variants=["topk"]), lambda _: None)
    names = lambda: [j.name for j in bench.lr_jobs("topk")[0]]
    assert names() == ["lr-topk-x0.5", "lr-topk-x1", "lr-topk-x2"] and bench.lr_jobs("topk")[1] is None
    for name, fvu in (("lr-topk-x0.5", 0.3), ("lr-topk-x1", 0.2), ("lr-topk-x2", 0.1)):
        _record(bench, name, fvu)
    fvu = 0.1
    for i in range(LR_EXTENSIONS):  # best at the top edge each time: one more, twice as large
        mult = 2 ** (i + 2)
        assert names()[-1] == f"lr-topk-x{mult}"
        fvu *= 0.5
        _record(bench, f"lr-topk-x{mult}", fvu)
    jobs, chosen = bench.lr_jobs("topk")
    assert len(jobs) == 3 + LR_EXTENSIONS and chosen["best"]["sae"] == f"lr-topk-x{mult}"  # limit reached
    assert bench.chosen_lrs()["topk"]["fvu"] == fvu  # the last 10% of steps only, not the early lines


def test_lr_sweep_stops_when_the_best_rate_is_inside_and_prefers_runs_at_the_target(tiny_model_dir, tmp_path):
    bench = Benchmark(_cfg(tiny_model_dir, tmp_path, variants=["standard"]), lambda _: None)
    # x0.5 has the lowest FVU but landed at L0 60 (not within 25% of 32): the rule must not pick it.
    for name, fvu, l0 in (("lr-standard-x0.5", 0.1, 60.0), ("lr-standard-x1", 0.3, 30.0),
                          ("lr-standard-x2", 0.4, 34.0)):
        _record(bench, name, fvu, l0)
    jobs, chosen = bench.lr_jobs("standard")
    assert len(jobs) == 3 and chosen["best"]["sae"] == "lr-standard-x1"
    assert chosen["rule"].startswith("lowest FVU x (L0/32)^0.5 among runs with L0 within 25%")


def test_lr_sweep_does_not_reward_a_rate_for_overshooting_the_target_l0(tiny_model_dir, tmp_path):
    """seed002-selection's sweep (2026-12-03): 32x ended at L0 35.3 with FVU 0.0888, 16x at L0 31.2 with
    0.0905; the raw-FVU rule took 32x, which was the worse rate at the full budget."""
    bench = Benchmark(_cfg(tiny_model_dir, tmp_path, variants=["standard"]), lambda _: None)
    for name, fvu, l0 in (("lr-standard-x0.5", 0.1111, 31.9), ("lr-standard-x1", 0.0905, 31.2),
                          ("lr-standard-x2", 0.0888, 35.3)):
        _record(bench, name, fvu, l0)
    jobs, chosen = bench.lr_jobs("standard")
    assert chosen["best"]["sae"] == "lr-standard-x1" and len(jobs) == 3


def test_a_penalty_run_started_above_its_calibration_is_redone_from_a_calibrated_start(tiny_model_dir, tmp_path):
    """Issue 10, equal care (2026-12-03): a controller started at a default 9-19x too strong collapsed L0 in the
    warmup (seed001_fixed_ortho: 19% dead, tail FVU 0.0907; started 4.7x below its calibration: 2%, 0.0774), while
    archs with a too-weak default always approached from above. Sweep runs that ended with a multiplier less than
    START_MARGIN above their start are redone from calibrated_start, the redo's score counts, and the matched SAEs
    start from the chosen run's calibration; archs without a penalty controller (topk) never get a start."""
    bench = Benchmark(_cfg(tiny_model_dir, tmp_path, variants=["standard", "topk"]), lambda _: None)
    _record(bench, "lr-standard-x0.5", 0.2, multiplier=20.0)  # default 20x too weak: counts as it is
    _record(bench, "lr-standard-x1", 0.05, multiplier=0.08)  # default 12.5x too strong: redone
    _record(bench, "lr-standard-x2", 0.15, multiplier=3.0)  # less than START_MARGIN below: redone
    jobs, chosen = bench.lr_jobs("standard")
    assert chosen is None and [j.name for j in jobs] == [
        "lr-standard-x0.5", "lr-standard-x1", "lr-standard-x1-start0.02", "lr-standard-x2", "lr-standard-x2-start0.75"]
    by_name = {j.name: j for j in jobs}
    assert by_name["lr-standard-x1-start0.02"].l0_start == pytest.approx(0.08 / START_MARGIN)
    assert by_name["lr-standard-x1-start0.02"].lr == by_name["lr-standard-x1"].lr
    _record(bench, "lr-standard-x1-start0.02", 0.09, multiplier=0.1, l0_start=0.02)
    _record(bench, "lr-standard-x2-start0.75", 0.11, multiplier=3.2, l0_start=0.75)
    jobs, chosen = bench.lr_jobs("standard")
    assert chosen["best"]["sae"] == "lr-standard-x1-start0.02"  # its own score, not the collapsed first run's
    assert [r["sae"] for r in chosen["runs"]] == ["lr-standard-x0.5", "lr-standard-x1-start0.02",
                                                  "lr-standard-x2-start0.75"]
    for name, fvu in (("lr-topk-x0.5", 0.3), ("lr-topk-x1", 0.1), ("lr-topk-x2", 0.2)):
        _record(bench, name, fvu)
    matched = bench.matched_jobs(bench.chosen_lrs(write=False))
    assert [j.l0_start for j in matched if j.arch == "standard"] == pytest.approx([0.1 / START_MARGIN] * 2)
    assert {j.l0_start for j in matched if j.arch == "topk"} == {1.0}
    assert calibrated_start(40.0) == 1.0 and calibrated_start(None) == 1.0  # never above the arch's own coefficient


def test_a_sweep_redo_started_too_low_to_reach_the_target_is_recalibrated(tiny_model_dir, tmp_path):
    """Issue 10, equal care (2026-12-04): a collapsed first run's controller can end far below the penalty the target
    needs; the redo from there stays above the L0 band for its whole budget and its rate drops out of the choice
    without ever being measured at the target (seed001_adaptive_ortho64 x8: started at 0.000269, ended at 0.0162
    with L0 46.2, so x4 was chosen). Such a redo is redone from its own calibration; one whose calibration moved
    less than RECALIBRATE_FACTOR counts as it is."""
    bench = Benchmark(_cfg(tiny_model_dir, tmp_path, variants=["standard"]), lambda _: None)
    _record(bench, "lr-standard-x0.5", 0.2, multiplier=20.0)
    _record(bench, "lr-standard-x1", 0.12, multiplier=8.0)  # calibration >= 1: counts as it is
    _record(bench, "lr-standard-x2", 0.05, l0=1.5, multiplier=0.001)  # collapsed: redone from 0.00025
    _record(bench, "lr-standard-x2-start0.00025", 0.09, l0=46.0, multiplier=0.016, l0_start=0.00025)
    jobs, chosen = bench.lr_jobs("standard")
    assert chosen is None and [j.name for j in jobs][-1] == "lr-standard-x2-start0.004"
    assert jobs[-1].l0_start == pytest.approx(0.016 / START_MARGIN) and jobs[-1].lr == jobs[-2].lr
    _record(bench, "lr-standard-x2-start0.004", 0.08, l0=33.0, multiplier=0.02, l0_start=0.004)
    jobs, chosen = bench.lr_jobs("standard")
    assert chosen is None and jobs[-1].name == "lr-standard-x4"  # measured at the target, x2 wins: the edge grows
    x2_jobs, x2_run = bench._calibrated_sweep_run("standard", 2)
    assert [j.name for j in x2_jobs] == ["lr-standard-x2", "lr-standard-x2-start0.00025", "lr-standard-x2-start0.004"]
    assert x2_run["sae"] == "lr-standard-x2-start0.004"  # the recalibrated run counts, not the one that missed
    _record(bench, "lr-standard-x4", 0.05, l0=1.0, multiplier=0.01)  # collapsed: redone from 0.0025 ...
    _record(bench, "lr-standard-x4-start0.0025", 0.07, l0=45.0, multiplier=0.009, l0_start=0.0025)
    jobs, chosen = bench.lr_jobs("standard")  # ... whose calibration (0.00225) is not above its start: it counts
    assert "lr-standard-x4-start0.00225" not in [j.name for j in jobs]
    assert chosen["best"]["sae"] == "lr-standard-x2-start0.004"  # x4 missed the band: x2 is the best inside


def test_a_narrowed_run_reports_every_variant_with_results_in_out(tiny_model_dir, tmp_path):
    """Issue 10 (2026-12-04): a ``--variants`` run into the shared results folder rewrote matched.md and the README
    tables with its own variants only; every other variant's rows vanished from the published table."""
    from saestrata.benchmark_report import matched_table

    bench = Benchmark(_cfg(tiny_model_dir, tmp_path, variants=["topk"]), lambda _: None)
    (bench.cfg.out / "saes" / "standard-l0=24").mkdir(parents=True)  # trained, not evaluated yet
    (bench.cfg.out / "core").mkdir(parents=True)
    (bench.cfg.out / "core" / "seed004-groups-published.json").write_text("{}")
    _record(bench, "lr-jumprelu-x1", 0.1)  # a sweep run alone is not a result
    assert bench.reported_variants == ["standard", "topk", "seed004-groups"]
    _, rows = matched_table(bench)
    assert {"standard", "topk", "seed004-groups"} <= {r["variant"] for r in rows}
    assert "jumprelu" not in {r["variant"] for r in rows}


def _core_json(bench, name: str, l0: float, ce: float) -> None:
    """A recorded, evaluated SAE ``name`` with the fields the report reads (core JSON, cfg.json, train log)."""
    path = bench.cfg.out / "core" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "eval_result_metrics": {"sparsity": {"l0": l0}, "model_performance_preservation": {"ce_loss_score": ce},
                                "reconstruction_quality": {"explained_variance": ce},
                                "model_behavior_preservation": {"kl_div_score": ce, "kl_div_with_sae": 0.1},
                                "misc_metrics": {"frac_alive": 0.5}},
        "sae_cfg_dict": {"d_sae": 64}, "eval_result_unstructured": {}}))
    sae = bench.cfg.out / "saes" / name
    sae.mkdir(parents=True, exist_ok=True)
    (sae / "cfg.json").write_text(json.dumps({"saestrata": {"final_counters": {}}}))
    (sae / "train_log.jsonl").write_text(json.dumps({"step": 0, "l0": l0}) + "\n")


def test_a_narrowed_run_keeps_the_other_variants_published_rows(tiny_model_dir, tmp_path):
    """Issue 10 (2026-12-04): published.md listed only the narrowed run's variants' as-published points."""
    from saestrata.benchmark_report import published_table

    bench = Benchmark(_cfg(tiny_model_dir, tmp_path, variants=["seed001_adaptive_ortho64"]), lambda _: None)
    _core_json(bench, "seed004-groups-published", 400.0, 0.97)
    text, rows = published_table(bench)
    assert [r["sae"] for r in rows] == ["seed004-groups-published"] and "| seed004-groups-published | 400.0 |" in text


def test_a_narrowed_run_picks_the_best_seed_variant_among_all_with_results(tiny_model_dir, tmp_path):
    """Issue 10 (2026-12-04): a run narrowed to one seed variant took it for "the best seed variant", so the
    init-seeds table (benchmark_report.seed_spread) showed that variant's single seed in place of the best
    variant's three."""
    bench = Benchmark(_cfg(tiny_model_dir, tmp_path, variants=["seed001_adaptive_ortho64"]), lambda _: None)
    for v, ce in (("seed001_adaptive_ortho64", 0.85), ("seed002-contrastive", 0.92)):
        _core_json(bench, f"{v}-l0=3", 24.0, ce)  # the targets' names; their eval L0s bracket 32
        _core_json(bench, f"{v}-l0=12", 40.0, ce + 0.02)
    assert bench.best_seed_variant() == "seed002-contrastive"
    assert not bench.seed_jobs(bench.best_seed_variant(), {})  # ... whose seeds this run does not train


def test_lr_sweep_file_keeps_the_variants_a_narrowed_run_does_not_cover(tiny_model_dir, tmp_path):
    first = Benchmark(_cfg(tiny_model_dir, tmp_path, variants=["topk"]), lambda _: None)
    for name, fvu in (("lr-topk-x0.5", 0.3), ("lr-topk-x1", 0.1), ("lr-topk-x2", 0.2)):
        _record(first, name, fvu)
    first.chosen_lrs()
    second = Benchmark(_cfg(tiny_model_dir, tmp_path, variants=["standard"]), lambda _: None)
    for name, fvu in (("lr-standard-x0.5", 0.3), ("lr-standard-x1", 0.1), ("lr-standard-x2", 0.2)):
        _record(second, name, fvu)
    second.code = "other-code"
    second.chosen_lrs()  # a run of other variants (and code) rewrites the file
    archs = json.loads((first.cfg.out / "lr_sweep.json").read_text())["variants"]
    assert set(archs) == {"topk", "standard"}
    assert archs["topk"]["lr"] == first.chosen_lrs(write=False)["topk"]["lr"] and archs["topk"]["code"] == first.code
    assert archs["standard"]["code"] == "other-code"


def test_unlearning_at_a_looser_retain_bar_is_its_own_number(tiny_model_dir, tmp_path):
    from saestrata.benchmark_report import _unlearning

    bench = Benchmark(_cfg(tiny_model_dir, tmp_path, variants=["topk"]), lambda _: None)
    details = [{"kind": "selected", "forget_accuracy": 0.6, "retain_accuracy": 0.97},  # fails 0.99, passes 0.95
               {"kind": "selected", "forget_accuracy": 0.9, "retain_accuracy": 1.0},
               {"kind": "selected", "forget_accuracy": 0.1, "retain_accuracy": 0.5},  # fails both
               {"kind": "random", "forget_accuracy": 0.2, "retain_accuracy": 0.96}]  # control: never counted
    path = bench.cfg.out / "unlearning" / "topk-l0=3.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"eval_result_metrics": {"unlearning": {"unlearning_score": 0.1}},
                                "eval_result_details": details}))
    assert _unlearning(bench, "topk-l0=3") == 0.1  # SAEBench's key, as written
    assert _unlearning(bench, "topk-l0=3", 0.95) == pytest.approx(0.4)
    assert _unlearning(bench, "topk-l0=3", 0.99) == pytest.approx(0.1)


def test_auxk_unexplained_is_the_last_windows_auxk_term_over_its_coefficient(tmp_path):
    # The mechanisms table says whether AuxK reconstructs anything once latents are dead: 1.0 = inert.
    from saestrata.benchmark_report import auxk_unexplained

    (tmp_path / "cfg.json").write_text(json.dumps({"saestrata": {"hparams": {"k": 4, "aux_coeff": 0.05}}}))
    lines = [{"step": 0, "auxk": 0.0, "counters": {"auxk_dead": 0}}, {"step": 9, "auxk": 0.04, "counters": {"auxk_dead": 7}}]
    (tmp_path / "train_log.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    assert auxk_unexplained(tmp_path, {"auxk_dead": 7}) == {"auxk_unexplained": pytest.approx(0.8)}
    assert auxk_unexplained(tmp_path, {"auxk_dead": 0}) == {}  # AuxK has not acted: nothing to say
    (tmp_path / "cfg.json").write_text(json.dumps({"saestrata": {"hparams": {"l1_coeff": 1.0}}}))
    assert auxk_unexplained(tmp_path, {"auxk_dead": 7}) == {}  # not an AuxK arch


def test_mixed_code_versions_are_named_file_by_file(tmp_path):
    """Results of two code versions: the warning names exactly the files that differ (or asks for a rerun)."""
    import shutil
    from pathlib import Path

    from saestrata.benchmark import code_fingerprint, code_manifest
    from saestrata.benchmark_report import _mixed_code_warning

    root = Path(__file__).resolve().parents[1]
    copy = tmp_path / "pkg"
    for sub in ("train", "evaluate", "store", "harvest"):
        shutil.copytree(root / sub, copy / sub, ignore=shutil.ignore_patterns("__pycache__"))
    assert code_fingerprint(copy) == code_fingerprint(root)
    (copy / "train" / "jumprelu.py").write_text((copy / "train" / "jumprelu.py").read_text() + "\n# changed\n")
    (copy / "store" / "new_module.py").write_text("X = 1\n")
    a, b = code_fingerprint(root), code_fingerprint(copy)
    assert a != b
    out = tmp_path / "out"
    (out / "code").mkdir(parents=True)
    (out / "code" / f"{a}.json").write_text(json.dumps(code_manifest(root)))
    assert "rerun the stale ones" in _mixed_code_warning(out, sorted([a, b]))  # one manifest missing
    (out / "code" / f"{b}.json").write_text(json.dumps(code_manifest(copy)))
    text = _mixed_code_warning(out, sorted([a, b]))
    assert "differ only in `store/new_module.py`, `train/jumprelu.py`:" in text
    assert _mixed_code_warning(out, [a]) == ""


def test_a_fresh_machine_retrains_only_the_sae_a_missing_result_needs(tiny_model_dir, tmp_path):
    """Weights gone, every core result kept, the probe of the SAE nearest L0 32 missing: only that SAE is
    retrained. Its retraining drops its own core result, which must not make the later points look
    pending too (the old code retrained topk-l0=48 here)."""
    import shutil

    cfg = _cfg(tiny_model_dir, tmp_path, variants=["topk"], targets=(3.0, 24.0, 48.0), seeds=1,
               stages=("store", "lr", "matched", "evaluate", "probe"))
    Benchmark(cfg, lambda _: None).run()
    nearest = Benchmark(cfg, lambda _: None).nearest_to("topk", 32.0)
    shutil.rmtree(cfg.work / "runs")
    (cfg.out / "probing" / f"{nearest}.json").unlink()
    # The nearest SAE's job first, so the others come after its retraining (jobs follow the targets' order).
    first = float(nearest.split("=")[1])
    cfg = _cfg(tiny_model_dir, tmp_path, variants=["topk"], targets=(first, *(t for t in cfg.targets if t != first)),
               seeds=1, stages=cfg.stages)
    lines: list[str] = []
    Benchmark(cfg, lines.append).run()
    assert [l.split()[1] for l in lines if l.strip().startswith("trained")] == [nearest]
    assert (cfg.out / "probing" / f"{nearest}.json").exists()
    assert all((cfg.out / "core" / f"topk-l0={t}.json").exists() for t in (3, 24, 48))


def test_probing_is_interpolated_at_l0_32_between_the_two_bracketing_saes(tiny_model_dir, tmp_path):
    """Hand-built results: topk probed at L0 24 (top-1 0.60) and 48 (0.80), L0 80 not probed. The row must be the
    log-L0 interpolation at 32: 0.60 + 0.20 * ln(32/24) / ln(48/24) = 0.683 (not either SAE's own number), and a
    variant with one bracketing SAE probed must say the other is missing."""
    import math

    from saestrata.benchmark_report import probing_table

    bench = Benchmark(_cfg(tiny_model_dir, tmp_path, variants=["topk", "batchtopk"], targets=(24.0, 48.0, 80.0)),
                      lambda _: None)
    out = bench.cfg.out
    for d in ("core", "probing"):
        (out / d).mkdir(parents=True)
    for v, t, l0, acc in (("topk", 24, 24.0, 0.60), ("topk", 48, 48.0, 0.80), ("topk", 80, 80.0, 0.95),
                          ("batchtopk", 24, 23.0, 0.70), ("batchtopk", 48, 47.0, None)):
        name = f"{v}-l0={t}"
        (out / "core" / f"{name}.json").write_text(json.dumps({"eval_result_metrics": {"sparsity": {"l0": l0}}}))
        if acc is not None and t != 80:
            metrics = {"sae": {"sae_top_1_test_accuracy": acc, "sae_test_accuracy": acc + 0.1},
                       "llm": {"llm_top_1_test_accuracy": 0.5, "llm_test_accuracy": 0.9}}
            (out / "probing" / f"{name}.json").write_text(json.dumps(
                {"eval_result_metrics": metrics, "eval_result_unstructured": {}}))
    assert bench.bracketing("topk", 32.0) == ["topk-l0=24", "topk-l0=48"]
    md, rows = probing_table(bench)
    topk = next(r for r in rows if r["variant"] == "topk")
    expected = 0.60 + 0.20 * math.log(32 / 24) / math.log(48 / 24)
    assert topk["interpolated"] and topk["metrics"]["sae_top_1_test_accuracy"] == pytest.approx(expected)
    assert topk["metrics"]["sae_test_accuracy"] == pytest.approx(expected + 0.1)
    line = next(l for l in md.splitlines() if l.startswith("| topk |"))
    assert f"| 32 (interpolated) | {expected:.3f} |" in line and "topk-l0=24 (L0 24.0) + topk-l0=48 (L0 48.0)" in line
    bt = next(l for l in md.splitlines() if l.startswith("| batchtopk |"))
    assert "batchtopk-l0=24 (other bracketing SAE not probed yet) | 23.0 | 0.700 |" in bt


def test_per_group_probing_interpolates_only_groups_that_are_the_same_slots_in_both_saes(tiny_model_dir, tmp_path):
    """Fixed groups (same names and sizes in both bracketing SAEs) are interpolated like the whole-SAE numbers;
    learned groups (sizes differ, a group missing in one SAE) must come from the nearest SAE alone, with its own
    integer latent counts: interpolating them paired unrelated latent sets and printed counts like 921.87."""
    from saestrata.benchmark_report import probing_table

    bench = Benchmark(_cfg(tiny_model_dir, tmp_path, variants=["seed004-groups", "seed001_dynamic_hier",
                                                                "seed001_adaptive_ortho32"],
                           targets=(24.0, 48.0)), lambda _: None)
    out = bench.cfg.out
    for d in ("core", "probing"):
        (out / d).mkdir(parents=True)
    groups = {("seed004-groups", 24): {"group0": (8, 0.5), "group1": (8, 0.6)},
              ("seed004-groups", 48): {"group0": (8, 0.7), "group1": (8, 0.8)},
              ("seed001_dynamic_hier", 24): {"coarse0": (11, 0.5), "coarse3": (5, 0.6)},  # nearest 32 (L0 30)
              ("seed001_dynamic_hier", 48): {"coarse0": (3, 0.9), "coarse1": (13, 0.9)},
              # balanced k-means: same names and sizes in both SAEs, yet learned (found 2026-12-05)
              ("seed001_adaptive_ortho32", 24): {"group0": (8, 0.5), "group1": (8, 0.6)},
              ("seed001_adaptive_ortho32", 48): {"group0": (8, 0.9), "group1": (8, 0.9)}}
    for t in (24, 48):  # what the report reads to tell a learned grouping: the SAE's arch and hparams
        folder = out / "saes" / f"seed001_adaptive_ortho32-l0={t}"
        folder.mkdir(parents=True)
        (folder / "cfg.json").write_text(json.dumps({"saestrata": {"arch": "seed001_grouped_ortho",
                                                                   "hparams": {"adaptive": True}}}))
    l0s = {24: 30.0, 48: 48.0}
    for (v, t), gs in groups.items():
        name = f"{v}-l0={t}"
        (out / "core" / f"{name}.json").write_text(json.dumps({"eval_result_metrics": {"sparsity": {"l0": l0s[t]}}}))
        metrics = {"sae": {"sae_top_1_test_accuracy": 0.5}, "llm": {"llm_top_1_test_accuracy": 0.5}}
        unstructured = {"latent_groups": {g: {"n_latents": n, "sae_top_1_test_accuracy": a} for g, (n, a) in gs.items()}}
        (out / "probing" / f"{name}.json").write_text(json.dumps(
            {"eval_result_metrics": metrics, "eval_result_unstructured": unstructured}))
    md, rows = probing_table(bench)
    fixed = next(r for r in rows if r["variant"] == "seed004-groups")
    w = math.log(32 / 30) / math.log(48 / 30)
    assert fixed["groups"]["group0"]["sae_top_1_test_accuracy"] == pytest.approx(0.5 + 0.2 * w)
    assert fixed["groups"]["group0"]["n_latents"] == 8
    learned = next(r for r in rows if r["variant"] == "seed001_dynamic_hier")
    assert learned["groups"] == {"coarse0": {"n_latents": 11, "sae_top_1_test_accuracy": 0.5},
                                 "coarse3": {"n_latents": 5, "sae_top_1_test_accuracy": 0.6}}
    line = next(l for l in md.splitlines() if l.startswith("| seed001_dynamic_hier / coarse0 |"))
    assert "| seed001_dynamic_hier-l0=24 (L0 30.0; its own groups" in line and "| 11 | 0.500 |" in line
    assert "seed001_dynamic_hier-l0=48" not in line
    assert any(l.startswith("| seed001_dynamic_hier / coarse3 |") for l in md.splitlines())
    adaptive = next(r for r in rows if r["variant"] == "seed001_adaptive_ortho32")
    assert adaptive["groups"]["group0"]["sae_top_1_test_accuracy"] == 0.5  # the nearest SAE's own, not 0.5 + 0.4 w
    assert "seed001_adaptive_ortho32-l0=24 (L0 30.0; its own groups" in adaptive["group_sae"]


def test_matched_table_has_no_rows_that_can_never_fill(tiny_model_dir, tmp_path):
    """An as-published-only preset is never trained at a target L0, and ablations only around L0 32: the table
    must not show them as pending at L0s they will never have ("not evaluated yet" forever)."""
    from saestrata.benchmark_report import matched_table

    bench = Benchmark(_cfg(tiny_model_dir, tmp_path, variants=["seed004-lambda0.06", "seed004-k3", "topk"]),
                      lambda _: None)
    md, rows = matched_table(bench)
    lines = md.splitlines()
    lam = [l for l in lines if l.startswith("| seed004-lambda0.06 |")]
    assert len(lam) == 1 and "as published only" in lam[0] and "not evaluated yet" not in lam[0]
    assert [l.split("|")[2].strip() for l in lines if l.startswith("| seed004-k3 |")] == ["32"]
    assert [l.split("|")[2].strip() for l in lines if l.startswith("| topk |")] == ["32", "64"]
    assert "0.99" in lines[-1] and "retain >= 0.95 column" in lines[-1]  # the caveat under every matched table


def test_each_variant_has_its_own_lr_sweep_whatever_else_the_run_holds(tiny_model_dir, tmp_path):
    """Presets of one arch: each is swept and trained at its own rate. With a shared sweep, the variant standing
    for the arch (the first in ``variants``) and so seed004-k3's lr depended on how a run was narrowed."""
    alone = Benchmark(_cfg(tiny_model_dir, tmp_path, variants=["seed004-k3"]), lambda _: None)
    both = Benchmark(_cfg(tiny_model_dir, tmp_path, variants=["seed004-groups", "seed004-k3"]), lambda _: None)
    names = lambda b: [j.name for j in b.lr_jobs("seed004-k3")[0]]  # noqa: E731
    assert names(alone) == names(both) == ["lr-seed004-k3-x0.5", "lr-seed004-k3-x1", "lr-seed004-k3-x2"]
    # groups' best rate is x1; k3's is x2 (at the edge, so its sweep adds x4, which is worse).
    for name, fvu in (("lr-seed004-groups-x0.5", 0.2), ("lr-seed004-groups-x1", 0.1), ("lr-seed004-groups-x2", 0.3),
                      ("lr-seed004-k3-x0.5", 0.3), ("lr-seed004-k3-x1", 0.2), ("lr-seed004-k3-x2", 0.1),
                      ("lr-seed004-k3-x4", 0.2)):
        _record(both, name, fvu)
    for b in (alone, both):
        lrs = b.chosen_lrs(write=False)
        k3 = [j for j in b.matched_jobs(lrs) if j.arch == "seed004-k3"]
        assert k3 and {j.lr for j in k3} == {lrs["seed004-k3"]["lr"]} == {b._sweep_job("seed004-k3", 2.0).lr}
    assert both.chosen_lrs(write=False)["seed004-groups"]["lr"] == both._sweep_job("seed004-groups", 1.0).lr


def test_lr_column_is_the_rate_the_matched_saes_were_trained_with(tiny_model_dir, tmp_path):
    """The table's lr comes from the SAEs' own job.json (read: what trained them), not from another sweep."""
    from saestrata.benchmark_report import swept_lr
    from saestrata.train.trainer import default_lr

    bench = Benchmark(_cfg(tiny_model_dir, tmp_path, variants=["topk"], targets=(3.0, 12.0)), lambda _: None)
    for name, fvu in (("lr-topk-x0.5", 0.3), ("lr-topk-x1", 0.1), ("lr-topk-x2", 0.2)):
        _record(bench, name, fvu)
    assert swept_lr(bench, "topk") == "x1"  # nothing trained yet: the sweep's choice, inside the grid
    for t in (3, 12):
        d = bench.cfg.out / "saes" / f"topk-l0={t}"
        d.mkdir(parents=True)
        (d / "job.json").write_text(json.dumps({"lr": 2 * default_lr(bench.cfg.d_sae)}))
    assert swept_lr(bench, "topk") == "x2 (edge)"


def _fake_core(bench, name, l0, ev, ce, kl, alive_frac, loss=None):
    """A hand-built core result + saved-SAE record for report tests (values chosen by the test)."""
    core = {"eval_result_metrics": {"sparsity": {"l0": l0}, "reconstruction_quality": {"explained_variance": ev},
                                    "model_performance_preservation": {"ce_loss_score": ce},
                                    "model_behavior_preservation": {"kl_div_score": 1 - kl / 10, "kl_div_with_sae": kl},
                                    "misc_metrics": {"frac_alive": alive_frac}},
            "eval_result_unstructured": {}, "sae_cfg_dict": {"d_sae": bench.cfg.d_sae}}
    bench.core_path(name).parent.mkdir(parents=True, exist_ok=True)
    bench.core_path(name).write_text(json.dumps(core))
    sae = bench.cfg.out / "saes" / name
    sae.mkdir(parents=True, exist_ok=True)
    (sae / "cfg.json").write_text(json.dumps({"saestrata": {}}))
    if loss is not None:
        (sae / "train_log.jsonl").write_text(json.dumps({"step": 0, "loss": 2 * loss}) + "\n"
                                             + json.dumps({"step": 9, "loss": loss}) + "\n")


def test_seed004_claims_use_its_uniform_l1_baseline_and_sweep_k_and_gamma(tmp_path):
    """Seed 004's baseline is its uniform-L1 SAE (sec. 5), not `standard`; K / gamma rows list every point."""
    from saestrata.benchmark_report import claims

    bench = Benchmark(_cfg("no-model-needed", tmp_path, d_sae=100, targets=(24.0, 40.0)), lambda _: None)
    _fake_core(bench, "standard-published", 50, 0.5, 0.5, 1.0, 0.11)  # must not appear in seed 004's rows
    sweep = {"seed004-uniform": 0.9, "seed004-k3": 0.8, "seed004-groups": 0.7, "seed004-k7": 0.6,
             "seed004-gamma1.25": 0.75, "seed004-gamma2": 0.65}
    for i, (v, ce) in enumerate(sweep.items()):
        _fake_core(bench, f"{v}-published", 60, ce, ce, 1 - ce, 0.2 + i / 10, loss=2.0 if v == "seed004-groups" else None)
        _fake_core(bench, f"{v}-l0=24", 24, ce - 0.1, ce - 0.1, 2 - ce, 0.5)
        _fake_core(bench, f"{v}-l0=40", 40, ce - 0.05, ce - 0.05, 1.5 - ce, 0.5)
    _fake_core(bench, "seed004-lambda0.06-published", 40, 0.6, 0.6, 0.5, 0.5, loss=2.5)
    rows = {r["claim"]: r for r in claims(bench)}
    alive = rows["alive latents, uniform L1 (lambda 0.04) -> group sparsity"]
    assert alive["published"] == "20 vs 40"  # uniform 0.2 x 100 alive, groups 0.4 x 100; standard's 11 nowhere
    ev = rows["explained variance, uniform L1 (lambda 0.04) -> group sparsity"]
    assert ev["published"] == "0.900 vs 0.700"
    w = math.log(32 / 24) / math.log(40 / 24)  # log-L0 interpolation at 32
    assert ev["matched"] == f"{0.8 + 0.05 * w:.3f} vs {0.6 + 0.05 * w:.3f}"
    k = rows["group count K: K = 5 optimal (CE loss score per K)"]
    assert k["published"] == "K=1 0.900, K=3 0.800, K=5 0.700, K=7 0.600"
    gamma = rows["progression factor gamma: KL div 0.31 / 0.047 / 0.99 at gamma 1.25 / 1.5 / 2.0"]
    assert gamma["published"] == "gamma=1 0.100, gamma=1.25 0.250, gamma=1.5 0.300, gamma=2 0.350"
    assert rows["base penalty lambda 0.06 vs 0.04: training loss"]["published"].startswith("+25%")


def test_quick_sweeps_with_the_full_runs_care_and_its_tables_say_they_are_short(tiny_model_dir, tmp_path):
    """`--quick` (2026-12-03, timed on an idle machine): with the full run's sweep fraction its sweep runs were 64
    steps, too few for a penalty arch's L0 controller, and standard got 2x the default lr (EV 0.52 at L0 32; the
    full sweep picks 16x). Its sweep runs must be as long as the full benchmark's, and every table of a quick run
    must say it is the short version, so its numbers are not cited as the benchmark's."""
    from saestrata.benchmark import quick_config
    from saestrata.benchmark_report import write_benchmark_report

    quick, full = quick_config(tmp_path / "q", tmp_path / "qw"), BenchmarkConfig()
    assert quick.tokens_per_sae * quick.lr_sweep_frac == full.tokens_per_sae * full.lr_sweep_frac
    bench = Benchmark(_cfg(tiny_model_dir, tmp_path, variants=["topk"], quick=True), lambda _: None)
    bench.cfg.out.mkdir(parents=True)
    write_benchmark_report(bench)
    for name in ("matched.md", "published.md", "claims.md", "mechanisms.md", "probing.md"):
        assert "saestrata benchmark --quick" in (bench.cfg.out / name).read_text(), name
    plain = Benchmark(_cfg(tiny_model_dir, tmp_path / "plain", variants=["topk"]), lambda _: None)
    plain.cfg.out.mkdir(parents=True)
    write_benchmark_report(plain)
    assert "--quick" not in (plain.cfg.out / "matched.md").read_text()


def test_unlearning_results_asked_other_retain_questions_are_recomputed(tiny_model_dir, tmp_path, monkeypatch):
    """A result computed with another retain-question count (the 200 sampled before 2026-12-03) is stale: the
    unlearn stage recomputes it with the benchmark's setting (all questions) and then keeps it."""
    from saestrata.benchmark_report import _unlearning_known
    from saestrata.evaluate import unlearning as U

    lines: list[str] = []
    bench = Benchmark(_cfg(tiny_model_dir, tmp_path, variants=["topk"], unlearn=True), lines.append)
    assert bench.cfg.unlearn_retain_questions is None  # every retain question by default
    asked = []

    def fake_run(cfg, lm=None, progress=True):
        asked.append(cfg.max_retain_questions)
        return {"eval_config": {"max_retain_questions": cfg.max_retain_questions},
                "eval_result_metrics": {"unlearning": {"unlearning_score": 0.25, "retain_known": 561,
                                                       "retain_questions": 850}}}

    monkeypatch.setattr(U, "run_unlearning", fake_run)
    monkeypatch.setattr(bench, "done", lambda name: True)
    monkeypatch.setattr(bench, "lm", lambda: None)
    path = bench.unlearning_path("topk-l0=3")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"eval_config": {"max_retain_questions": 200},
                                "eval_result_metrics": {"unlearning": {"unlearning_score": 0.5, "retain_known": 133,
                                                                       "retain_questions": 200}}}))
    assert not bench.has_unlearning("topk-l0=3") and _unlearning_known(bench, "topk-l0=3") == "133/200"
    bench.unlearn(["topk-l0=3"])
    assert asked == [None] and any("used 200 retain questions" in l and "recomputing" in l for l in lines)
    assert bench.has_unlearning("topk-l0=3") and _unlearning_known(bench, "topk-l0=3") == "561/850"
    bench.unlearn(["topk-l0=3"])
    assert asked == [None]  # a current result is kept


def test_seed000_overhead_claim_reads_the_speed_stage_and_the_ablation_rows_interpolate_at_32(tmp_path):
    """Seed 000 sec. 6: adaptive selection "+35% overhead" (timed by stage speed, not step clocks) and its two
    ablations (CE loss score at L0 32, base vs ablation)."""
    from saestrata.benchmark_report import claims

    bench = Benchmark(_cfg("no-model-needed", tmp_path, d_sae=100, targets=(24.0, 40.0)), lambda _: None)
    # Stage speed's rates of each variant's two SAEs bracketing 32 (adaptive at 40 / 24 as well): the pairs step's
    # cost grows with L0, so each side is interpolated at 32, not the SAE nearest 32 taken alone (until the
    # twenty-ninth session: adaptive's l0=40 beside standard's l0=24).
    rates = {"seed000_adaptive-l0=24": 9000.0, "seed000_adaptive-l0=40": 7000.0,
             "standard-l0=24": 12000.0, "standard-l0=40": 10000.0}
    for name in rates:
        _fake_core(bench, name, float(name.rsplit("=", 1)[1]), 0.5, 0.5, 0.5, 0.5)
    (bench.cfg.out / "speed.json").write_text(json.dumps({"saes": {n: {"tokens_per_s": t} for n, t in rates.items()}}))
    for v, ce in (("seed000_hsae", 0.9), ("seed000_hsae_no_separation", 0.8)):
        _fake_core(bench, f"{v}-l0=24", 24, ce - 0.1, ce - 0.1, 0.5, 0.5)
        _fake_core(bench, f"{v}-l0=40", 40, ce, ce, 0.5, 0.5)
    rows = {r["claim"]: r for r in claims(bench)}
    over = rows["adaptive feature selection: computational overhead (train tok/s), adaptive vs standard"]
    w = math.log(32 / 24) / math.log(40 / 24)
    a, b = 9000 - 2000 * w, 12000 - 2000 * w
    assert over["matched"] == f"{a:,.0f} vs {b:,.0f}; overhead +{100 * (b / a - 1):.0f}%"  # time per token: 1/a vs 1/b
    # A speed.json of the older format (one SAE per variant, keyed by variant) gives no row rather than a wrong one.
    (bench.cfg.out / "speed.json").write_text(json.dumps({"variants": {"seed000_adaptive": {"tokens_per_s": 8000.0},
                                                                       "standard": {"tokens_per_s": 10000.0}}}))
    assert {r["claim"]: r for r in claims(bench)}[over["claim"]]["matched"] == "- vs -"
    sep = rows["ablation without the feature separation loss: sparsity kept, no unlearning gain (CE loss score at "
               "L0 32, base vs ablation)"]
    assert sep["matched"] == f"{0.8 + 0.1 * w:.3f} vs {0.7 + 0.1 * w:.3f}"
    single = rows["ablation single-scale temporal: sparsity kept, no unlearning gain (CE loss score at L0 32, base "
                  "vs ablation)"]
    assert single["matched"] == "- vs -"
