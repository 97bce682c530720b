"""Packing and the deterministic split of the embedded corpus."""

import numpy as np

from saestrata.harvest.packing import pack_documents
from saestrata.harvest.text import Document, split_of, wiki_articles


def test_rows_start_with_bos_and_track_documents(tiny_lm):
    tok = tiny_lm.tokenizer
    docs = [Document(str(i), "word " * n, {}) for i, n in enumerate([5, 40, 3, 70])]
    rows = list(pack_documents(docs, tok, context_length=16))
    expected_tokens = sum(1 + len(tok(d.text, add_special_tokens=False)["input_ids"]) for d in docs)
    assert all(r.token_ids[0] == tok.bos_token_id for r in rows)
    assert all((r.position == np.arange(16)).all() for r in rows)
    flat_docs = np.concatenate([r.doc_index for r in rows])
    assert (np.diff(flat_docs) >= 0).all()  # documents appear in order
    # Every document start is a BOS; extra BOS only where a row begins mid-document.
    flat_tok = np.concatenate([r.token_ids for r in rows])
    n_bos = int((flat_tok == tok.bos_token_id).sum())
    assert len(docs) <= n_bos <= len(docs) + len(rows)
    assert len(rows) * 16 <= expected_tokens + len(rows)


def test_wiki_split_is_disjoint_and_deterministic():
    train = {d.key for d in wiki_articles("train")}
    evals = wiki_articles("eval")
    assert train.isdisjoint({d.key for d in evals})
    assert 0.05 < len(evals) / (len(evals) + len(train)) < 0.15
    assert [d.key for d in wiki_articles("eval", seed=0)] == [d.key for d in evals]
    assert all(split_of(d.key) == "eval" for d in evals)
    assert {d.meta["topic"] for d in evals} >= {"Biology and health sciences", "History", "Geography"}
