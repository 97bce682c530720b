"""Sparse probing (SAEBench ``sparse_probing``): planted latent found at k = 1, train-only selection,
SAEBench's JSON layout, ``--labels`` files, per-group restriction."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

import saestrata.evaluate.sparse_probing as SP  # noqa: E402
from saestrata.harvest.text import DatasetError, split_of  # noqa: E402
from saestrata.train.registry import build  # noqa: E402
from saestrata.train.sae_io import save_sae  # noqa: E402

D_IN, D_SAE, PLANTED, T = 16, 32, 7, 12
CLASSES = ("alpha", "beta", "gamma", "delta")


def planted_sae(direction: torch.Tensor):
    """A ReLU SAE whose latent ``PLANTED`` reads ``direction``; every other latent reads a random
    direction orthogonal to it (so only ``PLANTED`` knows the planted signal)."""
    sae = build("standard", D_IN, D_SAE, seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(D_IN, D_SAE, generator=gen)
    w -= direction[:, None] * (direction @ w)[None, :]  # orthogonal to the planted direction
    w = w / w.norm(dim=0, keepdim=True)
    w[:, PLANTED] = direction
    with torch.no_grad():
        sae.W_enc.copy_(w)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def synthetic_texts(n_per_class: int, seed: int, direction: torch.Tensor, plant: str = "alpha"):
    """Token residuals ``[n, T, d_in]`` of unit Gaussian noise; texts of class ``plant`` get ``+3 direction``
    on every token. The last two positions of odd rows are padding (excluded by ``keep``)."""
    gen = torch.Generator().manual_seed(seed)
    labels = np.array([c for c in CLASSES for _ in range(n_per_class)])
    h = torch.randn(len(labels), T, D_IN, generator=gen)
    h[torch.from_numpy(labels == plant)] += 3.0 * direction
    keep = torch.ones(len(labels), T, dtype=torch.bool)
    keep[1::2, -2:] = False
    h[1::2, -2:] = 1e3  # padding garbage that pooling must ignore
    return h, keep, labels


@pytest.fixture(scope="module")
def planted():
    """Pooled SAE latents and residuals of a train and a test set with a planted class-``alpha`` latent."""
    direction = torch.nn.functional.normalize(torch.randn(D_IN, generator=torch.Generator().manual_seed(3)), dim=0)
    sae = planted_sae(direction)
    (htr, ktr, ytr), (hte, kte, yte) = (synthetic_texts(40, 10, direction), synthetic_texts(20, 11, direction))
    llm_tr, sae_tr = SP.pool_rows(htr, ktr, {"s": sae})
    llm_te, sae_te = SP.pool_rows(hte, kte, {"s": sae})
    return {"sae_tr": sae_tr["s"].numpy(), "sae_te": sae_te["s"].numpy(), "llm_tr": llm_tr.numpy(),
            "llm_te": llm_te.numpy(), "ytr": ytr, "yte": yte, "sae": sae}


def test_planted_latent_is_selected_at_k1_with_accuracy_1(planted):
    splits = SP.class_splits(planted["ytr"], planted["yte"], seed=0)
    per = SP.probe_features(planted["sae_tr"], planted["sae_te"], splits, (1, 2, 5), "sae")
    assert per["selected"]["alpha"][1] == [PLANTED]
    assert per["sae_top_1_test_accuracy"]["alpha"] == 1.0
    # the control: a latent that reads noise only is at chance on the same rows
    alpha = next(s for s in splits if s.cls == "alpha")
    other = (PLANTED + 1) % D_SAE
    acc = SP.probe_accuracy(planted["sae_tr"][alpha.train_rows][:, [other]], alpha.train_y,
                            planted["sae_te"][alpha.test_rows][:, [other]], alpha.test_y)
    assert acc < 0.8


def test_pooling_is_the_mean_over_kept_tokens_only():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, D_IN, generator=gen)
    keep = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    sae = build("standard", D_IN, D_SAE, seed=0).eval()
    llm, lat = SP.pool_rows(h, keep, {"s": sae})
    for i in range(3):
        torch.testing.assert_close(llm[i], h[i][keep[i]].mean(0))
        torch.testing.assert_close(lat["s"][i], sae.encode(h[i][keep[i]]).mean(0))
    with pytest.raises(DatasetError, match="no token besides special tokens"):
        SP.pool_rows(h, torch.zeros(3, 5, dtype=torch.bool), {})


def test_selection_never_sees_the_test_split(planted):
    """Selected latents depend on the train rows only: scrambling every test feature changes none."""
    splits = SP.class_splits(planted["ytr"], planted["yte"], seed=0)
    a = SP.probe_features(planted["sae_tr"], planted["sae_te"], splits, (1, 5), "sae")
    scrambled = np.random.default_rng(0).permutation(planted["sae_te"].ravel()).reshape(planted["sae_te"].shape)
    b = SP.probe_features(planted["sae_tr"], scrambled * 100, splits, (1, 5), "sae")
    assert a["selected"] == b["selected"]
    # and the train rows it used are train rows: every index is within the train set
    assert all(s.train_rows.max() < len(planted["ytr"]) for s in splits)


def test_top_k_mean_diff_is_saebench_absolute_difference():
    x = np.array([[0.0, 5.0, 1.0, 2.0], [0.0, 5.0, 1.0, 2.0], [3.0, 0.0, 1.0, 2.5], [3.0, 0.0, 1.0, 2.5]])
    y = np.array([1, 1, 0, 0])
    # |diffs| = 3, 5, 0, 0.5; latent 0 is *lower* for the class and still ranks second (SAEBench uses abs)
    assert SP.top_k_mean_diff(x, y, 3).tolist() == [1, 0, 3]
    assert SP.top_k_mean_diff(x, y, 2, candidates=np.array([0, 2, 3])).tolist() == [0, 3]


def test_balanced_one_vs_rest_matches_saebench_sampling():
    labels = np.array(["a"] * 6 + ["b"] * 10 + ["c"] * 4)
    rows, y = SP.balanced_one_vs_rest(labels, "a", np.random.default_rng(0))
    assert (y == 1).sum() == (y == 0).sum() == 6
    assert set(labels[rows[y == 1]]) == {"a"} and "a" not in set(labels[rows[y == 0]])
    assert len(set(rows.tolist())) == len(rows)  # no text twice
    # ceil(6 / 2) = 3 per negative class, c has only 2: 3 + 2 = 5 negatives -> positives cut to 5
    rows, y = SP.balanced_one_vs_rest(np.array(["a"] * 6 + ["b"] * 3 + ["c"] * 2), "a", np.random.default_rng(0))
    assert (y == 1).sum() == (y == 0).sum() == 5


def test_group_restricted_selection_stays_inside_the_group(planted):
    splits = SP.class_splits(planted["ytr"], planted["yte"], seed=0)
    group = np.array([i for i in range(D_SAE) if i != PLANTED][:10])
    per = SP.probe_features(planted["sae_tr"], planted["sae_te"], splits, (1, 5, 20), "sae", full=False,
                            candidates=group)
    for cls in CLASSES:
        assert set(per["selected"][cls]) == {1, 5}  # k = 20 > 10 latents: skipped
        assert all(set(v) <= set(group.tolist()) for v in per["selected"][cls].values())
    assert per["sae_top_1_test_accuracy"]["alpha"] < 1.0 or PLANTED in group


def test_wiki_topic_split_is_the_corpus_title_split():
    train, test = SP.wiki_topic_split(train_per_class=5, test_per_class=3, seed=0)
    assert {d.meta["label"] for d in train} == {d.meta["label"] for d in test} and len({d.meta["label"] for d in train}) == 12
    assert all(split_of(d.key) == "train" for d in train) and all(split_of(d.key) == "eval" for d in test)
    assert not {d.key for d in train} & {d.key for d in test}
    assert max(np.unique([d.meta["label"] for d in train], return_counts=True)[1]) == 5


# ----------------------------------------------------------------------------- --labels files
def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("rows, message", [
    ([], "is empty"),
    (["", "  "], "is empty"),
    (["not json"], "line 1 is not JSON"),
    (['["a list"]'], "not a JSON object"),
    ([{"label": "x"}], "no 'text' field"),
    ([{"text": "hello"}], "no 'label' field"),
    ([{"text": "", "label": "x"}], "'text' must be a non-empty string"),
    ([{"text": "a", "label": None}], "'label' must be"),
    ([{"text": "a", "label": "x", "split": "test"}], "'split' must be train or eval"),
    ([{"text": "a", "label": "x", "split": "train"}, {"text": "b", "label": "x", "split": "eval"}],
     "only the label 'x'"),
    ([{"text": "a", "label": "x", "split": "train"}, {"text": "b", "label": "x", "split": "eval"},
      {"text": "c", "label": "y", "split": "train"}], "label 'y' has no eval text"),
])
def test_bad_labels_files_give_one_line(tmp_path, rows, message):
    path = _write_jsonl(tmp_path / "labels.jsonl", rows)
    with pytest.raises(DatasetError, match=message) as err:
        SP.load_labelled_jsonl(path)
    assert "\n" not in str(err.value)


def test_labels_split_field_and_hash_rule(tmp_path):
    rows = [{"text": f"text number {i}", "label": i % 2} for i in range(40)]
    rows += [{"text": "forced eval 0", "label": 0, "split": "eval"}, {"text": "forced eval 1", "label": 1, "split": "eval"}]
    train, test = SP.load_labelled_jsonl(_write_jsonl(tmp_path / "l.jsonl", rows))
    assert {d.key for d in test} >= {"forced eval 0", "forced eval 1"}
    for d in train + test:
        if not d.key.startswith("forced"):
            assert d.meta["split"] == split_of(d.key)
    assert {d.meta["label"] for d in train} == {"0", "1"}


# ----------------------------------------------------------------------------- end to end (tiny model)
LAYER = 1
TOPICS = {"music": "The orchestra played a symphony with violins, drums and a loud choir of singers.",
          "ocean": "Whales and sharks swim in the deep salty ocean near coral reefs and waves.",
          "maths": "An integer prime number divides a polynomial equation with algebraic proofs."}


def _labels(tmp_path, name, eval_suffix=""):
    rows = [{"text": f"{text} Example {i}.", "label": lab, "split": "train"} for lab, text in TOPICS.items()
            for i in range(8)]
    rows += [{"text": f"{text} Held out {i}{eval_suffix}.", "label": lab, "split": "eval"}
             for lab, text in TOPICS.items() for i in range(4)]
    return _write_jsonl(tmp_path / name, rows)


@pytest.fixture(scope="module")
def tiny_saes(tiny_model_dir, tmp_path_factory):
    from conftest import TINY_D_MODEL

    root = tmp_path_factory.mktemp("probe_saes")
    meta = {"model_id": str(tiny_model_dir), "layer": LAYER, "context_length": 64,
            "hook_name": f"blocks.{LAYER}.hook_resid_post"}
    return [save_sae(build(arch, TINY_D_MODEL, 64, seed=0, **hp).eval(), root / arch, meta)
            for arch, hp in (("topk", {"k": 8}), ("seed004-groups", {}))]


# SAEBench sae_bench/evals/sparse_probing/eval_output.py (SparseProbingEvalOutput, BaseEvalOutput) and
# eval_config.py (SparseProbingEvalConfig): the keys a SAEBench reader expects.
SAEBENCH_TOP = {"eval_type_id", "eval_config", "eval_id", "datetime_epoch_millis", "eval_result_metrics",
                "eval_result_details", "eval_result_unstructured", "sae_bench_commit_hash", "sae_lens_id",
                "sae_lens_release_id", "sae_lens_version", "sae_cfg_dict"}
SAEBENCH_CONFIG = {"random_seed", "dataset_names", "probe_train_set_size", "probe_test_set_size", "context_length",
                   "sae_batch_size", "llm_batch_size", "llm_dtype", "model_name", "k_values", "lower_vram_usage"}


def test_run_on_tiny_model_has_saebench_layout_and_groups(tiny_lm, tiny_saes, tmp_path):
    labels = _labels(tmp_path, "l.jsonl")
    cfg = SP.ProbeConfig(saes=tiny_saes, labels=labels, k_values=(1, 2, 5), context_length=32, batch_rows=4,
                         device="cpu")
    results = SP.run_sparse_probing(cfg, tiny_lm, progress=False)
    assert len(results) == 2
    for r in results:
        json.dumps(r)
        assert set(r) == SAEBENCH_TOP and r["eval_type_id"] == "sparse_probing"
        assert SAEBENCH_CONFIG <= set(r["eval_config"]) and r["eval_config"]["deviations_from_saebench"]
        llm, sae = r["eval_result_metrics"]["llm"], r["eval_result_metrics"]["sae"]
        assert set(llm) == {"llm_test_accuracy", "llm_top_1_test_accuracy", "llm_top_2_test_accuracy",
                            "llm_top_5_test_accuracy"}
        assert set(sae) == {"sae_test_accuracy", "sae_top_1_test_accuracy", "sae_top_2_test_accuracy",
                            "sae_top_5_test_accuracy"}
        assert all(0.0 <= v <= 1.0 for v in [*llm.values(), *sae.values()])
        (detail,) = r["eval_result_details"]
        assert detail["dataset_name"] == "l.jsonl" and {**llm, **sae}.items() <= detail.items()
        per_class = r["eval_result_unstructured"]["l.jsonl_results"]
        assert set(per_class["sae_top_1_test_accuracy"]) == set(TOPICS)
        counts = r["eval_result_unstructured"]["counts"]
        assert counts["train_texts_per_class"] == {k: 8 for k in sorted(TOPICS)}
        assert counts["test_texts_per_class"] == {k: 4 for k in sorted(TOPICS)}
    groups = results[1]["eval_result_unstructured"]["latent_groups"]
    assert results[0]["eval_result_unstructured"]["latent_groups"] == {}
    assert len(groups) == 5 and sum(g["n_latents"] for g in groups.values()) == 64


def test_selection_on_tiny_model_ignores_eval_texts(tiny_lm, tiny_saes, tmp_path):
    """Same train lines, different eval lines: the selected latents are identical."""
    runs = []
    for name, suffix in (("a.jsonl", ""), ("b.jsonl", " with entirely different closing words")):
        cfg = SP.ProbeConfig(saes=tiny_saes[:1], labels=_labels(tmp_path, name, suffix), k_values=(1, 5),
                             context_length=32, batch_rows=4, device="cpu")
        runs.append(SP.run_sparse_probing(cfg, tiny_lm, progress=False)[0]["eval_result_unstructured"])
    assert runs[0]["selected_latents"] == runs[1]["selected_latents"]
    assert runs[0]["selected_llm_channels"] == runs[1]["selected_llm_channels"]


def test_markdown_table_lists_each_k_the_baseline_and_groups():
    r = {"eval_config": {"k_values": [1, 5]},
         "eval_result_metrics": {"llm": {"llm_test_accuracy": 0.9, "llm_top_1_test_accuracy": 0.61,
                                         "llm_top_5_test_accuracy": 0.72},
                                 "sae": {"sae_test_accuracy": 0.88, "sae_top_1_test_accuracy": 0.55,
                                         "sae_top_5_test_accuracy": 0.7}},
         "eval_result_unstructured": {"latent_groups": {"level1": {"n_latents": 8, "sae_top_1_test_accuracy": 0.5}}}}
    lines = SP.markdown_table([("hsae", r)]).splitlines()
    assert lines[0] == "| features | k=1 | k=5 | all |"
    assert lines[2] == "| hsae | 0.550 | 0.700 | 0.880 |"
    assert lines[3] == "| raw residual (d_in channels) | 0.610 | 0.720 | 0.900 |"
    assert lines[4] == "| hsae / level1 (8 latents) | 0.500 | - | - |"


# ----------------------------------------------------------------------------- the residual cache
def _counting_forwards(monkeypatch):
    """Count the LM forwards sparse probing makes (every one goes through ``residuals``)."""
    calls = {"n": 0}
    real = SP.residuals

    def counted(*args, **kw):
        calls["n"] += 1
        return real(*args, **kw)

    monkeypatch.setattr(SP, "residuals", counted)
    return calls


@pytest.fixture(scope="module")
def tiny_saes_all(tiny_model_dir, tiny_saes, tmp_path_factory):
    """The two tiny SAEs plus a sequence SAE (seed 000's temporal: latents read earlier tokens of the row)."""
    from conftest import TINY_D_MODEL

    meta = {"model_id": str(tiny_model_dir), "layer": LAYER, "context_length": 64,
            "hook_name": f"blocks.{LAYER}.hook_resid_post"}
    sae = build("seed000_temporal", TINY_D_MODEL, 64, seed=0).eval()
    with torch.no_grad():  # taps at lag > 0 start at 0: give them weight so the context really acts
        sae.conv_weight.add_(0.3)
    return [*tiny_saes, save_sae(sae, tmp_path_factory.mktemp("probe_seq") / "temporal", meta)]


def test_cached_residuals_give_the_direct_results(tiny_lm, tiny_saes_all, tmp_path, monkeypatch):
    """Cache and LM forward feed one pooling path: same pooled features (fp32) and the same probe results."""
    labels = _labels(tmp_path, "l.jsonl")
    cfg = SP.ProbeConfig(saes=tiny_saes_all, labels=labels, k_values=(1, 2, 5), context_length=32, batch_rows=4,
                         device="cpu")
    train, _, _, _ = SP.labelled_docs(cfg)
    enc = {name: (sae, layer) for name, (sae, layer, _) in SP._load_saes(tiny_saes_all, tiny_lm).items()}
    direct = SP.collect_features(SP.LMResiduals(tiny_lm, train, [LAYER], 32), enc, batch_rows=4)
    calls = _counting_forwards(monkeypatch)
    cached = SP.collect_features(SP.cached_residuals(tiny_lm, train, [LAYER], 32, tmp_path / "cache", batch_rows=4),
                                 enc, batch_rows=4)
    assert calls["n"] == math.ceil(len(train) / 4)  # a miss: one forward per batch of 4 texts
    np.testing.assert_allclose(cached.llm[LAYER], direct.llm[LAYER], rtol=1e-5, atol=1e-6)
    assert set(cached.sae) == set(direct.sae) == {"topk", "seed004-groups", "temporal"}
    for name in direct.sae:
        np.testing.assert_allclose(cached.sae[name], direct.sae[name], rtol=1e-5, atol=1e-6, err_msg=name)
        assert np.abs(direct.sae[name]).sum() > 0, name  # not trivially equal
    np.testing.assert_array_equal(cached.n_tokens, direct.n_tokens)

    plain = SP.run_sparse_probing(cfg, tiny_lm, progress=False)
    via_cache = SP.run_sparse_probing(cfg, tiny_lm, progress=False, cache=tmp_path / "cache")
    for a, b in zip(plain, via_cache):
        for part in ("llm", "sae"):
            assert a["eval_result_metrics"][part] == pytest.approx(b["eval_result_metrics"][part], abs=1e-6)
        ua, ub = a["eval_result_unstructured"], b["eval_result_unstructured"]
        assert ua["selected_latents"] == ub["selected_latents"] and ua["latent_groups"] == ub["latent_groups"]
        assert ua["residual_cache"] is None and set(ub["residual_cache"]) == {"train", "test"}


def test_residual_cache_hit_skips_the_lm_and_a_new_key_misses(tiny_lm, tiny_saes, tmp_path, monkeypatch):
    labels = _labels(tmp_path, "l.jsonl")
    cfg = SP.ProbeConfig(saes=tiny_saes[:1], labels=labels, k_values=(1, 2), context_length=32, batch_rows=4,
                         device="cpu")
    train, test, _, _ = SP.labelled_docs(cfg)
    root = tmp_path / "cache"
    calls = _counting_forwards(monkeypatch)
    first = SP.run_sparse_probing(cfg, tiny_lm, progress=False, cache=root)[0]
    n_miss = calls["n"]
    assert n_miss == math.ceil(len(train) / 4) + math.ceil(len(test) / 4)
    folders = sorted(p.name for p in root.iterdir())
    assert len(folders) == 2 and not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp folder left
    second = SP.run_sparse_probing(cfg, tiny_lm, progress=False, cache=root)[0]
    assert calls["n"] == n_miss  # a hit: no forward at all
    assert first["eval_result_metrics"] == second["eval_result_metrics"]
    resid = np.load(root / folders[0] / f"resid_{LAYER}.npy", mmap_mode="r")
    assert isinstance(resid, np.memmap) and resid.dtype == np.float32
    meta = json.loads((root / folders[0] / "meta.json").read_text())
    assert meta["layers"] == [LAYER] and meta["n_tokens"] == resid.shape[0]

    # Anything that changes the residuals changes the key: another layer, context length, text, model weights.
    rows = SP.article_ids(tiny_lm.tokenizer, [d.text for d in train], 32)
    key = SP.residual_cache_key(tiny_lm, train, rows, [LAYER], 32)
    assert key in folders
    assert SP.residual_cache_key(tiny_lm, train, rows, [LAYER + 1], 32) != key
    rows16 = SP.article_ids(tiny_lm.tokenizer, [d.text for d in train], 16)
    assert SP.residual_cache_key(tiny_lm, train, rows16, [LAYER], 16) != key
    edited = [SP.Document(train[0].key, train[0].text + " x", train[0].meta), *train[1:]]
    assert SP.residual_cache_key(tiny_lm, edited, rows, [LAYER], 32) != key
    from dataclasses import replace

    assert SP.residual_cache_key(replace(tiny_lm, weights_hash="0" * 16), train, rows, [LAYER], 32) != key
    SP.cached_residuals(tiny_lm, train, [LAYER + 1], 32, root, batch_rows=4)
    assert calls["n"] == n_miss + math.ceil(len(train) / 4)  # layer 2: a miss, one more forward per batch
    assert len(list(root.iterdir())) == 3


def test_an_interrupted_cache_write_leaves_no_folder(tiny_lm, tmp_path, monkeypatch):
    """Ctrl-C mid-write: no cache folder (a later run must not read half the residuals), no temp folder."""
    train = [SP.Document(f"t{i}", f"Some text number {i} about things.", {"label": str(i % 2)}) for i in range(6)]
    real, calls = SP.residuals, {"n": 0}

    def interrupted(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(SP, "residuals", interrupted)
    with pytest.raises(KeyboardInterrupt):
        SP.cached_residuals(tiny_lm, train, [LAYER], 16, tmp_path / "cache", batch_rows=2)
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(FileNotFoundError, match="not a finished probe residual cache"):
        SP.CachedResiduals(tmp_path / "cache" / "nothing")
