"""The fast evaluation path (evaluate/branch.py) against the reference path (evaluate/splice.py + full logits).

Issue 14: every metric of the core JSON within 1e-4 (absolute) of ``evaluate_saes(..., reference=True)``,
on the tiny random Gemma3 (tests/conftest.py) in float32 with its output distribution sharpened
(as tests/test_eval_parity.py, so the CE/KL scores are well conditioned), for four SAEs at two
layers: a standard and seed 000's temporal (sequence) SAE at layer 1, seed 003's tiered SAE and a
TopK at layer 2. Plus the chunked head statistics on their own: positions and vocabulary not
divisible by the chunks, special tokens in the middle and at the end of rows, a fixed group.
"""

from __future__ import annotations

import math

import pytest
import torch

from saestrata.evaluate.branch import BranchForward, Head, head_stats, supports_branch
from saestrata.evaluate.core import EvalConfig, _LogitSums, evaluate_saes
from saestrata.train.registry import build
from saestrata.train.sae_io import save_sae

from conftest import TINY_D_MODEL

CTX, N_ROWS, BATCH_ROWS = 40, 5, 2  # batches of 2, 2 and 1 rows; 40 positions: not a multiple of the chunks
TOL = 1e-4
SAES = (("standard", 1), ("temporal_dilated", 1), ("tiered_hsae", 2), ("topk", 2))
TIMING_KEYS = {"eval_tokens_per_s"}


@pytest.fixture(scope="module")
def sae_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fast-saes")
    out = []
    for i, (arch, layer) in enumerate(SAES):
        sae = build(arch, TINY_D_MODEL, 96, seed=i + 1)
        with torch.no_grad():  # random decoders of small norm would make x_hat ~ 0: scale the reconstruction up
            for name, par in sae.named_parameters():
                if "dec" in name.lower() and par.dim() == 2:
                    par.mul_(4.0)
        meta = {"model_id": str(tiny_model_dir), "hook_name": f"blocks.{layer}.hook_resid_post", "layer": layer,
                "context_length": CTX}
        out.append(save_sae(sae, root / f"{arch}-l{layer}", meta))
    return out


def _cfg(tiny_model_dir, **kw):
    return EvalConfig(tokens=N_ROWS * CTX, batch_rows=BATCH_ROWS, context_length=CTX, model=str(tiny_model_dir),
                      device="cpu", dtype="float32", **kw)


@pytest.fixture(scope="module")
def both(lm32, sae_dirs, tiny_model_dir):
    cfg = _cfg(tiny_model_dir, bos_kept_ablation=True)
    fast = evaluate_saes(sae_dirs, cfg, lm=lm32, progress=False)
    ref = evaluate_saes(sae_dirs, cfg, lm=lm32, progress=False, reference=True)
    return fast, ref


def _leaves(obj, prefix=""):
    """``{dotted key: number}`` of every int/float leaf of a nested dict/list."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_leaves(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_leaves(v, f"{prefix}{i}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix[:-1]] = float(obj)
    return out


def test_paths_are_the_ones_asked_for(both):
    fast, ref = both
    assert all(r["eval_config"]["eval_path"] == "branch" for r in fast)
    assert all(r["eval_config"]["eval_path"] == "reference" for r in ref)


@pytest.mark.parametrize("i", range(len(SAES)))
def test_every_metric_matches_the_reference_path(both, i):
    fast, ref = both
    for part in ("eval_result_metrics", "eval_result_unstructured"):
        a, b = _leaves(fast[i][part]), _leaves(ref[i][part])
        assert set(a) == set(b)
        for key in a:
            if key.rsplit(".", 1)[-1] in TIMING_KEYS:
                continue
            if math.isnan(b[key]):
                assert math.isnan(a[key]), key
            else:
                assert abs(a[key] - b[key]) <= TOL, (SAES[i], key, a[key], b[key])


def test_parity_is_not_vacuous(both):
    # The comparison above means something only if the scores are informative on this model.
    fast, _ = both
    for r in fast:
        m = {k.rsplit(".", 1)[-1]: v for k, v in _leaves(r["eval_result_metrics"]).items()}
        assert m["kl_div_with_ablation"] > 0.1 and m["kl_div_with_sae"] > 1e-3
        assert abs(m["ce_loss_with_ablation"] - m["ce_loss_without_sae"]) > 0.05
        assert m["ce_loss_with_sae"] != m["ce_loss_without_sae"]
        assert m["l0"] > 0


def test_branch_forward_matches_hf_forward(lm32):
    # The replayed forward (no branches) gives HF's own final hidden state.
    ids = torch.randint(3, 1000, (2, 23))
    with torch.inference_mode():
        ref = lm32.model.model(input_ids=ids, use_cache=False).last_hidden_state
        ours = BranchForward(lm32.model).run(ids, {})
    assert supports_branch(lm32.model)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_zero_ablation_logits_do_not_depend_on_tokens(lm32):
    # The premise of computing SAEBench's ablation once: zero the residual after block 1 of any
    # rows and the logits are BranchForward.zero_logits's at every position.
    bf, head = BranchForward(lm32.model), Head(lm32.model)
    ids = torch.randint(3, 1000, (2, 17))
    with torch.inference_mode():
        h = bf.run(ids, {1: [torch.zeros_like]})[2:]
        z, lse = bf.zero_logits(1, 17, head)
        # Gemma has no biases: the ablated logits are exactly zero and zero_logits skips the head (None).
        assert z is None
        z = torch.zeros(17, head.weight.shape[0])
        torch.testing.assert_close(head.logits(h).float(), z.expand(2, -1, -1), rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(z.double(), -1))


class _TinyHead(torch.nn.Module):
    """A stand-in causal LM head: ``lm_head`` of ``vocab`` x ``d`` (bf16), optional soft-capping."""

    def __init__(self, vocab, d, cap=None):
        super().__init__()
        self.lm_head = torch.nn.Linear(d, vocab, bias=False).to(torch.bfloat16)
        with torch.no_grad():
            self.lm_head.weight.normal_(0, 1.0)
        self.config = type("C", (), {"final_logit_softcapping": cap})()


@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("pos_chunk,vocab_chunk", [(7, 300), (64, 4096), (1, 1000)])
def test_chunked_head_stats_equal_full_logits(cap, pos_chunk, vocab_chunk):
    # Vocabulary 1000 (not a multiple of 300), rows of 13 positions with special tokens at the
    # start, in the middle and at the end; three hidden-state groups and one fixed group. The
    # sums must equal _LogitSums.add on the full logits (the reference path's accumulation).
    torch.manual_seed(0)
    n, T, d, V = 3, 13, 16, 1000
    model = _TinyHead(V, d, cap)
    head = Head(model)
    ids = torch.randint(3, V, (n, T))
    ids[:, 0] = 2  # BOS
    ids[0, 6] = 2  # a document boundary mid-row
    ids[1, -1] = 1  # EOS at the end of a row
    ids[2, 5] = 0  # pad
    keep = torch.isin(ids, torch.tensor([0, 1, 2]))
    hidden = torch.randn(3, n, T, d).to(torch.bfloat16)  # groups: clean, two others
    fixed_z = head.logits(torch.randn(T, d).to(torch.bfloat16)).float()  # a token-independent group, [T, V]
    full = torch.cat([head.logits(hidden).reshape(3 * n, T, V), fixed_z.to(torch.bfloat16).expand(n, T, V)])
    ref = _LogitSums(4)
    ref.add(full, ids, keep, chunk=5)

    scored = ~keep
    stats = head_stats(head, hidden[:, scored], torch.roll(ids, -1, 1)[scored],
                       [(fixed_z, torch.logsumexp(fixed_z.double(), -1))], torch.arange(T).expand(n, T)[scored],
                       pos_chunk=pos_chunk, vocab_chunk=vocab_chunk)
    ours = _LogitSums(4)
    ours.add_positions(stats["ce"], stats["kl"], [0, 1, 2, 3], ids, keep)
    assert (ours.n_ce, ours.n_kl, ours.n_strict) == (ref.n_ce, ref.n_kl, ref.n_strict)
    assert ref.n_kl < n * T and ref.n_strict < ref.n_ce < ref.n_kl  # the masks did remove positions
    for name in ("ce", "kl", "ce_strict", "kl_strict"):
        assert getattr(ours, name) == pytest.approx(getattr(ref, name), rel=1e-5, abs=1e-4), name
    assert min(ref.kl[1:]) > 1.0  # groups differ from the clean one, so KL is tested


def test_chunked_head_stats_match_float64_definitions():
    # Directly against the definitions in float64: CE = lse - z[target], KL = sum p (log p - log q).
    torch.manual_seed(1)
    V, d, P = 777, 8, 11
    head = Head(_TinyHead(V, d))
    h = torch.randn(2, P, d).to(torch.bfloat16)
    target = torch.randint(0, V, (P,))
    stats = head_stats(head, h, target, pos_chunk=4, vocab_chunk=100)
    z = head.logits(h).double()
    lp = torch.log_softmax(z, -1)
    torch.testing.assert_close(stats["ce"], -lp.gather(-1, target.expand(2, P)[..., None])[..., 0])
    kl = (lp[0].exp() * (lp[0] - lp[1])).sum(-1)
    torch.testing.assert_close(stats["kl"][1], kl, rtol=1e-5, atol=1e-6)
    assert (stats["kl"][0] == 0).all()


@pytest.mark.parametrize("kernel", [False, True])
def test_head_stats_equal_groups_share_exact_numbers_and_zero_fixed_group(kernel, monkeypatch):
    # Groups with bitwise-equal hidden states get bitwise-equal CE and KL (a duplicate of the clean
    # group has KL exactly 0), whatever their place in the head's row blocks; a fixed group given
    # as None (all-zero logits, BranchForward.zero_logits on a bias-free model) equals explicit zeros.
    # Explicit zeros always take the torch ops; None takes the compiled kernel when it is there, so
    # with the kernel the two agree to fp32 rounding of exp and sums, without it bit for bit.
    import saestrata.train.native as native

    if not kernel:
        monkeypatch.setattr(native, "load_native", lambda: None)
    tol = dict(rtol=1e-7, atol=1e-6) if kernel else dict(rtol=0, atol=1e-9)
    torch.manual_seed(2)
    V, d, P = 1000, 16, 23
    head = Head(_TinyHead(V, d))
    h = torch.randn(4, P, d).to(torch.bfloat16)
    h[2] = h[1]
    h[3] = h[0]
    target = torch.randint(0, V, (P,))
    tpos = torch.arange(P)
    lse0 = torch.full((P,), math.log(V), dtype=torch.float64)
    zeros = torch.zeros(P, V)
    for kw in (dict(rows_per_block=7, vocab_chunk=300), dict(pos_chunk=5, vocab_chunk=128), {}):
        stats = head_stats(head, h, target, [(None, lse0)], tpos, **kw)
        assert torch.equal(stats["ce"][1], stats["ce"][2]) and torch.equal(stats["kl"][1], stats["kl"][2])
        assert torch.equal(stats["ce"][0], stats["ce"][3]) and (stats["kl"][3] == 0).all()
        explicit = head_stats(head, h, target, [(zeros, torch.logsumexp(zeros.double(), -1))], tpos, **kw)
        torch.testing.assert_close(stats["ce"], explicit["ce"], **tol)
        torch.testing.assert_close(stats["kl"], explicit["kl"], rtol=1e-6, atol=1e-6)
        assert (stats["kl"][1] > 0.1).all()  # the groups do differ from the clean one


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("U,P,W", [(5, 9, 4096), (3, 4, 1000), (1, 3, 17), (2, 2, 16 * 17 + 5)])
def test_head_kernel_block_stats_equal_float64_and_the_torch_ops(dtype, U, P, W):
    # csrc/native.cpp's head_block_stats against the definitions in float64 and the torch path it
    # replaces: widths off the 8- and 16-lane vectors and the 256-column sum blocks, one to five groups,
    # logits spread over ~100 nats (exp underflows for most columns, as on the real head).
    from saestrata.evaluate.branch import _block_stats_native, _block_stats_torch
    from saestrata.train.native import load_native

    mod = load_native()
    assert mod is not None, "the CPU kernels did not build (tests/test_native.py says why)"
    torch.manual_seed(3)
    z = (torch.randn(U, P, W) * 12).to(dtype)
    if U > 1:
        z[1:] = (z[1:].float() + torch.randn(U - 1, P, W) * 0.5).to(dtype)
    nd = U  # the U - 1 groups and one all-zero fixed group
    got = [torch.empty(U, P, dtype=torch.float64), torch.empty(U, P, dtype=torch.float64),
           torch.empty(nd, P, dtype=torch.float64)]
    _block_stats_native(mod, z, *got, U)
    ref = [torch.empty_like(t) for t in got]
    _block_stats_torch(z.float(), torch.empty(U, P, W), *ref, [(None, None)], None, 0, W)
    zd = z.double()
    m = zd.amax(-1)
    e = (zd - m[..., None]).exp()
    truth = [m, e.sum(-1), torch.cat([(e[0] * (zd[0] - zd[1:])).sum(-1), (e[0] * zd[0]).sum(-1)[None]])]
    assert torch.equal(got[0], truth[0])  # maxima are exact
    for ours in (got, ref):
        torch.testing.assert_close(ours[1], truth[1], rtol=1e-6, atol=0)
        # d is a p-weighted sum of logit differences: compare in nats, i.e. divided by sum exp
        torch.testing.assert_close(ours[2] / truth[1][0], truth[2] / truth[1][0], rtol=0, atol=2e-5)


def test_head_stats_equal_with_and_without_the_kernel(monkeypatch):
    # The whole chunked statistic (CE, KL per group and the zero-ablation group) on the compiled
    # kernel and on the torch ops agree to fp32 rounding, in fp32 and bf16 heads.
    import saestrata.train.native as native

    torch.manual_seed(4)
    V, d, P = 1000, 16, 23
    model = _TinyHead(V, d)
    lse0 = torch.full((P,), math.log(V), dtype=torch.float64)
    for dtype in (torch.bfloat16, torch.float32):
        model.lm_head.to(dtype)
        head = Head(model)
        h = torch.randn(3, P, d).to(dtype)
        target = torch.randint(0, V, (P,))
        args = (head, h, target, [(None, lse0)], torch.arange(P))
        with_kernel = head_stats(*args, pos_chunk=5, vocab_chunk=300)
        monkeypatch.setattr(native, "load_native", lambda: None)
        without = head_stats(*args, pos_chunk=5, vocab_chunk=300)
        monkeypatch.undo()
        for key in ("ce", "kl"):
            torch.testing.assert_close(with_kernel[key], without[key], rtol=1e-6, atol=1e-5)
        assert (with_kernel["kl"][1:] > 0.1).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_fast_path_on_cuda_matches_the_cpu_result(tiny_model_dir, sae_dirs, both):
    # The fast path must run where the LM is (issue 14: nothing may assume a CPU): hidden states, head
    # buffers and the zero-ablation logits on the GPU, the compiled CPU kernel not used there.
    from saestrata.harvest.model import load_model

    lm = load_model(str(tiny_model_dir), device="cuda", dtype="float32")
    with torch.no_grad():
        lm.model.model.norm.weight.fill_(39.0)  # as the lm32 fixture, whose CPU results ``both`` holds
    cfg = EvalConfig(tokens=N_ROWS * CTX, batch_rows=BATCH_ROWS, context_length=CTX, model=str(tiny_model_dir),
                     device="cuda", dtype="float32", bos_kept_ablation=True)
    gpu = evaluate_saes(sae_dirs, cfg, lm=lm, progress=False)
    cpu, _ = both
    for g, c in zip(gpu, cpu):
        assert g["eval_config"]["eval_path"] == "branch"
        a, b = _leaves(g["eval_result_metrics"]), _leaves(c["eval_result_metrics"])
        for key in b:
            if key.rsplit(".", 1)[-1] in TIMING_KEYS or math.isnan(b[key]):
                continue
            assert abs(a[key] - b[key]) <= 10 * TOL, key


def test_the_kernel_build_happens_before_evaluations_clock(lm32, sae_dirs, tiny_model_dir, monkeypatch):
    """On a machine without a cached build the head kernel compiles (~1 min) on first use; that landed inside
    the first batch's clock and so in ``eval_tokens_per_s``. evaluate_saes now builds it before the first batch."""
    from saestrata.evaluate import core
    from saestrata.train import native

    events = []
    real_load, real_fast = native.load_native, core._fast_batch
    monkeypatch.setattr(native, "load_native", lambda: events.append("build") or real_load())

    def fast_batch(*args, **kw):
        step = real_fast(*args, **kw)
        return lambda *a: events.append("batch") or step(*a)

    monkeypatch.setattr(core, "_fast_batch", fast_batch)
    evaluate_saes(sae_dirs[:1], _cfg(tiny_model_dir), lm=lm32, progress=False)
    assert "batch" in events and events[0] == "build"
