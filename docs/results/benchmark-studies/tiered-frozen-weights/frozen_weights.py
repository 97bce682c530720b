"""Study: seed003-tiered with its softmax tier weights frozen at the paper's initial 0.1 / 0.3 / 0.6.

The benchmark's seed003-tiered learns the weights (seed 003 eq. 3), which collapses tier 1's weight to
0.0002 at matched L0 (docs/results/benchmark_findings.md). This trains the same matched jobs (target L0
24 and 40, the benchmark's swept lr, budget, store, controller) with the logits frozen, then runs the
benchmark's core evaluation, in a separate out/work sharing the benchmark's store:

    python frozen_weights.py RESULTS_DIR BENCH_WORK
    (RESULTS_DIR: docs/results; BENCH_WORK: the benchmark's --work, holding store-train)
"""
import dataclasses
import functools
import json
import sys
from pathlib import Path

import saestrata.train.seed003_tiered as tiered
from saestrata.benchmark import Benchmark, BenchmarkConfig

_init = tiered.TieredHSAE.__init__


@functools.wraps(_init)  # keeps the signature the hparam checks read
def _frozen_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.tier_logits.requires_grad_(False)  # Adam skips a parameter without a gradient


tiered.TieredHSAE.__init__ = _frozen_init

results, bench_work = Path(sys.argv[1]), Path(sys.argv[2])
out = results / "benchmark-studies" / "tiered-frozen-weights"
work = bench_work / "study-tiered-frozen"
work.mkdir(parents=True, exist_ok=True)
if not (work / "store-train").exists():
    (work / "store-train").symlink_to((bench_work / "store-train").resolve())
b = Benchmark(BenchmarkConfig(out=out, work=work, variants=["seed003-tiered"], targets=(24.0, 40.0)))
lrs = {k: v for k, v in json.loads((results / "benchmark" / "lr_sweep.json").read_text())["archs"].items()}
jobs = [dataclasses.replace(j, name=j.name.replace("seed003-tiered", "seed003-tiered-frozen"))
        for j in b.matched_jobs(lrs)]
for job in jobs:
    b.train_job(job)
b.evaluate([j.name for j in jobs])
for job in jobs:
    core = json.loads(b.core_path(job.name).read_text())["eval_result_metrics"]
    print(job.name, "L0", round(core["sparsity"]["l0"], 1), "EV", round(core["reconstruction_quality"]["explained_variance"], 3),
          "CE", round(core["model_performance_preservation"]["ce_loss_score"], 3))
