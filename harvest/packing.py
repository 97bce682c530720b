"""Tokenise documents and pack them into fixed-length context rows.

Every row starts with BOS (Gemma's attention sink; without it position 0 carries
extreme norms) and every document starts with BOS, so a row that begins mid
document still sees BOS first. ``doc_index`` lets later stages (temporal SAEs,
evaluation) respect document boundaries; ``position`` is the index inside the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from .text import Document


@dataclass
class Row:
    """One packed context row, all arrays of shape ``[context_length]``.

    ``token_ids`` int32, ``doc_index`` int64 (index of the document in source order),
    ``position`` int32 (0..context_length-1). ``end`` is where packing stands after this row
    (:func:`pack_documents`' ``start`` takes it to pack the rows after this one), or None.
    """

    token_ids: np.ndarray
    doc_index: np.ndarray
    position: np.ndarray
    end: dict | None = None


def pack_documents(
    docs: Iterable[Document], tokenizer, context_length: int, batch_docs: int = 64, start: dict | None = None
) -> Iterator[Row]:
    """Yield packed rows of ``context_length`` tokens from ``docs`` (drops the final partial row).

    Every document contributes ``[BOS, *tokens]``; a row that begins mid-document gets a BOS
    first. Each row's ``end`` is ``{"rows": n, "doc_index": d, "offset": o, "source": cursor}``:
    ``n`` rows are packed so far, and the next row begins at token ``o`` of document ``d``'s
    ``[BOS, *tokens]`` (``o`` may equal its length: the next document), whose
    :attr:`Document.cursor` is ``cursor``.

    Args:
        docs: documents in source order; with ``start``, the source restarted at ``start["source"]``
            (its first document is document ``start["doc_index"]``).
        tokenizer: HF tokenizer with ``bos_token_id``.
        context_length: tokens per row (>= 2).
        batch_docs: documents tokenised per tokenizer call (speed only).
        start: a row's ``end``: pack the rows that followed it (same rows as packing from the
            beginning and dropping the rows before it).

    Raises:
        ValueError: context_length < 2 or a tokenizer without BOS.
    """
    if context_length < 2:
        raise ValueError(f"context length must be >= 2, got {context_length}")
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError("tokenizer has no BOS token; saestrata packs rows that start with BOS")
    toks: list[int] = []
    docs_of: list[int] = []

    def push(token: int, doc: int) -> bool:
        """Append ``token`` of document ``doc``; True when that completed a row."""
        if not toks and token != bos:
            toks.append(bos)
            docs_of.append(doc)
        toks.append(token)
        docs_of.append(doc)
        return len(toks) == context_length

    def take(end: dict) -> Row:
        """The full buffer as a Row ending at cursor ``end``; empties the buffer."""
        row = Row(np.asarray(toks, dtype=np.int32), np.asarray(docs_of, dtype=np.int64),
                  np.arange(context_length, dtype=np.int32), end)
        toks.clear()
        docs_of.clear()
        return row

    first_doc, skip, n_rows = (start["doc_index"], start["offset"], start["rows"]) if start else (0, 0, 0)
    for first, texts in _batched(docs, batch_docs):
        encoded = tokenizer([d.text for d in texts], add_special_tokens=False)["input_ids"]
        for offset, (ids, text) in enumerate(zip(encoded, texts)):
            doc = first_doc + first + offset
            sequence = [bos, *ids]
            for pos in range(skip if doc == first_doc else 0, len(sequence)):
                if push(sequence[pos], doc):
                    n_rows += 1
                    yield take({"rows": n_rows, "doc_index": doc, "offset": pos + 1, "source": text.cursor})


def _batched(docs: Iterable[Document], size: int) -> Iterator[tuple[int, list[Document]]]:
    batch: list[Document] = []
    first = 0
    for i, doc in enumerate(docs):
        if not batch:
            first = i
        batch.append(doc)
        if len(batch) == size:
            yield first, batch
            batch = []
    if batch:
        yield first, batch
