"""The dashboard's files, readable without the HTML, and :func:`load_dashboard` to read them back.

Layout of an ``inspect --out DIR`` folder (every file written atomically, ``index.json`` last)::

    index.json                 run facts, histogram edges, block list, one summary row per latent
    vocab.json                 {token id: string} for every id the blocks use
    blocks/block_NNNNN.safetensors   tensors of latents [first, first + block_size)
    blocks/block_NNNNN.json          strings and statistics of the same latents
    index.html, browser.js, browser.css, data/*.js   the static browser (dashboards/html.py)

Block tensors (``b`` latents, ``k`` top examples, ``W = 2 context + 1``, ``Q`` intervals, ``P`` per interval):
``top_index`` int64 ``[b, k]`` (global token index, -1 = empty), ``top_value`` fp32 ``[b, k]``,
``top_tokens`` int32 ``[b, k, W]`` (-1 = outside the row/document), ``top_acts`` fp32 ``[b, k, W]``,
``q_index``/``q_value``/``q_tokens``/``q_acts`` ``[b, Q, P, ...]``, ``q_bounds`` fp32 ``[b, Q, 2]``,
``hist`` int64 ``[b, N_BINS]``, ``logit_top_ids``/``logit_bottom_ids`` int64 ``[b, n]`` and their
``_values`` fp32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import write_text_atomic

FORMAT = "saestrata-dashboard"
FORMAT_VERSION = 1


def block_name(block: int) -> str:
    """File stem of block number ``block`` (``block_00003``)."""
    return f"block_{block:05d}"


def finite(x: float) -> float | None:
    """``x`` as a float, None for NaN / inf (JSON has neither)."""
    x = float(x)
    return x if math.isfinite(x) else None


def write_block(folder: Path, block: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``blocks/block_NNNNN.safetensors`` (``tensors``) and ``.json`` (``meta``) atomically."""
    target = folder / "blocks"
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"{block_name(block)}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)
    write_text_atomic(target / f"{block_name(block)}.json", json.dumps(meta))


def write_json(path: Path, data) -> None:
    """``data`` as compact JSON at ``path``, atomically."""
    write_text_atomic(path, json.dumps(data))


class Dashboard:
    """A dashboard folder opened for notebook work (:func:`load_dashboard`).

    Attributes:
        folder: the folder.
        index: ``index.json`` as a dict (``latents``: one summary dict per latent).
        vocab: ``{token id: string}``.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / "index.json"
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder} is not a dashboard folder (no index.json): run saestrata inspect")
        self.index = json.loads(path.read_text(encoding="utf-8"))
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{path} is not a saestrata dashboard index")
        self.vocab = {int(k): v for k, v in json.loads((self.folder / "vocab.json").read_text("utf-8")).items()}
        self._cache: dict[int, tuple[dict, dict]] = {}

    @property
    def d_sae(self) -> int:
        """Number of latents."""
        return int(self.index["d_sae"])

    def block(self, b: int) -> tuple[dict[str, torch.Tensor], dict]:
        """``(tensors, meta)`` of block ``b`` (cached)."""
        if b not in self._cache:
            stem = self.folder / "blocks" / block_name(b)
            self._cache = {b: (load_file(f"{stem}.safetensors"), json.loads(Path(f"{stem}.json").read_text("utf-8")))}
        return self._cache[b]

    def strings(self, ids) -> list[str | None]:
        """Token strings of ``ids`` (None for -1, i.e. outside the window)."""
        return [None if int(t) < 0 else self.vocab.get(int(t), f"<{int(t)}>") for t in ids]

    def latent(self, i: int) -> dict:
        """Everything about latent ``i``.

        Returns:
            ``{"latent", "stats" (density, max, mean_firing, mean_all, group ...), "top": [example],
            "quantiles": [{"bounds": [lo, hi], "examples": [example]}], "logits": {"top": [(str, value)],
            "bottom": [...]}, "hist": {"edges", "counts"}}``, where an example is ``{"index" (global
            token), "value", "centre" (position of the example in the window), "token_ids", "tokens"
            (strings, None outside), "acts"}``; top examples by decreasing activation.

        Raises:
            IndexError: ``i`` outside ``[0, d_sae)``.
        """
        if not 0 <= i < self.d_sae:
            raise IndexError(f"latent {i} out of range [0, {self.d_sae})")
        size = int(self.index["block_size"])
        tensors, meta = self.block(i // size)
        j, centre = i % size, int(self.index["context"])

        def example(prefix: str, *where) -> dict | None:
            """Example ``where`` of table ``prefix`` (``top``/quantile) as a dict, or None for an empty slot."""
            idx = int(tensors[f"{prefix}_index"][where])
            if idx < 0:
                return None
            ids = tensors[f"{prefix}_tokens"][where].tolist()
            return {"index": idx, "value": float(tensors[f"{prefix}_value"][where]), "centre": centre,
                    "token_ids": ids, "tokens": self.strings(ids), "acts": tensors[f"{prefix}_acts"][where].tolist()}

        top = [e for e in (example("top", j, r) for r in range(tensors["top_index"].shape[1])) if e]
        quantiles = [{"bounds": tensors["q_bounds"][j, q].tolist(),
                      "examples": [e for e in (example("q", j, q, p) for p in range(tensors["q_index"].shape[2])) if e]}
                     for q in range(tensors["q_index"].shape[1])]
        lm = meta["latents"][j]
        return {"latent": i, "stats": lm["stats"], "structure": lm["structure"], "top": top, "quantiles": quantiles,
                "logits": lm["logits"], "hist": {"edges": self.index["hist_edges"], "counts": tensors["hist"][j].tolist()}}


def load_dashboard(folder: str | Path) -> Dashboard:
    """Open an ``inspect --out`` folder: ``load_dashboard(DIR).latent(12)["top"][0]["tokens"]``.

    Raises:
        FileNotFoundError: no ``index.json`` in ``folder``.
        ValueError: ``index.json`` is not a dashboard index.
    """
    return Dashboard(folder)
