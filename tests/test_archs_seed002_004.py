"""Seed families 002 (importance tracking), 003 (tiered HSAE) and 004 (hierarchical group sparsity).

Expected values are recomputed here from the papers' formulas (loops, autograd,
explicit counts), never read back from the code under test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from saestrata.train.registry import build, optimizer_hparams
from saestrata.train.sae_io import load_sae, save_sae
from saestrata.train.seed002_importance import ImportanceSAE, bernoulli_kl, spherical_kmeans, standardized_profiles
from saestrata.train.seed003_tiered import TieredHSAE
from saestrata.train.seed004_groups import GroupSparsitySAE
from saestrata.train.sweep import expand_specs
from saestrata.train.trainer import LOG_FILE, SAESpec, TrainConfig, train

D_IN = 32


def _x(n=64, d=D_IN, seed=0, scale=1.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * scale


# -- seed 004: hierarchical group sparsity ---------------------------------------------------------
def test_group_penalty_is_lambda_gamma_power():
    d_sae, groups, lam, gamma = 23, 5, 0.04, 1.5  # 23 is not a multiple of 5: sizes 5,5,5,4,4
    sae = GroupSparsitySAE(D_IN, d_sae, groups=groups, gamma=gamma, l1_coeff=lam)
    sizes = [len(a) for a in np.array_split(np.arange(d_sae), groups)]
    f = torch.rand(7, d_sae, generator=torch.Generator().manual_seed(1))
    expected, start = 0.0, 0
    for k, size in enumerate(sizes, start=1):
        expected += lam * gamma ** (k - 1) * f[:, start:start + size].sum().item()
        start += size
    expected /= f.shape[0]
    got = sae.penalties(None, None, f, None)["l1"].item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert sae.group_index().tolist() == [k for k, s in enumerate(sizes) for _ in range(s)]


def test_groups_and_gamma_sweep_through_set():
    specs = expand_specs(["seed004-groups"], ["gamma=1.25,1.5,2.0", "groups=3,5,7"])
    assert len(specs) == 9
    for spec in specs:
        sae = build(spec.arch, D_IN, 70, **spec.hparams)
        hp = spec.hparams
        assert sae.hparams()["gamma"] == hp["gamma"] and sae.hparams()["groups"] == hp["groups"]
        w = sae.l1_weights
        assert w[0].item() == pytest.approx(0.04)
        assert w[-1].item() == pytest.approx(0.04 * hp["gamma"] ** (hp["groups"] - 1), rel=1e-5)
        assert len(torch.unique(w)) == hp["groups"]


def test_ablation_presets_exist_with_the_papers_settings():
    """Sec. 6.2: K in {3, 5, 7}, gamma in {1.25, 1.5, 2.0}, lambda 0.06 (issue 10: they were missing)."""
    expected = {"seed004-groups": (5, 1.5, 0.04), "seed004-k3": (3, 1.5, 0.04), "seed004-k7": (7, 1.5, 0.04),
                "seed004-gamma1.25": (5, 1.25, 0.04), "seed004-gamma2": (5, 2.0, 0.04),
                "seed004-lambda0.06": (5, 1.5, 0.06), "seed004-uniform": (1, 1.0, 0.04)}
    for preset, (k, gamma, lam) in expected.items():
        sae = build(preset, D_IN, 70)
        assert (sae.groups, sae.gamma, sae.l1_coeff) == (k, gamma, lam), preset
        assert optimizer_hparams(preset) == {"lr": 3e-4, "weight_decay": 1e-4}, preset  # sec. 5.2
        w = sae.l1_weights
        assert w[-1].item() == pytest.approx(lam * gamma ** (k - 1), rel=1e-6)


def test_group_counters_match_explicit_counts():
    """Per-group L0 / firing rate / intensity of the last training batch and dead latents per group."""
    d_sae, groups = 23, 5  # sizes 5, 5, 5, 4, 4
    sae = GroupSparsitySAE(D_IN, d_sae, groups=groups).train()
    sizes = [len(a) for a in np.array_split(np.arange(d_sae), groups)]
    x = _x(n=50, scale=3.0)
    f = sae(x).f.detach()
    sae.dead_window_tokens = 100
    sae.tokens_since_fired[[0, 1, 22]] = 100  # two dead in group 1, one in group 5
    c = sae.counters()
    start = 0
    for k, size in enumerate(sizes, start=1):
        block = f[:, start:start + size]
        start += size
        assert c[f"l0_g{k}"] == pytest.approx((block > 0).sum(1).float().mean().item(), rel=1e-6)
        assert c[f"rate_g{k}"] == pytest.approx((block > 0).float().mean().item(), rel=1e-6)
        active = block[block > 0]
        assert c[f"intensity_g{k}"] == pytest.approx(active.mean().item() if active.numel() else 0.0, rel=1e-5)
    assert [c[f"dead_g{k}"] for k in range(1, 6)] == [2, 0, 0, 0, 1]
    assert sum(c[f"l0_g{k}"] for k in range(1, 6)) == pytest.approx((f > 0).sum(1).float().mean().item(), rel=1e-6)
    sae.eval()(x * 0)  # evaluation forwards leave the training counters alone
    assert sae.counters()["l0_g1"] == c["l0_g1"]


def test_whole_group_penalty_scales_with_sparsity_scale():
    """--target-l0 reaches every sparsity term through sparsity_scale; the gamma ratios are kept."""
    sae = GroupSparsitySAE(D_IN, 23)
    f = torch.rand(7, 23, generator=torch.Generator().manual_seed(2))
    full = sae.penalties(None, None, f, None)
    sae.sparsity_scale = 0.25
    scaled = sae.penalties(None, None, f, None)
    assert scaled.keys() == full.keys() == {"l1"}
    assert scaled["l1"].item() == pytest.approx(0.25 * full["l1"].item(), rel=1e-6)


# -- seed 003: tiered HSAE -------------------------------------------------------------------------
def test_tier_widths_and_softmax_weights():
    sae = TieredHSAE(D_IN, 600)
    assert sae.widths == [100, 200, 300]
    assert [w.shape for w in sae.tier_encoders()] == [(D_IN, 100), (100, 200), (200, 300)]
    assert sae.tier_weights().tolist() == pytest.approx([0.1, 0.3, 0.6], abs=1e-6)
    assert sum(TieredHSAE(640, 5120).widths) == 5120 and sum(TieredHSAE(2304, 4608).widths) == 4608
    with torch.no_grad():  # tier weights are a softmax of a learnable logit vector
        sae.tier_logits.add_(torch.tensor([0.5, -1.0, 0.2]))
    logits = sae.tier_logits.detach().double()
    assert sae.tier_weights().tolist() == pytest.approx((logits.exp() / logits.exp().sum()).tolist(), abs=1e-6)
    sae.eval()
    sae(_x()).loss.backward()
    assert sae.tier_logits.grad is not None and sae.tier_logits.grad.abs().sum() > 0


def test_tiers_are_chained_and_l1_weighted():
    sae = TieredHSAE(D_IN, 60, seed=3).eval()
    x = _x(scale=2.0)
    h, tiers = x - sae.b_dec, []
    for i, (w, sl) in enumerate(zip(sae.tier_encoders(), sae.tier_slices())):
        if i:  # layer norm without affine parameters between tiers (seed 003 sec. 5)
            h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
        h = torch.relu(h @ w + sae.b_enc[sl])
        tiers.append(h)
    out = sae(x)
    torch.testing.assert_close(out.f, torch.cat(tiers, -1), rtol=1e-4, atol=1e-5)
    w = [0.1, 0.3, 0.6]
    expected = 0.04 * sum(wi * t.abs().sum(-1).mean().item() for wi, t in zip(w, tiers))
    assert out.losses["l1"].item() == pytest.approx(expected, rel=1e-4)
    x_hat = sum(t @ sae.W_dec[sl] for t, sl in zip(tiers, sae.tier_slices())) + sae.b_dec
    torch.testing.assert_close(out.x_hat, x_hat, rtol=1e-4, atol=1e-4)


def test_per_tier_gradient_clipping():
    sae = TieredHSAE(D_IN, 60, tier_clip=(1.0, 1e9, 5.0), curriculum_frac=0.0).train()
    sae(_x(scale=50.0)).loss.backward()
    w_dec = sae.W_dec.detach()
    proj = sae.W_dec.grad - (sae.W_dec.grad * w_dec).sum(-1, keepdim=True) * w_dec  # unit-norm decoder projection
    raw = [[sae.tier_encoders()[i].grad.clone(), sae.b_enc.grad[sl].clone(), proj[sl]]
           for i, sl in enumerate(sae.tier_slices())]
    raw_norms = [math.sqrt(sum(g.pow(2).sum().item() for g in gs)) for gs in raw]
    assert raw_norms[0] > 1.0 and raw_norms[2] > 5.0, "precondition: gradients above the bounds"
    sae.remove_parallel_grad()  # the trainer's hook between backward and optimiser step
    for i, bound in ((0, 1.0), (2, 5.0)):
        clipped = sae.tier_grads(i)
        norm = math.sqrt(sum(g.pow(2).sum().item() for g in clipped))
        assert norm == pytest.approx(bound, rel=1e-4)
        for before, after in zip(raw[i], clipped):  # encoder, bias, decoder rows: direction kept
            torch.testing.assert_close(after, before * (bound / raw_norms[i]), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(sae.tier_grads(1)[0], raw[1][0])  # under its bound: untouched


def test_curriculum_fades_tiers_in_during_training_only():
    sae = TieredHSAE(D_IN, 60, curriculum_frac=0.2).train()
    x = _x(scale=3.0)
    sl = sae.tier_slices()
    f0 = sae.encode(x)
    assert f0[:, sl[0]].abs().sum() > 0 and f0[:, sl[1]].abs().sum() == 0 and f0[:, sl[2]].abs().sum() == 0
    sae.after_step(14, 100)  # progress 0.15: tier 2 fully on, tier 3 half-way
    ungated = sae.tier_latents(x)
    f = sae.encode(x)
    torch.testing.assert_close(f[:, sl[1]], ungated[1])
    torch.testing.assert_close(f[:, sl[2]], 0.5 * ungated[2])
    sae.after_step(0, 100)
    torch.testing.assert_close(sae.eval().encode(x), torch.cat(ungated, -1))


# -- seed 002: importance tracking -----------------------------------------------------------------
def test_importance_ema_weights_and_memory():
    """Eq. (3) from s = 0, bias-corrected: the gamma-weighted mean of the observations so far."""
    sae = ImportanceSAE(D_IN, 10, n_clusters=4)
    gen = torch.Generator().manual_seed(0)
    obs = [[torch.rand(10, generator=gen) for _ in range(3)] for _ in range(4)]
    seen = []
    for n, (a, g, m) in enumerate(obs, start=1):
        sae.update_importance(a, g, m, n=n)
        seen.append(0.35 * a + 0.5 * g + 0.15 * m)
        raw = sum(0.1 * 0.9 ** (n - k) * c for k, c in enumerate(seen, start=1))  # s_n of eq. (3), s_0 = 0
        torch.testing.assert_close(sae.importance, raw / (1 - 0.9 ** n))
    with pytest.raises(ValueError):
        sae.update_importance(*obs[0], n=0)


def test_importance_signals_match_definitions():
    d_sae, k = 24, 4
    sae = ImportanceSAE(D_IN, d_sae, n_clusters=k, min_cluster_size=1)
    x = _x(n=200, scale=3.0)
    f = sae.encode(x).detach().requires_grad_(True)
    x_hat = sae.decode(f)
    per_token = (x_hat - x).pow(2).sum(-1)
    (grad_f,) = torch.autograd.grad(per_token.sum(), f)  # d L_b / d f_b for every token b
    taylor = (f * grad_f).abs().mean(0).detach()
    a, g, m = sae.importance_signals(x, f.detach(), x_hat.detach())
    fire = (f > 0).detach().numpy()
    torch.testing.assert_close(a, torch.tensor(fire.mean(0), dtype=torch.float32))
    torch.testing.assert_close(g, taylor / taylor.max(), rtol=1e-4, atol=1e-6)
    # Token cluster: the cluster with the largest summed activation; MI from explicit counts.
    fd, clusters = f.detach().numpy(), sae.clusters.numpy()
    sums = np.stack([fd[:, clusters == c].sum(1) for c in range(k)], 1)
    tok = sums.argmax(1)
    for i in range(d_sae):
        mi = 0.0
        for b in (0, 1):
            for c in range(k):
                pbc = np.mean((fire[:, i] == b) & (tok == c))
                if pbc > 0:
                    mi += pbc * math.log(pbc / (np.mean(fire[:, i] == b) * np.mean(tok == c)))
        assert m[i].item() == pytest.approx(mi / math.log(2), abs=1e-5)


def test_pruning_masks_lowest_candidates_below_threshold():
    sae = ImportanceSAE(D_IN, 40, prune_rate=0.05)  # budget: 2 latents per update
    scores = torch.full((40,), 0.5)
    scores[[3, 7, 11, 20]] = torch.tensor([0.004, 0.001, 0.009, 0.002])
    sae.importance.copy_(scores)
    sae.n_updates.fill_(2)  # round 0 clusters only; scores exist from round 1
    assert sorted(sae.prune().tolist()) == [7, 20]
    assert sorted(sae.prune().tolist()) == [3, 11]
    assert sae.prune().numel() == 0  # only latents below tau are ever pruned
    assert torch.nonzero(sae.keep_mask == 0).flatten().tolist() == [3, 7, 11, 20]
    f = sae.encode(_x(scale=5.0))
    assert f[:, [3, 7, 11, 20]].abs().sum() == 0
    unpruned = [i for i in range(40) if i not in (3, 7, 11, 20)]
    torch.testing.assert_close(f[:, unpruned], torch.relu(sae.pre_acts(_x(scale=5.0)))[:, unpruned])


def test_unlearn_term_kl_and_pruned_l2():
    sae = ImportanceSAE(D_IN, 12, unlearn_coeff=0.3, prune_coeff=0.3, target_rate=1e-4, contrast_coeff=0.0,
                        n_clusters=4)
    sae.importance.copy_(torch.tensor([0.5] * 8 + [0.005, 0.002, 0.001, 0.003]))
    sae.n_updates.fill_(2)  # round 0 clusters only; scores exist from round 1
    sae.keep_mask[[10, 11]] = 0  # pruned; 8 and 9 are unpruned candidates
    x = _x(scale=4.0)
    pre = sae.pre_acts(x)
    f = sae.activation(pre)
    kl = 0.0
    for i in (8, 9):
        r = min(max(torch.tanh(f[:, i]).mean().item(), 1e-6), 1 - 1e-6)
        kl += r * math.log(r / 1e-4) + (1 - r) * math.log((1 - r) / (1 - 1e-4))
    l2 = torch.relu(pre[:, [10, 11]]).pow(2).sum(-1).mean().item()
    assert sae.unlearn_loss(pre, f).item() == pytest.approx(kl + 0.3 * l2, rel=1e-4)
    losses = sae.eval().penalties(x, pre, f, None)
    assert losses["unlearn"].item() == pytest.approx(0.3 * (kl + 0.3 * l2), rel=1e-4)
    assert bernoulli_kl(torch.tensor([1e-4]), 1e-4).item() == pytest.approx(0.0, abs=1e-9)


def _train_importance(sae: ImportanceSAE, steps: int, kill=(), seed=0, lr=1e-3) -> list[dict]:
    """The trainer's step order on random data; latents in ``kill`` stop firing after step 0.

    Returns ``sae.counters()`` after every step.
    """
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    sae.train()
    seen = []
    for step in range(steps):
        out = sae(_x(n=128, seed=seed + step, scale=3.0))
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        sae.normalize_decoder()
        sae.after_step(step, steps)
        if step == 0 and kill:
            with torch.no_grad():  # fired at initialisation like every latent, silent from now on
                sae.b_enc[list(kill)] = -1e4
        seen.append(sae.counters())
    return seen


def test_latent_that_dies_after_init_is_pruned_within_the_papers_budget():
    """Issue 10: at seed002-hierarchical's settings (memory 0.9, tau 0.01, 5% per round, a round every
    50 of the paper's 1,000 steps: 20 rounds) a latent silent after initialisation must be pruned.
    Scaled here to a round every 2 of 40 steps. Before the fix round 0 observed the initialisation
    (every latent firing on ~half the tokens, score >= 0.18), and 0.18 * 0.9^19 > 0.01."""
    d_sae, kill = 40, (3, 17)  # budget int(0.05 * 40) = 2 per round
    sae = build("seed002-hierarchical", D_IN, d_sae, update_every=2, n_clusters=4, min_cluster_size=1)
    assert (sae.memory, sae.threshold, sae.prune_rate) == (0.9, 0.01, 0.05)
    seen = _train_importance(sae, 40, kill=kill)
    assert seen[-1]["importance_updates"] == 20
    pruned = set(torch.nonzero(sae.keep_mask == 0).flatten().tolist())
    assert set(kill) <= pruned, (pruned, sae.importance[list(kill)])
    assert seen[-1]["latents_pruned"] == len(pruned)
    first = next(i for i, c in enumerate(seen) if c["latents_pruned"] > 0)
    print("first pruning after step", first, "pruned", sorted(pruned))


def test_kl_term_acts_on_candidates_before_they_are_pruned():
    """Eq. (4): candidates (s < tau) get the KL term for one interval, then are pruned and get the L2
    term. Issue 10: before, no latent became a candidate within the paper's 20 rounds, and a round's
    candidates within the 5% budget were pruned at once, so the KL term was 0 at every step."""
    d_sae, kill = 40, (3, 17)
    sae = build("seed002-hierarchical", D_IN, d_sae, update_every=2, n_clusters=4, min_cluster_size=1)
    seen = _train_importance(sae, 40, kill=kill)
    became = next(i for i, c in enumerate(seen) if c["candidates"] > 0)
    pruned_at = next(i for i, c in enumerate(seen) if c["latents_pruned"] > 0)
    assert pruned_at == became + sae.update_every  # one interval as a candidate first
    kl_steps = [i for i, c in enumerate(seen) if c["unlearn_kl"] > 0]
    assert kl_steps[:2] == [became, became + 1] and seen[-1]["unlearn_kl_steps"] >= 2
    # KL(Bern(rate) || Bern(1e-4)) summed over the candidates, from the rate the module clamps to 1e-6
    assert seen[became]["unlearn_kl"] > 0 and seen[-1]["prune_l2_steps"] >= 0


def test_no_latent_is_scored_at_initialisation():
    """Round 0 (the first training step) only clusters: no importance, so no candidate yet."""
    sae = build("seed002-hierarchical", D_IN, 40, update_every=3, n_clusters=4, min_cluster_size=1)
    seen = _train_importance(sae, 3)
    assert [c["importance_updates"] for c in seen] == [1, 1, 1]
    assert float(sae.importance.abs().sum()) == 0 and not sae.scored() and seen[-1]["candidates"] == 0
    _train_importance(sae, 1, seed=3)
    assert sae.scored() and float(sae.importance.abs().sum()) > 0


def test_kmeans_recovers_correlated_latent_groups_and_min_size():
    gen = torch.Generator().manual_seed(0)
    sources = torch.rand(300, 3, generator=gen)
    members = torch.tensor([0] * 6 + [1] * 6 + [2] * 6)  # 18 latents, three planted groups
    f = torch.relu(sources[:, members] + 0.05 * torch.randn(300, 18, generator=gen))
    prof = standardized_profiles(f)
    assign = spherical_kmeans(prof, 3, iters=10)  # seeded start
    for g in range(3):  # same planted group <=> same cluster (labels may be permuted)
        assert len(set(assign[members == g].tolist())) == 1
    assert len(set(assign.tolist())) == 3
    # A lone latent near group 0 keeps its own cluster unless clusters need >= 2 members.
    e = torch.eye(3)
    prof = torch.nn.functional.normalize(torch.stack([e[0]] * 3 + [e[1]] * 3 + [e[0] + 0.2 * e[2]]), dim=1)
    start = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    assert spherical_kmeans(prof, 3, iters=1, assign=start).tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert spherical_kmeans(prof, 3, iters=1, min_size=2, assign=start).tolist() == [0, 0, 0, 1, 1, 1, 0]


# -- save / load round trip -------------------------------------------------------------------------
def _stateful(arch):
    """A built SAE with non-default learned state (a few Adam steps on random data)."""
    sae = build(arch, D_IN, 60, seed=5, **({"update_every": 2, "n_clusters": 4} if "002" in arch else {}))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for step in range(6):
        out = sae.train()(_x(seed=step, scale=3.0))
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        sae.normalize_decoder()
        sae.after_step(step, 6)
    if isinstance(sae, ImportanceSAE):
        sae.importance[:5] = 0.0
        sae.prune()
    return sae.eval()


@pytest.mark.parametrize("arch", ["seed002-hierarchical", "seed003-tiered", "seed004-groups"])
def test_save_load_round_trip_and_scale_folding(arch, scratch):
    sae = _stateful(arch)
    x = _x(seed=9, scale=3.0)
    f, x_hat = sae.encode(x).detach(), sae(x).x_hat.detach()
    loaded, cfg = load_sae(save_sae(sae, scratch / "sae", {"layer": 8}))
    assert cfg["saestrata"]["arch"] == sae.arch and cfg["saestrata"]["hparams"] == json.loads(
        json.dumps(sae.hparams()))
    for name, tensor in sae.state_dict().items():
        if name != "tokens_since_fired":
            torch.testing.assert_close(loaded.state_dict()[name], tensor, check_dtype=False)
    torch.testing.assert_close(loaded.encode(x), f)
    torch.testing.assert_close(loaded(x).x_hat, x_hat)
    loaded.fold_input_scale(4.0)  # the trainer folds its input scale before saving
    torch.testing.assert_close(loaded.encode(x / 4.0), f, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loaded.decode(f), x_hat / 4.0, rtol=1e-4, atol=1e-4)


# -- 50 steps on real Gemma 3 270M activations ------------------------------------------------------
STEPS, BATCH = 50, 256
SPECS = {
    "seed002": SAESpec("imp", "seed002-hierarchical", {"update_every": 10}),
    "seed003": SAESpec("tiered", "seed003-tiered"),
    "seed004": SAESpec("groups", "seed004-groups"),
}


@pytest.fixture(scope="module")
def trained(real_store, tmp_path_factory):
    """One pass over real layer-8 activations training all three families; returns ``{family: folder}``."""
    out = tmp_path_factory.mktemp("seed002_004_runs")
    cfg = TrainConfig(store=real_store, layer=8, out=out, specs=list(SPECS.values()), d_sae=640,
                      batch_size=BATCH, tokens=STEPS * BATCH, log_every=1, device="cpu", seed=0)
    folders = train(cfg, progress=False)
    return {fam: folders[spec.name] for fam, spec in SPECS.items()}


def _check_trained(folder):
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["saestrata"]["failed"] is None
    log = [json.loads(line) for line in (folder / LOG_FILE).read_text().splitlines()]
    assert len(log) == STEPS
    assert all(math.isfinite(v) for row in log for v in row.values() if isinstance(v, float))
    # Medians: a few batches of the store have much larger variance and spike every SAE's mse at once.
    first, last = np.median([r["mse"] for r in log[:5]]), np.median([r["mse"] for r in log[-5:]])
    assert last < 0.8 * first, (first, last)
    sae, _ = load_sae(folder)
    assert all(torch.isfinite(t).all() for t in sae.state_dict().values())
    final = cfg["saestrata"]["final_train_metrics"]
    print(f"{folder.name}: mse {first:.1f} -> {last:.1f}, L0 {final['l0']:.1f}, fvu {final['fvu']:.3f}")
    return sae


def test_seed002_trains_on_real_activations(trained):
    sae = _check_trained(trained["seed002"])
    assert int(sae.n_updates) == len(range(0, STEPS, 10))  # the trainer's after_step drives the schedule
    print("pruned latents:", int((sae.keep_mask == 0).sum()), "clusters used:", len(torch.unique(sae.clusters)))


def test_seed003_trains_on_real_activations(trained):
    sae = _check_trained(trained["seed003"])
    weights = sae.tier_weights()
    assert torch.isfinite(weights).all() and weights.sum().item() == pytest.approx(1.0, abs=1e-5)
    print("tier weights after 50 steps:", [round(w, 4) for w in weights.tolist()])


def test_seed004_trains_on_real_activations(trained):
    _check_trained(trained["seed004"])
