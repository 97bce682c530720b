"""Compiled CPU kernels (issue 14), built once on first use with torch's C++ extension loader.

:func:`rowwise_topk_indices`, the per-row top-k that the TopK SAE's encoder needs every step,
where torch's CPU ``topk`` cost about half an encoder matmul (docs/results/bench/README.md),
:func:`batch_topk_pairs`, BatchTopK's (and Matryoshka's) batch-wide selection from the encoder matmul,
:func:`auxk_pairs`, AuxK's positive pairs among the dead latents, and
:func:`remove_parallel_grad_`, the decoder-gradient projection every unit-norm-decoder SAE runs
each step (one pass instead of torch's three temporaries), and :func:`normalize_rows_`, the decoder
renormalisation after each step; :func:`adam_unit_rows_` fuses those two with the Adam step and the clip
factor, and :func:`projected_sq_norm` gives the clip its norm (both for :class:`~.optim.Adam`'s ``unit_rows``).
:mod:`.kernels` also calls the module's ``sampled_dot`` (the sparse
decoder backward's dot products) and :mod:`.fused` the whole TopK training forward / backward
(``topk_fused_forward`` / ``topk_fused_backward``, AuxK's ``auxk_forward`` / ``auxk_backward_``) and :mod:`saestrata.evaluate.branch` the LM head's
per-block softmax / KL statistics (``head_block_stats``) through :func:`load_native`. The source is
``csrc/native.cpp``; the build (~1 min, g++ and ninja) lands in torch's extension cache
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) and is reused by later processes.

Where the kernel cannot run (a CUDA tensor, another dtype, ``SAESTRATA_NATIVE=0``, or no
compiler: one warning then) the same indices come from torch: a stable descending sort, whose
tie rule is the kernel's (of equal values the lower column wins), so results do not depend on
whether the kernel was built. On CUDA, where torch's ``topk`` is fast, :func:`rowwise_topk_indices`
uses ``topk`` itself and ties follow torch's rule there.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("csrc") / "native.cpp"
# -fopenmp: at::parallel_for is OpenMP in torch's CPU builds and runs serially without it.
# -march=native: the build is for this machine's vector units (its name includes the CPU's flags).
# -fno-math-errno: std::sqrt vectorizes (the fused Adam step's inner loop); nothing reads errno.
_CFLAGS = ["-O3", "-fopenmp", "-march=native", "-fno-math-errno"]
_lock = threading.Lock()
_module = None
_failed: str | None = None


def native_enabled() -> bool:
    """False when ``SAESTRATA_NATIVE=0`` asks for the torch fallbacks."""
    return os.environ.get("SAESTRATA_NATIVE", "1") != "0"


def load_native():
    """The compiled extension module, building it on first call; None where it cannot be built.

    A failed build warns once (``RuntimeWarning``, with the compiler's first error line) and later
    calls return None at once.
    """
    global _module, _failed
    if _module is not None or _failed is not None or not native_enabled():
        return _module
    with _lock:
        if _module is None and _failed is None:
            from torch.utils.cpp_extension import load

            # A new source, new flags or another CPU (a shared home on a cluster) build anew.
            key = _SOURCE.read_bytes() + " ".join(_CFLAGS).encode() + _cpu_flags().encode()
            name = "saestrata_native_" + hashlib.sha256(key).hexdigest()[:12]
            if not _cached(name):
                print("saestrata: building the CPU kernels (once per machine, ~1 min)...", file=sys.stderr)
            try:
                _module = load(name, [str(_SOURCE)], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as err:  # no compiler / ninja, or a build error: keep training, on torch's ops
                _failed = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                warnings.warn(f"saestrata: CPU kernels not built ({_failed}); using torch's ops "
                              "(same results, slower). Install g++ and ninja to build it.", RuntimeWarning,
                              stacklevel=2)
    return _module


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; '' elsewhere), part of the build's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _cached(name: str) -> bool:
    """True when a build of extension ``name`` is in torch's extension cache (no message then)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private: a message is all it decides

        return any(Path(_get_build_directory(name, verbose=False)).glob(f"{name}*.so"))
    except Exception:
        return False


def rowwise_topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the ``k`` largest entries of each row of ``x``: long ``[..., k]``.

    ``x`` is ``[..., n]`` (rows = the leading dims), any float dtype, ``1 <= k <= n`` (no gradient flows through indices;
    take values with ``x.gather(-1, idx)``). Ties: of equal values the lower column wins, and each
    row's indices are in ascending order, on the kernel and on its CPU fallback alike (on CUDA,
    torch's ``topk`` order and tie rule). NaN ranks lowest on the kernel, highest on the fallback
    (callers reject NaN activations before this).

    Raises:
        ValueError: ``x`` has no dimension or ``k`` is out of range.
    """
    if x.dim() == 0 or not 1 <= k <= x.shape[-1]:
        raise ValueError(f"rowwise_topk_indices: need 1 <= k <= n for x [..., n], got shape {tuple(x.shape)} "
                         f"and k={k}")
    x = x.detach()
    if x.device.type != "cpu":
        return x.topk(k, dim=-1, sorted=False).indices
    rows = x.reshape(-1, x.shape[-1])
    if x.dtype in (torch.float32, torch.bfloat16) and (mod := load_native()) is not None:
        with torch.profiler.record_function("saestrata::rowwise_topk"):  # named in bench/topk_profile.py
            idx = mod.rowwise_topk(rows, k)[1]
    else:
        idx = reference_topk_indices(rows, k)
    return idx.reshape(*x.shape[:-1], k)


def batch_topk_pairs(mm: torch.Tensor, b_enc: torch.Tensor, n: int):
    """BatchTopK's selection (Bussmann et al. 2024, sec. 3) straight from the encoder matmul, compiled.

    ``mm`` ``[B, L]`` fp32 or bf16 on CPU, the encoder matmul without its bias; ``b_enc`` fp32 ``[L]``;
    ``n`` in ``[1, B * L]`` (``k * B``). Returns ``(rows, cols, values)``: long, long, fp32 ``[N]`` in row then
    column order, the ``N = min(n, #positive)`` largest entries of ``pre = mm + b_enc`` that are > 0 (the sum
    formed in fp32 as torch's type promotion forms the dense path's ``pre``, which is never materialised),
    i.e. the non-zeros of :func:`.batchtopk.batch_topk_relu`; of entries tied with the n-th largest the lowest
    (row, column) win. None where the compiled module is not built or ``mm`` is not on CPU (callers then
    form ``pre`` and use :func:`.batchtopk.top_n`).

    Raises:
        RuntimeError: from the module on a wrong shape, dtype or ``n``.
    """
    if mm.device.type != "cpu" or (mod := load_native()) is None:
        return None
    with torch.profiler.record_function("saestrata::batch_topk_select"):  # named in bench/topk_profile.py
        return tuple(mod.batch_topk_select(mm, b_enc, n))


def auxk_pairs(mm: torch.Tensor, b_enc: torch.Tensor, dead: torch.Tensor, k_aux: int):
    """AuxK's pairs (Gao et al. 2024, app. A.2) straight from the encoder matmul, compiled.

    ``mm`` ``[B, L]`` fp32 or bf16 on CPU, the encoder matmul without its bias; ``b_enc`` fp32 ``[L]``; ``dead``
    long ``[n_dead]``, the dead latents, ascending; ``1 <= k_aux <= n_dead``. Returns ``(crow, cols, vals)``:
    long ``[B + 1]`` row offsets, long ``[N]``, fp32 ``[N]``: per row, of ``pre = mm + b_enc`` on the dead columns
    (the sum in fp32, as torch's type promotion forms it) the ``k_aux`` largest that are > 0, in ascending column
    order, i.e. the non-zeros of ``topk_relu(where(dead, pre, -inf), k_aux)`` (of entries tied with the
    ``k_aux``-th the lower columns win). None where the compiled module is not built or ``mm`` is not a CPU
    fp32 / bf16 tensor (callers then gather the dead columns and use torch's ``topk``).

    Raises:
        RuntimeError: from the module on a wrong shape or dtype, ``k_aux`` out of range or unsorted ``dead``.
    """
    if mm.device.type != "cpu" or mm.dtype not in (torch.float32, torch.bfloat16) or (mod := load_native()) is None:
        return None
    with torch.profiler.record_function("saestrata::auxk_select"):  # named in bench/topk_profile.py
        return tuple(mod.auxk_select(mm, b_enc, dead, k_aux))


def reference_topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """The kernel's result from torch ops (``[rows, k]`` long, ascending per row): a stable
    descending sort keeps the lower column first among equal values. O(n log n) per row."""
    idx = torch.sort(x.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    return idx.sort(dim=-1).values


def remove_parallel_grad_(grad: torch.Tensor, w: torch.Tensor) -> None:
    """In place, ``grad[r] -= <grad[r], w[r]> w[r]`` for every row ``r`` of ``[d_sae, d_in]`` tensors.

    The projection that keeps Adam's decoder update tangent to the unit sphere (Bricken et al. 2023,
    "Towards Monosemanticity", training details; :meth:`~saestrata.train.base.SAE.remove_parallel_grad`).
    On the kernel for contiguous fp32 CPU tensors, else torch's expression (same maths; the kernel
    sums each dot product in 16 partial sums, so results differ in the last bits).
    """
    if (grad.device.type == "cpu" and grad.dtype == w.dtype == torch.float32 and grad.dim() == 2
            and grad.shape == w.shape and grad.is_contiguous() and w.is_contiguous()
            and (mod := load_native()) is not None):
        with torch.profiler.record_function("saestrata::remove_parallel"):  # named in bench/topk_profile.py
            mod.remove_parallel_(grad, w.detach())
    else:
        grad -= (grad * w).sum(-1, keepdim=True) * w


def normalize_rows_(w: torch.Tensor, eps: float = 1e-8) -> None:
    """In place, ``w[r] /= max(||w[r]||_2, eps)`` for every row of a 2-D tensor (unit-norm decoder rows).

    The renormalisation unit-norm-decoder SAEs run after every optimiser step
    (:meth:`~saestrata.train.base.SAE.normalize_decoder`; Bricken et al. 2023). On the kernel for
    contiguous fp32 CPU tensors (one pass), else torch's expression (same maths; the kernel sums
    each norm in its own order, so results differ in the last bits).
    """
    if (w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2 and w.is_contiguous()
            and (mod := load_native()) is not None):
        with torch.profiler.record_function("saestrata::normalize_rows"):  # named in bench/topk_profile.py
            mod.normalize_rows_(w.detach(), eps)
    else:
        w /= w.norm(dim=-1, keepdim=True).clamp_min(eps)


def projected_sq_norm(grad: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """``sum_r ||grad[r] - <grad[r], w[r]> w[r]||^2`` (fp64 0-dim), the squared norm of the gradient
    :func:`remove_parallel_grad_` would leave, without writing it; None where the kernel cannot run.

    Rows are summed in row order, so the value does not depend on the thread count.
    """
    if not unit_rows_ready(w, grad):
        return None
    with torch.profiler.record_function("saestrata::projected_norms"):  # named in bench/topk_profile.py
        return load_native().projected_row_sq_norms(grad, w.detach()).sum()


def adam_unit_rows_(w: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                    step_size: float, bc2_sqrt: float, beta1: float, beta2: float, eps: float, grad_scale: float,
                    norm_eps: float = 1e-8) -> bool:
    """One Adam step on unit-norm rows, fused with the projection before it and the renormalisation after.

    Per row ``r`` of ``[rows, d]`` fp32 tensors: ``g = (grad[r] - <grad[r], w[r]> w[r]) * grad_scale``
    (:func:`remove_parallel_grad_`, then the gradient clip's factor); torch's Adam update of ``exp_avg``,
    ``exp_avg_sq`` and ``w[r]`` with ``step_size = lr / (1 - beta1^t)`` and ``bc2_sqrt = sqrt(1 - beta2^t)``
    (Kingma & Ba 2015, Alg. 1, as ``torch.optim.Adam`` computes it); then ``w[r] /= max(||w[r]||, norm_eps)``
    (:func:`normalize_rows_`). ``grad`` is read, never written. Returns False (nothing done) where the kernel
    cannot run (not CPU / fp32 / contiguous, or no compiled module); the caller then takes the unfused path.
    """
    if not (unit_rows_ready(w, grad) and unit_rows_ready(w, exp_avg) and unit_rows_ready(w, exp_avg_sq)):
        return False
    with torch.profiler.record_function("saestrata::adam_unit_rows"):  # named in bench/topk_profile.py
        load_native().adam_unit_rows_(w.detach(), grad, exp_avg, exp_avg_sq, step_size, bc2_sqrt, beta1, beta2,
                                      eps, grad_scale, norm_eps)
    return True


def unit_rows_ready(w: torch.Tensor, other: torch.Tensor) -> bool:
    """True when the unit-row kernels can take ``w`` and ``other``: contiguous fp32 CPU ``[rows, d]`` of one shape."""
    return (w.device.type == other.device.type == "cpu" and w.dtype == other.dtype == torch.float32 and w.dim() == 2
            and w.shape == other.shape and w.is_contiguous() and other.is_contiguous() and load_native() is not None)

