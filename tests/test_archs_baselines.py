"""State-of-the-art baselines: BatchTopK, JumpReLU, Matryoshka BatchTopK.

Each arch gets a test of its defining mechanism (expected values recomputed here
from the papers' formulas, never taken from the code under test), a save/load
round trip on raw inputs after ``fold_input_scale``, and a 50-step training run on
real Gemma 3 270M layer-8 activations.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from safetensors.torch import load_file

from saestrata.train.arch_info import ArchError
from saestrata.train.batchtopk import BatchTopKSAE, top_n
from saestrata.train.jumprelu import JumpReLUSAE, jumprelu, step
from saestrata.train.matryoshka import MatryoshkaSAE
from saestrata.train.registry import build
from saestrata.train.sae_io import WEIGHTS_FILE, load_sae, save_sae
from saestrata.train.trainer import LOG_FILE, SAESpec, TrainConfig, train

BASELINES = ["batchtopk", "jumprelu", "matryoshka"]


def _inputs(batch: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """Random inputs with mean norm ~sqrt(d_in), like the trainer's normalised batches."""
    return torch.randn(batch, d_in, generator=torch.Generator().manual_seed(seed))


# -- BatchTopK -------------------------------------------------------------------------

def test_batchtopk_keeps_k_times_batch_largest_in_training():
    sae = BatchTopKSAE(32, 256, k=8).train()
    x = _inputs(64, 32)
    with torch.no_grad():
        pre = sae.pre_acts(x)
        f = sae.encode(x)
    active = f > 0
    assert int(active.sum()) == 8 * 64
    # The budget is shared by the batch: tokens differ in their counts (a per-token TopK would not).
    assert len(set(active.sum(-1).tolist())) > 1
    # Kept entries are the largest pre-activations of the whole batch, passed through unchanged.
    assert float(pre[active].min()) >= float(pre[~active].max())
    torch.testing.assert_close(f[active], pre[active])


@pytest.mark.parametrize("case", ["random", "ties", "sample-holds-the-largest", "half"])
def test_top_n_selects_what_topk_selects(case):
    g = torch.Generator().manual_seed(3)
    flat = torch.randn(512 * 1024, generator=g).relu()
    n = 8 * 512
    if case == "ties":  # bf16-like values: many entries equal to the n-th largest
        flat = flat.bfloat16().float()
    if case == "sample-holds-the-largest":  # the strided sample alone is above everything else: fallback path
        flat = torch.rand(flat.numel(), generator=g) * 0.5
        flat[:: (flat.numel() // (2 * n)) | 1] += 1.0
    if case == "half":
        n = flat.numel() // 2
    values, indices = top_n(flat, n)
    reference = flat.topk(n).values
    assert indices.numel() == n and len(set(indices.tolist())) == n
    torch.testing.assert_close(flat[indices], values, rtol=0, atol=0)
    torch.testing.assert_close(values.sort(descending=True).values, reference, rtol=0, atol=0)


def test_batchtopk_threshold_is_running_min_and_used_in_eval():
    sae = BatchTopKSAE(32, 256, k=8, threshold_lr=0.25).train()
    x1, x2 = _inputs(64, 32, seed=1), _inputs(64, 32, seed=2)
    with torch.no_grad():
        f1, f2 = sae.encode(x1), sae.encode(x2)
    sae.update_firing(f1)
    first = float(f1[f1 > 0].min())
    assert torch.all(sae.threshold == first)
    sae.update_firing(f2)
    expected = first + 0.25 * (float(f2[f2 > 0].min()) - first)
    torch.testing.assert_close(sae.threshold, torch.full((256,), expected))

    sae.eval()
    with torch.no_grad():
        pre = sae.pre_acts(x1)
        f_eval = sae.encode(x1)
        single = sae.encode(x1[:1])
    torch.testing.assert_close(f_eval, torch.relu(pre) * (pre > expected))
    assert 0 < int((f_eval > 0).sum()) < int((pre > 0).sum())  # the threshold actually cuts
    torch.testing.assert_close(single, f_eval[:1])  # eval is per token, no batch dependence


def test_batchtopk_auxk_trains_dead_latents():
    sae = BatchTopKSAE(32, 256, k=8, aux_k=16).train()
    dead = torch.arange(256) % 2 == 0
    sae.tokens_since_fired[dead] = sae.dead_window_tokens
    out = sae(_inputs(64, 32))
    assert float(out.losses["auxk"].detach()) > 0
    out.losses["auxk"].backward()
    grad_norm = sae.W_enc.grad.norm(dim=0)
    assert float(grad_norm[dead].max()) > 0 and float(grad_norm[~dead].max()) == 0


# -- JumpReLU --------------------------------------------------------------------------

def _kernel(z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """Rectangle kernel K((z - theta)/eps), written out independently of the module."""
    return ((z - theta).abs() < eps / 2).float()


def test_jumprelu_ste_matches_paper_pseudo_derivatives():
    gen = torch.Generator().manual_seed(0)
    eps = 0.5
    z = torch.randn(128, 16, generator=gen).requires_grad_()
    theta = (torch.rand(16, generator=gen) + 0.2).requires_grad_()
    g = torch.randn(128, 16, generator=gen)

    out = jumprelu(z, theta, eps)
    torch.testing.assert_close(out, z * (z > theta))
    out.backward(g)
    k = _kernel(z.detach(), theta.detach(), eps)
    torch.testing.assert_close(theta.grad, (-(theta.detach() / eps) * k * g).sum(0))
    torch.testing.assert_close(z.grad, g * (z.detach() > theta.detach()))

    theta.grad = None
    z.grad = None
    h = step(z, theta, eps)
    torch.testing.assert_close(h, (z > theta).float())
    h.backward(g)
    torch.testing.assert_close(theta.grad, (-(1 / eps) * k * g).sum(0))
    assert z.grad is None or float(z.grad.abs().max()) == 0  # no STE for z (paper app. J)


def test_jumprelu_l0_penalty_and_reconstruction_reach_threshold():
    eps, lam = 0.5, 0.3
    sae = JumpReLUSAE(32, 64, l0_coeff=lam, bandwidth=eps, init_threshold=0.4).train()
    x = _inputs(128, 32)
    with torch.no_grad():
        z = torch.relu(sae.pre_acts(x))
    theta = sae.threshold.detach()
    window = _kernel(z, theta, eps)
    assert float(window.sum()) > 0

    out = sae(x)
    torch.testing.assert_close(out.losses["l0"], lam * (z > theta).float().sum(-1).mean())
    out.losses["l0"].backward()
    # d/dlog(theta) = theta * d/dtheta of lambda * mean_b sum_i H(z - theta) (sec. 4).
    expected = theta * (-(lam / eps) * window.mean(0))
    torch.testing.assert_close(sae.log_threshold.grad, expected)
    assert float(sae.log_threshold.grad.abs().max()) > 0
    assert sae.W_enc.grad is None or float(sae.W_enc.grad.abs().max()) == 0  # L0 trains only theta

    sae.zero_grad()
    sae(x).losses["mse"].backward()
    assert float(sae.log_threshold.grad.abs().max()) > 0  # reconstruction also moves theta


def test_jumprelu_thresholds_start_at_the_target_firing_rate():
    """With a target L0 the first batch's per-latent quantile sets theta (benchmark 2026-12-02 fix)."""
    d_in, d_sae, target = 32, 256, 12.0
    x = _inputs(512, d_in) + 3.0  # an offset, so b_dec matters
    paper = JumpReLUSAE(d_in, d_sae, seed=1).train()
    paper.init_from_batch(x)  # no target: the paper's constant theta
    calibrated = JumpReLUSAE(d_in, d_sae, seed=1, target_l0=target).train()
    calibrated.init_from_batch(x)
    torch.testing.assert_close(calibrated.b_dec, x.mean(0))
    with torch.no_grad():
        l0_paper = float((paper.encode(x) > 0).float().sum(-1).mean())
        f = calibrated.encode(x)
        l0 = float((f > 0).float().sum(-1).mean())
        z = torch.relu(calibrated.pre_acts(x))
        theta = calibrated.threshold.clone()
    assert l0_paper > 5 * target  # the constant init starts far above any target
    assert abs(l0 - target) <= 0.05 * target
    # Each latent fires on ~target/d_sae of the batch (a quantile per latent, not one global threshold).
    rate = (f > 0).float().mean(0)
    assert float((rate - target / d_sae).abs().max()) <= 2.0 / len(x)
    # theta_i lies between latent i's own order statistics around rank target/d_sae * batch (sorted here).
    k = round(len(x) * target / d_sae)
    ranked = z.sort(0, descending=True).values
    assert torch.all(theta >= ranked[k] - 1e-5) and torch.all(theta <= ranked[k - 1] + 1e-5)
    # The floor init_threshold holds where the quantile is smaller.
    floored = JumpReLUSAE(d_in, d_sae, seed=1, target_l0=target, init_threshold=50.0).train()
    floored.init_from_batch(x)
    assert float(floored.threshold.detach().min()) >= 50.0 - 1e-3
    with pytest.raises(ArchError, match="target_l0"):
        JumpReLUSAE(d_in, d_sae, target_l0=0.0)


def test_jumprelu_target_loss_pushes_l0_towards_the_target_from_both_sides():
    """``target_coeff * (L0/T - 1)^2`` (dictionary_learning's JumpReluTrainer): below T it lowers theta."""
    eps, d_in, d_sae = 0.5, 32, 64
    x = _inputs(128, d_in)
    for target, sign in ((2.0, +1), (200.0, -1)):  # L0 above 2 (theta must rise), below 200 (theta must fall)
        sae = JumpReLUSAE(d_in, d_sae, bandwidth=eps, init_threshold=0.4, target_l0=target, target_coeff=0.7).train()
        with torch.no_grad():
            z = torch.relu(sae.pre_acts(x))
        theta = sae.threshold.detach()
        l0 = (z > theta).float().sum(-1).mean()
        out = sae(x)
        torch.testing.assert_close(out.losses["l0"], 0.7 * (l0 / target - 1) ** 2)
        out.losses["l0"].backward()
        # d/dlog(theta) = theta * 0.7 * 2 (L0/T - 1) / T * d L0/d theta, d L0/d theta = -(1/eps) mean_b K (sec. 4).
        expected = theta * 0.7 * 2 * (l0 / target - 1) / target * (-(1 / eps) * _kernel(z, theta, eps).mean(0))
        torch.testing.assert_close(sae.log_threshold.grad, expected)
        moved = -sae.log_threshold.grad  # a descent step's direction
        assert sign * float(moved.sum()) > 0


def test_trainer_passes_the_target_l0_to_jumprelu_and_its_controller(tmp_path, tiny_store):
    """``train --target-l0``: JumpReLU gets ``target_l0`` (cfg.json), starts near it, and the L0 controller acts."""
    run = tmp_path / "run"
    train(TrainConfig(store=tiny_store, layer=1, out=run, d_sae=64, batch_size=64, tokens=256,
                      specs=[SAESpec("jr", "jumprelu", target_l0=6.0), SAESpec("plain", "jumprelu")]), progress=False)
    cfg = json.loads((run / "jr" / "cfg.json").read_text())
    assert cfg["saestrata"]["hparams"]["target_l0"] == 6.0
    assert cfg["saestrata"]["final_counters"]["l0_control_updates"] > 0
    plain = json.loads((run / "plain" / "cfg.json").read_text())
    assert plain["saestrata"]["hparams"]["target_l0"] is None
    first = json.loads((run / "jr" / LOG_FILE).read_text().splitlines()[0])
    first_plain = json.loads((run / "plain" / LOG_FILE).read_text().splitlines()[0])
    assert first["step"] == 0 and abs(first["l0"] - 6.0) < 2.0 and first_plain["l0"] > 20
    with pytest.raises(ValueError, match="not both"):
        train(TrainConfig(store=tiny_store, layer=1, out=tmp_path / "r2", d_sae=64, batch_size=64, tokens=256,
                          specs=[SAESpec("jr", "jumprelu", {"target_l0": 4.0}, target_l0=6.0)]), progress=False)


def test_jumprelu_fold_leaves_pre_activations_and_thresholds():
    sae = JumpReLUSAE(32, 64).eval()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
        sae.log_threshold.uniform_(-3, 0)
    x, scale = _inputs(16, 32) * 50.0, 0.037  # raw activations are large; s < 1 as for Gemma
    with torch.no_grad():
        pre_before, theta_before = sae.pre_acts(x * scale), sae.threshold.clone()
        sae.fold_input_scale(scale)
        pre_after = sae.pre_acts(x)
    torch.testing.assert_close(pre_after, pre_before, rtol=1e-4, atol=1e-5)
    assert torch.equal(sae.threshold, theta_before)


# -- Matryoshka ------------------------------------------------------------------------

def test_matryoshka_loss_is_sum_of_prefix_losses():
    sae = MatryoshkaSAE(16, 64, k=6, prefix_fractions=[0.125, 0.25, 0.5, 1.0]).train()
    with torch.no_grad():
        sae.b_dec.normal_()
    x = _inputs(32, 16)
    out = sae(x)
    f = out.f.detach()
    expected = sum(
        (x - (f[:, :m] @ sae.W_dec[:m] + sae.b_dec)).pow(2).sum(-1).mean() for m in (8, 16, 32, 64)
    )
    assert float(out.losses["auxk"].detach()) == 0  # no dead latents yet
    torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.x_hat, sae.decode(out.f), rtol=1e-5, atol=1e-4)


def test_matryoshka_rejects_bad_prefixes():
    with pytest.raises(ArchError):
        MatryoshkaSAE(16, 64, prefix_fractions=[0.25, 0.5])  # does not end with the full dictionary
    with pytest.raises(ArchError):
        MatryoshkaSAE(16, 64, prefix_fractions=[0.5, 0.25, 1.0])


# -- save / load -----------------------------------------------------------------------

def _trained_like(arch: str) -> torch.nn.Module:
    """An SAE with non-trivial biases and thresholds, as after training."""
    sae = build(arch, 32, 128, seed=3, **({"k": 8} if arch != "jumprelu" else {}))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
        if arch == "jumprelu":
            sae.log_threshold.uniform_(-2, 0.5)
        else:
            sae.train()
            sae.update_firing(sae.encode(_inputs(64, 32, seed=4) + sae.b_dec))
    return sae.eval()


@pytest.mark.parametrize("arch", BASELINES)
def test_save_load_round_trip_on_raw_inputs(arch, scratch):
    sae = _trained_like(arch)
    # A power-of-two scale makes folding exact in floating point, so no pre-activation
    # can cross its threshold through rounding and the comparison can be exact.
    scale = 0.125
    x_raw = (_inputs(64, 32, seed=5) + sae.b_dec.detach()) / scale
    with torch.no_grad():
        f_ref = sae.encode(x_raw * scale)
        x_hat_ref = sae.decode(f_ref) / scale
        assert 0 < int((f_ref > 0).sum()) < int((sae.pre_acts(x_raw * scale) > 0).sum())  # thresholds bite
        sae.fold_input_scale(scale)
    save_sae(sae, scratch, {"hook_name": "blocks.8.hook_resid_post", "layer": 8})

    loaded, cfg = load_sae(scratch)
    with torch.no_grad():
        f = loaded.encode(x_raw)
        x_hat = loaded.decode(f)
    assert torch.equal(f > 0, f_ref > 0)
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(x_hat, x_hat_ref, rtol=1e-5, atol=1e-3)

    # SAELens' JumpReLU inference from the saved tensors alone gives the same latents.
    assert cfg["architecture"] == "jumprelu" and cfg["saestrata"]["arch"] == arch
    w = load_file(str(scratch / WEIGHTS_FILE))
    assert "log_threshold" not in w and w["threshold"].shape == (128,)
    pre = (x_raw - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    torch.testing.assert_close(torch.relu(pre) * (pre > w["threshold"]), f_ref)


# -- training on real Gemma 3 270M activations -----------------------------------------

STEPS, BATCH = 50, 512


@pytest.fixture(scope="module")
def trained_baselines(real_store, tmp_path_factory) -> dict:
    """The three baselines trained together for 50 steps on layer 8 (one pass, shared batches)."""
    cfg = TrainConfig(
        store=real_store, layer=8, out=tmp_path_factory.mktemp("baselines"),
        specs=[SAESpec(arch, arch) for arch in BASELINES], d_sae=2048, batch_size=BATCH,
        tokens=STEPS * BATCH, log_every=1, dead_window_tokens=8 * BATCH, device="cpu",
    )
    return train(cfg, progress=False)


@pytest.mark.parametrize("arch", BASELINES)
def test_trains_on_real_gemma_activations(arch, trained_baselines):
    folder = trained_baselines[arch]
    log = [json.loads(line) for line in (folder / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(STEPS))
    last, mse = log[-1], [r["mse"] for r in log]
    print(f"\n{arch}: step {last['step']} L0 {last['l0']:.1f} fvu {last['fvu']:.3f} mse {last['mse']:.1f} "
          f"(first mse {mse[0]:.1f}) dead {last['dead_frac']:.3f}")
    print(f"median of last 10 steps: fvu {statistics.median(r['fvu'] for r in log[-10:]):.3f} "
          f"mse {statistics.median(mse[-10:]):.1f} (first 10: {statistics.median(mse[:10]):.1f})")
    for record in log:
        assert all(math.isfinite(v) for v in record.values() if isinstance(v, (int, float))), record
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["saestrata"]["failed"] is None
    # Medians over 10 steps: a few batches holding outlier tokens have several times the usual mse.
    assert statistics.median(mse[-10:]) < 0.85 * statistics.median(mse[:10])
    if arch != "jumprelu":
        k = cfg["saestrata"]["hparams"]["k"]
        assert all(r["l0"] == pytest.approx(k) for r in log)  # exactly k * batch active in training
        threshold = load_file(str(folder / WEIGHTS_FILE))["threshold"]
        assert float(threshold.min()) > 0 and float(threshold.max()) == float(threshold.min())  # one global value
        print(f"global threshold {float(threshold[0]):.3f}")
