"""Seed 001 architectures (train/seed001_grouped.py): each variant's mechanism, save/load, real training.

Expected values are computed here independently (explicit loops over groups and
pairs), never copied from the module's output.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from saestrata.train import seed001_grouped as s1
from saestrata.train.arch_info import ArchError
from saestrata.train.registry import build, resolve
from saestrata.train.sae_io import load_sae, save_sae
from saestrata.train.trainer import SAESpec, TrainConfig, train

# float(loss) on a graph-carrying scalar warns; the tests only read values
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

PRESETS = ["seed001_fixed_ortho", "seed001_adaptive_ortho32", "seed001_adaptive_ortho64",
           "seed001_static_hier", "seed001_dynamic_hier", "seed001_contrastive_hier"]


def _frob_pairs(h: torch.Tensor, groups: list[torch.Tensor], pairs) -> float:
    """sum over (i, j) in pairs of ||h_gi^T h_gj / batch||_F, with groups given as weight vectors over latents."""
    total = 0.0
    for i, j in pairs:
        hi, hj = h * groups[i], h * groups[j]
        total += float((hi.T @ hj / h.shape[0]).norm())
    return total


def _random_latents(batch: int, d_sae: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(batch, d_sae, generator=gen))


# -- presets ------------------------------------------------------------------------
def test_presets_carry_the_papers_settings():
    """Sec. 4.3 / 6.1 values reach the built modules."""
    assert resolve("seed001_fixed_ortho")[0] == "seed001_grouped_ortho"
    fixed = build("seed001_fixed_ortho", 64, 256)
    assert float(fixed.alpha) == pytest.approx(0.1) and not fixed.adaptive
    a32, a64 = build("seed001_adaptive_ortho32", 64, 256), build("seed001_adaptive_ortho64", 64, 256)
    assert (a32.n_groups, a32.alpha_range, a32.update_every) == (32, (0.05, 0.15), 100)
    assert (a64.n_groups, a64.alpha_range, a64.update_every) == (64, (0.2, 0.4), 50)
    hier = build("seed001_static_hier", 64, 256)
    assert (hier.n_coarse, hier.n_fine, hier.alpha_l1, hier.alpha_l2) == (8, 8, 0.4, 0.2)
    dyn = build("seed001_dynamic_hier", 64, 256)
    assert dyn.contrast_coeff == 0 and dyn.entropy_coeff == 0.01 and dyn.update_every == 50
    assert float(dyn.log_tau.detach().exp()) == pytest.approx(1.0)
    con = build("seed001_contrastive_hier", 64, 256)
    assert (con.contrast_coeff, con.contrast_temperature) == (0.1, 0.1)
    with pytest.raises(ArchError):
        build("seed001_static_hier", 64, 32)  # 64 fine groups cannot fit 32 latents


# -- grouped orthogonality (Eq. 4, single level) ------------------------------------
def test_ortho_penalty_equals_explicit_pair_loop():
    """Arbitrary (non-contiguous, unequal) groups: the matrix form equals the loop over group pairs."""
    d_sae, n_groups = 40, 5
    f = _random_latents(16, d_sae)
    ids = torch.randint(0, n_groups, (d_sae,), generator=torch.Generator().manual_seed(1))
    groups = [(ids == g).float() for g in range(n_groups)]
    pairs = [(i, j) for i in range(n_groups) for j in range(n_groups) if i != j]
    got = float(s1.ortho_penalty(f, s1.one_hot(ids, n_groups)))
    assert got == pytest.approx(_frob_pairs(f, groups, pairs), rel=1e-5)


def test_fixed_ortho_module_loss_is_alpha_times_contiguous_group_penalty():
    d_in, d_sae, n_groups = 32, 128, 32
    sae = build("seed001_fixed_ortho", d_in, d_sae).eval()
    x = torch.randn(64, d_in, generator=torch.Generator().manual_seed(2)) * 3
    out = sae(x)
    size = d_sae // n_groups  # contiguous equal groups of 4 latents
    groups = [((torch.arange(d_sae) // size) == g).float() for g in range(n_groups)]
    pairs = [(i, j) for i in range(n_groups) for j in range(n_groups) if i != j]
    expected = 0.1 * _frob_pairs(out.f.detach(), groups, pairs)
    assert expected > 0
    assert float(out.losses["ortho"]) == pytest.approx(expected, rel=1e-4)
    assert float(out.losses["l1"]) == pytest.approx(5.0 * float(out.f.sum(-1).mean()), rel=1e-5)


def test_ortho_gradient_is_finite_when_blocks_are_zero():
    """All-zero blocks (ReLU latents that never co-fire) must not produce NaN gradients."""
    f = torch.zeros(8, 16)
    f[:, 0] = 1.0
    f.requires_grad_(True)
    s1.ortho_penalty(f, s1.one_hot(torch.arange(16) // 4, 4)).backward()
    assert torch.isfinite(f.grad).all()


# -- adaptive groups -----------------------------------------------------------------
def test_balanced_assign_respects_capacity_and_preference():
    aff = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6], [0.1, 0.0]])
    ids = s1.balanced_assign(aff, capacity=2)
    assert ids.tolist() == [0, 0, 1, 1]  # latent 2 prefers 0 but group 0 is full of stronger claims


def test_balanced_assign_terminates_on_non_finite_affinity():
    aff = torch.full((6, 3), float("nan"))
    aff[0, 0] = 1.0
    ids = s1.balanced_assign(aff, capacity=2)
    assert torch.bincount(ids, minlength=3).tolist() == [2, 2, 2] and ids[0] == 0


def _clustered_latents(n_clusters: int, size: int, batch: int, seed: int = 0):
    """Latents in hidden clusters (scattered positions); each token fires one whole cluster."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_clusters * size, generator=gen)
    cluster_of = torch.empty_like(perm)
    cluster_of[perm] = torch.arange(n_clusters * size) // size
    token_cluster = torch.randint(0, n_clusters, (batch,), generator=gen)
    mags = torch.rand(batch, n_clusters * size, generator=gen) + 0.5
    return mags * (cluster_of[None, :] == token_cluster[:, None]).float(), cluster_of


def test_adaptive_update_groups_cofiring_latents_and_sets_alpha_in_range():
    n_groups, size = 8, 8
    f, cluster_of = _clustered_latents(n_groups, size, batch=256)
    sae = build("seed001_adaptive_ortho64", 16, n_groups * size, n_groups=n_groups)
    lo, hi = sae.alpha_range
    assign = s1.one_hot(sae.group_ids, n_groups)
    # alpha from the correlation of the groups' summed activity, computed here with torch.corrcoef
    corr = torch.corrcoef((f @ assign).T)
    mean_abs = corr[~torch.eye(n_groups, dtype=torch.bool)].abs().mean()
    before = float(s1.ortho_penalty(f, assign))
    for _ in range(5):
        sae.adapt(f)
    after = float(s1.ortho_penalty(f, s1.one_hot(sae.group_ids, n_groups)))
    assert torch.bincount(sae.group_ids, minlength=n_groups).tolist() == [size] * n_groups
    # every group now holds exactly one hidden cluster, so no cross-group co-firing is left
    for g in range(n_groups):
        assert len(cluster_of[sae.group_ids == g].unique()) == 1
    assert after < 1e-3 * before
    sae2 = build("seed001_adaptive_ortho64", 16, n_groups * size, n_groups=n_groups)
    sae2.adapt(f)
    assert lo <= float(sae2.alpha) <= hi
    assert float(sae2.alpha) == pytest.approx(lo + (hi - lo) * float(mean_abs), rel=1e-4)


def test_adaptive_updates_only_every_update_every_training_steps():
    sae = build("seed001_adaptive_ortho32", 16, 64, n_groups=8, update_every=3).train()
    f, _ = _clustered_latents(8, 8, batch=128)
    x = torch.zeros(128, 16)
    seen = []
    for _ in range(4):
        sae.penalties(x, None, f, None)
        seen.append(sae.group_ids.clone())
        sae.group_ids.copy_(s1.static_group_ids(64, 8))  # reset so each step shows its own effect
    static = s1.static_group_ids(64, 8)
    changed = [not torch.equal(ids, static) for ids in seen]
    assert changed == [True, False, False, True]


# -- static 8x8 hierarchy ------------------------------------------------------------
@pytest.mark.parametrize("a, b, level", [(0, 1, None), (0, 2, 2), (0, 16, 1), (5, 127, 1)])
def test_static_hierarchy_masks_pairs_by_level(a, b, level):
    """d_sae 128: fine groups of 2 latents, coarse groups of 16. Two co-firing latents are penalised
    at level 1 iff their coarse groups differ, at level 2 iff they are in different fine groups of
    the same coarse group, and not at all inside one fine group."""
    sae = build("seed001_static_hier", 16, 128)
    f = torch.zeros(4, 128)
    f[:, a], f[:, b] = torch.tensor([1.0, 2.0, 0.5, 1.5]), torch.tensor([2.0, 1.0, 1.0, 0.5])
    losses = sae.penalties(None, None, f, None)
    cross = 2 * float((f[:, a] * f[:, b]).mean())  # ordered pairs (i, j) and (j, i)
    assert float(losses["ortho_level1"]) == pytest.approx(0.4 * cross if level == 1 else 0.0, abs=1e-6)
    assert float(losses["ortho_level2"]) == pytest.approx(0.2 * cross if level == 2 else 0.0, abs=1e-6)


def test_static_hierarchy_fine_groups_nest_in_coarse_groups():
    sae = build("seed001_static_hier", 16, 200)  # not a multiple of 64: near-equal groups
    coarse, fine = sae.assignments()
    coarse_of_fine = torch.arange(64) // 8
    assert torch.equal(coarse.argmax(1), coarse_of_fine[fine.argmax(1)])
    assert fine.sum(0).min() >= 3 and coarse.sum(0).min() >= 25


# -- dynamic attention-assigned hierarchy ---------------------------------------------
def test_dynamic_assignments_are_nested_distributions_and_losses_match():
    d_in, d_sae = 16, 128
    sae = build("seed001_dynamic_hier", d_in, d_sae).train()
    x = torch.randn(32, d_in, generator=torch.Generator().manual_seed(3)) * 4
    coarse, fine = sae.live_assignments()
    assert torch.allclose(coarse.sum(1), torch.ones(d_sae), atol=1e-5)
    assert torch.allclose(fine.sum(1), torch.ones(d_sae), atol=1e-5)
    assert torch.allclose(fine.view(d_sae, 8, 8).sum(-1), coarse, atol=1e-5)  # p(i) = sum_j p(i, j)
    assert (coarse.max(1).values < 1).all() and (coarse.min(1).values > 0).all()  # soft

    out = sae(x)  # first training forward: the live assignment is used
    coarse, fine = coarse.detach(), fine.detach()

    def gap(p):
        usage = p.mean(0)
        return math.log(p.shape[1]) + float((usage * usage.log()).sum())

    assert float(out.losses["entropy"]) == pytest.approx(0.01 * (gap(coarse) + gap(fine)), rel=1e-4)
    f = out.f.detach()
    pairs1 = [(i, j) for i in range(8) for j in range(8) if i != j]
    pairs2 = [(8 * i + j, 8 * i + k) for i in range(8) for j in range(8) for k in range(8) if j != k]
    groups1 = [coarse[:, i] for i in range(8)]
    groups2 = [fine[:, k] for k in range(64)]
    assert float(out.losses["ortho_level1"]) == pytest.approx(0.4 * _frob_pairs(f, groups1, pairs1), rel=1e-4)
    assert float(out.losses["ortho_level2"]) == pytest.approx(0.2 * _frob_pairs(f, groups2, pairs2), rel=1e-4)


def test_usage_entropy_regulariser_is_zero_when_balanced_and_grows_when_collapsed():
    balanced = s1.one_hot(torch.arange(64) % 8, 8)
    collapsed = s1.one_hot(torch.zeros(64, dtype=torch.long), 8)
    assert float(s1.usage_entropy(balanced)) == pytest.approx(math.log(8), rel=1e-6)
    assert float(s1.usage_entropy(collapsed)) == pytest.approx(0.0, abs=1e-6)


def test_usage_entropy_term_balances_the_live_assignments_it_trains():
    """Trained on the entropy term alone, the attention must move group usage towards balance. Taken through
    the cached assignments (straight-through, gradient at a point up to update_every steps old) it did the
    opposite: coarse usage entropy fell from ~ln 8 to ~1.1 nats within 40 steps (issue 10)."""
    torch.manual_seed(0)
    sae = build("seed001_dynamic_hier", 64, 512, entropy_coeff=1.0).train()
    opt = torch.optim.Adam(sae.attention_parameters(), lr=1e-2)
    f = torch.zeros(8, 512)  # no activity: only the entropy term has a gradient
    for _ in range(80):
        opt.zero_grad()
        sae.penalties(None, None, f, None)["entropy"].backward()
        opt.step()
    with torch.no_grad():
        coarse, fine = sae.live_assignments()
    assert float(s1.usage_entropy(coarse)) > math.log(8) - 0.05
    assert float(s1.usage_entropy(fine)) > math.log(64) - 0.1


def test_orthogonality_terms_train_the_attention_towards_lower_live_values():
    """Trained on the penalties (orthogonality + entropy) with fixed latents, the attention must lower the
    orthogonality terms at its live assignments. Through the 50-step-stale cache it raised them (876 -> ~2,650
    over 150 steps, 512 latents): the gradient of a quadratic term taken at an old point (issue 10)."""
    torch.manual_seed(0)
    sae = build("seed001_dynamic_hier", 64, 512).train()
    opt = torch.optim.Adam(sae.attention_parameters(), lr=1e-2)
    with torch.no_grad():
        f = sae.encode(torch.randn(256, 64) * 4)

    def live_ortho() -> float:
        with torch.no_grad():
            t1, t2 = s1.hier_ortho_terms(f, *sae.live_assignments(), sae.n_fine)
        return float(0.4 * t1 + 0.2 * t2)

    before = live_ortho()
    for _ in range(100):
        opt.zero_grad()
        losses = sae.penalties(None, None, f, None)
        (losses["ortho_level1"] + losses["ortho_level2"] + losses["entropy"]).backward()
        opt.step()
    assert live_ortho() < 0.8 * before


def test_dynamic_assignment_refreshes_every_update_every_steps_and_trains_attention_every_step():
    """Values refresh every update_every steps (sec. 4.2), but every attention parameter gets a
    gradient on every step (issue 10: before, only on refresh steps, 6 of 300 at every 50)."""
    sae = build("seed001_dynamic_hier", 16, 128, update_every=3).train()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(4)) * 4
    has_grad, cached = [], []
    for step in range(7):
        sae.zero_grad(set_to_none=True)
        sae(x).loss.backward()
        has_grad.append([p.grad is not None and bool(p.grad.abs().sum() > 0) for p in
                         (sae.W_key, sae.q_coarse, sae.q_fine, sae.log_tau)])
        cached.append(sae.assign_coarse.clone())
        sae.after_step(step, 7)
        with torch.no_grad():
            sae.q_coarse.add_(torch.randn_like(sae.q_coarse))  # move the attention between steps
    assert all(all(flags) for flags in has_grad), has_grad
    same = [torch.equal(cached[i], cached[i + 1]) for i in range(6)]
    assert same == [True, True, False, True, True, False]  # refreshes on forwards 0, 3, 6
    counters = sae.counters()
    assert counters["assign_grad_steps"] == 7 and counters["assign_refreshes"] == 3
    assert counters["coarse_reassignments"] > 0  # the queries moved, so some argmax groups changed


def test_dynamic_loss_sees_cached_values_between_refreshes():
    """Straight-through: the ortho term between refreshes equals the one computed from the cache."""
    sae = build("seed001_dynamic_hier", 16, 128, update_every=5).train()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(9)) * 4
    sae(x)  # refresh
    with torch.no_grad():
        sae.q_coarse.add_(torch.randn_like(sae.q_coarse))  # live attention now differs from the cache
    out = sae(x)
    f = out.f.detach()
    coarse = sae.assign_coarse
    pairs1 = [(i, j) for i in range(8) for j in range(8) if i != j]
    expected = 0.4 * _frob_pairs(f, [coarse[:, i] for i in range(8)], pairs1)
    assert float(out.losses["ortho_level1"]) == pytest.approx(expected, rel=1e-4)


# -- contrastive (InfoNCE) ------------------------------------------------------------
def _info_nce_loop(a: torch.Tensor, b: torch.Tensor, t: float) -> float:
    a, b = a.double(), b.double()  # float64: the loss is a small difference of large log-sum-exps
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    n, total = a.shape[0], 0.0
    for i in range(n):
        row = torch.stack([a[i] @ b[j] for j in range(n)]) / t
        col = torch.stack([a[j] @ b[i] for j in range(n)]) / t
        total += float(torch.logsumexp(row, 0) - row[i]) + float(torch.logsumexp(col, 0) - col[i])
    return total / (2 * n)


def test_info_nce_matches_definition_and_prefers_identical_views():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(12, 20, generator=gen)
    b_noisy = a + 0.5 * torch.randn(12, 20, generator=gen)
    shuffled = a[torch.roll(torch.arange(12), 1)]
    assert float(s1.info_nce(a, b_noisy, 0.1)) == pytest.approx(_info_nce_loop(a, b_noisy, 0.1), rel=1e-5)
    same, shuf = float(s1.info_nce(a, a, 0.1)), float(s1.info_nce(a, shuffled, 0.1))
    assert same < shuf
    assert float(s1.info_nce(torch.ones(12, 3), torch.ones(12, 3), 0.1)) == pytest.approx(math.log(12), rel=1e-6)
    with pytest.raises(ValueError):
        s1.info_nce(a, a[:5], 0.1)


@pytest.mark.parametrize("over", ["groups", "tokens"])
def test_contrastive_term_contrasts_fine_group_activity_of_two_views(over):
    d_in, d_sae = 16, 128
    sae = build("seed001_contrastive_hier", d_in, d_sae, view_noise=0.0, contrast_over=over).train()
    x = torch.randn(48, d_in, generator=torch.Generator().manual_seed(6)) * 4
    out = sae(x)  # noise 0: both views identical
    z = out.f.detach() @ sae.assign_fine
    z = z.T if over == "groups" else z
    expected = 0.1 * _info_nce_loop(z, z, 0.1)
    assert float(out.losses["contrast"]) == pytest.approx(expected, rel=1e-4)
    perm = torch.roll(torch.arange(z.shape[0]), 1)
    assert float(out.losses["contrast"]) < 0.1 * _info_nce_loop(z, z[perm], 0.1)
    assert "contrast" not in sae.eval()(x).losses  # views only while training


def test_contrastive_second_view_is_noisy():
    sae = build("seed001_contrastive_hier", 16, 128).train()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(7)) * 4
    assert not torch.allclose(sae.second_view(x), sae.encode(x))


# -- counters (issue 10: every mechanism visible in the train log) ----------------------
def _corr_of_group_sums(f: torch.Tensor, assign: torch.Tensor) -> float:
    """Mean |Pearson r| between different groups' summed activity, via torch.corrcoef."""
    corr = torch.corrcoef((f @ assign).T)
    return float(corr[~torch.eye(corr.shape[0], dtype=torch.bool)].abs().mean())


def test_fixed_and_adaptive_counters():
    d_in, d_sae, n_groups = 16, 64, 8
    f, _ = _clustered_latents(n_groups, 8, batch=256)
    f = f + 0.01  # every group varies, so every correlation is defined
    sae = build("seed001_adaptive_ortho32", d_in, d_sae, n_groups=n_groups, update_every=2).train()
    before = sae.group_ids.clone()
    sae.penalties(None, None, f, None)  # first training call: regroups, then the loss
    c = sae.counters()
    assign = s1.one_hot(sae.group_ids, n_groups)
    assert c["group_updates"] == 1 and c["group_reassignments"] == int((sae.group_ids != before).sum()) > 0
    assert c["ortho"] == pytest.approx(float(s1.ortho_penalty(f, assign)), rel=1e-5)
    assert c["alpha"] == pytest.approx(float(sae.alpha), rel=1e-6)
    assert c["inter_group_corr"] == pytest.approx(_corr_of_group_sums(f, assign), rel=1e-4)
    assert c["l1"] == pytest.approx(float(f.sum(-1).mean()), rel=1e-6)
    sae.penalties(None, None, f, None)  # not due: no regrouping
    assert sae.counters()["group_updates"] == 1


def test_static_and_contrastive_counters():
    d_in, d_sae = 16, 128
    x = torch.randn(48, d_in, generator=torch.Generator().manual_seed(10)) * 4
    static = build("seed001_static_hier", d_in, d_sae).train()
    out = static(x)
    c = static.counters()
    assert c["ortho_level1"] == pytest.approx(float(out.losses["ortho_level1"]) / 0.4, rel=1e-5)
    assert c["ortho_level2"] == pytest.approx(float(out.losses["ortho_level2"]) / 0.2, rel=1e-5)
    con = build("seed001_contrastive_hier", d_in, d_sae).train()
    out = con(x)
    c = con.counters()
    assert c["infonce"] == pytest.approx(float(out.losses["contrast"]) / 0.1, rel=1e-5)
    fine = con.assign_fine
    assert c["latent_entropy_fine"] == pytest.approx(float(-(fine * fine.log()).sum(-1).mean()), rel=1e-5)
    assert c["tau"] == pytest.approx(1.0) and c["assign_refreshes"] == 1
    for key in ("usage_entropy_coarse", "usage_entropy_fine", "coarse_reassignments", "fine_reassignments",
                "inter_group_corr", "ortho_level1", "ortho_level2"):
        assert key in c, key


def test_alive_usage_entropy_counts_only_latents_that_fired_within_the_dead_window():
    """Dead latents spread over the groups keep the regulariser's usage entropy high while live ones
    collapse (seed001_contrastive_hier on the benchmark): the *_alive counters must see only live ones."""
    d_in, d_sae = 16, 128
    x = torch.randn(48, d_in, generator=torch.Generator().manual_seed(11)) * 4
    sae = build("seed001_contrastive_hier", d_in, d_sae).train()
    sae.dead_window_tokens = 1000
    sae.tokens_since_fired[:96] = 5000  # 96 dead latents, 32 alive
    with torch.no_grad():
        coarse, fine = (a[96:] for a in sae.live_assignments())
    sae(x)
    c = sae.counters()

    def entropy_of_mean(a):
        p = a.mean(0)
        return float(-(p * p.log()).sum())

    assert c["alive_latents"] == 32
    assert c["usage_entropy_coarse_alive"] == pytest.approx(entropy_of_mean(coarse), rel=1e-5)
    assert c["usage_entropy_fine_alive"] == pytest.approx(entropy_of_mean(fine), rel=1e-5)
    sae.tokens_since_fired[:] = 5000  # none alive: defined as 0, not NaN
    sae._refresh(*(a.detach() for a in sae.live_assignments()))
    assert sae.counters()["alive_latents"] == 0 and sae.counters()["usage_entropy_fine_alive"] == 0.0


def test_activity_weighted_entropy_sees_live_latents_collapsed_where_the_plain_one_does_not():
    """entropy_over="activity": latents weighted by their batch activation, so dead latents spread over the
    groups no longer hide that every live latent sits in one group."""
    d_sae, n = 64, 8
    sae = build("seed001_dynamic_hier", 16, d_sae, entropy_over="activity").train()
    plain = build("seed001_dynamic_hier", 16, d_sae).train()
    coarse = torch.zeros(d_sae, n)
    coarse[:8, 0] = 1  # the 8 live latents all in group 0
    coarse[8:] = torch.nn.functional.one_hot(torch.arange(56) % n, n).float()  # the dead ones spread evenly
    fine = torch.nn.functional.one_hot(torch.arange(d_sae) % 64, 64).float()
    f = torch.zeros(32, d_sae)
    f[:, :8] = torch.rand(32, 8, generator=torch.Generator().manual_seed(3)) + 0.1
    w = f.sum(0)
    usage = (w[:, None] * coarse).sum(0) / w.sum()  # explicit: [1, 0, ..., 0]
    gap_coarse = math.log(n) - float(-(usage[usage > 0] * usage[usage > 0].log()).sum())
    assert gap_coarse == pytest.approx(math.log(n))
    weighted = sae.entropy_reg(coarse, fine, weight=sae._entropy_weight(f))
    unweighted = plain.entropy_reg(coarse, fine, weight=plain._entropy_weight(f))
    fine_usage = (w[:, None] * fine).sum(0) / w.sum()
    gap_fine = math.log(64) - float(-(fine_usage[fine_usage > 0] * fine_usage[fine_usage > 0].log()).sum())
    assert float(weighted) == pytest.approx(0.01 * (gap_coarse + gap_fine), rel=1e-5)
    assert float(unweighted) < 0.01 * 0.2 < float(weighted)  # the plain usage is almost balanced (7.5 of 8 per group)
    assert sae._entropy_weight(torch.zeros(4, d_sae)) is None  # nothing fired: plain usage, no 0/0
    with pytest.raises(ArchError, match="entropy_over"):
        build("seed001_dynamic_hier", 16, d_sae, entropy_over="tokens")


# -- save / load ------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
def test_save_load_round_trip_after_input_scale_fold(preset, scratch):
    d_in, d_sae, scale = 32, 128, 0.25
    sae = build(preset, d_in, d_sae).train()
    x = torch.randn(64, d_in, generator=torch.Generator().manual_seed(8)) * 4
    for _ in range(2):  # adaptive / dynamic variants update their state on the first step
        sae(x * scale)
    f_scaled = sae.encode(x * scale).detach()
    sae.fold_input_scale(scale)
    assert torch.allclose(sae.encode(x), f_scaled, atol=1e-4, rtol=1e-4)
    sae.eval()
    save_sae(sae, scratch, {"hook_name": "blocks.8.hook_resid_post", "layer": 8})
    loaded, cfg = load_sae(scratch)
    assert type(loaded) is type(sae) and cfg["saestrata"]["hparams"] == json.loads(json.dumps(sae.hparams()))
    for name, tensor in sae.state_dict().items():
        if name != "tokens_since_fired":
            assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(loaded.encode(x), sae.encode(x))
    for key, value in sae(x).losses.items():
        assert float(loaded(x).losses[key]) == pytest.approx(float(value), rel=1e-6), key


# -- real Gemma 3 270M activations --------------------------------------------------
@pytest.mark.slow
def test_all_variants_train_on_real_gemma_layer8(real_store, tmp_path):
    """One pass, six SAEs, 50 steps: finite throughout and reconstruction error falls."""
    steps, batch = 50, 256
    cfg = TrainConfig(store=real_store, layer=8, out=tmp_path, specs=[SAESpec(p, p) for p in PRESETS],
                      d_sae=512, batch_size=batch, tokens=steps * batch, lr=3e-4, log_every=1, device="cpu")
    folders = train(cfg, progress=False)
    for preset in PRESETS:
        rows = [json.loads(line) for line in (folders[preset] / "train_log.jsonl").read_text().splitlines()]
        saved = json.loads((folders[preset] / "cfg.json").read_text())["saestrata"]
        assert saved["failed"] is None, (preset, saved["failed"])
        assert len(rows) == steps
        assert all(math.isfinite(v) for r in rows for k, v in r.items() if isinstance(v, float)), preset
        first = sum(r["fvu"] for r in rows[:5]) / 5
        last = sum(r["fvu"] for r in rows[-5:]) / 5
        print(f"{preset}: L0 {rows[-1]['l0']:.1f} fvu {rows[0]['fvu']:.3f} -> {rows[-1]['fvu']:.3f} "
              f"losses { {k: round(v, 2) for k, v in rows[-1].items() if isinstance(v, float) and k not in ('tokens_per_s', 'lr')} }")
        assert last < first, (preset, first, last)
        loaded, _ = load_sae(folders[preset])
        assert all(torch.isfinite(p).all() for p in loaded.parameters())


def test_sharp_soft_assignments_enter_eq4_without_subnormal_products(monkeypatch):
    """Sharp attention (probabilities down to ~1e-38, as InfoNCE makes them) would put subnormal floats into Eq. 4's
    products, on which x86 matmuls are ~50x slower; squared memberships below the floor are zeroed first. Eq. 4's
    terms, InfoNCE and their gradients equal those with the subnormals kept (fp32 tolerance), and the weights
    entering the products hold no subnormal."""
    tiny = torch.finfo(torch.float32).tiny
    gen = torch.Generator().manual_seed(0)
    d_sae = 128
    coarse = torch.softmax(torch.randn(d_sae, 8, generator=gen) * 40, -1)  # sharp: many entries < 1e-19
    fine = torch.softmax(torch.randn(d_sae, 64, generator=gen) * 40, -1)
    sq = fine.pow(2)
    assert bool(((sq > 0) & (sq < tiny)).any())  # the case: subnormal squares without the floor
    kept = s1._without_denormals(sq, s1.MEMBERSHIP_SQ_FLOOR)
    assert not bool(((kept > 0) & (kept < tiny)).any()) and bool((kept > 0).any())
    f = torch.relu(torch.randn(96, d_sae, generator=gen) - 1.5)

    def terms(floor):
        monkeypatch.setattr(s1, "MEMBERSHIP_SQ_FLOOR", floor)
        f_ = f.clone().requires_grad_()
        c_, g_ = coarse.clone().requires_grad_(), fine.clone().requires_grad_()
        gram_sq = s1.latent_gram(f_).pow(2)
        t1, t2 = s1._ortho_terms(gram_sq, c_, g_, 8)
        sae = build("seed001_contrastive_hier", 16, d_sae)
        nce = sae.contrast(f_, f_.flip(0), g_)
        (t1 + t2 + nce).backward()
        return [t.detach() for t in (t1, t2, nce)], [f_.grad, g_.grad]

    (vals_floor, grads_floor), (vals_raw, grads_raw) = terms(1e-18), terms(0.0)
    for a, b in zip(vals_floor, vals_raw):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    for a, b in zip(grads_floor, grads_raw):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_sharp_attention_memberships_below_the_floor_are_zero_in_value_with_the_same_gradients(monkeypatch):
    """Eq. 2's memberships below MEMBERSHIP_FLOOR (1e-30) are 0 in value where they are formed (live and, through the
    refresh, cached), so no subnormal reaches InfoNCE's ``f @ P_fine`` or its backward (11 ms instead of 0.8 for one
    product at step 600 of the benchmark run). Every loss term of a contrastive step, and every gradient (the
    attention's, passed straight through, and the encoder's), equal those with the floor off (fp32 tolerance)."""
    tiny, floor = torch.finfo(torch.float32).tiny, s1.MEMBERSHIP_FLOOR
    d_in, d_sae = 48, 256
    x = torch.randn(64, d_in, generator=torch.Generator().manual_seed(1)) * 2

    def step(floor):
        monkeypatch.setattr(s1, "MEMBERSHIP_FLOOR", floor)
        sae = build("seed001_contrastive_hier", d_in, d_sae, seed=3, kernels="dense").train()
        sae.init_b_dec(x)
        with torch.no_grad():
            sae.log_tau.fill_(math.log(0.01))  # sharp attention: memberships down to far below 1e-38
            sae.b_enc.sub_(1.0)
        coarse, fine = sae.live_assignments()
        sae._refresh(coarse.detach(), fine.detach())  # the cache as a refresh leaves it
        out = sae(x)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}
        return sae, fine.detach(), {k: v.detach() for k, v in out.losses.items()}, grads

    _, raw_fine, raw_losses, raw_grads = step(0.0)
    sae, fine, losses, grads = step(floor)
    assert bool(((raw_fine > 0) & (raw_fine < tiny)).any())  # the case: subnormal memberships without the floor
    for m in (fine, sae.assign_fine, sae.assign_coarse):
        assert not bool(((m > 0) & (m < floor)).any())
    assert bool((fine == 0).any()) and torch.allclose(fine.sum(-1), torch.ones(d_sae))
    assert "contrast" in losses and losses.keys() == raw_losses.keys()
    for key in losses:
        torch.testing.assert_close(losses[key], raw_losses[key], rtol=1e-6, atol=0, msg=key)
    assert {"W_key", "q_coarse", "q_fine", "W_enc"} <= grads.keys() and grads.keys() == raw_grads.keys()
    for name in grads:
        g, r = grads[name], raw_grads[name]
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6 * float(r.abs().max()), msg=name)


def test_flush_tiny_grad_zeroes_only_the_gradient_entries_below_the_floor():
    """Eq. 2's logits pass through _flush_tiny_grad: identity forward; backward, entries of magnitude below the floor
    (a sharp softmax's subnormal logit gradients) become 0 and every other entry passes exactly."""
    t = torch.randn(6, 5, requires_grad=True)
    out = s1._flush_tiny_grad(t, 1e-30)
    assert torch.equal(out, t)
    upstream = torch.tensor([1e-3, -2e-31, 5e-39, -1.0, 3e-30] * 6).reshape(6, 5)
    out.backward(upstream)
    expected = upstream.masked_fill(upstream.abs() < 1e-30, 0.0)
    assert torch.equal(t.grad, expected) and int((t.grad == 0).sum()) == 12
