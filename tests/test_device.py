"""Device handling: host-to-device copies (pinned, non-blocking on CUDA) and the GPU readiness script."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saestrata.device import resolve_device, to_device

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_to_device_on_cpu_keeps_values_and_dtype():
    x = torch.randn(8, 4).to(torch.bfloat16)
    y = to_device(x, torch.device("cpu"))
    assert y.device.type == "cpu" and y.dtype == torch.bfloat16 and torch.equal(y, x)


@needs_cuda
def test_to_device_on_cuda_is_exact_and_usable_without_sync():
    x = torch.randn(1024, 640)
    y = to_device(x, torch.device("cuda"))
    assert y.device.type == "cuda" and torch.equal((y * 2).cpu(), x * 2)  # same-stream ops see the copy


@needs_cuda
def test_auto_device_is_cuda_when_there_is_one():
    assert resolve_device("auto").type == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the whole demo")
def test_gpu_check_without_cuda_says_so_and_exits_cleanly():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
