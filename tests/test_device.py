"""Device handling: host-to-device copies (pinned, non-blocking on CUDA) and the GPU readiness script."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saestrata.device import fast_dtype, native_bf16, resolve_device, to_device

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


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists(),
                    reason="reads x86 CPU flags from /proc/cpuinfo")
def test_native_bf16_on_cpu_agrees_with_the_kernels_cpu_flags():
    """torch's cpuinfo checks against the kernel's own list: AVX-512 BF16 or AMX means native bf16."""
    flags = _cpu_flags()
    assert native_bf16(torch.device("cpu")) == bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})


def test_native_bf16_asks_the_named_gpu_not_the_current_one(monkeypatch):
    """On a host with a Turing GPU 0 and an Ampere GPU 1, ``--device cuda:1`` has native bf16 and ``cuda:0``
    has not, whichever GPU is current (GPU properties simulated: no CUDA here)."""
    from types import SimpleNamespace

    majors = {0: 7, 1: 8}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(major=majors[torch.device(d).index or 0]))
    monkeypatch.setattr(torch.version, "hip", None)
    assert native_bf16(torch.device("cuda:1")) is True
    assert native_bf16(torch.device("cuda:0")) is False


def test_fast_dtype_swaps_only_emulated_bfloat16(monkeypatch):
    import saestrata.device as device_mod

    cpu = torch.device("cpu")
    monkeypatch.setattr(device_mod, "native_bf16", lambda device: False)
    assert [fast_dtype(d, cpu) for d in ("bfloat16", "float32", "float16")] == ["float32", "float32", "float16"]
    monkeypatch.setattr(device_mod, "native_bf16", lambda device: True)
    assert [fast_dtype(d, cpu) for d in ("bfloat16", "float32", "float16")] == ["bfloat16", "float32", "float16"]
    assert native_bf16(torch.device("meta")) is False


def test_auto_model_dtype_is_the_fast_one(tiny_model_dir, monkeypatch):
    import saestrata.device as device_mod
    from saestrata.harvest.model import load_model

    for flag, want in ((False, "float32"), (True, "bfloat16")):
        monkeypatch.setattr(device_mod, "native_bf16", lambda device, flag=flag: flag)
        assert load_model(str(tiny_model_dir), "cpu", "auto").dtype == want
