"""Issue 11 (dashboards): ``saestrata inspect`` against answers known in advance, its files, CLI and browser.

The known-answer store is built by hand: rows of 8 tokens (BOS first), documents that start
mid-row and continue across rows, and a standard SAE whose latent 0 reads activation dim 0,
which is non-zero only on tokens of one id (``TARGET``) with a distinct value per token. So the
top examples, their order and their context windows follow from the construction alone; the
windows are rebuilt here with row arithmetic (``g // T``), not with the ``position`` array the
code uses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from saestrata.cli import main
from saestrata.dashboards import InspectConfig, inspect_sae, load_dashboard
from saestrata.dashboards.collect import N_BINS, LatentCollector, bin_edges
from saestrata.dashboards.run import collect
from saestrata.dashboards.segtopk import SegmentTopK
from saestrata.store import StoreWriter
from saestrata.store.format import to_stored
from saestrata.train.registry import build
from saestrata.train.sae_io import save_sae

T, N_ROWS, D, BOS, TARGET = 8, 24, 64, 2, 777
HOOK = "blocks.1.hook_resid_post"
REPO = Path(__file__).resolve().parents[1]


def _layout() -> tuple[np.ndarray, np.ndarray]:
    """``(token_ids, doc_index)`` of 24 rows of 8: documents of varied lengths packed as harvest/packing.py does."""
    rng = np.random.default_rng(0)
    toks, docs, doc = [], [], 0
    while len(toks) < N_ROWS * T:
        body = rng.integers(100, 120, size=int(rng.integers(3, 14))).tolist()
        for t in [BOS, *body]:
            if len(toks) % T == 0 and t != BOS:  # a row continuing a document starts with BOS
                toks.append(BOS)
                docs.append(doc)
            toks.append(t)
            docs.append(doc)
        doc += 1
    return np.asarray(toks[: N_ROWS * T], np.int32), np.asarray(docs[: N_ROWS * T], np.int64)


def _plant(tok: np.ndarray) -> list[int]:
    """Put TARGET at batch edges (row ends/starts), right after mid-row document starts, and elsewhere.

    Returns the planted tokens in decreasing order of the activation they will get: the
    batch-edge and document-start ones first, so they are the top examples.
    """
    n = len(tok)
    starts = [g for g in range(1, n - 1) if tok[g] == BOS and g % T]  # mid-row document starts
    order = [15, 16 * 3 - 1, 16 * 3 + 1, starts[0] + 1, 17, starts[1] + 1, 1, 100, starts[2] + 1, 131, n - 1]
    planted = []
    for g in order:
        if tok[g] != BOS and g not in planted:
            tok[g] = TARGET
            planted.append(g)
    return planted


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """A hand-built store + SAE: ``(root, token_ids, doc_index, x0 value per token)``."""
    root = tmp_path_factory.mktemp("known")
    tok, doc = _layout()
    planted = _plant(tok)
    n = len(tok)
    x = torch.zeros(n, D)
    rng = np.random.default_rng(1)
    assert set(planted) == set(np.flatnonzero(tok == TARGET).tolist())  # the layout holds no other TARGET
    x[planted, 0] = torch.arange(len(planted), 0, -1, dtype=torch.float32) * 0.5  # distinct: 5.5, 5.0, ...
    x[torch.as_tensor(tok == BOS), 0] = 1000.0  # BOS: huge, must be ignored
    x[:, 1] = torch.tensor(rng.uniform(0.1, 2.0, n), dtype=torch.float32)  # latent 1 fires everywhere
    pos = (np.arange(n) % T).astype(np.int32)
    writer = StoreWriter(root / "store", [HOOK], D, n, shard_tokens=64, chunk_tokens=16, dtype="float32",
                         attrs={"bos_token_id": BOS, "special_token_ids": [0, 1, BOS], "context_length": T},
                         identity={"name": "known"})
    for shard in range(writer.n_shards):
        lo, hi = shard * 64, min(shard * 64 + 64, n)
        writer.write_shard(shard, {HOOK: to_stored(x[lo:hi])},
                           {"token_ids": tok[lo:hi], "doc_index": doc[lo:hi], "position": pos[lo:hi]})
    writer.finish({})
    sae = build("standard", D, 4)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.b_dec):
            p.zero_()
        sae.W_enc[0, 0] = sae.W_enc[1, 1] = 1.0  # latent 0 = relu(x0), latent 1 = relu(x1); 2, 3 never fire
    save_sae(sae.eval(), root / "sae", {"hook_name": HOOK, "layer": 1, "context_length": T})
    return root, tok, doc, x[:, 0].numpy()


def _window(tok, doc, g, c):
    """The expected window of token ``g``: same row (``g // T``) and same document, else -1."""
    out = []
    for o in range(-c, c + 1):
        h = g + o
        ok = 0 <= h < len(tok) and h // T == g // T and doc[h] == doc[g]
        out.append(int(tok[h]) if ok else -1)
    return out


def _expected_top(tok, x0, k):
    """Global indices of the k largest x0 among non-special tokens, descending."""
    cand = np.flatnonzero((tok == TARGET) & (x0 > 0))
    return cand[np.argsort(-x0[cand], kind="stable")][:k].tolist()


@pytest.mark.parametrize("batch_rows", [1, 2, 5])
def test_top_examples_and_windows_are_exactly_the_known_ones(known, batch_rows, tmp_path):
    root, tok, doc, x0 = known
    k, c = 6, 3
    coll, facts = collect(InspectConfig(sae=root / "sae", store=root / "store", out=tmp_path, top_k=k, context=c,
                                        batch_rows=batch_rows))
    want = _expected_top(tok, x0, k)
    scores, top = coll.top_examples()
    assert top["index"][0].tolist() == want
    assert scores[0].tolist() == pytest.approx(x0[want].tolist())
    for slot, g in enumerate(want):
        assert top["tokens"][0, slot].tolist() == _window(tok, doc, g, c), (slot, g)
        acts = top["acts"][0, slot].tolist()
        window = _window(tok, doc, g, c)
        expect = [float(x0[g + o - c]) if window[o] == TARGET else 0.0 for o in range(2 * c + 1)]
        assert acts == pytest.approx(expect)  # neighbours' activations too; BOS shown as 0
    # The top examples sit at batch edges (15, 47, 49 for 2-row batches), right after document
    # starts and at row edges: their windows must stop there.
    assert want[:3] == [15, 47, 49]
    assert all(-1 in top["tokens"][0, s].tolist() for s in range(k))
    # Statistics: BOS excluded everywhere; latent 1 fires on every other token.
    counted = int((tok != BOS).sum())
    assert facts["counted_tokens"] == coll.n_tokens == counted
    assert int(coll.fire_count[0]) == int((tok == TARGET).sum()) and int(coll.fire_count[1]) == counted
    assert coll.mean_firing()[0].item() == pytest.approx(float(x0[tok == TARGET].mean()))
    assert coll.fire_count[2:].tolist() == [0, 0] and torch.isinf(scores[2:]).all()
    assert coll.histogram().sum(1).tolist() == coll.fire_count.tolist()
    # Memory is fixed by d_sae and k, not by the store: every per-latent buffer is [d_sae, k] or [d_sae, bins].
    assert tuple(coll.top.scores.shape) == (4, k) and tuple(coll.top.data["tokens"].shape) == (4, k, 2 * c + 1)
    assert all(tuple(v.shape[:2]) == (4, k) for v in coll.top.data.values())
    assert tuple(coll.samples.scores.shape) == (4 * N_BINS, coll.samples.k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_the_encode_on_cuda_gives_the_cpus_top_examples(known, tmp_path):
    """``device="cuda"`` runs the streaming encode on the GPU (a copy of the SAE) and collects the same top
    examples as the CPU, to fp32 rounding."""
    root = known[0]
    got = {}
    for device in ("cpu", "cuda"):
        coll, _ = collect(InspectConfig(sae=root / "sae", store=root / "store", out=tmp_path, top_k=6, context=3,
                                        device=device))
        got[device] = coll.top_examples()
    (s_cpu, t_cpu), (s_gpu, t_gpu) = got["cpu"], got["cuda"]
    assert torch.equal(torch.as_tensor(t_cpu["index"]), torch.as_tensor(t_gpu["index"]))
    torch.testing.assert_close(torch.as_tensor(s_gpu), torch.as_tensor(s_cpu), rtol=1e-5, atol=1e-6)


def test_quantile_examples_are_real_firings_inside_their_interval(known, tmp_path):
    root, tok, doc, x0 = known
    coll, _ = collect(InspectConfig(sae=root / "sae", store=root / "store", out=tmp_path, top_k=3, context=2,
                                    batch_rows=2))
    q = coll.quantile_examples(n_intervals=3, per_interval=4)
    seen = []
    for interval in range(3):
        lo, hi = q["bounds"][0, interval].tolist()
        for slot in range(4):
            g = int(q["index"][0, interval, slot])
            if g < 0:
                continue
            seen.append(g)
            assert tok[g] == TARGET and float(q["value"][0, interval, slot]) == pytest.approx(float(x0[g]))
            assert lo <= x0[g] < hi
            assert q["tokens"][0, interval, slot].tolist() == _window(tok, doc, g, 2)
    assert len(seen) == len(set(seen)) >= 3


def test_segment_topk_matches_a_global_stable_sort():
    """Random streams in random batch sizes, ties included: equal to sorting everything at once."""
    gen = torch.Generator().manual_seed(0)
    n_seg, k, n = 7, 4, 500
    seg = torch.randint(0, n_seg, (n,), generator=gen)
    score = torch.randint(0, 30, (n,), generator=gen).float()  # many ties
    top = SegmentTopK(n_seg, k, {"index": ((), torch.int64)})
    cuts = [0, *sorted(torch.randint(0, n, (12,), generator=gen).tolist()), n]
    for a, b in zip(cuts[:-1], cuts[1:]):
        top.update(seg[a:b], score[a:b], {"index": torch.arange(a, b)})
    scores, data = top.sorted()
    for s in range(n_seg):
        idx = torch.nonzero(seg == s).flatten()
        order = idx[torch.argsort(score[idx], descending=True, stable=True)][:k]
        assert data["index"][s, : len(order)].tolist() == order.tolist()
        assert scores[s, : len(order)].tolist() == score[order].tolist()


def test_inspect_files_api_and_cli(known, tiny_lm, tmp_path, monkeypatch):
    root, tok, doc, x0 = known
    out = tmp_path / "dash"
    import saestrata.dashboards.run as run

    opened = []
    real_store = run.ActivationStore
    monkeypatch.setattr(run, "ActivationStore", lambda *a, **k: opened.append(a) or real_store(*a, **k))
    index = inspect_sae(InspectConfig(sae=root / "sae", store=root / "store", out=out, top_k=5, context=3,
                                      batch_rows=2, block_size=3), lm=tiny_lm)
    assert len(opened) == 1  # one open per run: each open of an S3 store is a round of requests
    monkeypatch.undo()
    assert [b["first"] for b in index["blocks"]] == [0, 3]
    dash = load_dashboard(out)
    assert dash.index["post_seconds"] == index["post_seconds"] > 0  # the file has the run's whole timing
    lat = dash.latent(0)
    want = _expected_top(tok, x0, 5)
    assert [e["index"] for e in lat["top"]] == want
    assert lat["top"][0]["token_ids"] == _window(tok, doc, want[0], 3)
    assert lat["top"][0]["tokens"][3] == tiny_lm.tokenizer.decode([TARGET])
    assert lat["stats"]["fire_count"] == int((tok == TARGET).sum())
    assert len(lat["logits"]["top"]) == 10 and dash.latent(3)["top"] == []
    # Logit effects: W_dec[0] @ W_U^T computed here directly.
    from saestrata.train.sae_io import load_sae

    sae, _ = load_sae(root / "sae")
    logits = sae.W_dec[0].float() @ tiny_lm.model.get_output_embeddings().weight.float().T
    assert [s for s, _ in lat["logits"]["top"]][:3] == [tiny_lm.tokenizer.decode([int(t)])
                                                        for t in logits.topk(3).indices]
    for name in ("index.html", "browser.js", "browser.css", "data/index.js", "data/vocab.js", "data/block_00000.js"):
        assert (out / name).is_file(), name
    # The CLI writes the same top examples (default --out handling: an earlier dashboard may be replaced).
    result = CliRunner().invoke(main, ["inspect", "--sae", str(root / "sae"), "--store", str(root / "store"),
                                       "--top-k", "5", "--context", "3", "--batch-rows", "3", "--out", str(out),
                                       "--model", str(tiny_lm.model_id)])
    assert result.exit_code == 0, result.output
    assert [e["index"] for e in load_dashboard(out).latent(0)["top"]] == want


def test_matches_brute_force_on_the_tiny_store(tiny_store, tmp_path):
    """A random topk SAE over a real harvest: every latent's top-k equals a dense top-k over all tokens."""
    from saestrata.store import ActivationStore

    store = ActivationStore(tiny_store)
    sae = build("topk", 64, 96, k=8, seed=3).eval()
    save_sae(sae, tmp_path / "sae", {"hook_name": "blocks.2.hook_resid_post", "layer": 2})
    coll, _ = collect(InspectConfig(sae=tmp_path / "sae", store=tiny_store, out=tmp_path / "o", top_k=7, context=4,
                                    batch_rows=3))
    with torch.no_grad():
        f = sae.encode(store.activations("blocks.2.hook_resid_post").float())
    tok = torch.as_tensor(store.aligned("token_ids"))
    f[torch.isin(tok, torch.tensor(store.attrs["special_token_ids"], dtype=tok.dtype))] = 0
    want = f.T.topk(7, dim=1)
    fired = want.values > 0
    got = coll.top_examples()[0]
    assert torch.allclose(got[fired], want.values[fired], rtol=1e-5, atol=1e-6)
    assert torch.isinf(got[~fired]).all()
    assert torch.equal(coll.fire_count, (f > 0).sum(0))


def test_the_store_gives_the_same_top_examples_as_re_running_the_lm(tiny_store, tiny_model_dir, tmp_path):
    """bench/inspect_vs_lm.py on the tiny model: the peers' way (LM forward again) finds the same examples."""
    import json
    import subprocess
    import sys

    sae = build("topk", 64, 96, k=8, seed=5).eval()
    save_sae(sae, tmp_path / "sae", {"hook_name": "blocks.2.hook_resid_post", "layer": 2})
    script = Path(__file__).resolve().parents[1] / "bench" / "inspect_vs_lm.py"
    done = subprocess.run([sys.executable, str(script), "--sae", str(tmp_path / "sae"), "--store", str(tiny_store),
                           "--tokens", "4096", "--latents", "50", "--top-k", "5", "--model", str(tiny_model_dir),
                           "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["latents_compared"] == 50 and r["max_rel_activation_diff_shared"] < 1e-6
    assert r["differing_latents"] == r["differing_latents_explained_by_ties"]  # any difference is a tie at the k-th value


# ----------------------------------------------------------------------------- the browser
def _chromium() -> str | None:
    """A Chromium binary: on PATH, else installed with apt-get (Debian ``chromium``) when we are root."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=900)
    return shutil.which("chromium")


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=15000"]


def _chrome(binary: str, url: str, *extra: str, profile: Path) -> str:
    """Run headless Chromium on ``url``; returns stdout (the DOM with ``--dump-dom``)."""
    cmd = [binary, *CHROME_FLAGS, f"--user-data-dir={profile}", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout


@pytest.fixture(scope="module")
def chromium():
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium: install Debian's 'chromium' package (apt-get install -y chromium) to run this test")
    return binary


def test_browser_in_headless_chromium(known, tiny_lm, tmp_path, chromium):
    root, tok, doc, x0 = known
    out = tmp_path / "dash"
    inspect_sae(InspectConfig(sae=root / "sae", store=root / "store", out=out, top_k=5, context=3, batch_rows=2),
                lm=tiny_lm)
    page = (out / "index.html").resolve().as_uri()
    dom = _chrome(chromium, page, "--dump-dom", profile=tmp_path / "p1")
    assert 'data-ready="index"' in dom, dom[:2000]
    for i in (0, 1):  # latents that fired are listed; the dead ones are hidden by default
        assert f'data-latent="{i}"' in dom
    dom = _chrome(chromium, page + "#latent=0", "--dump-dom", profile=tmp_path / "p2")
    assert 'data-ready="latent-0"' in dom, dom[:2000]
    first = dom.split('id="top-examples"', 1)[1].split('class="example"', 2)[1]
    want = _expected_top(tok, x0, 1)[0]
    assert f'data-index="{want}"' in first
    peak = first.split('peak', 1)[1].split(">", 1)[1].split("<", 1)[0]
    assert peak == tiny_lm.tokenizer.decode([TARGET])  # the highest-activation token is the one highlighted
    shot = tmp_path / "shot.png"
    _chrome(chromium, page + "#latent=0", f"--screenshot={shot}", "--window-size=1200,900", profile=tmp_path / "p3")
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_example_script_runs(known, tiny_lm, tmp_path):
    """docs/examples/inspect_latents.py on a dashboard of the known store prints latent 0's best token."""
    root, tok, doc, x0 = known
    out = tmp_path / "dash"
    inspect_sae(InspectConfig(sae=root / "sae", store=root / "store", out=out, top_k=5, context=3), lm=tiny_lm)
    env = dict(os.environ)  # PYTHONPATH (or the editable install) makes saestrata importable, as for pytest
    result = subprocess.run([sys.executable, str(REPO / "docs" / "examples" / "inspect_latents.py"), str(out),
                             "--store", str(root / "store"), "--latent", "0"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"token {_expected_top(tok, x0, 1)[0]}" in result.stdout
    assert json.loads(result.stdout.strip().splitlines()[-1])["rows"] > 0


def test_sequence_sae_gets_whole_rows(known, tmp_path):
    """A temporal (sequence) SAE at init is a plain SAE on lag 0: same known top examples via encode_seq."""
    root, tok, doc, x0 = known
    sae = build("temporal_dilated", D, 4)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.b_dec):
            p.zero_()
        sae.W_enc[0, 0] = sae.W_enc[1, 1] = 1.0
    save_sae(sae.eval(), tmp_path / "temporal", {"hook_name": HOOK, "layer": 1, "context_length": T})
    coll, _ = collect(InspectConfig(sae=tmp_path / "temporal", store=root / "store", out=tmp_path, top_k=4,
                                    context=2, batch_rows=3))
    assert coll.top_examples()[1]["index"][0].tolist() == _expected_top(tok, x0, 4)


def test_structure_of_a_two_level_hsae():
    """seed 000's HSAE: levels from latent_groups(); level-2 children = largest W_dec2 entries, parents = argmax."""
    from saestrata.dashboards.structure import latent_structure

    sae = build("hsae_skip", 8, 16)
    s = latent_structure(sae, n_children=3)
    assert s["kind"] == "level" and s["groups"] == ["level1", "level2"]
    assert s["group"] == [0] * 8 + [1] * 8
    w = sae.W_dec2.detach()
    for j in range(8):
        kids = s["children"][8 + j]
        assert len(kids) == 3 and all(0 <= c < 8 for c in kids)
        assert min(w[j, kids]) >= max(w[j, [c for c in range(8) if c not in kids]])
    assert s["parent"][:8] == (8 + w.argmax(0)).tolist() and s["parent"][8:] == [-1] * 8
