"""Sparse TopK-family kernels (train/kernels.py): same losses, reconstructions and gradients as dense.

Every comparison runs in fp32 without autocast against the existing dense computation
(``kernels="dense"``), for topk, batchtopk and matryoshka, with and without dead latents
(AuxK through both of its sparse branches: dead-column matmuls and pair lists).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import saestrata.train.batchtopk as batchtopk_module
import saestrata.train.fused as fused_module
import saestrata.train.matryoshka as matryoshka_module
import saestrata.train.topk as topk_module
from saestrata.train.arch_info import ArchError
from saestrata.train.kernels import ActiveSet, _argsort, gather_pre_acts, sparse_decode
from saestrata.train.registry import build
from saestrata.train.trainer import SAESpec, TrainConfig, train

ARCHS = ["topk", "batchtopk", "matryoshka"]
D_IN, D_SAE, BATCH, K = 24, 96, 40, 6
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _pair(arch: str, dead_every: int | None, aux_k: int = 12, d_in: int = D_IN, d_sae: int = D_SAE):
    """Identical dense and sparse SAEs (non-trivial biases), every ``dead_every``-th latent dead."""
    saes = []
    for kernels in ("dense", "sparse"):
        sae = build(arch, d_in, d_sae, seed=7, k=K, aux_k=aux_k, kernels=kernels).train()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            sae.b_dec.copy_(torch.randn(d_in, generator=gen) * 0.3)
            sae.b_enc.copy_(torch.randn(d_sae, generator=gen) * 0.1)
        if dead_every:
            sae.tokens_since_fired[::dead_every] = sae.dead_window_tokens
        saes.append(sae)
    return saes


def _inputs(seed: int = 0, d_in: int = D_IN) -> torch.Tensor:
    return torch.randn(BATCH, d_in, generator=torch.Generator().manual_seed(seed)) * 1.5


def _assert_same_step(dense, sparse, x):
    out_d, out_s = dense(x), sparse(x)
    assert out_d.losses.keys() == out_s.losses.keys()
    for key in out_d.losses:
        torch.testing.assert_close(out_s.losses[key], out_d.losses[key], **TOL, msg=key)
    torch.testing.assert_close(out_s.x_hat, out_d.x_hat, **TOL)
    torch.testing.assert_close(out_s.f, out_d.f, **TOL)
    if out_s.sq_error is not None:  # the trainer's FVU numerator when a forward hands it over (fused topk)
        want = (x.float() - out_d.x_hat.float()).pow(2).sum(-1).mean()
        torch.testing.assert_close(out_s.sq_error, want.detach(), **TOL)
    out_d.loss.backward()
    out_s.loss.backward()
    for (name, p_d), (_, p_s) in zip(dense.named_parameters(), sparse.named_parameters()):
        assert p_s.grad is not None and p_s.grad.dtype == torch.float32, name
        torch.testing.assert_close(p_s.grad, p_d.grad, rtol=1e-4, atol=1e-5, msg=name)
    return out_d, out_s


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_matches_dense_without_dead_latents(arch):
    dense, sparse = _pair(arch, None)
    out_d, _ = _assert_same_step(dense, sparse, _inputs())
    assert float(out_d.losses["auxk"].detach()) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_matches_dense_auxk_dead_columns(arch):
    # 32 dead latents, k_aux 12: the dead block is dense enough for the dead-column matmuls.
    dense, sparse = _pair(arch, 3)
    out_d, _ = _assert_same_step(dense, sparse, _inputs(1))
    assert float(out_d.losses["auxk"].detach()) > 0
    dead = dense.tokens_since_fired >= dense.dead_window_tokens
    assert float(sparse.W_dec.grad[dead].abs().max()) > 0  # AuxK reached the dead decoder rows


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_matches_dense_auxk_pair_lists(arch, monkeypatch):
    # 48 dead latents, k_aux 3: below the share, AuxK goes through the pair-list kernels.
    monkeypatch.setattr(topk_module, "AUXK_DENSE_SHARE", 8)
    dense, sparse = _pair(arch, 2, aux_k=3)
    out_d, _ = _assert_same_step(dense, sparse, _inputs(2))
    assert float(out_d.losses["auxk"].detach()) > 0


def _push_dead_down(saes, keep_positive: int = 0):
    """Dead latents' encoder biases made very negative (their pre-activations never positive), but for
    the first ``keep_positive`` of them: the state of a trained SAE's dead latents (issue 14)."""
    for sae in saes:
        dead = (sae.tokens_since_fired >= sae.dead_window_tokens).nonzero().flatten()
        with torch.no_grad():
            sae.b_enc[dead[keep_positive:]] = -1e3


@pytest.mark.parametrize("arch", ARCHS)
def test_auxk_with_no_positive_dead_pre_acts_is_its_constant_and_counts_no_pairs(arch):
    dense, sparse = _pair(arch, 3)
    _push_dead_down((dense, sparse))
    out_d, out_s = _assert_same_step(dense, sparse, _inputs(4))
    assert float(out_s.losses["auxk"]) == pytest.approx(sparse.aux_coeff, rel=1e-6)  # ||0 - e||^2 / ||e||^2
    assert dense.counters()["auxk_dead"] == sparse.counters()["auxk_dead"] == 32
    assert dense.counters()["auxk_pairs"] == sparse.counters()["auxk_pairs"] == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_auxk_takes_the_pair_lists_when_few_dead_pre_acts_survive_the_relu(arch, monkeypatch):
    # 32 dead latents and k_aux 12 chose the dead-column matmuls by count; with two dead latents able to
    # reach a positive pre-activation the work follows the surviving pairs instead, with the same result.
    dense, sparse = _pair(arch, 3)
    _push_dead_down((dense, sparse), keep_positive=2)

    def no_matmuls(*args, **kwargs):
        raise AssertionError("AuxK ran the dead-column matmuls for a handful of positive pairs")

    monkeypatch.setattr(topk_module, "gather_columns", no_matmuls)
    out_d, _ = _assert_same_step(dense, sparse, _inputs(5))
    assert abs(float(out_d.losses["auxk"].detach()) - dense.aux_coeff) > 1e-5  # the two latents decode something
    pairs = dense.counters()["auxk_pairs"]
    assert 0 < pairs <= 2 * BATCH and sparse.counters()["auxk_pairs"] == pairs
    dead = dense.tokens_since_fired >= dense.dead_window_tokens
    assert float(sparse.W_dec.grad[dead].abs().max()) > 0


@pytest.mark.parametrize("arch,module,fn", [("topk", topk_module, "fused_topk"),
                                             ("batchtopk", batchtopk_module, "fused_pairs"),
                                             ("matryoshka", matryoshka_module, "fused_nested")])
def test_fused_auxk_pairs_keep_the_clip_norms_exact(arch, module, fn, monkeypatch):
    # The fused topk / batchtopk step adds AuxK's pair gradients into its own gradient rows and corrects the
    # squared norms it hands the gradient clip (train/fused.py); they must be the norms of the final gradients.
    calls = []
    real = getattr(module, fn)
    monkeypatch.setattr(module, fn, lambda *a, **kw: calls.append(kw.get("aux")) or real(*a, **kw))
    dense, sparse = _pair(arch, 3)
    _push_dead_down((dense, sparse), keep_positive=2)
    _assert_same_step(dense, sparse, _inputs(6))
    assert len(calls) == 1 and calls[0] is not None and len(calls[0].act) > 0  # AuxK went through the fused op
    known = sparse.grad_sq_norms()
    assert known, "the fused backward's norms were invalidated"
    w = sparse.W_dec.detach().double()
    g_dec = sparse.W_dec.grad.double()
    projected = g_dec - (g_dec * w).sum(-1, keepdim=True) * w
    assert known[sparse.W_enc] == pytest.approx(float(sparse.W_enc.grad.double().pow(2).sum()), rel=1e-5)
    assert known[sparse.W_dec] == pytest.approx(float(projected.pow(2).sum()), rel=1e-5)


def test_matryoshka_prefixes_sum_only_latents_below_their_boundary():
    _, sparse = _pair("matryoshka", None)
    x = _inputs(3)
    out = sparse(x)
    f = out.f.detach()
    expected = sum((x - (f[:, :m] @ sparse.W_dec[:m] + sparse.b_dec)).pow(2).sum(-1).mean()
                   for m in sparse.prefix_sizes)
    torch.testing.assert_close(out.loss.detach(), expected.detach(), rtol=1e-5, atol=1e-4)


def test_batchtopk_sparse_rows_have_varying_counts():
    _, sparse = _pair("batchtopk", None)
    out = sparse(_inputs(4))
    counts = (out.f > 0).sum(-1)
    assert int(counts.sum()) <= K * BATCH and len(set(counts.tolist())) > 1


def test_kernels_against_dense_autograd_including_input_grad():
    gen = torch.Generator().manual_seed(5)
    sae = build("topk", D_IN, D_SAE, seed=2, k=K)
    with torch.no_grad():
        sae.b_dec.normal_(generator=gen)
    x = torch.randn(BATCH, D_IN, generator=gen, requires_grad=True)
    with torch.no_grad():
        pre = sae.pre_acts(x)
    values, cols = pre.topk(K, dim=-1)
    rows = torch.arange(BATCH).unsqueeze(1).expand_as(cols)
    act = ActiveSet.from_values(values.flatten(), rows.flatten(), cols.flatten(), BATCH, D_SAE, [D_SAE // 4, D_SAE])
    assert len(act) == int((values > 0).sum())
    weight = torch.randn(BATCH, 2, D_IN, generator=gen)
    out = (sparse_decode(gather_pre_acts(x, sae, pre, act), sae.W_dec, act).view(BATCH, 2, D_IN) * weight).sum()
    grads = torch.autograd.grad(out, [x, sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec])

    dense_pre = sae.pre_acts(x)
    mask = torch.zeros(BATCH, D_SAE, dtype=torch.bool)
    mask[act.rows, act.cols] = True
    f = torch.where(mask, dense_pre, torch.zeros_like(dense_pre))
    q = D_SAE // 4
    ref = (torch.stack([f[:, :q] @ sae.W_dec[:q], f[:, q:] @ sae.W_dec[q:]], 1) * weight).sum()
    ref_grads = torch.autograd.grad(ref, [x, sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec])
    torch.testing.assert_close(out, ref, **TOL)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_under_bf16_autocast_gives_fp32_grads(arch):
    dense, sparse = _pair(arch, 3)
    x = _inputs(6)
    losses = []
    for sae in (dense, sparse):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sae(x)
        out.loss.backward()
        losses.append(float(out.loss.detach()))
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in sae.parameters())
    assert math.isclose(losses[0], losses[1], rel_tol=2e-2)


def test_eval_mode_and_bad_switch():
    _, sparse = _pair("topk", None)
    x = _inputs(7)
    with torch.no_grad():
        torch.testing.assert_close(sparse.eval()(x).x_hat, sparse.decode(sparse.encode(x)))  # eval is dense
    assert "kernels" not in sparse.hparams()  # a speed switch, not part of the saved SAE
    with pytest.raises(ArchError):
        build("topk", D_IN, D_SAE, kernels="fast")


def test_trainer_runs_sparse_kernels_like_dense(tiny_store, tmp_path):
    """fp32 training, AuxK on after one batch: the sparse run tracks the dense one step by step."""
    folders = {}
    for kern in ("dense", "sparse"):  # separate runs: SAE i is seeded cfg.seed + i in both
        specs = [SAESpec(f"{arch}-{kern}", arch, {"k": 4, "kernels": kern}) for arch in ARCHS]
        folders.update(train(TrainConfig(store=tiny_store, layer=1, out=tmp_path / kern, specs=specs, d_sae=512,
                                         batch_size=256, tokens=12 * 256, log_every=1, lr=1e-3, autocast=False,
                                         dead_window_tokens=256, checkpoint_every=0), progress=False))
    for arch in ARCHS:
        logs = [[json.loads(line) for line in (folders[f"{arch}-{k}"] / "train_log.jsonl").read_text().splitlines()]
                for k in ("dense", "sparse")]
        assert any(row["auxk"] > 0 for row in logs[0])
        for row_d, row_s in zip(*logs):
            assert math.isclose(row_d["loss"], row_s["loss"], rel_tol=1e-3), (arch, row_d["step"])
            assert row_d["l0"] == row_s["l0"]


@pytest.mark.parametrize("bound", [7, 4096, 70_000, 2**33])
def test_radix_argsort_is_torch_stable_argsort(bound):
    keys = torch.randint(0, bound, (3000,), generator=torch.Generator().manual_seed(bound % 1000))
    assert torch.equal(_argsort(keys, bound), torch.argsort(keys, stable=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_bookkeeping_matches_dense_code(arch):
    """Firing, L0 and the BatchTopK threshold read off the active pairs equal those of the dense code."""
    dense, sparse = _pair(arch, dead_every=None)
    x = _inputs()
    out_d, out_s = dense(x), sparse(x)
    assert out_s.active is not None and out_d.active is None
    assert torch.equal(out_s.fired(), (out_s.f > 0).any(0))
    assert torch.equal(out_s.fired(), out_d.fired())
    assert out_s.l0() == pytest.approx(float((out_d.f > 0).sum(-1).float().mean()))
    torch.testing.assert_close(out_s.min_active(), out_d.f[out_d.f > 0].min().float(), **TOL)
    for sae, out in ((dense, out_d), (sparse, out_s)):
        sae.tokens_since_fired += 7
        sae.update_firing(out)
    assert torch.equal(dense.tokens_since_fired, sparse.tokens_since_fired)
    if arch != "topk":
        torch.testing.assert_close(sparse.threshold, dense.threshold, **TOL)


@pytest.mark.parametrize("dead_every", [None, 3])
def test_topk_fused_step_is_taken_and_equals_the_unfused_sparse_and_dense(dead_every, monkeypatch):
    """On CPU the topk SAE trains through train/fused.py; the pair-list kernels stay its fallback."""
    calls = []
    real = topk_module.fused_topk
    monkeypatch.setattr(topk_module, "fused_topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    dense, sparse = _pair("topk", dead_every)
    _, out = _assert_same_step(dense, sparse, _inputs(8))
    assert calls == [1] and out.sq_error is not None
    monkeypatch.setattr(topk_module, "fused_available", lambda sae, x: False)
    dense, unfused = _pair("topk", dead_every)
    _assert_same_step(dense, unfused, _inputs(8))
    assert calls == [1]
    for p_f, p_u in zip(sparse.parameters(), unfused.parameters()):
        torch.testing.assert_close(p_f.grad, p_u.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dead_every", [None, 3])
def test_fused_backward_hands_the_clip_its_gradient_norms_only_while_they_hold(dead_every, arch):
    """train/fused.py's GradSqNorms: the fused backward's norms of W_enc.grad and of W_dec.grad projected off
    its rows equal those recomputed from the gradients it left; they are withdrawn once the gradients are
    not the backward's alone (AuxK's term added when latents are dead, or any later change) and after a
    forward that did not run fused."""
    _, sae = _pair(arch, dead_every)
    sae(_inputs(8)).loss.backward()
    known = sae.grad_sq_norms()
    if dead_every:  # AuxK added its gradient to the fused backward's
        assert known == {}
        return
    w, g = sae.W_dec.detach(), sae.W_dec.grad
    projected = g - (g * w).sum(1, keepdim=True) * w  # what remove_parallel_grad_ leaves
    assert len(known) == 2 and sae.W_enc in known and sae.W_dec in known
    assert known[sae.W_enc] == pytest.approx(float(sae.W_enc.grad.double().pow(2).sum()), rel=1e-5)
    assert known[sae.W_dec] == pytest.approx(float(projected.double().pow(2).sum()), rel=1e-5)
    sae.W_enc.grad.mul_(2.0)
    assert sae.grad_sq_norms() == {}
    sae.zero_grad(set_to_none=True)
    sae.kernels = "dense"
    sae(_inputs(9)).loss.backward()
    assert sae.grad_sq_norms() == {}


@pytest.mark.parametrize("arch", ARCHS)
def test_the_clip_keeps_the_fused_norms_when_autograd_copies_the_gradient(arch, monkeypatch):
    """Autograd stores a copy as ``.grad`` when something else still holds the backward's gradient (a thread
    sampling ``sys._current_frames()``, as dask's worker profiler does every 10 ms, keeps the backward's frame
    and its locals alive). The norms must survive that copy: withdrawn, the clip recomputes them in other
    arithmetic and the SAE's last bits depend on that thread's timing (tests/test_train_distributed.py's
    two-worker test failed so on a loaded VM). Here the test holds the references, so autograd copies every time."""
    held = []
    real = fused_module.GradSqNorms.record
    monkeypatch.setattr(fused_module.GradSqNorms, "record",
                        lambda self, d_enc, d_dec, sq: held.extend((d_enc, d_dec)) or real(self, d_enc, d_dec, sq))
    _, sae = _pair(arch, None)
    sae(_inputs(8)).loss.backward()
    assert len(held) == 2 and sae.W_dec.grad.data_ptr() != held[1].data_ptr()  # autograd copied W_dec's gradient
    known = sae.grad_sq_norms()
    assert len(known) == 2, "the fused backward's norms were withdrawn because autograd copied its gradient"
    w, g = sae.W_dec.detach(), sae.W_dec.grad
    projected = g - (g * w).sum(1, keepdim=True) * w
    assert known[sae.W_enc] == pytest.approx(float(sae.W_enc.grad.double().pow(2).sum()), rel=1e-5)
    assert known[sae.W_dec] == pytest.approx(float(projected.double().pow(2).sum()), rel=1e-5)
    sae.W_dec.grad.add_(1.0)  # the copy changed afterwards: withdrawn
    assert sae.grad_sq_norms() == {}
    sae(_inputs(9)).loss.backward()  # accumulated into the existing .grad: not this backward's alone
    assert sae.grad_sq_norms() == {}


def test_a_deep_copied_sae_tracks_its_own_gradients():
    """The norm hooks sit on parameter objects; a deep copy (new parameters, no hooks) gets its own on its next
    fused forward, and the original keeps its."""
    _, sae = _pair("topk", None)
    sae(_inputs(8)).loss.backward()
    twin = copy.deepcopy(sae)
    assert twin.grad_sq_norms() == {}  # nothing tracked on the copy's parameters yet
    for model in (twin, sae, twin):
        model.zero_grad(set_to_none=True)
        model(_inputs(9)).loss.backward()
        assert len(model.grad_sq_norms()) == 2
    assert sae.grad_sq_norms()[sae.W_enc] == pytest.approx(float(sae.W_enc.grad.double().pow(2).sum()), rel=1e-5)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
@pytest.mark.parametrize("dead_every", [None, 3])
def test_batchtopk_family_selects_from_the_matmul_and_equals_the_torch_path(arch, dead_every, monkeypatch):
    """On CPU BatchTopK and Matryoshka take their pairs from the compiled selection (no [batch, d_sae] pre;
    AuxK's dead columns formed from the matmul), and train them in one fused op (train/fused.py
    ``fused_pairs``, ``fused_nested``); same losses and gradients as the dense path and as the torch-op path
    they replace (``fused_available`` False), which stays the fallback."""
    calls, fused = [], []
    real = batchtopk_module.batch_topk_pairs
    monkeypatch.setattr(batchtopk_module, "batch_topk_pairs", lambda *a: calls.append(1) or real(*a))
    module, fn = (batchtopk_module, "fused_pairs") if arch == "batchtopk" else (matryoshka_module, "fused_nested")
    real_fused = getattr(module, fn)
    monkeypatch.setattr(module, fn, lambda *a, **kw: fused.append(1) or real_fused(*a, **kw))
    dense, fast = _pair(arch, dead_every)
    out_d, out_f = _assert_same_step(dense, fast, _inputs(10))
    assert calls == [1] and fused == [1] and out_f.sq_error is not None
    assert (float(out_d.losses["auxk"].detach()) > 0) == bool(dead_every)
    for m in (batchtopk_module, matryoshka_module):
        monkeypatch.setattr(m, "fused_available", lambda sae, x: False)
    dense, torch_path = _pair(arch, dead_every)
    _assert_same_step(dense, torch_path, _inputs(10))
    assert calls == [1] and fused == [1]
    for p_f, p_t in zip(fast.parameters(), torch_path.parameters()):
        torch.testing.assert_close(p_f.grad, p_t.grad, rtol=1e-5, atol=1e-6)


def test_prefix_squared_errors_equal_autograd_of_the_running_sums():
    """train/matryoshka.py's one-node nested losses: values and the gradients of groups, x and b_dec (x too,
    which the SAE's step does not need) equal autograd through ``cumsum`` and per-prefix squared errors."""
    gen = torch.Generator().manual_seed(11)
    groups = torch.randn(BATCH, 4, D_IN, generator=gen, requires_grad=True)
    x = torch.randn(BATCH, D_IN, generator=gen, requires_grad=True)
    b_dec = torch.randn(D_IN, generator=gen, requires_grad=True)
    weights = torch.tensor([0.5, -1.0, 2.0, 3.0])
    errors, x_hat = matryoshka_module.prefix_squared_errors(groups, x, b_dec)
    prefixes = groups.cumsum(1) + b_dec
    want = torch.stack([matryoshka_module.squared_error(x, p) for p in prefixes.unbind(1)])
    torch.testing.assert_close(errors, want, **TOL)
    torch.testing.assert_close(x_hat, prefixes[:, -1].detach(), **TOL)
    got = torch.autograd.grad((errors * weights).sum(), [groups, x, b_dec])
    ref = torch.autograd.grad((want * weights).sum(), [groups, x, b_dec])
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dead_every", [None, 3])
def test_fused_steps_at_a_width_with_full_vector_blocks(arch, dead_every):
    """d_in 200 = one 128-float register block + a 72-float tail: the compiled decode / error / gradient loops'
    vector paths (d_in 24 elsewhere in this file runs only their scalar tails) equal the dense path."""
    dense, sparse = _pair(arch, dead_every, d_in=200, d_sae=384)
    out_d, out_s = _assert_same_step(dense, sparse, _inputs(12, d_in=200))
    assert out_s.sq_error is not None  # the fused op ran
    assert (float(out_d.losses["auxk"].detach()) > 0) == bool(dead_every)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0, 1.0), (0.5, -1.0, 2.0, 3.0, 1.0)])
def test_fused_nested_gradients_for_equal_and_unequal_prefix_weights(weights):
    """train/fused.py fused_nested: the prefixes' errors and the gradients of a weighted sum of them (equal
    weights, the trainer's: the forward's suffix sums serve the backward; unequal: the per-bag gradients are
    formed from the errors) equal autograd through the dense prefix reconstructions, at d_in 200."""
    from saestrata.train.fused import fused_nested

    _, sae = _pair("matryoshka", None, d_in=200, d_sae=384)
    ref = build("matryoshka", 200, 384, seed=7, k=K, kernels="dense").train()
    ref.load_state_dict(sae.state_dict())
    x = _inputs(13, d_in=200)
    _, act, vals = sae._matmul_pairs(x, sae.prefix_sizes)
    errors, _, x_hat = fused_nested(x, sae, act, vals)
    w = torch.tensor(weights)
    (errors * w).sum().backward()
    pre = ref.pre_acts(x)
    mask = torch.zeros_like(pre, dtype=torch.bool)
    mask[act.rows, act.cols] = True
    partials = ref.prefix_reconstructions(torch.where(mask, pre, torch.zeros_like(pre)))
    want = torch.stack([matryoshka_module.squared_error(x, p) for p in partials])
    torch.testing.assert_close(errors.detach(), want.detach(), **TOL)
    torch.testing.assert_close(x_hat, partials[-1].detach(), **TOL)
    (want * w).sum().backward()
    for (name, p), (_, q) in zip(sae.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_auxk_pairs_at_full_vector_width_with_the_input_gradient(arch, monkeypatch):
    """AuxK's compiled pairs (native.auxk_select / auxk_forward / auxk_backward_) at d_in 200 (their vector
    loops' full blocks and tails) on the pair path the fused steps take once latents die: losses, every
    parameter's gradient and the input's (x requires grad: the AuxK encoder term of d_x) equal the dense path."""
    module, fn = {"topk": (topk_module, "fused_topk"), "batchtopk": (batchtopk_module, "fused_pairs"),
                  "matryoshka": (matryoshka_module, "fused_nested")}[arch]
    calls = []
    real = getattr(module, fn)
    monkeypatch.setattr(module, fn, lambda *a, **kw: calls.append(kw.get("aux")) or real(*a, **kw))
    dense, sparse = _pair(arch, 3, d_in=200, d_sae=384)
    _push_dead_down((dense, sparse), keep_positive=6)
    x = _inputs(14, d_in=200)
    _assert_same_step(dense, sparse, x)
    x_d, x_s = x.clone().requires_grad_(), x.clone().requires_grad_()
    sparse.zero_grad(set_to_none=True)
    dense.zero_grad(set_to_none=True)
    out_d, out_s = dense(x_d), sparse(x_s)
    out_d.loss.backward()
    out_s.loss.backward()
    torch.testing.assert_close(x_s.grad, x_d.grad, rtol=1e-4, atol=1e-5)
    assert calls and all(a is not None and len(a.act) > 0 for a in calls)  # the fused op took AuxK's pairs
    assert abs(float(out_d.losses["auxk"].detach()) - dense.aux_coeff) > 1e-5


def _standard_pair(d_in: int, d_sae: int, b_enc: float):
    """Identical standard SAEs on the dense and the pairs step; ``b_enc`` sets how many pre-activations are > 0."""
    saes = []
    for kernels in ("dense", "sparse"):
        sae = build("standard", d_in, d_sae, seed=3, kernels=kernels).train()
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            sae.b_dec.copy_(torch.randn(d_in, generator=gen) * 0.3)
            sae.b_enc.copy_(torch.randn(d_sae, generator=gen) * 0.02 + b_enc)
            sae.W_dec.mul_(torch.rand(d_sae, 1, generator=gen) + 0.5)  # unequal decoder norms weight the L1
        sae.sparsity_scale = 0.6  # mid warm-up: the trainer's factor reaches the L1 weights
        saes.append(sae)
    return saes


def _assert_same_grads(dense, sparse, out_d, out_s, x_d, x_s) -> None:
    """Backward through both SAEs' losses; every parameter's and the input's gradient equal (fp32 tolerance)."""
    out_d.loss.backward()
    out_s.loss.backward()
    for (name, p_d), (_, p_s) in zip(dense.named_parameters(), sparse.named_parameters()):
        torch.testing.assert_close(p_s.grad, p_d.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(x_s.grad, x_d.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("d_in", [D_IN, 200])
def test_standard_pairs_step_equals_the_dense_step_with_the_input_gradient(d_in):
    """The standard SAE's fused pairs step (train/standard.py): losses (mse, decoder-norm-weighted L1), x_hat, the
    code and every gradient, the input's included, equal the dense step's; d_in 200 runs the compiled loops'
    vector blocks. The L1's gradient reaches b_enc / W_enc only through the pairs' dv inside the compiled backward
    (a sign flip of that add fails here) and W_dec through its row norms."""
    d_sae = 384
    dense, sparse = _standard_pair(d_in, d_sae, b_enc=-0.25 if d_in == D_IN else -0.3)
    x_d, x_s = (_inputs(5, d_in=d_in).requires_grad_() for _ in range(2))
    out_d, out_s = dense(x_d), sparse(x_s)
    assert sparse.sparse_steps == 1 and out_s.active is not None and dense.sparse_steps == 0
    density = out_s.l0() / d_sae
    assert 0.01 < density < 1 / 8, density  # a sparse batch, but not a trivial one
    assert float(out_d.losses["l1"].detach()) > 0
    for key in ("mse", "l1"):
        torch.testing.assert_close(out_s.losses[key], out_d.losses[key], **TOL, msg=key)
    torch.testing.assert_close(out_s.x_hat, out_d.x_hat, **TOL)
    torch.testing.assert_close(out_s.f, out_d.f, **TOL)
    torch.testing.assert_close(out_s.sq_error, (x_d.detach() - out_d.x_hat.detach()).pow(2).sum(-1).mean(), **TOL)
    _assert_same_grads(dense, sparse, out_d, out_s, x_d, x_s)
    assert sparse.counters()["sparse_steps"] == 1


def test_standard_dense_batches_stay_on_the_dense_step():
    """Above SPARSE_MAX_DENSITY of positive pre-activations (a run's first steps) the dense step runs, bit for bit
    the dense SAE's; eval mode and ``kernels="dense"`` never take the pairs; a bad switch is refused."""
    from saestrata.train.relu_pairs import SPARSE_MAX_DENSITY

    dense, sparse = _standard_pair(D_IN, 96, b_enc=0.0)
    x = _inputs(6)
    out_d, out_s = dense(x), sparse(x)
    assert out_s.l0() / 96 > SPARSE_MAX_DENSITY and sparse.sparse_steps == 0 and out_s.active is None
    assert torch.equal(out_s.loss.detach(), out_d.loss.detach())
    low = _standard_pair(D_IN, 96, b_enc=-0.35)[1]
    low.eval()
    assert low(x).active is None and low.sparse_steps == 0
    low.train()
    low.kernels = "dense"
    assert low(x).active is None
    with pytest.raises(ArchError, match="kernels="):
        build("standard", D_IN, 96, kernels="fast")


def test_standard_pairs_counter_survives_a_checkpoint():
    """``sparse_steps`` is in the train log's counters and in the checkpoint's extra state (a resumed run's
    counter continues); checkpoints written before it existed load as 0."""
    sae = _standard_pair(D_IN, 96, b_enc=-0.35)[1]
    sae(_inputs(7))
    state = sae.extra_state()
    fresh = build("standard", D_IN, 96)
    fresh.load_extra_state(state)
    assert fresh.counters()["sparse_steps"] == 1
    fresh.load_extra_state({})
    assert fresh.counters()["sparse_steps"] == 0


def _jumprelu_pair(d_in: int, d_sae: int, b_enc: float, target_l0: float | None, bandwidth: float = 0.2):
    """Identical JumpReLU SAEs on the dense and the pairs step; thresholds 0.3-0.5, a wide STE window (many of the
    batch's entries inside it, active or not)."""
    saes = []
    for kernels in ("dense", "sparse"):
        sae = build("jumprelu", d_in, d_sae, seed=4, bandwidth=bandwidth, target_l0=target_l0, kernels=kernels).train()
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            sae.b_dec.copy_(torch.randn(d_in, generator=gen) * 0.3)
            sae.b_enc.copy_(torch.randn(d_sae, generator=gen) * 0.02 + b_enc)
            sae.log_threshold.copy_((0.3 + 0.2 * torch.rand(d_sae, generator=gen)).log())
        sae.sparsity_scale = 0.6
        saes.append(sae)
    return saes


@pytest.mark.parametrize("d_in,target_l0", [(D_IN, None), (D_IN, 3.0), (200, 5.0)])
def test_jumprelu_pairs_step_equals_the_dense_step(d_in, target_l0):
    """JumpReLU's pairs step (train/jumprelu.py): mse, the L0 term (the paper's lambda L0, or the two-sided loss at a
    target), x_hat, the code and every gradient, log_threshold's straight-through pseudo-derivative (sec. 4: from the
    reconstruction over the window, active entries and inactive ones just below theta, and from the L0 term) and the
    input's, equal the dense step's; d_in 200 runs the compiled loops' vector blocks."""
    d_sae = 384
    dense, sparse = _jumprelu_pair(d_in, d_sae, b_enc=-2.5, target_l0=target_l0)
    x_d, x_s = (_inputs(8, d_in=d_in).requires_grad_() for _ in range(2))
    out_d, out_s = dense(x_d), sparse(x_s)
    assert sparse.sparse_steps == 1 and out_s.active is not None and dense.sparse_steps == 0
    with torch.no_grad():
        z = torch.relu(dense.pre_acts(x_d))
        theta = dense.threshold
        inside = ((z - theta) / dense.bandwidth).abs() < 0.5
    assert int((inside & (z <= theta)).sum()) > 5 and int((inside & (z > theta)).sum()) > 5  # both sides acted
    assert 0.005 < out_s.l0() / d_sae < 1 / 8
    for key in ("mse", "l0"):
        torch.testing.assert_close(out_s.losses[key], out_d.losses[key], **TOL, msg=key)
    torch.testing.assert_close(out_s.x_hat, out_d.x_hat, **TOL)
    torch.testing.assert_close(out_s.f, out_d.f, **TOL)
    _assert_same_grads(dense, sparse, out_d, out_s, x_d, x_s)
    assert float(dense.log_threshold.grad.abs().max()) > 0


def test_jumprelu_takes_the_dense_step_when_a_window_reaches_zero_or_the_batch_is_dense():
    """A threshold below bandwidth / 2 puts z = 0 (every inactive row) in its window, and a batch with more than
    SPARSE_MAX_DENSITY candidates is dense: both run the dense step, bit for bit the dense SAE's."""
    for b_enc, low_theta in ((-2.5, True), (0.0, False)):
        dense, sparse = _jumprelu_pair(D_IN, 96, b_enc=b_enc, target_l0=None)
        if low_theta:
            for sae in (dense, sparse):
                with torch.no_grad():
                    sae.log_threshold[5] = math.log(0.05)  # < 0.2 / 2
        x = _inputs(9)
        out_d, out_s = dense(x), sparse(x)
        assert sparse.sparse_steps == 0 and out_s.active is None
        assert torch.equal(out_s.loss.detach(), out_d.loss.detach())


@pytest.mark.parametrize("d_in", [D_IN, 200])
def test_seed004_pairs_step_equals_the_dense_step_and_counts_its_groups(d_in):
    """Seed 004's group-weighted L1 (eq. 1) on the pairs step: losses, the code, every gradient and the per-group
    counters (sec. 6.3: L0, firing rate, intensity per group) equal the dense step's."""
    saes = []
    for kernels in ("dense", "sparse"):
        sae = build("group_sparsity", d_in, 384, seed=5, groups=3, gamma=2.0, l1_coeff=0.3, kernels=kernels).train()
        gen = torch.Generator().manual_seed(4)
        with torch.no_grad():
            sae.b_dec.copy_(torch.randn(d_in, generator=gen) * 0.3)
            sae.b_enc.copy_(torch.randn(384, generator=gen) * 0.02 - 2.5)
        sae.sparsity_scale = 0.7
        saes.append(sae)
    dense, sparse = saes
    x = _inputs(10, d_in=d_in)
    out_d, out_s = _assert_same_step(dense, sparse, x)
    assert sparse.sparse_steps == 1 and out_s.active is not None and float(out_d.losses["l1"].detach()) > 0
    c_d, c_s = dense.counters(), sparse.counters()
    assert c_s.pop("sparse_steps") == 1 and c_d.pop("sparse_steps") == 0
    assert c_d.keys() == c_s.keys() and any(k.startswith("l0_g") and c_d[k] > 0 for k in c_d)
    for key in c_d:
        assert math.isclose(c_d[key], c_s[key], rel_tol=1e-5, abs_tol=1e-6), key


@pytest.mark.parametrize("d_in", [D_IN, 200])
def test_seed000_adaptive_pairs_step_equals_the_dense_step_with_the_masks_gradient(d_in):
    """Seed 000's importance-masked ReLU SAE (f = ReLU(pre) sigmoid(importance)) on the pairs step: losses, the code
    (the masked activations), every gradient (the masks' logits included: the pairs' pre * d loss / d f) and the
    input's equal the dense step's."""
    saes = []
    for kernels in ("dense", "sparse"):
        sae = build("adaptive_mask", d_in, 384, seed=6, l1_coeff=0.2, kernels=kernels).train()
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            sae.b_dec.copy_(torch.randn(d_in, generator=gen) * 0.3)
            sae.b_enc.copy_(torch.randn(384, generator=gen) * 0.02 - 2.5)
            sae.importance.copy_(torch.randn(384, generator=gen))  # masks spread over (0, 1)
        sae.sparsity_scale = 0.7
        saes.append(sae)
    dense, sparse = saes
    x_d, x_s = (_inputs(11, d_in=d_in).requires_grad_() for _ in range(2))
    out_d, out_s = dense(x_d), sparse(x_s)
    assert sparse.sparse_steps == 1 and out_s.active is not None
    for key in ("mse", "l1"):
        torch.testing.assert_close(out_s.losses[key], out_d.losses[key], **TOL, msg=key)
    torch.testing.assert_close(out_s.f, out_d.f, **TOL)
    _assert_same_grads(dense, sparse, out_d, out_s, x_d, x_s)
    assert float(dense.importance.grad.abs().max()) > 0


def _assert_step_like_dense(runs, rtol: float = 1e-4, atol: float = 1e-6):
    """``runs`` = ``[(SAE, training output, input)]`` with ``kernels="dense"`` then ``"sparse"``, one forward each: the
    sparse SAE took its sparse step once and the dense one never; every loss term (``rtol`` / ``atol``), ``x_hat``,
    the code, every parameter's gradient and the input's, and the mechanism counters equal (fp32 tolerance).
    Returns ``(dense, out_d, sparse, out_s)``."""
    (dense, out_d, x_d), (sparse, out_s, x_s) = runs
    assert sparse.sparse_steps == 1 and dense.sparse_steps == 0
    assert out_d.losses.keys() == out_s.losses.keys()
    for key in out_d.losses:
        torch.testing.assert_close(out_s.losses[key], out_d.losses[key], rtol=rtol, atol=atol, msg=key)
    torch.testing.assert_close(out_s.x_hat, out_d.x_hat, **TOL)
    torch.testing.assert_close(out_s.f, out_d.f, **TOL)
    _assert_same_grads(dense, sparse, out_d, out_s, x_d, x_s)
    c_d, c_s = dense.counters(), sparse.counters()
    assert c_s.pop("sparse_steps") == 1 and c_d.pop("sparse_steps") == 0
    if "sparse_views" in c_s:  # seed001_contrastive_hier's second view, on its pairs too (never in the dense step)
        assert c_s.pop("sparse_views") == 1 and "sparse_views" not in c_d
    assert c_d.keys() == c_s.keys()
    for key in c_d:
        assert math.isclose(c_d[key], c_s[key], rel_tol=1e-4, abs_tol=1e-6), key
    return dense, out_d, sparse, out_s


@pytest.mark.parametrize("arch", ["seed001_fixed_ortho", "seed001_adaptive_ortho32", "seed001_adaptive_ortho64",
                                  "seed001_static_hier", "seed001_dynamic_hier", "seed001_contrastive_hier"])
def test_seed001_pairs_step_with_penalties_on_the_dense_code_equals_the_dense_step(arch):
    """Seed 001's SAEs on the pairs step (train/relu_pairs.py's DenseCodePairsMixin): the reconstruction on the pairs,
    the penalties (Eq. 4's Gram, group statistics, entropy, InfoNCE) on the dense code the fused op hands out.
    Every loss term, x_hat, the code, every parameter's gradient and the input's, and the mechanism counters equal
    the dense step's; the counter ``sparse_steps`` survives a checkpoint. The penalties' gradient reaches W_enc /
    b_enc only through the pairs' dv in the compiled backward (dropping it fails the W_enc comparison)."""
    d_in, d_sae = 200, 512
    x = torch.randn(96, d_in, generator=torch.Generator().manual_seed(2)) * 3
    runs = []
    for kernels in ("dense", "sparse"):
        sae = build(arch, d_in, d_sae, seed=5, kernels=kernels).train()
        sae.init_b_dec(x)
        with torch.no_grad():
            sae.b_enc.sub_(4.5)  # ~7% of the entries positive: under the pairs step's density cap
        x_in = x.clone().requires_grad_()
        out = sae(x_in)
        runs.append((sae, out, x_in))
    dense, out_d, sparse, out_s = _assert_step_like_dense(runs)
    assert out_s.active is not None and 0.02 < out_s.l0() / d_sae < 1 / 8
    assert len(out_d.losses) >= 3  # mse, l1 and Eq. 4's terms
    torch.testing.assert_close(out_s.sq_error, (x - out_d.x_hat.detach()).pow(2).sum(-1).mean(), rtol=1e-5, atol=1e-4)
    fresh = build(arch, d_in, d_sae)
    fresh.load_extra_state(sparse.extra_state())
    assert fresh.counters()["sparse_steps"] == 1
    if arch == "seed001_contrastive_hier":  # the second view took its pairs as well (the grads above cover it)
        assert fresh.counters()["sparse_views"] == 1 and "contrast" in out_s.losses


def test_contrastive_second_view_on_its_pairs_equals_the_dense_encode():
    """seed001_contrastive_hier's second view (input plus noise) encoded from its positive pairs (gather_pre_acts,
    pairs_code): the code and the gradients of an arbitrary function of it into W_enc, b_enc, b_dec and the input
    equal the dense encode's (the whole-step test above cannot see them: InfoNCE's share of the gradient is under
    its tolerance); the view counts in sparse_views; a dense view takes the dense encode."""
    d_in, d_sae = 200, 512
    x = torch.randn(96, d_in, generator=torch.Generator().manual_seed(2)) * 3
    weight = torch.randn(96, d_sae, generator=torch.Generator().manual_seed(3))
    runs = []
    for kernels in ("dense", "sparse"):
        sae = build("seed001_contrastive_hier", d_in, d_sae, seed=5, kernels=kernels).train()
        sae.init_b_dec(x)
        with torch.no_grad():
            sae.b_enc.sub_(4.5)
        x_in = x.clone().requires_grad_()
        f2 = sae.second_view(x_in)
        (f2 * weight).sum().backward()
        runs.append((sae, f2, x_in))
    (dense, f_d, x_d), (sparse, f_s, x_s) = runs
    assert sparse.counters().get("sparse_views") == 1 and "sparse_views" not in dense.counters()
    assert 0.01 < float((f_s > 0).float().mean()) < 1 / 8
    torch.testing.assert_close(f_s, f_d, **TOL)
    for name in ("W_enc", "b_enc", "b_dec"):
        g_d, g_s = getattr(dense, name).grad, getattr(sparse, name).grad
        assert float(g_d.abs().max()) > 0
        torch.testing.assert_close(g_s, g_d, rtol=1e-5, atol=1e-5 * float(g_d.abs().max()), msg=name)
    torch.testing.assert_close(x_s.grad, x_d.grad, rtol=1e-5, atol=1e-5 * float(x_d.grad.abs().max()))
    with torch.no_grad():
        sparse.b_enc.add_(6.0)  # most entries positive: the dense encode
    sparse.second_view(x)
    assert sparse.counters()["sparse_views"] == 1


@pytest.mark.parametrize("preset", ["seed002-contrastive", "seed002-hierarchical"])
def test_seed002_pairs_step_leaves_pruned_latents_out_and_equals_the_dense_step(preset):
    """Seed 002's importance-tracking SAE on the pairs step: pruned latents (keep_mask 0) never become pairs, the
    unlearning term's L2 on their pre-activations (eq. 4) is formed from their encoder columns alone, the KL on the
    candidates, the cluster decorrelation and the L1 read the dense code. Losses, x_hat, the code, every gradient
    (the input's too) and the counters equal the dense step's; a bookkeeping round (clusters, importance, pruning)
    on the pairs step's x_hat equals the dense one's."""
    d_in, d_sae = 200, 512
    x = torch.randn(96, d_in, generator=torch.Generator().manual_seed(3)) * 3
    gen = torch.Generator().manual_seed(4)
    importance = torch.rand(d_sae, generator=gen) * 0.05  # ~20% below tau = 0.01: candidates for the KL term
    pruned = torch.randperm(d_sae, generator=gen)[:40]
    runs = []
    for kernels in ("dense", "sparse"):
        sae = build(preset, d_in, d_sae, seed=5, kernels=kernels).train()
        sae.init_b_dec(x)
        with torch.no_grad():
            sae.b_enc.sub_(4.5)
            sae.b_enc[pruned] += 6.0  # pruned latents' pre-activations mostly > 0: the L2 term has work, the mask too
            sae.importance.copy_(importance)
            sae.keep_mask[pruned] = 0
            sae.n_updates.fill_(3)  # scored: candidates exist
        sae.after_step(0, 1000)  # step 1: no bookkeeping round in this forward (it would re-score the candidates)
        x_in = x.clone().requires_grad_()
        runs.append((sae, sae(x_in), x_in))
    dense, out_d, sparse, out_s = _assert_step_like_dense(runs)
    assert out_s.active is not None and not torch.isin(out_s.active.cols, pruned).any()
    assert 0.02 < out_s.l0() / d_sae < 1 / 8
    c_d = dense.counters()
    if "unlearn" in out_d.losses:  # the unlearning presets: both parts of eq. 4 acted
        assert c_d["unlearn_kl"] > 0 and c_d["prune_l2"] > 0 and float(dense.W_enc.grad[:, pruned].abs().max()) > 0
    for sae in (dense, sparse):  # step 100: a bookkeeping round (every preset's update_every divides it)
        sae.after_step(99, 1000)
        sae(x)
    assert dense.counters()["importance_updates"] == 4 == sparse.counters()["importance_updates"]
    assert torch.equal(dense.keep_mask, sparse.keep_mask) and torch.equal(dense.clusters, sparse.clusters)
    torch.testing.assert_close(sparse.importance, dense.importance, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("progress", [0.05, 0.5])  # tier 2's gate 0.5 and tier 3's 0; every gate 1
def test_seed003_decode_from_the_code_non_zeros_equals_the_dense_step(progress):
    """Seed 003's chained tiers with the decode and its gradients from the code's non-zeros (kernels.decode_nonzeros):
    losses, x_hat, the code, every gradient (tier maps, tier logits, the input's) and the counters equal the dense
    step's, whatever the curriculum gates (a zero gate's latents are zeros of the code whose gradient is gated away).
    A dense code takes the dense product; eval mode never counts."""
    d_in, d_sae = 200, 600
    x = torch.randn(96, d_in, generator=torch.Generator().manual_seed(6)) * 3
    runs = []
    for kernels in ("dense", "sparse"):
        sae = build("seed003-tiered", d_in, d_sae, seed=5, kernels=kernels).train()
        sae.init_b_dec(x)
        with torch.no_grad():
            sae.b_enc[:100] -= 4.0  # tier 1 (100 latents) reads x, tiers 2-3 a layer norm: 3-7% of the code positive
            sae.b_enc[100:] -= 1.3
        sae.after_step(int(progress * 1000) - 1, 1000)
        x_in = x.clone().requires_grad_()
        runs.append((sae, sae(x_in), x_in))
    dense, out_d, sparse, out_s = _assert_step_like_dense(runs, rtol=1e-5, atol=1e-5)
    assert 0.01 < float((out_s.f > 0).float().mean()) < 1 / 8
    with torch.no_grad():
        sparse.b_enc.add_(3.0)  # a dense code: the dense product
    sparse(x)
    sparse.eval()
    sparse(x)
    assert sparse.sparse_steps == 1


@pytest.mark.parametrize("preset, z2_shift", [("seed000_hsae", 1.0), ("seed000_hsae_no_separation", 1.0),
                                              ("seed000_hsae", 0.0)])  # last: z2 too dense, z2 Wd2 dense
def test_seed000_hsae_level_products_from_the_codes_non_zeros_equal_the_dense_step(preset, z2_shift):
    """Seed 000's HSAE with z1 W2, z2 Wd2 and z1 Ws (and their gradients) from the level codes' non-zeros: losses
    (the Gram term too), x_hat, the code, every gradient (the input's too) and the counters equal the dense step's,
    also when only level 1 is sparse enough."""
    d_in, d_sae = 200, 512
    x = torch.randn(96, d_in, generator=torch.Generator().manual_seed(7)) * 3
    runs = []
    for kernels in ("dense", "sparse"):
        sae = build(preset, d_in, d_sae, seed=5, kernels=kernels).train()
        sae.init_b_dec(x)
        with torch.no_grad():
            sae.b_enc.sub_(1.5 * sae.b_enc.abs().mean() + 2.0)  # level 1 ~5% active
            sae.b_enc2.sub_(z2_shift)
        x_in = x.clone().requires_grad_()
        runs.append((sae, sae(x_in), x_in))
    _, _, _, out_s = _assert_step_like_dense(runs)
    half = d_sae // 2
    z1_density, z2_density = (float((out_s.f[:, s] > 0).float().mean()) for s in (slice(0, half), slice(half, None)))
    assert 0.01 < z1_density < 1 / 8 and (0.003 < z2_density < 1 / 8) == (z2_shift > 0), (z1_density, z2_density)


@pytest.mark.parametrize("preset", ["seed000_temporal", "seed000_temporal_single_scale"])
def test_seed000_temporal_decode_from_the_code_non_zeros_equals_the_dense_step(preset):
    """Seed 000's temporal SAE (dilated causal convolutions over the encoder's output) with the decode and its
    gradients from the valid tokens' code non-zeros: losses, x_hat, the code, every gradient (taps, the input's)
    and the counters equal the dense step's."""
    d_in, d_sae, rows, seq = 200, 512, 4, 24
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(rows, seq, d_in, generator=gen) * 3
    docs = torch.arange(rows * seq).reshape(rows, seq) // 10  # documents cross the rows' middles
    valid = torch.rand(rows, seq, generator=gen) > 0.1
    taps = torch.rand(1, generator=gen)
    runs = []
    for kernels in ("dense", "sparse"):
        sae = build(preset, d_in, d_sae, seed=5, kernels=kernels).train()
        sae.init_b_dec(x[valid])
        with torch.no_grad():
            sae.b_enc.sub_(4.0)
            sae.conv_weight[:, -1] += 0.3 * taps  # the context taps act
        x_in = x.clone().requires_grad_()
        runs.append((sae, sae.forward_seq(x_in, docs, valid), x_in))
    dense, _, sparse, out_s = _assert_step_like_dense(runs, rtol=1e-5, atol=1e-5)
    assert 0.01 < float((out_s.f > 0).float().mean()) < 1 / 8
    flat = x[valid][:16]
    torch.testing.assert_close(sparse(flat).loss, dense(flat).loss)  # token-wise forward (no context): the dense one
