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
    ``position`` int32 (0..context_length-1).
    """

    token_ids: np.ndarray
    doc_index: np.ndarray
    position: np.ndarray


def pack_documents(
    docs: Iterable[Document], tokenizer, context_length: int, batch_docs: int = 64
) -> Iterator[Row]:
    """Yield packed rows of ``context_length`` tokens from ``docs`` (drops the final partial row).

    Args:
        docs: documents in source order.
        tokenizer: HF tokenizer with ``bos_token_id``.
        context_length: tokens per row (>= 2).
        batch_docs: documents tokenised per tokenizer call (speed only).

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

    def push(token: int, doc: int) -> Row | None:
        if not toks and token != bos:
            toks.append(bos)
            docs_of.append(doc)
        toks.append(token)
        docs_of.append(doc)
        if len(toks) < context_length:
            return None
        row = Row(
            token_ids=np.asarray(toks, dtype=np.int32),
            doc_index=np.asarray(docs_of, dtype=np.int64),
            position=np.arange(context_length, dtype=np.int32),
        )
        toks.clear()
        docs_of.clear()
        return row

    for first, texts in _batched(docs, batch_docs):
        encoded = tokenizer([d.text for d in texts], add_special_tokens=False)["input_ids"]
        for offset, ids in enumerate(encoded):
            doc = first + offset
            for token in [bos, *ids]:
                row = push(token, doc)
                if row is not None:
                    yield row


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
