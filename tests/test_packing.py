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


def test_packing_resumed_at_any_row_end_gives_the_same_rows(tiny_lm):
    """A resumed harvest packs from a row's ``end`` cursor: the rows must be those an unbroken pass gives."""
    tok = tiny_lm.tokenizer
    n_tok = lambda n: len(tok("word " * n, add_special_tokens=False)["input_ids"])  # noqa: E731
    fill = next(n for n in range(1, 64) if n_tok(n) == 15)  # BOS + 15 tokens: a row ending on the doc's last token
    # rows end mid-document, exactly at a document's last token, and span 3+ documents
    docs = [Document(str(i), "word " * n, {}, cursor={"index": i})
            for i, n in enumerate([fill, 5, 14, 3, 70, 1, 30, fill, 2])]
    rows = list(pack_documents(docs, tok, context_length=16, batch_docs=3))
    assert len(rows) > 6
    ends = {r.end["offset"] - len(tok(docs[r.end["doc_index"]].text, add_special_tokens=False)["input_ids"]) - 1
            for r in rows}
    assert 0 in ends and min(ends) < 0  # some rows end on a document's last token, others mid-document
    for i, row in enumerate(rows):
        start = row.end
        assert start["source"] == docs[start["doc_index"]].cursor
        rest = list(pack_documents(docs[start["source"]["index"]:], tok, 16, batch_docs=3, start=start))
        assert len(rest) == len(rows) - i - 1, i
        for a, b in zip(rest, rows[i + 1:]):
            assert np.array_equal(a.token_ids, b.token_ids) and np.array_equal(a.doc_index, b.doc_index), i
            assert a.end == b.end
