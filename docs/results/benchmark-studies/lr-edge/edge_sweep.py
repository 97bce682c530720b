"""Study: archs whose swept lr sat at the sweep's upper edge (x32): extend to x64, x128 ... (while the tail
FVU still falls) with the benchmark's own sweep job (same tokens, target, clip, plain Adam), in a separate
out/work that shares the benchmark's store.

    python edge_sweep.py RESULTS_DIR BENCH_WORK [variant ...]
    (RESULTS_DIR: docs/results; BENCH_WORK: the benchmark's --work, holding store-train)
"""
import json, sys, math
from pathlib import Path
from saestrata.benchmark import Benchmark, BenchmarkConfig, tail_metrics, _read_log

results, bench_work = Path(sys.argv[1]), Path(sys.argv[2])
out = results / "benchmark-studies" / "lr-edge"
work = bench_work / "study-lr-edge"
work.mkdir(parents=True, exist_ok=True)
if not (work / "store-train").exists():
    (work / "store-train").symlink_to((bench_work / "store-train").resolve())
variants = sys.argv[3:] or ["standard", "seed000_adaptive", "seed004-groups"]
b = Benchmark(BenchmarkConfig(out=out, work=work, variants=variants))
sweep = json.loads((results / "benchmark" / "lr_sweep.json").read_text())["archs"]
res = {}
for v in variants:
    arch = b._arch_of(v)
    runs = {r["sae"].rsplit("-x", 1)[1]: r for r in sweep[arch]["runs"]}
    mult, last = 64.0, runs["32"]["fvu"]
    res[v] = {"arch": arch, "benchmark_runs": sweep[arch]["runs"], "extended": []}
    while mult <= 256:
        job = b._sweep_job(v, mult)
        b.train_job(job)
        tail = tail_metrics(_read_log(b.cfg.out / "saes" / job.name))
        res[v]["extended"].append({"sae": job.name, "mult": mult, "lr": job.lr, **tail})
        print(v, mult, tail, flush=True)
        if not (math.isfinite(tail["fvu"]) and tail["fvu"] < last):
            break
        last, mult = tail["fvu"], mult * 2
    (out / "lr_edge.json").write_text(json.dumps({"code": b.code, "results": res}, indent=1))
