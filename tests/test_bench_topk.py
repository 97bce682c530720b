"""bench/topk_profile.py and bench/topk_auxk.py run for every TopK-family arch on the tiny store.

Their timings are for an idle machine (docs/results/bench/README.md); here only that each script runs
its arch's real trainer step end to end and prints its ratio line, so that a change of a shared
helper (e.g. ``topk_profile._slot``, which topk_auxk.py imports) cannot silently break one of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saestrata.benchmark_speed import cpu_model

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("arch,dtype", [("topk", "bf16"), ("batchtopk", "bf16"), ("matryoshka", "bf16"),
                                        ("topk", "fp32")])
def test_topk_profile_runs_each_arch(tiny_store, arch, dtype):
    out = _run("topk_profile.py", "--store", str(tiny_store), "--layer", "2", "--arch", arch, "--d-sae", "64",
               "--k", "4", "--batch-size", "64", "--steps", "3", "--dtype", dtype)
    autocast = "bf16 autocast" if dtype == "bf16" else "fp32"
    assert f"{arch} SAE d_in" in out and f"step / one {dtype} encoder matmul, 8 alternating rounds: median " in out
    assert f"kernels, {autocast};" in out
    # Ratios against a bf16 matmul differ ~4x between an EPYC and an AMX Xeon: every output names its machine.
    assert out.splitlines()[0].startswith(f"machine: {cpu_model()}; torch {torch.__version__}, ")
    assert ("own selection" in out) == (arch != "topk")


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_topk_auxk_runs_until_latents_die(tiny_store, arch):
    out = _run("topk_auxk.py", "--store", str(tiny_store), "--layer", "2", "--arch", arch, "--d-sae", "256",
               "--k", "2", "--batch-size", "64", "--steps", "40", "--timed", "5", "--dead-window", "64",
               "--profile", "2")
    assert f"{arch} d_in" in out and "AuxK acting" in out, out
    assert "profile of 2 steps" in out and "Self CPU" in out


def test_relu_sparse_and_sparse_gram_run_on_their_shared_setup(tiny_store):
    """bench/relu_sparse.py and bench/sparse_gram.py share ``relu_sparse.warmed_slot`` (store batches, the trainer's
    slot, its untimed steps): both run end to end and print their ratio lines and counters."""
    common = ["--store", str(tiny_store), "--layer", "2", "--d-sae", "64", "--batch-size", "64", "--warm-steps", "2",
              "--steps", "2", "--rounds", "1"]
    out = _run("relu_sparse.py", *common, "--arch", "standard")
    assert out.splitlines()[0].startswith("machine: ") and "median step: dense" in out and "on the pairs" in out
    out = _run("sparse_gram.py", *common, "--arch", "seed001_static_hier")
    assert out.splitlines()[0].startswith("machine: ") and "median step: dense Gram" in out
    assert "Grams from the non-zeros in 2 steps" in out
