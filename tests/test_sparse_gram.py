"""The co-activation Gram from a code's non-zeros (train/sparse_gram.py): equal to the dense ``f^T f`` in value and
gradient, the dense fallback past its pair budget, and the seed 000 / 001 archs that use it equal to their dense
step, with the counter that says which path ran."""

from __future__ import annotations

import pytest
import torch

import saestrata.train.sparse_gram as sparse_gram
from saestrata.train.native import load_native
from saestrata.train.registry import build

pytestmark = pytest.mark.skipif(load_native() is None, reason="compiled CPU kernels not built (no compiler)")


def _relu_code(batch: int, d_sae: int, shift: float, seed: int = 0) -> torch.Tensor:
    """``pre [batch, d_sae]`` (leaf, requires grad) whose ReLU keeps about ``P(N(0, 1) > shift)`` of the entries."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, d_sae, generator=gen) - shift).requires_grad_(True)


@pytest.mark.parametrize("shift", [2.2, 0.0])  # L0 ~1.4% and ~50% of the latents
def test_gram_from_the_non_zeros_equals_the_dense_product_and_its_gradient(shift, monkeypatch):
    pre = _relu_code(96, 160, shift)
    weight = torch.randn(160, 160, generator=torch.Generator().manual_seed(1))
    grads, grams = [], []
    monkeypatch.setattr(sparse_gram, "RATIO", 1)  # the kernel at any density (the dense code of shift 0 too)
    for fn in (lambda f: sparse_gram.coactivation_gram(f, stats), lambda f: (f.T @ f).float()):
        stats: dict = {}
        f = torch.relu(pre)
        gram = fn(f)
        (gram.pow(2) * weight).sum().backward()  # an asymmetric weight: dG != dG^T, so both terms count
        grams.append(gram.detach())
        grads.append(pre.grad.clone())
        pre.grad = None
        if len(grams) == 1:
            assert stats == {"sparse_gram": 1}  # the kernel ran, and said so
    # fp32 sums in another order: tolerances relative to each tensor's scale (each gradient entry sums ~100
    # terms of either sign, so a small entry's own relative error can be large)
    torch.testing.assert_close(grams[0], grams[1], rtol=1e-5, atol=1e-6 * float(grams[1].abs().max()))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5 * float(grads[1].abs().max()))
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("divisor", [96.0, 7.0])  # the batch size; and one that is not a power of two
def test_squared_gram_from_the_non_zeros_equals_the_squared_dense_product_and_its_gradient(divisor, monkeypatch):
    """coactivation_gram_sq (the square and the division fused into the kernel, their gradients formed only where the
    non-zeros read them) equals ``((f^T f) / divisor) ** 2`` of the dense product, value and gradient, and counts."""
    pre = _relu_code(96, 160, 2.2)
    weight = torch.randn(160, 160, generator=torch.Generator().manual_seed(1))
    grads, sqs = [], []
    monkeypatch.setattr(sparse_gram, "RATIO", 1)
    for fn in (lambda f: sparse_gram.coactivation_gram_sq(f, divisor, stats),
               lambda f: ((f.T @ f).float() / divisor).pow(2)):
        stats: dict = {}
        sq = fn(torch.relu(pre))
        (sq * weight).sum().backward()  # asymmetric: both of the backward's terms count
        sqs.append(sq.detach())
        grads.append(pre.grad.clone())
        pre.grad = None
        if len(sqs) == 1:
            assert stats == {"sparse_gram": 1}
    torch.testing.assert_close(sqs[0], sqs[1], rtol=1e-5, atol=1e-6 * float(sqs[1].abs().max()))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5 * float(grads[1].abs().max()))
    assert grads[0].abs().sum() > 0


def test_gram_falls_back_to_the_matmul_past_its_pair_budget(monkeypatch):
    """The kernel runs while its products are at most batch * d_sae^2 / RATIO (the measured break-even)."""
    pre = _relu_code(32, 64, 0.0)
    f = torch.relu(pre)
    pairs = int((f != 0).sum(1).pow(2).sum())
    ratio = 32 * 64 * 64 / pairs
    assert ratio != int(ratio)
    monkeypatch.setattr(sparse_gram, "RATIO", int(ratio) + 1)  # budget just below the products: the matmul
    stats: dict = {}
    gram = sparse_gram.coactivation_gram(f, stats)
    assert stats == {} and torch.equal(gram, (f.T @ f).float())
    monkeypatch.setattr(sparse_gram, "RATIO", int(ratio))  # just above: the kernel
    sparse_gram.coactivation_gram(f, stats)
    assert stats == {"sparse_gram": 1}


@pytest.mark.parametrize("arch", ["seed001_fixed_ortho", "seed001_adaptive_ortho32", "seed001_static_hier",
                                  "seed001_dynamic_hier", "seed001_contrastive_hier", "seed000_hsae",
                                  "seed000_hsae_no_separation"])
def test_archs_on_the_sparse_gram_equal_their_dense_step(arch, monkeypatch):
    """Every loss term and every parameter's gradient of a training forward equal with the Gram from the
    non-zeros and with the dense matmul (``load_native`` hidden from sparse_gram: the reference)."""
    d_in, d_sae = 48, 128
    x = torch.randn(64, d_in, generator=torch.Generator().manual_seed(2)) * 3

    def step(use_kernel: bool):
        if not use_kernel:
            monkeypatch.setattr(sparse_gram, "load_native", lambda: None)
        sae = build(arch, d_in, d_sae, seed=5).train()
        sae.init_b_dec(x)
        sae.b_enc.data -= 0.5  # a sparser code than at init, as in training
        monkeypatch.setattr(sparse_gram, "RATIO", 1)  # the kernel whatever this tiny code's density
        out = sae(x)
        out.loss.backward()
        monkeypatch.undo()
        return sae, out

    sparse, out_s = step(True)
    dense, out_d = step(False)
    assert sparse.counters()["sparse_gram"] >= 1 and dense.counters().get("sparse_gram", 0) == 0
    for k, v in out_d.losses.items():
        torch.testing.assert_close(out_s.losses[k], v, rtol=1e-4, atol=1e-6, msg=k)
    for (name, p_d), (_, p_s) in zip(dense.named_parameters(), sparse.named_parameters()):
        if p_d.grad is None:
            assert p_s.grad is None, name
            continue
        torch.testing.assert_close(p_s.grad, p_d.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_hsae_counter_survives_a_checkpoint(monkeypatch):
    monkeypatch.setattr(sparse_gram, "RATIO", 1)  # the kernel whatever this tiny code's density
    sae = build("seed000_hsae", 16, 32).train()
    sae(torch.randn(8, 16))
    state = sae.extra_state()
    assert state["sparse_gram"] == 2  # one Gram per level
    again = build("seed000_hsae", 16, 32)
    again.load_extra_state(state)
    assert again.counters()["sparse_gram"] == 2
