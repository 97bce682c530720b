"""The compiled CPU top-k kernel (train/native.py, train/csrc/rowwise_topk.cpp) against torch's ops."""

import pytest
import torch

from saestrata.train import native
from saestrata.train.native import batch_topk_pairs, load_native, reference_topk_indices, rowwise_topk_indices


def test_the_kernel_builds_on_this_machine():
    """make test installs ninja and the machine has g++: the fast path must really run, not its fallback."""
    assert native.native_enabled(), "unset SAESTRATA_NATIVE=0 to test the kernel"
    assert load_native() is not None, f"the top-k kernel did not build: {native._failed}"


def test_a_hand_built_row_with_ties_keeps_the_lower_columns():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0, 4.0]])
    assert rowwise_topk_indices(x, 2).tolist() == [[1, 2], [0, 1]]
    assert rowwise_topk_indices(x, 4).tolist() == [[1, 2, 3, 4], [0, 1, 2, 3]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,k", [((257, 4096), 32), ((64, 1000), 7), ((33, 100), 7), ((9, 50), 50),
                                     ((9, 50), 1), ((5, 16 * 32 + 3), 32)])
def test_kernel_equals_a_stable_sort_and_torch_topk(dtype, shape, k):
    """Both block-bound paths (n >= 16 k and below) and edge k; bf16 rows have many ties."""
    torch.manual_seed(0)
    x = (torch.randn(*shape) * torch.rand(shape[1]) * 4).to(dtype)  # columns of different scales, as latents
    got = rowwise_topk_indices(x, k)
    assert got.dtype == torch.long and got.shape == (shape[0], k)
    assert torch.equal(got, reference_topk_indices(x, k))
    assert torch.equal(got, got.sort(dim=-1).values)  # ascending per row
    want = x.topk(k, dim=-1).values.float().sort(dim=-1).values  # torch's own top-k values
    assert torch.equal(x.gather(-1, got).float().sort(dim=-1).values, want)


def test_heavy_ties_non_contiguous_and_batched_leading_dims():
    torch.manual_seed(1)
    x = torch.randint(0, 4, (40, 600)).float()
    assert torch.equal(rowwise_topk_indices(x, 40), reference_topk_indices(x, 40))
    xt = torch.randn(700, 48).t()  # a non-contiguous [48, 700] view
    assert torch.equal(rowwise_topk_indices(xt, 24), reference_topk_indices(xt.contiguous(), 24))
    x3 = torch.randn(2, 3, 800)
    assert torch.equal(rowwise_topk_indices(x3, 5), reference_topk_indices(x3.reshape(6, 800), 5).reshape(2, 3, 5))


def test_the_fallback_gives_the_kernels_result(monkeypatch):
    torch.manual_seed(2)
    x = torch.randn(100, 2048).bfloat16()
    fast = rowwise_topk_indices(x, 16)
    monkeypatch.setenv("SAESTRATA_NATIVE", "0")
    monkeypatch.setattr(native, "_module", None)
    assert torch.equal(rowwise_topk_indices(x, 16), fast)


def test_bad_k_is_one_clear_error():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        rowwise_topk_indices(torch.randn(3, 10), 11)


@pytest.mark.parametrize("shape", [(4096, 640), (33, 17), (5, 3)])
def test_remove_parallel_grad_matches_torchs_expression(shape):
    """The kernel's projection against the plain formula, and what it is for: <grad[r], w[r]> = 0 after."""
    from saestrata.train.native import remove_parallel_grad_

    torch.manual_seed(3)
    w = torch.nn.functional.normalize(torch.randn(*shape), dim=-1)
    g = torch.randn(*shape) * 3
    want = g - (g * w).sum(-1, keepdim=True) * w
    got = g.clone()
    remove_parallel_grad_(got, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got * w).sum(-1).abs().max() < 1e-4
    t = g.t().contiguous().t()  # non-contiguous: the torch fallback
    remove_parallel_grad_(t, w)
    torch.testing.assert_close(t, want, rtol=1e-5, atol=1e-5)


def test_nan_rows_stay_in_bounds_and_k_large_against_n():
    """NaN (rejected upstream) must not crash the kernel; k near n takes the no-bound path."""
    x = torch.randn(8, 300)
    x[0, :295] = float("nan")  # fewer than k numbers in the row
    x[1, ::2] = float("nan")
    got = rowwise_topk_indices(x, 10)
    assert got.min() >= 0 and got.max() < 300
    assert set(got[0].tolist()) >= set(range(295, 300))  # the five numbers outrank the NaNs
    keep = ~x[1].isnan()
    assert set(got[1].tolist()) == set(torch.where(keep)[0][x[1][keep].topk(10).indices].tolist())
    y = torch.randn(6, 2048)
    assert torch.equal(rowwise_topk_indices(y, 80), reference_topk_indices(y, 80))  # span 6 (k 80)
    assert torch.equal(rowwise_topk_indices(y, 600), reference_topk_indices(y, 600))  # no bound (n < 8 k)


def test_sampled_dot_kernel_equals_sampled_addmm():
    """The decoder backward's dot products: compiled kernel vs torch's sparse sampled_addmm."""
    import warnings

    from saestrata.train.kernels import ActiveSet, sampled_dot

    torch.manual_seed(4)
    rows = torch.arange(50).repeat_interleave(6)
    cols = torch.randint(0, 300, (50, 6)).sort(-1).values.flatten()
    keep = torch.ones_like(cols, dtype=torch.bool)
    keep[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])  # unique pairs
    act = ActiveSet(rows[keep], cols[keep], 50, 300)
    g, w = torch.randn(50, 37), torch.randn(300, 37)
    got = sampled_dot(g, w, act)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mask = torch.sparse_csr_tensor(act.bag_crow, act.cols, g.new_zeros(len(act)), (50, 300))
        want = torch.sparse.sampled_addmm(mask, g, w.t()).values()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, (g[act.bags] * w[act.cols]).sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mm_dtype", [torch.float32, torch.bfloat16])
def test_fused_topk_forward_backward_equal_dense_autograd(mm_dtype):
    """train/fused.py: selection on mm + b_enc formed in fp32, ReLU'd-away winners, ties, all gradients."""
    from saestrata.train.fused import fused_topk

    torch.manual_seed(3)
    B, D, L, k = 37, 131, 300, 9  # D not a multiple of the kernels' 64/128-float blocks: tails run too
    sae = torch.nn.Module()
    sae.W_enc = torch.nn.Parameter(torch.randn(D, L) / D ** 0.5)
    sae.b_enc = torch.nn.Parameter(torch.randn(L) * 0.3 - 1.5)
    sae.W_dec = torch.nn.Parameter(torch.randn(L, D))
    sae.b_dec = torch.nn.Parameter(torch.randn(D) * 0.2)
    with torch.no_grad():
        sae.W_enc[:, 10] = sae.W_enc[:, 11]  # exact ties between two latents
        sae.b_enc[10] = sae.b_enc[11]
    x = torch.randn(B, D)
    x[:6] *= 0.05  # rows whose pre-activations are about b_enc: some winners are <= 0
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mm_dtype == torch.bfloat16):
        mse, aux, x_hat, idx, val, mm = fused_topk(x, sae, k)
    assert float(aux.detach()) == 0  # no AuxK pairs given
    assert mm.dtype == mm_dtype and not x_hat.requires_grad
    params = [x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    grads = torch.autograd.grad(mse * 3.0, params)  # a non-unit upstream gradient reaches every parameter

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mm_dtype == torch.bfloat16):
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # the dense path's pre (fp32 after the bias)
    want_idx = reference_topk_indices(pre.detach(), k)
    assert torch.equal(idx, want_idx)
    assert (val <= 0).any() and (val > 0).any()
    torch.testing.assert_close(val, pre.detach().gather(1, want_idx), rtol=0, atol=0)
    f = torch.zeros_like(pre).scatter(1, want_idx, torch.relu(pre.gather(1, want_idx))).float()
    torch.testing.assert_close(x_hat, f @ sae.W_dec + sae.b_dec, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mse, (x_hat - x).pow(2).sum(-1).mean(), rtol=1e-6, atol=1e-6)
    # Gradients: the sparse kernels' maths, fp32 throughout (under autocast the dense path's backward
    # runs its matmuls in bf16): the forward's values, differentiated as fp32 pre-activations.
    sel = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).gather(1, want_idx)
    f32 = torch.zeros(B, L).scatter(1, want_idx, (val + sel - sel.detach()) * (val > 0))
    ref_grads = torch.autograd.grad(3.0 * ((f32 @ sae.W_dec + sae.b_dec) - x).pow(2).sum(-1).mean(), params)
    for name, got, want in zip(["x", "W_enc", "b_enc", "W_dec", "b_dec"], grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)


def test_normalize_rows_matches_torchs_expression_and_guards_zero_rows():
    from saestrata.train.native import normalize_rows_

    torch.manual_seed(5)
    w = torch.randn(300, 131) * torch.rand(300, 1) * 5
    w[7] = 0  # a zero row stays zero (eps), as with torch's clamp_min
    want = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    normalize_rows_(w)
    torch.testing.assert_close(w, want, rtol=1e-6, atol=1e-7)
    assert float(w[7].abs().max()) == 0 and torch.allclose(w[8].norm(), torch.tensor(1.0))


def _batch_reference(mm: torch.Tensor, b_enc: torch.Tensor, n: int):
    """BatchTopK's pairs by a stable descending sort of the flattened fp32 ``pre`` (ties: lowest flat index
    first, the kernel's rule), positive ones only, in row then column order."""
    pre = (mm + b_enc).flatten()  # torch's type promotion: bf16 + fp32 -> fp32, as the dense path forms it
    order = torch.sort(torch.nan_to_num(pre, nan=-float("inf")), descending=True, stable=True).indices[:n]
    order = order[pre[order] > 0].sort().values
    L = mm.shape[1]
    return order // L, order % L, pre[order]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,k", [((1024, 4096), 32), ((257, 2048), 32), ((64, 1000), 7), ((33, 100), 7),
                                     ((9, 50), 50), ((5, 16 * 32 + 3), 3)])
def test_batch_topk_pairs_equal_a_stable_sort_of_the_whole_batch(dtype, shape, k):
    """train/batchtopk.py's compiled selection: exactly the k * B largest positive entries of mm + b_enc (bf16
    mm has many ties at the cut, which the kernel breaks by lowest (row, column)); k = L keeps every positive."""
    torch.manual_seed(3)
    mm = (torch.randn(*shape) * torch.rand(shape[1]) * 4).to(dtype)
    b_enc = torch.randn(shape[1]) * 0.5
    n = min(k * shape[0], mm.numel())
    rows, cols, vals = batch_topk_pairs(mm, b_enc, n)
    want_rows, want_cols, want_vals = _batch_reference(mm, b_enc, n)
    assert rows.dtype == cols.dtype == torch.long and vals.dtype == torch.float32
    assert torch.equal(rows, want_rows) and torch.equal(cols, want_cols) and torch.equal(vals, want_vals)
    assert 0 < len(vals) <= n and bool((vals > 0).all())


def test_batch_topk_pairs_with_heavy_ties_few_positives_and_nan():
    torch.manual_seed(4)
    mm = torch.randint(-3, 3, (40, 600)).float()  # integer values: whole blocks of ties at the cut
    zero = torch.zeros(600)
    for n in (1, 37, 5000, 40 * 600):
        got = batch_topk_pairs(mm, zero, n)
        for a, b in zip(got, _batch_reference(mm, zero, n)):
            assert torch.equal(a, b), n
    rows, _, _ = batch_topk_pairs(-mm.abs() - 1, zero, 100)  # nothing positive: no pair
    assert rows.numel() == 0
    nan = torch.randn(16, 256)
    nan[::3, ::5] = float("nan")
    rows, cols, vals = batch_topk_pairs(nan, zero[:256], 16 * 8)
    assert not bool(nan[rows, cols].isnan().any()) and len(vals) == 16 * 8
    with pytest.raises(RuntimeError, match="n must be in"):
        batch_topk_pairs(mm, zero, 0)


def _auxk_reference(mm, b_enc, dead, k_aux):
    """The dense path's AuxK pairs: non-zeros of ReLU(top-k_aux of pre masked to the dead columns), ties to the
    lower column (reference_topk_indices), in row then column order."""
    pre = mm.float() + b_enc
    mask = torch.zeros(mm.shape[1], dtype=torch.bool)
    mask[dead] = True
    masked = torch.where(mask, pre, torch.full_like(pre, -torch.inf))
    idx = reference_topk_indices(masked, k_aux)
    vals = masked.gather(1, idx)
    keep = vals > 0
    crow = torch.cat([torch.zeros(1, dtype=torch.long), keep.sum(1).cumsum(0)])
    return crow, idx[keep], vals[keep]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,n_dead,k_aux,shift", [((1024, 4096), 300, 320, -2.0), ((1024, 4096), 900, 320, -1.0),
                                                      ((64, 1000), 200, 7, 0.0), ((33, 100), 1, 1, 0.0)])
def test_auxk_pairs_equal_topk_relu_on_the_dead_columns(dtype, shape, n_dead, k_aux, shift):
    """train/topk.py AuxK's compiled selection (native.auxk_pairs): the pairs the dense path's -inf mask, top-k_aux
    and ReLU leave, from the bias-free matmul; rows with more positives than k_aux (shift 0) and with few (shift < 0)."""
    torch.manual_seed(5)
    mm = (torch.randn(*shape) * 2).to(dtype)
    b_enc = torch.randn(shape[1]) * 0.5 + shift
    dead = torch.randperm(shape[1])[:n_dead].sort().values
    k_aux = min(k_aux, n_dead)
    got = native.auxk_pairs(mm, b_enc, dead, k_aux)
    want = _auxk_reference(mm, b_enc, dead, k_aux)
    assert got[0].dtype == got[1].dtype == torch.long and got[2].dtype == torch.float32
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert 0 < len(got[1]) and bool((got[2] > 0).all())


def test_auxk_pairs_with_ties_no_positives_and_bad_input():
    torch.manual_seed(6)
    mm = torch.randint(-2, 3, (40, 600)).float()  # integer values: ties at every row's k_aux-th
    zero = torch.zeros(600)
    dead = torch.arange(0, 600, 3)
    for k_aux in (1, 3, 50, 200):
        for a, b in zip(native.auxk_pairs(mm, zero, dead, k_aux), _auxk_reference(mm, zero, dead, k_aux)):
            assert torch.equal(a, b), k_aux
    crow, cols, vals = native.auxk_pairs(-mm.abs() - 1, zero, dead, 5)  # nothing positive: no pair
    assert cols.numel() == 0 and torch.equal(crow, torch.zeros(41, dtype=torch.long))
    with pytest.raises(RuntimeError, match="k_aux must be in"):
        native.auxk_pairs(mm, zero, dead, 0)
    with pytest.raises(RuntimeError, match="ascending"):
        native.auxk_pairs(mm, zero, dead.flip(0), 3)
