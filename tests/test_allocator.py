"""tune_allocator: freed large buffers are reused instead of re-faulted (allocator.py)."""

import subprocess
import sys

import pytest

# The tuned heap still grows now and then in its first steps (one-off faults in multiples of 4096 pages:
# 0-17,409 over steps 4-23 in five runs on 2026-12-03, once only 8.9x below the default's 155,666), so the
# steady state is measured after 10 warm-up steps, over 40 steps.
WARMUP, STEPS = 10, 40
PROBE = f"""
WARMUP, STEPS = {WARMUP}, {STEPS}
import resource, sys, torch
from saestrata.allocator import tune_allocator
applied = tune_allocator() if sys.argv[1] == "tuned" else None
x = torch.randn(1024, 640)
w = torch.randn(640, 4096)
def step():  # the allocation pattern of an SAE step: several fresh [1024, 4096] temporaries
    pre = x @ w
    mask = (pre > 0).sum(-1)
    return float(pre.relu().mean() + mask.float().mean())
for _ in range(WARMUP):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(STEPS):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_allocator_stops_refaulting_large_buffers():
    applied, tuned = _faults("tuned")
    _, default = _faults("default")
    assert applied == "True"
    # Each step frees and re-allocates ~56 MiB; with glibc's defaults that is ~7-14k faults a step.
    assert default > STEPS * 2000, default
    assert tuned * 10 < default, (tuned, default)


def test_opt_out(monkeypatch):
    from saestrata.allocator import tune_allocator

    monkeypatch.setenv("SAESTRATA_MALLOC", "system")
    assert tune_allocator() is False
