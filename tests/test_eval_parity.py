"""Parity of ``saestrata evaluate``'s core metrics with SAEBench's definitions.

The reference below re-implements, independently of evaluate/core.py and evaluate/splice.py,
what SAEBench's ``sae_bench/evals/core/main.py`` (commit 8042bb3828c6340da8d12062324e92b2077c571c:
``get_recons_loss``, ``get_downstream_reconstruction_metrics``, ``get_sparsity_and_variance_metrics``,
``calculate_misc_metrics``) computes: separate clean / SAE-spliced / zero-ablated forwards with
plain forward hooks, their full logits, per-token values concatenated over batches and averaged.
Special tokens are SAEBench's ``ignore_tokens = {pad, eos, bos}``.

The tiny random Gemma3 runs in float32 so that batching the groups into one forward (as
evaluate/core.py does) cannot move the numbers beyond rounding; CE/KL are taken from fp32
logits, as evaluate/core.py does (a declared deviation: SAEBench uses the logits' dtype).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from saestrata.evaluate.core import SAEBENCH_COMMIT, EvalConfig, ReconSums, evaluate_saes
from saestrata.harvest.packing import pack_documents
from saestrata.harvest.text import EMBEDDED_DATASET, iter_documents
from saestrata.train.sae_io import load_sae, save_sae
from saestrata.train.standard import StandardSAE

from conftest import TINY_D_MODEL

CTX, N_ROWS, BATCH_ROWS = 32, 3, 2  # batches of 2 and 1 rows: uneven batches matter for mse
LAYERS = (1, 2)
REL = 1e-5


@pytest.fixture(scope="module")
def sae_dirs(tiny_model_dir, tmp_path_factory):
    """One random StandardSAE per layer of LAYERS; decoder scaled so x_hat is not negligible."""
    root = tmp_path_factory.mktemp("parity-saes")
    out = []
    for i, layer in enumerate(LAYERS):
        sae = StandardSAE(TINY_D_MODEL, 96, seed=i + 1, init_dec_norm=1.0)
        with torch.no_grad():
            sae.b_enc.fill_(-0.05)  # some latents off on some tokens, so L0 and density are not trivial
        meta = {"model_id": str(tiny_model_dir), "hook_name": f"blocks.{layer}.hook_resid_post", "layer": layer,
                "context_length": CTX}
        out.append(save_sae(sae, root / f"l{layer}", meta))
    return out


@pytest.fixture(scope="module")
def ours(lm32, sae_dirs, tiny_model_dir):
    cfg = EvalConfig(tokens=N_ROWS * CTX, batch_rows=BATCH_ROWS, context_length=CTX, model=str(tiny_model_dir),
                     device="cpu", dtype="float32", bos_kept_ablation=True)
    return evaluate_saes(sae_dirs, cfg, lm=lm32, progress=False)


def _batches(tokenizer):
    rows = pack_documents(iter_documents(EMBEDDED_DATASET, "eval", 0), tokenizer, CTX)
    ids = torch.from_numpy(np.stack([next(rows).token_ids for _ in range(N_ROWS)])).long()
    return [ids[i : i + BATCH_ROWS] for i in range(0, N_ROWS, BATCH_ROWS)]


def _forward(lm, ids, layer=None, replace=None):
    """``(logits [n, T, V] fp32, {layer: resid_post [n, T, d]} of every block)``, ``replace(h)`` hooked at ``layer``."""
    seen = {}

    def make_hook(i):
        def hook(_m, _i, out):
            h = out[0] if isinstance(out, tuple) else out
            seen[i] = h.detach().clone()
            if replace is None or i != layer:
                return None
            new = replace(h)
            return (new, *out[1:]) if isinstance(out, tuple) else new

        return hook

    handles = [block.register_forward_hook(make_hook(i)) for i, block in enumerate(lm.layers)]
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=ids, use_cache=False).logits.float()
    finally:
        for handle in handles:
            handle.remove()
    return logits, seen


def _log_probs(logits):
    """SAEBench's ``kl`` takes ``softmax`` then ``log``; here in float64, ``(p, log p)`` ``[n, T, V]``.

    float64 gives the exact value of the definitions: in fp32 SAEBench's own formula is ~1e-5
    off it on a 262k vocabulary (its softmax normaliser), as is evaluate/core.py's.
    """
    p = torch.softmax(logits.double(), -1)
    return p, torch.log(p)


def _ce(log_q, ids):
    """Per-token CE ``[n, T-1]``: position t predicts token t+1 (TransformerLens' per-token loss)."""
    return -log_q[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]


def _kl(p, log_p, log_q):
    """SAEBench's ``kl``: ``sum_v p (log p - log q)``, ``[n, T]``."""
    return (p * (log_p - log_q)).sum(-1)


def saebench_reference(lm, saes: list, layers: tuple) -> list[dict]:
    """SAEBench's core metrics (and the declared extras) of each ``saes[i]`` at ``layers[i]``, from scratch.

    The clean forward of a batch is shared by the SAEs (it does not depend on them).
    """
    tok = lm.tokenizer
    ignore = torch.tensor(sorted({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id}))
    st = [dict(v=defaultdict(list), ms_sq=[], mean_act_dim=[], ms_resid=[], x=[], rss=[],
               fired=torch.zeros(sae.d_sae, dtype=torch.float64), n_tok=0) for sae in saes]
    for ids in _batches(tok):
        mask = ~torch.isin(ids, ignore)  # SAEBench: True = ordinary token
        clean, clean_acts = _forward(lm, ids)
        p, log_p = _log_probs(clean)
        ce_clean = _ce(log_p, ids)
        m_ce, m_strict = mask[:, :-1], mask[:, :-1] & mask[:, 1:]
        for sae, layer, s in zip(saes, layers, st):
            v = s["v"]  # per-token values, concatenated over batches at the end
            acts = clean_acts[layer]
            with_sae, _ = _forward(lm, ids, layer, lambda h: torch.where(
                mask[..., None], sae.decode(sae.encode(h.float())).to(h.dtype), h))
            zero, _ = _forward(lm, ids, layer, torch.zeros_like)  # standard_zero_ablate_hook: EVERY position
            bos_kept, _ = _forward(lm, ids, layer, lambda h: torch.where(mask[..., None], torch.zeros_like(h), h))
            v["ce_clean"].append(ce_clean[m_ce])
            v["ce_clean_strict"].append(ce_clean[m_strict])
            for name, lg in (("sae", with_sae), ("zero", zero), ("bos_kept", bos_kept)):
                log_q = _log_probs(lg)[1]
                ce, kl = _ce(log_q, ids), _kl(p, log_p, log_q)
                v[f"ce_{name}"].append(ce[m_ce])
                v[f"ce_{name}_strict"].append(ce[m_strict])
                v[f"kl_{name}"].append(kl[mask])
                v[f"kl_{name}_strict"].append(kl[:, :-1][m_strict])
            # get_sparsity_and_variance_metrics, in float64 (precision is not what is compared here)
            flat = mask.flatten()
            x = acts.flatten(0, 1)[flat].double()
            f = sae.encode(acts.flatten(0, 1).float())[flat].double()
            x_hat = sae.decode(f.float()).double()
            rss = (x - x_hat).pow(2).sum(-1)
            v["l0"].append((f != 0).sum(-1).double())
            v["l1"].append(f.sum(-1))
            v["mse"].append(rss / flat.sum())
            v["ev_legacy"].append(1 - rss / (x - x.mean(0)).pow(2).sum(-1))
            s["ms_sq"].append(x.pow(2).sum(-1).mean(0))
            s["mean_act_dim"].append(x.pow(2).mean(0))
            s["ms_resid"].append(rss.mean(0))
            x_normed, x_hat_normed = x / x.norm(dim=-1, keepdim=True), x_hat / x_hat.norm(dim=-1, keepdim=True)
            v["cossim"].append((x_normed * x_hat_normed).sum(-1))
            s["fired"] += (f > 0).sum(0)
            s["n_tok"] += int(flat.sum())
            s["x"].append(x)
            s["rss"].append(rss)
    return [_aggregate(s) for s in st]


def _aggregate(s: dict) -> dict:
    """SAEBench's aggregation: per-token values concatenated over batches, then averaged."""
    mean = {k: float(torch.cat(t).double().mean()) for k, t in s["v"].items()}
    ev_code = 1 - torch.stack(s["ms_resid"]).mean() / (
        torch.stack(s["ms_sq"]).mean() - torch.cat(s["mean_act_dim"]).mean() ** 2)
    xs, rss = torch.cat(s["x"]), torch.cat(s["rss"])
    density = s["fired"] / s["n_tok"]

    def score(abl, sae_v, clean=None):
        return (abl - sae_v) / abl if clean is None else (abl - sae_v) / (abl - clean)

    return {
        "ce_loss_without_sae": mean["ce_clean"], "ce_loss_with_sae": mean["ce_sae"],
        "ce_loss_with_ablation": mean["ce_zero"],
        "ce_loss_score": score(mean["ce_zero"], mean["ce_sae"], mean["ce_clean"]),
        "ce_loss_score_bos_kept": score(mean["ce_bos_kept"], mean["ce_sae"], mean["ce_clean"]),
        "ce_loss_score_strict": score(mean["ce_zero_strict"], mean["ce_sae_strict"], mean["ce_clean_strict"]),
        "ce_loss_score_bos_kept_strict": score(mean["ce_bos_kept_strict"], mean["ce_sae_strict"],
                                               mean["ce_clean_strict"]),
        "kl_div_with_sae": mean["kl_sae"], "kl_div_with_ablation": mean["kl_zero"],
        "kl_div_score": score(mean["kl_zero"], mean["kl_sae"]),
        "kl_div_score_bos_kept": score(mean["kl_bos_kept"], mean["kl_sae"]),
        "kl_div_score_strict": score(mean["kl_zero_strict"], mean["kl_sae_strict"]),
        "kl_div_score_bos_kept_strict": score(mean["kl_bos_kept_strict"], mean["kl_sae_strict"]),
        "l0": mean["l0"], "l1": mean["l1"], "mse": mean["mse"], "cossim": mean["cossim"],
        "explained_variance_legacy": mean["ev_legacy"], "explained_variance_saebench_code": float(ev_code),
        # DESIGN.md's definitions (declared deviations / extra keys)
        "explained_variance": float(1 - rss.mean() / (xs.pow(2).sum(-1).mean() - xs.mean(0).pow(2).sum())),
        "mse_per_token": float(rss.mean()), "mse_per_element": float(rss.mean() / xs.shape[1]),
        "frac_alive": float((density > 0).double().mean()),
        "freq_over_1_percent": float((density > 0.01).double().mean()),
        "freq_over_10_percent": float((density > 0.1).double().mean()),
        "normalized_freq_over_1_percent": float(density[density > 0.01].sum() / density.sum()),
        "normalized_freq_over_10_percent": float(density[density > 0.1].sum() / density.sum()),
    }


@pytest.fixture(scope="module")
def reference(lm32, sae_dirs):
    saes = [load_sae(folder)[0].requires_grad_(False) for folder in sae_dirs]
    with torch.no_grad():
        return saebench_reference(lm32, saes, LAYERS)


def _flat(result: dict) -> dict:
    return {k: val for group in result["eval_result_metrics"].values() for k, val in group.items()}


CE_KL_SAEBENCH = ("ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation", "ce_loss_score",
                  "kl_div_with_sae", "kl_div_with_ablation", "kl_div_score")
RECON_SAEBENCH = ("l0", "l1", "mse", "cossim", "explained_variance_legacy", "explained_variance_saebench_code",
                  "frac_alive", "freq_over_1_percent", "freq_over_10_percent",
                  "normalized_freq_over_1_percent", "normalized_freq_over_10_percent")
OURS_EXTRA = ("ce_loss_score_bos_kept", "kl_div_score_bos_kept", "ce_loss_score_strict", "kl_div_score_strict",
              "ce_loss_score_bos_kept_strict", "kl_div_score_bos_kept_strict",
              "explained_variance", "mse_per_token", "mse_per_element")


@pytest.mark.parametrize("key", CE_KL_SAEBENCH)
def test_ce_kl_match_saebench(ours, reference, key):
    # Zero ablation of every position (BOS included); CE on T-1 positions and KL on T positions
    # masked by the INPUT token only.
    for mine, ref in zip(ours, reference):
        assert _flat(mine)[key] == pytest.approx(ref[key], rel=REL), key


@pytest.mark.parametrize("key", RECON_SAEBENCH)
def test_reconstruction_and_sparsity_match_saebench(ours, reference, key):
    for mine, ref in zip(ours, reference):
        assert _flat(mine)[key] == pytest.approx(ref[key], rel=REL), key


@pytest.mark.parametrize("key", OURS_EXTRA)
def test_declared_variants_match_their_definitions(ours, reference, key):
    for mine, ref in zip(ours, reference):
        assert _flat(mine)[key] == pytest.approx(ref[key], rel=REL), key


def test_variants_are_not_vacuous(reference):
    # Each variant must change the number on this model, or the tests above prove nothing about it.
    for ref in reference:
        assert ref["ce_loss_score"] != pytest.approx(ref["ce_loss_score_bos_kept"], rel=1e-3)
        assert ref["ce_loss_score"] != pytest.approx(ref["ce_loss_score_strict"], rel=1e-4)  # 10x the parity tolerance
        assert ref["kl_div_score"] != pytest.approx(ref["kl_div_score_bos_kept"], rel=1e-3)
        assert ref["kl_div_score"] != pytest.approx(ref["kl_div_score_strict"], rel=1e-3)
        assert ref["mse"] != pytest.approx(ref["mse_per_token"], rel=1e-3)
        assert 0 < ref["l0"] < 96 and 0 < ref["frac_alive"] <= 1


def test_eval_config_declares_deviations(ours):
    cfg = ours[0]["eval_config"]
    assert cfg["saebench_commit"] == SAEBENCH_COMMIT
    assert len(cfg["deviations_from_saebench"]) >= 3
    assert all(isinstance(d, str) and d for d in cfg["deviations_from_saebench"])
    assert cfg["mse_batch_tokens"] == BATCH_ROWS * CTX


def test_bos_kept_ablation_is_optional(lm32, sae_dirs, tiny_model_dir, ours):
    cfg = EvalConfig(tokens=2 * CTX, batch_rows=BATCH_ROWS, context_length=CTX, model=str(tiny_model_dir),
                     device="cpu", dtype="float32")
    flat = _flat(evaluate_saes(sae_dirs[:1], cfg, lm=lm32, progress=False)[0])
    assert "ce_loss_score_bos_kept" not in flat and "kl_div_score_bos_kept" not in flat
    assert math.isfinite(flat["ce_loss_score"]) and math.isfinite(flat["ce_loss_score_strict"])


def test_saebench_code_explained_variance_is_not_a_variance_ratio():
    # SAEBench's current code takes total variance = E||x||^2 - (mean_d E[x_d^2])^2, which mixes
    # units (x^2 vs x^4): for activations whose norm exceeds d_in it goes negative and the
    # "explained variance" exceeds 1, while the centred formula stays in [0, 1].
    g = torch.Generator().manual_seed(0)
    d = 16
    x = 4.5 + torch.randn(512, d, generator=g, dtype=torch.float64)  # E||x||^2 ~ 340 > d^2 = 256
    x_hat = x + 0.5 * torch.randn(512, d, generator=g, dtype=torch.float64)
    sums = ReconSums(d_sae=4)
    for lo in range(0, 512, 128):  # four batches of 128 tokens
        sums.add(x[lo : lo + 128], x_hat[lo : lo + 128], torch.zeros(128, 4, dtype=torch.float64))
    m = sums.metrics()
    rss = (x - x_hat).pow(2).sum(-1)
    centred = 1 - rss.mean() / (x.pow(2).sum(-1).mean() - x.mean(0).pow(2).sum())
    assert m["explained_variance"] == pytest.approx(float(centred), rel=1e-9)
    assert 0.7 < m["explained_variance"] < 0.8  # residual variance ~0.25 of the unit variance per dim
    assert m["explained_variance_saebench_code"] > 1
    assert m["mse"] == pytest.approx(float(rss.mean()) / 128, rel=1e-9)  # SAEBench: divided by the batch's tokens
