"""Study: a variant whose lr sweep stopped at its last extension (x32, flagged "(edge)") run once more at x64.

The benchmark's own sweep run at 64x the default rate, calibrated as the sweep calibrates every rate
(``Benchmark._calibrated_sweep_run``: a penalty arch first from its own coefficient, then from the
multiplier that run needed), scored by the sweep's rule (FVU x (L0/32)^0.5 over the last 10% of steps,
L0 within 25% of 32), written beside the x32 run that won, into ``lr_edge_x64.json``. Results and SAE
logs go to this folder's ``saes/``; the work folder shares the benchmark's store.

    python docs/results/benchmark-studies/lr-edge/edge_x64.py RESULTS_DIR BENCH_WORK VARIANT [...]
    (RESULTS_DIR: docs/results; BENCH_WORK: the benchmark's --work, holding store-train)

Resumable: finished runs are skipped (their logs are in ``saes/``).
"""

import json
import sys
from pathlib import Path

from saestrata.benchmark import Benchmark, BenchmarkConfig, _choose

results, bench_work = Path(sys.argv[1]), Path(sys.argv[2])
out = results / "benchmark-studies" / "lr-edge"
work = bench_work / "study-lr-edge"
work.mkdir(parents=True, exist_ok=True)
if not (work / "store-train").exists():
    (work / "store-train").symlink_to((bench_work / "store-train").resolve())
variants = sys.argv[3:]
bench = Benchmark(BenchmarkConfig(out=out, work=work, variants=variants))
sweep = json.loads((results / "benchmark" / "lr_sweep.json").read_text())["variants"]
path = out / "lr_edge_x64.json"
res = json.loads(path.read_text()) if path.exists() else {}
for v in variants:
    while True:
        jobs, run = bench._calibrated_sweep_run(v, 64.0)
        if run is not None:
            break
        for job in jobs:
            bench.train_job(job, need_weights=False)
    chosen = sweep[v]
    won = next(r for r in chosen["runs"] if r["sae"] == chosen["sae"])
    rule = _choose([won, run])
    res[v] = {"x32_chosen_by_the_sweep": won, "x64": run, "x64_jobs": [j.name for j in jobs],
              "better_by_the_sweep_rule": rule["best"]["sae"], "rule": rule.get("rule"), "code": bench.code}
    print(v, "x32", won["fvu"], won["l0"], "x64", run["fvu"], run["l0"], "->", rule["best"]["sae"], flush=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
