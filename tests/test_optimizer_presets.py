"""Optimiser settings of the seed presets (registry.OPTIMIZER_HPARAMS) reach the trainer."""

import math

import pytest
import torch


def test_seed_presets_carry_their_papers_adamw_settings():
    from saestrata.train.trainer import SAESpec, TrainConfig, _optimizer
    from saestrata.train.registry import build

    cfg = TrainConfig(store=None, layer=0, out=None, specs=[])  # no --lr: the presets' own rates apply

    def opt(arch, lr=None, **hp):
        return _optimizer(SAESpec(arch, arch, hp, lr), build(arch, 16, 64, **hp), cfg)

    tiered = opt("seed003-tiered")  # seed 003 sec. 5: AdamW, lr 3e-4, weight decay 1e-4
    assert isinstance(tiered, torch.optim.AdamW)
    assert tiered.defaults["lr"] == 3e-4 and tiered.defaults["weight_decay"] == 1e-4
    grouped = opt("seed001_fixed_ortho")  # seed 001 sec. 5: weight decay 0.01
    assert isinstance(grouped, torch.optim.AdamW) and grouped.defaults["weight_decay"] == 0.01
    plain = opt("topk")  # baselines: plain Adam at default_lr(d_sae=64) = 2e-4 * 16
    assert isinstance(plain, torch.optim.Adam) and not isinstance(plain, torch.optim.AdamW)
    assert plain.defaults["lr"] == pytest.approx(3.2e-3)
    swept = opt("seed004-groups", lr=1e-3, weight_decay=0.5)  # --set lr / weight_decay win over the preset
    assert isinstance(swept, torch.optim.AdamW)
    assert swept.defaults["lr"] == 1e-3 and swept.defaults["weight_decay"] == 0.5


def test_an_explicit_lr_wins_over_a_presets_lr_and_set_lr_wins_over_both():
    """``train --lr`` (cfg.lr) once lost silently to a preset's 3e-4: a control run meant at 8e-3 trained at 3e-4."""
    from saestrata.train.trainer import SAESpec, TrainConfig, _optimizer
    from saestrata.train.registry import build, optimizer_hparams

    cfg = TrainConfig(store=None, layer=0, out=None, specs=[], lr=8e-3)
    for name in ("seed002-contrastive", "seed001_static_hier", "seed003-tiered", "topk"):
        opt = _optimizer(SAESpec(name, name), build(name, 16, 64), cfg)
        assert opt.defaults["lr"] == 8e-3, name
    seed002 = _optimizer(SAESpec("seed002-contrastive", "seed002-contrastive"), build("seed002-contrastive", 16, 64), cfg)
    wd = optimizer_hparams("seed002-contrastive")["weight_decay"]  # the rest of the preset stays
    assert isinstance(seed002, torch.optim.AdamW) and seed002.defaults["weight_decay"] == wd > 0
    swept = _optimizer(SAESpec("topk", "topk", {}, 5e-3), build("topk", 16, 64), cfg)
    assert swept.defaults["lr"] == 5e-3


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_contiguous_step_equals_torch_step_bit_for_bit_and_keeps_layouts(name):
    """train/optim.py: the fused step on transposed views of a column-major W_enc is torch's own step."""
    from saestrata.train import optim

    gen = torch.Generator().manual_seed(0)
    start = torch.randn(16, 24, generator=gen).t()  # column-major [24, 16], like an SAE's W_enc
    ours = torch.nn.Parameter(start.clone())  # clone keeps the column-major strides
    ref = torch.nn.Parameter(start.clone())
    assert not ours.is_contiguous() and ours.stride() == ref.stride() == (1, 24)
    kw = {"lr": 1e-2, "betas": (0.9, 0.999), "fused": True}
    kw |= {"weight_decay": 0.01} if name == "AdamW" else {}
    opt_ours, opt_ref = getattr(optim, name)([ours], **kw), getattr(torch.optim, name)([ref], **kw)
    for _ in range(3):
        grad = torch.randn(16, 24, generator=gen).t()
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_ref.step()
    assert torch.equal(ours, ref)
    assert ours.stride() == (1, 24) and ours.grad.stride() == (1, 24)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt_ours.state[ours][key], opt_ref.state[ref][key])
        assert opt_ours.state[ours][key].stride() == (1, 24)


@pytest.mark.parametrize("scale,max_norm", [(10.0, 1.0), (0.01, 1.0), (5.0, float("inf")), (1.0, 0.5)])
def test_clip_grad_norm_is_torchs_bit_for_bit(scale, max_norm):
    """train/optim.py skips only torch's multiply by exactly 1.0: gradients and norm must equal torch's."""
    from saestrata.train.optim import clip_grad_norm

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32).t()), torch.nn.Parameter(torch.randn(3))]
    for p in ours[:2]:
        p.grad = torch.randn_like(p) * scale
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        b.grad = None if a.grad is None else a.grad.clone()
    got, want = clip_grad_norm(ours, max_norm), torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert torch.equal(got, want)
    for a, b in zip(ours, theirs):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
    if scale == 10.0:
        assert ours[0].grad.norm() < 10  # it did clip


def _unit_row_params(seed: int = 1):
    """A decoder with unit-norm rows [300, 48], a column-major encoder (as the SAEs keep W_enc) and a bias."""
    gen = torch.Generator().manual_seed(seed)
    w_dec = torch.nn.functional.normalize(torch.randn(300, 48, generator=gen), dim=1)
    return [torch.nn.Parameter(w_dec), torch.nn.Parameter(w_dec.t().clone().t().contiguous().t()),
            torch.nn.Parameter(torch.randn(300, generator=gen))]


def _reference_step(params, opt, max_norm):
    """The trainer's unfused sequence in plain torch: project W_dec's gradient, clip, Adam, renormalise."""
    w = params[0]
    w.grad -= (w.grad * w.detach()).sum(-1, keepdim=True) * w.detach()
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    with torch.no_grad():
        w /= w.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return norm


@pytest.mark.parametrize("native", [True, False])
def test_unit_rows_adam_equals_projection_clip_adam_renorm(native, monkeypatch):
    """optim.Adam(unit_rows=W_dec) keeps the decoder constraint and the clip itself (fused into one kernel on the
    CPU, issue 14): 12 steps, clipping on every other one, must equal torch's unfused sequence within fp32
    rounding, with the fused kernel seen running (or, without the compiled module, the unfused fallback)."""
    from saestrata.train import native as nat
    from saestrata.train import optim

    if not native:
        monkeypatch.setattr(nat, "load_native", lambda: None)
    calls = []
    real = nat.adam_unit_rows_
    monkeypatch.setattr(nat, "adam_unit_rows_", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours, ref = _unit_row_params(), _unit_row_params()
    opt = optim.Adam(ours, lr=1e-2, fused=True, unit_rows=ours[0])
    ref_opt = torch.optim.Adam(ref, lr=1e-2, fused=True)
    gen = torch.Generator().manual_seed(2)
    for step in range(12):
        grads = [torch.randn(p.shape, generator=gen) * (5.0 if step % 2 else 0.01) for p in ours]
        for a, b, g in zip(ours, ref, grads):
            a.grad, b.grad = g.clone(), g.clone()
        got = opt.clip_grad_norm_(1.0)
        opt.step()
        want = _reference_step(ref, ref_opt, 1.0)
        assert float(got) == pytest.approx(float(want), rel=1e-5)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours[0].detach().norm(dim=1), torch.ones(300), atol=1e-5)
    assert len(calls) == (12 if native else 0)
    state, ref_state = opt.state[ours[0]], ref_opt.state[ref[0]]  # torch's state layout: checkpoints interchange
    assert state.keys() == ref_state.keys() and float(state["step"]) == float(ref_state["step"]) == 12
    torch.testing.assert_close(state["exp_avg_sq"], ref_state["exp_avg_sq"], rtol=1e-4, atol=1e-9)


def test_clip_takes_known_squared_norms_in_place_of_its_own_passes():
    """clip_grad_norm_(known=...) uses the squared norms it is given (the fused backward's, train/fused.py) for
    those parameters and computes the others' (a deliberately wrong known value shows which one it used)."""
    from saestrata.train import optim

    params = _unit_row_params()
    w = params[0]
    gen = torch.Generator().manual_seed(3)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    g = w.grad
    proj = float((g - (g * w.detach()).sum(1, keepdim=True) * w.detach()).double().pow(2).sum())
    rest = sum(float(p.grad.double().pow(2).sum()) for p in params[1:])
    opt = optim.Adam(params, lr=1e-2, fused=True, unit_rows=w)
    assert float(opt.clip_grad_norm_(1.0)) == pytest.approx(math.sqrt(proj + rest), rel=1e-5)
    sq1 = float(params[1].grad.double().pow(2).sum())
    got = opt.clip_grad_norm_(1.0, known={w: 4 * proj, params[1]: 9 * sq1})
    assert float(got) == pytest.approx(math.sqrt(4 * proj + 9 * sq1 + rest - sq1), rel=1e-5)


def test_topk_training_with_the_backward_norms_equals_training_without(tmp_path, monkeypatch):
    """The trainer hands the fused backward's norms to the clip (grad_sq_norms seen non-empty); ten TopK steps
    that clip (max_grad_norm 1) give the weights of ten steps where the clip computes every norm itself."""
    from saestrata.train import topk as topk_module
    from saestrata.train.registry import build
    from saestrata.train.trainer import SAESpec, TrainConfig, _Slot

    x = torch.randn(10, 64, 32, generator=torch.Generator().manual_seed(4)) * 3
    cfg = TrainConfig(store=None, layer=0, out=tmp_path, specs=[], d_sae=128)
    seen, real = [], topk_module.TopKSAE.grad_sq_norms

    def spy(self):
        seen.append(bool(real(self)))
        return real(self)

    weights = []
    for use_known in (True, False):
        if not use_known:
            monkeypatch.setattr(topk_module.TopKSAE, "grad_sq_norms", lambda self: {})
        else:
            monkeypatch.setattr(topk_module.TopKSAE, "grad_sq_norms", spy)
        sae = build("topk", 32, 128, seed=1, k=4, kernels="sparse")
        slot = _Slot(SAESpec(f"t{use_known}", "topk"), sae, cfg, steps=10)
        sae.init_from_batch(x[0])
        for step in range(10):
            assert slot.step(x[step], step, False) is not None
        weights.append([p.detach().clone() for p in sae.parameters()])
    assert seen and all(seen)
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_only_archs_keeping_the_base_decoder_constraint_hand_it_to_the_optimizer():
    """Archs that override remove_parallel_grad / normalize_decoder (seed 000 HSAE, seed 003) keep doing it themselves."""
    from saestrata.train.registry import build
    from saestrata.train.trainer import SAESpec, TrainConfig, _optimizer

    cfg = TrainConfig(store=None, layer=0, out=None, specs=[])
    for arch, handed in [("topk", True), ("batchtopk", True), ("matryoshka", True), ("jumprelu", True),
                         ("standard", False), ("seed000_hsae", False), ("seed003-tiered", False)]:
        sae = build(arch, 16, 64)
        opt = _optimizer(SAESpec(arch, arch), sae, cfg)
        assert (opt.unit_rows is sae.W_dec) if handed else opt.unit_rows is None, arch


def test_the_unit_row_step_asks_for_the_cpu_kernels_only_for_cpu_weights(monkeypatch):
    """On a GPU the optimiser must not build the compiled CPU kernels (~1 min of g++ inside step 0, counted as
    training time, or a misleading "not built" warning without a compiler): it rules the fused path out by the
    weight's device before asking for the module. Meta tensors stand in for a GPU's; a CPU weight must ask."""
    from saestrata.train import native as nat
    from saestrata.train import optim

    calls = []
    monkeypatch.setattr(nat, "load_native", lambda: calls.append(1))  # returns None: "not built"
    for device, asked in (("meta", []), ("cpu", [1])):
        w = torch.nn.Parameter(torch.zeros(8, 4, device=device))
        w.grad = torch.zeros(8, 4, device=device)
        opt = optim.Adam([w], lr=1e-2, unit_rows=w)
        assert opt._fusable() is False
        assert calls == asked, device
        calls.clear()
