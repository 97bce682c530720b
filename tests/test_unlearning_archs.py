"""Unlearning for every arch (issue 10, defect 5): latent directions, clamp magnitudes, corpus split, JSON.

Tiny random SAEs (d_in 16, d_sae 128) of every registered variant, the tiny Gemma3 of conftest.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saestrata.evaluate import unlearning as U
from saestrata.harvest.packing import pack_documents
from saestrata.train.registry import build, every_variant
from saestrata.train.sae_io import save_sae

D_IN, D_SAE, LAYER = 16, 128, 1


def tiny_sae(name: str, seed: int = 0):
    """Variant ``name`` with every parameter perturbed (so no direction is its init) and in eval mode."""
    sae = build(name, D_IN, D_SAE, seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return sae.eval()


def latents_of(sae, h: torch.Tensor) -> torch.Tensor:
    """``[T, d_sae]`` latents of one row ``h [1, T, d_in]`` as the clamp hook sees them."""
    return U.encode_rows(sae, h)


@pytest.mark.parametrize("name", every_variant())
def test_decoder_is_affine_so_directions_are_exact(name):
    """``decode(f + t e_i) - decode(f) = t * latent_directions([i])`` for any f: the premise of the clamp."""
    sae = tiny_sae(name)
    gen = torch.Generator().manual_seed(1)
    f = torch.relu(torch.randn(5, D_SAE, generator=gen))
    idx = torch.tensor([0, 3, D_SAE // 2, D_SAE // 2 + 5, D_SAE - 1])
    dirs = sae.latent_directions(idx)
    assert dirs.shape == (len(idx), D_IN) and dirs.dtype == torch.float32
    with torch.no_grad():
        for row, i in enumerate(idx.tolist()):
            bumped = f.clone()
            bumped[:, i] += 2.5
            torch.testing.assert_close(sae.decode(bumped) - sae.decode(f), 2.5 * dirs[row].expand(5, -1),
                                       atol=1e-5, rtol=1e-5)
    with pytest.raises(IndexError, match="out of range"):
        sae.latent_directions(torch.tensor([D_SAE]))


@pytest.mark.parametrize("name", every_variant())
def test_clamp_moves_spliced_residual_along_latent_direction(name):
    """Clamping latent i to -v changes the replaced residual by exactly (-v - f_i) * latent_directions([i])
    where i fires, and nowhere else (seed 000's HSAE: level-2 latents have no W_dec row at all)."""
    sae = tiny_sae(name)
    h = 2.0 * torch.randn(1, 40, D_IN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        f = latents_of(sae, h)
    fires = f > 0
    candidates = [int(fires.sum(0).argmax())]
    if name.startswith("seed000_hsae"):  # one latent of each level
        half = D_SAE // 2
        candidates = [int(fires[:, :half].sum(0).argmax()), half + int(fires[:, half:].sum(0).argmax())]
    for i in candidates:
        rows = fires[:, i]
        assert rows.any() and (~rows).any(), "test input must have firing and non-firing tokens"
        v = 3.7
        with torch.no_grad():
            out = U.clamp_replacement(sae, np.array([i]), v)(h)[0]
            one_hot = torch.zeros(1, D_SAE)
            one_hot[0, i] = 1.0
            direction = sae.decode(one_hot) - sae.decode(torch.zeros(1, D_SAE))  # computed here, not by the code
            delta = torch.where(rows, -v - f[:, i], torch.zeros(())).unsqueeze(1) * direction
        torch.testing.assert_close(out - h[0], delta, atol=1e-5, rtol=1e-5)
        assert torch.equal(out[~rows], h[0][~rows])
        torch.testing.assert_close(sae.latent_directions([i]), direction, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["seed000_hsae", "topk", "standard"])
def test_clamp_values_give_the_same_residual_displacement_for_every_arch(name):
    """``v_i * ||direction_i|| = multiplier * scale``: the residual moves by multiplier * scale + f_i ||d_i||."""
    sae = tiny_sae(name)
    with torch.no_grad():  # make the directions' norms differ a lot between latents
        sae.W_dec.mul_(torch.linspace(0.2, 5.0, sae.W_dec.shape[0])[:, None])
    idx = np.array([1, 7, D_SAE // 2 + 2, D_SAE - 3])
    values = U.clamp_values(sae, idx, 50, 3.0)
    norms = sae.latent_directions(torch.as_tensor(idx)).norm(dim=-1)
    torch.testing.assert_close(values * norms, torch.full((len(idx),), 150.0))
    assert values.std() > 0  # the conversion is per latent, not one number
    h = 2.0 * torch.randn(1, 60, D_IN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        f = latents_of(sae, h)
        for k, i in enumerate(idx):
            rows = f[:, i] > 0
            if not rows.any():
                continue
            out = U.clamp_replacement(sae, np.array([i]), values[k])(h)[0]
            moved = (out - h[0])[rows].norm(dim=-1)
            torch.testing.assert_close(moved, 150.0 + f[rows, i] * norms[k], atol=1e-3, rtol=1e-5)


def test_reference_layer_matches_relative_depth():
    assert U.reference_layer(U.SAEBENCH_REFERENCE["n_layers"]) == U.SAEBENCH_REFERENCE["layer"]
    assert U.reference_layer(18) == 13  # Gemma 3 270M: 14/18 = 0.78 ~ 20/26 = 0.77
    assert U.reference_layer(1) == 0
    with pytest.raises(ValueError, match="at least one block"):
        U.reference_layer(0)


def test_clamp_calibration_measures_rms_norms_on_the_model(tiny_lm):
    """scale = RMS residual norm at the reference block / SAEBench's reference norm, measured independently."""
    docs = [d for d in U.wiki_articles("train") if d.meta.get("topic") != U.FORGET_TOPIC]
    cal = U.clamp_calibration(tiny_lm, LAYER, docs, max_tokens=512, context_length=64)
    ref = U.reference_layer(tiny_lm.n_layers)
    assert cal["reference_layer"] == ref and cal["hook_layer"] == LAYER and cal["tokens"] >= 512
    # independent measurement: HF hidden states of the same packed rows (hidden_states[l + 1] = after block l)
    rows = pack_documents(docs, tiny_lm.tokenizer, 64)
    special = torch.tensor(sorted(tiny_lm.tokenizer.all_special_ids))
    sq, n = {LAYER: 0.0, ref: 0.0}, 0
    while n < 512:
        ids = torch.from_numpy(np.stack([next(rows).token_ids for _ in range(8)])).long()
        with torch.inference_mode():
            hs = tiny_lm.model.model(input_ids=ids, output_hidden_states=True).hidden_states
        valid = ~torch.isin(ids, special)
        for layer in sq:
            sq[layer] += float(hs[layer + 1][valid].float().pow(2).sum())
        n += int(valid.sum())
    assert cal["tokens"] == n
    assert cal["hook_rms_norm"] == pytest.approx(np.sqrt(sq[LAYER] / n), rel=1e-4)
    assert cal["model_rms_norm_at_reference_layer"] == pytest.approx(np.sqrt(sq[ref] / n), rel=1e-4)
    assert cal["scale"] == pytest.approx(np.sqrt(sq[ref] / n) / U.SAEBENCH_REFERENCE["rms_norm"], rel=1e-4)
    fixed = U.clamp_calibration(tiny_lm, LAYER, docs, clamp_scale=2.5, max_tokens=64, context_length=64)
    assert fixed["scale"] == 2.5 and fixed["scale_source"] == "clamp_scale"


def test_saebench_reference_norm_follows_from_the_cited_numbers():
    """R_ref = sqrt(centred^2 + mean^2) with centred = sqrt(mse * N_batch / (1 - EV)) (module docstring)."""
    centred = np.sqrt(47.25 * (16 * 128 - 16) / (1 + 0.785))  # seed 003 sec. 6, SAEBench core definitions
    assert U.SAEBENCH_REFERENCE["rms_norm"] == pytest.approx(np.hypot(centred, 156.0), abs=1.0)
    low, high = U.SAEBENCH_REFERENCE["rms_norm_range"]
    assert low == pytest.approx(centred, abs=1.0) and high == pytest.approx(np.sqrt(47.25 * 2032), abs=1.0)


# ----------------------------------------------------------------------------- corpus split
def test_wiki_selection_corpora_exclude_every_question_article():
    bench = U.build_benchmark(U.UnlearnConfig(sae=".", max_retain_questions=50))
    forget_all, retain_all = U.wiki_questions("eval")
    question_articles = {q.qid for q in forget_all + retain_all}
    selection = {d.key for d in bench.forget_docs + bench.retain_docs}
    assert question_articles and selection
    assert not question_articles & selection
    assert {d.meta["topic"] for d in bench.forget_docs} == {U.FORGET_TOPIC}
    assert U.FORGET_TOPIC not in {d.meta["topic"] for d in bench.retain_docs}
    assert bench.split["questions"] == "eval" and bench.split["latent_selection"] == "train"
    assert bench.split["forget_docs"] == len(bench.forget_docs) > 100


def test_custom_corpus_drops_question_articles(monkeypatch):
    """A corpus holding question articles (here: the eval split itself) loses them, and says how many."""
    eval_docs = U.wiki_articles("eval")
    monkeypatch.setattr(U, "iter_documents", lambda source, split: iter(eval_docs if split == "eval" else []))
    bench = U.build_benchmark(U.UnlearnConfig(sae=".", forget_corpus="x", retain_corpus="x"))
    forget_all, retain_all = U.wiki_questions("eval")
    question_articles = {q.qid for q in forget_all + retain_all}
    assert not question_articles & {d.key for d in bench.forget_docs + bench.retain_docs}
    assert bench.split["question_articles_dropped_from_corpora"] == 2 * len(question_articles)


# ----------------------------------------------------------------------------- end to end (tiny)
@pytest.mark.parametrize("name", ["seed000_hsae", "topk"])
def test_run_unlearning_end_to_end_records_split_clamp_and_rule(name, tiny_lm, tiny_model_dir, scratch):
    from conftest import TINY_D_MODEL

    sae = build(name, TINY_D_MODEL, 64, seed=0, **({"k": 4} if name == "topk" else {})).eval()
    folder = save_sae(sae, scratch / name, {"model_id": str(tiny_model_dir), "layer": LAYER, "context_length": 64,
                                            "hook_name": f"blocks.{LAYER}.hook_resid_post"})
    cfg = U.UnlearnConfig(sae=folder, max_forget_questions=24, max_retain_questions=24, forget_tokens=512,
                          retain_tokens=512, context_length=64, n_features=(4,), multipliers=(25, 200),
                          retain_thresholds=(1.0,), device="cpu")  # 1.0: every latent not firing on all tokens
    result = U.run_unlearning(cfg, lm=tiny_lm, progress=False)
    json.dumps(result)
    config = result["eval_config"]
    assert config["split"]["latent_selection"] == "train" and config["split"]["questions"] == "eval"
    assert config["retain_threshold"] == 0.99 and config["deviations_from_saebench"]
    clamp = config["clamp"]
    assert clamp["scale"] == pytest.approx(clamp["model_rms_norm_at_reference_layer"]
                                           / U.SAEBENCH_REFERENCE["rms_norm"])
    selected = [d for d in result["eval_result_details"] if d["kind"] == "selected"]
    assert len(selected) == 2 and any(d["n_selected"] > 0 for d in result["eval_result_details"])
    for d in result["eval_result_details"]:
        assert d["residual_displacement"] == pytest.approx(d["multiplier"] * clamp["scale"])
        norms = sae.latent_directions(torch.tensor(d["latents"])).norm(dim=-1)
        torch.testing.assert_close(torch.tensor(d["clamp_values"]) * norms,
                                   torch.full((len(d["latents"]),), d["residual_displacement"]))
        assert d["retain_ok"] == (not d["retain_accuracy"] < 0.99)
    m = result["eval_result_metrics"]["unlearning"]
    expected = 1 - min([1.0 if d["retain_accuracy"] < 0.99 else d["forget_accuracy"] for d in selected])
    assert m["unlearning_score"] == pytest.approx(expected)
