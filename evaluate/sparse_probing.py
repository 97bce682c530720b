"""``saestrata probe``: SAEBench's ``sparse_probing`` eval on the embedded corpus's article topics.

Protocol (SAEBench ``sae_bench/evals/sparse_probing/main.py`` and ``probe_training.py``,
after Gurnee et al. 2023, "Finding neurons in a haystack"; read at SAEBench HEAD):

1. Texts of each class, truncated to ``context_length`` tokens (128), run through the LM
   to the SAE's block. SAEBench zeroes the residual at BOS / PAD / EOS tokens
   (``get_bos_pad_eos_mask``) and mean-pools over the remaining tokens
   (``create_meaned_model_activations``: sum / number of non-zero token vectors); SAE
   latents are encoded per token and pooled over the same tokens
   (``get_sae_meaned_activations``). Here: every article is tokenised alone, BOS first
   (as harvest rows, :mod:`~saestrata.harvest.packing`), truncated to ``context_length``;
   rows are right-padded in a batch (causal attention: real tokens never see the pads) and
   every token whose id is one of the tokenizer's special ids (BOS, EOS, PAD, ...) is
   dropped; the residual ``[T, d_in]`` and the latents ``[T, d_sae]`` are averaged over the
   remaining ``T`` tokens (:func:`pool_rows`).
2. One-vs-rest per class (``prepare_probe_data``): all texts of the class are positives;
   ``ceil(n_pos / (n_classes - 1))`` texts drawn from each other class, shuffled and cut to
   ``n_pos``, are negatives (balanced), separately for the train and the test split.
3. Latent selection (``get_top_k_mean_diff_mask``) on the *train* split only:
   ``|mean_pos - mean_neg|`` per pooled latent, the ``k`` largest kept. SAEBench takes the
   absolute difference (not the signed ``pos - neg``), so a latent that is *off* for the
   class counts as well; we follow SAEBench (:func:`top_k_mean_diff`).
4. ``LogisticRegression(penalty="l2", C=1.0, max_iter=1000)`` (scikit-learn) fitted on the
   train split's ``k`` selected latents, accuracy on the test split (``train_sklearn_probe``);
   ``k`` in :data:`K_VALUES`. The same on the raw residual: ``llm_top_{k}`` (top-``k``
   residual channels by the same rule) and ``llm_test_accuracy`` (all ``d_in`` channels);
   ``sae_test_accuracy`` on all ``d_sae`` latents.
5. Each metric is the mean over classes; ``eval_result_metrics`` holds the mean over
   datasets (here one dataset).

Labels: the 12 topics of the embedded corpus (:func:`wiki_topic_split`); the corpus is
split by article title (:func:`~saestrata.harvest.text.split_of`, the split the unlearning
eval uses), probes are selected and fitted on ``train``-split articles and scored on
``eval``-split articles. ``--labels FILE.jsonl`` replaces them with the user's own
``{"text", "label"[, "split"]}`` lines (:func:`load_labelled_jsonl`).

Structured SAEs (``sae.latent_groups()``: levels, groups, tiers): the top-``k`` selection
is also restricted to each group's latents (``eval_result_unstructured["latent_groups"]``),
which tests the seeds' claim that coarse latents carry coarse concepts.

Deviations from SAEBench are listed in ``eval_config["deviations_from_saebench"]``
(:data:`DEVIATIONS`).

One code path (:func:`run_sparse_probing`, used by ``saestrata probe`` and by the benchmark's
``probe`` stage): token residuals -> pooled residual and per-token latents pooled over the same
tokens (:func:`collect_features`, :func:`pool_rows`) -> probes (:func:`probe_features`). The
residuals come from the LM (:class:`LMResiduals`) or, with ``cache=``, from a residual cache
(:func:`cached_residuals`, :class:`CachedResiduals`): every real token's residual of every
article, float32, memory-mapped, in a folder named by the sha256 of what determines them
(:func:`residual_cache_key`: model name, weights hash, config, dtype, layers, context length,
articles and their token ids), so the LM forward over the articles (the expensive part) is paid
once and each further SAE costs an encode. Both
sources yield the same batches, so results agree to fp32 rounding.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..harvest.hooks import residuals
from ..harvest.model import LoadedModel, ModelError, check_layers, layer_of_hook
from ..harvest.text import EMBEDDED_DATASET, DatasetError, Document, split_of, wiki_articles
from ..train.sae_io import load_sae
from .diagnostics import latent_groups_of
from .unlearning import encode_rows

EVAL_TYPE_ID = "sparse_probing"
K_VALUES = (1, 2, 5, 10, 20, 50)
LABEL_KEY = "label"  # Document.meta key of the class label
WIKI_DATASET_NAME = f"{EMBEDDED_DATASET}/topics"
POSITIVE, NEGATIVE = 1, 0  # SAEBench dataset_info.POSITIVE_CLASS_LABEL / NEGATIVE_CLASS_LABEL
SAEBENCH_DEFAULTS = {  # SparseProbingEvalConfig / get_*_dataset: per class 4000 // 2 train, 1000 // 2 test texts
    "random_seed": 42, "probe_train_set_size": 4000, "probe_test_set_size": 1000, "context_length": 128,
    "k_values": [1, 2, 5], "train_texts_per_class": 2000, "test_texts_per_class": 500,
}
DEVIATIONS = (
    "dataset: the embedded wiki-vital corpus's 12 article topics (or --labels), not bias_in_bios / amazon / "
    "github-code / ag_news / europarl",
    "texts per class: at most train_per_class / test_per_class (defaults 100 / 50; SAEBench 2000 / 500); the eval "
    "split has 28-169 articles per topic, so test classes are unequal in size",
    "split: article-title hash (sha1(title) % 100 < 10 -> eval), the corpus's own split, not the datasets' "
    "train/test splits",
    "pooling: tokens with any special id dropped by id (SAEBench zeroes BOS/PAD/EOS and then drops all-zero "
    "residual vectors); same tokens otherwise",
    "llm_test_accuracy and sae_test_accuracy: sklearn LogisticRegression on all channels (SAEBench: a torch probe, "
    "100 epochs, early stopping on test accuracy, i.e. selected on the test set)",
    "k_values 1,2,5,10,20,50 by default (SAEBench default 1,2,5; its schema has 1..100)",
    "random draws (negatives, shuffles) from numpy.random.default_rng(seed, class index) (SAEBench: torch.randperm "
    "after torch.manual_seed)",
    "ties in |mean difference|: lower index first (SAEBench: torch.argsort, unspecified order)",
    "a positive class larger than all negatives available is cut to their number (SAEBench asserts equal sizes)",
    "per latent group (levels/groups/tiers): top-k restricted to the group, extra, in eval_result_unstructured",
)


@dataclass
class ProbeConfig:
    """What to run. ``labels`` None = the embedded corpus's topics.

    ``train_per_class`` / ``test_per_class`` cap the articles of each class per split (a seeded
    sample); None means every article.
    """

    saes: list[Path]
    labels: Path | None = None
    k_values: tuple[int, ...] = K_VALUES
    train_per_class: int | None = 100
    test_per_class: int | None = 50
    context_length: int = 128
    batch_rows: int = 8
    seed: int = 42
    model: str | None = None
    device: str = "auto"
    dtype: str = "bfloat16"


@dataclass
class Features:
    """Mean-pooled features of ``n`` documents.

    Attributes:
        llm: ``{layer: [n, d_in] float32}`` pooled residuals.
        sae: ``{name: [n, d_sae] float32}`` pooled latents.
        n_tokens: ``[n]`` int64, tokens averaged per document (special tokens excluded).
    """

    llm: dict[int, np.ndarray]
    sae: dict[str, np.ndarray]
    n_tokens: np.ndarray
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- labelled texts
def _cap_per_class(docs: list[Document], limit: int | None, seed: int) -> list[Document]:
    """At most ``limit`` documents of each label: a seeded sample, in key order."""
    by_label: dict[str, list[Document]] = {}
    for d in sorted(docs, key=lambda d: d.key):
        by_label.setdefault(d.meta[LABEL_KEY], []).append(d)
    rng = np.random.default_rng(seed)
    out = []
    for label in sorted(by_label):
        group = by_label[label]
        if limit is not None and len(group) > limit:
            group = [group[i] for i in sorted(rng.choice(len(group), size=limit, replace=False))]
        out += group
    return out


def wiki_topic_split(train_per_class: int | None = 100, test_per_class: int | None = 50,
                     seed: int = 42) -> tuple[list[Document], list[Document]]:
    """``(train docs, test docs)`` of the embedded corpus labelled by topic (``meta["label"]``).

    Train = ``wiki_articles("train")``, test = ``wiki_articles("eval")`` (disjoint by title,
    :func:`~saestrata.harvest.text.split_of`; the same split ``saestrata unlearn`` uses), each
    capped per topic by a seeded sample. All 12 topics, ``Uncategorized`` included.

    Raises:
        DatasetError: the embedded corpus is not installed.
    """
    def labelled(split: str) -> list[Document]:
        """The topic-labelled articles of ``split``, tagged with their label and split."""
        return [Document(d.key, d.text, {**d.meta, LABEL_KEY: d.meta["topic"], "split": split})
                for d in wiki_articles(split) if d.meta.get("topic")]

    return _cap_per_class(labelled("train"), train_per_class, seed), _cap_per_class(labelled("eval"), test_per_class,
                                                                                     seed + 1)


def _labelled_line(line: str, path: Path, lineno: int) -> Document:
    """One JSONL line -> Document (key = text, meta label / split); DatasetError naming the line."""
    where = f"{path} line {lineno}"
    try:
        row = json.loads(line)
    except ValueError:
        raise DatasetError(f"{where} is not JSON: each line must be {{\"text\": ..., \"label\": ...}}") from None
    if not isinstance(row, dict):
        raise DatasetError(f"{where} is not a JSON object: each line must be {{\"text\": ..., \"label\": ...}}")
    for name in ("text", "label"):
        if name not in row:
            raise DatasetError(f"{where} has no {name!r} field: each line must be {{\"text\": ..., \"label\": ...}}")
    text, label, split = row["text"], row["label"], row.get("split")
    if not isinstance(text, str) or not text.strip():
        raise DatasetError(f"{where}: 'text' must be a non-empty string")
    if not isinstance(label, (str, int)) or isinstance(label, bool) or str(label).strip() == "":
        raise DatasetError(f"{where}: 'label' must be a non-empty string or an integer")
    if split is not None and split not in ("train", "eval"):
        raise DatasetError(f"{where}: 'split' must be train or eval (or absent: split by a hash of the text)")
    split = split or split_of(text)
    return Document(key=text, text=text, meta={LABEL_KEY: str(label), "split": split})


def load_labelled_jsonl(path: str | Path, train_per_class: int | None = None, test_per_class: int | None = None,
                        seed: int = 42) -> tuple[list[Document], list[Document]]:
    """``(train docs, test docs)`` from a JSONL of ``{"text": str, "label": str|int, "split"?: "train"|"eval"}``.

    Lines without ``split`` go by the project's split rule on the text
    (:data:`~saestrata.harvest.text.SPLIT_RULE`, ~10% eval). Blank lines are skipped.

    Raises:
        DatasetError: unreadable / empty file, a bad line (one line naming it), fewer than two
            labels, or a label with no train or no eval text.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DatasetError(f"--labels {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    docs = [_labelled_line(line, path, i + 1) for i, line in enumerate(lines) if line.strip()]
    if not docs:
        raise DatasetError(f"--labels {path} is empty: give one {{\"text\": ..., \"label\": ...}} object per line")
    train = [d for d in docs if d.meta["split"] == "train"]
    test = [d for d in docs if d.meta["split"] == "eval"]
    labels = sorted({d.meta[LABEL_KEY] for d in docs})
    if len(labels) < 2:
        raise DatasetError(f"--labels {path} has only the label {labels[0]!r}: probing needs at least two labels")
    for name, part in (("train", train), ("eval", test)):
        missing = [lab for lab in labels if lab not in {d.meta[LABEL_KEY] for d in part}]
        if missing:
            raise DatasetError(f"--labels {path}: label {missing[0]!r} has no {name} text: add lines with "
                               f"\"split\": \"{name}\" for every label")
    return _cap_per_class(train, train_per_class, seed), _cap_per_class(test, test_per_class, seed + 1)


# ----------------------------------------------------------------------------- pooled features
def article_ids(tokenizer, texts: list[str], context_length: int) -> list[np.ndarray]:
    """Token ids of each text alone, BOS first, truncated to ``context_length`` (int64 ``[<= context_length]``).

    Raises:
        ValueError: ``context_length < 2`` or a tokenizer without BOS.
    """
    if context_length < 2:
        raise ValueError(f"context length must be >= 2, got {context_length}")
    if tokenizer.bos_token_id is None:
        raise ValueError("tokenizer has no BOS token; saestrata starts every row with BOS")
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [np.asarray([tokenizer.bos_token_id, *ids][:context_length], dtype=np.int64) for ids in encoded]


def pad_rows(rows: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``rows`` into ``(ids [n, T] int64, real [n, T] bool)``, ``T`` = the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.from_numpy(r)
        real[i, : len(r)] = True
    return ids, real


@torch.no_grad()
def pool_rows(h: torch.Tensor, keep: torch.Tensor, saes: dict[str, object]) -> tuple[torch.Tensor, dict]:
    """Mean over kept tokens of the residual and of each SAE's latents.

    Args:
        h: ``[n, T, d_in]`` residuals (any float dtype; computed in float32).
        keep: ``[n, T]`` bool, tokens to average (not special, not padding); every row needs one.
        saes: ``{name: sae}`` encoding ``[N, d_in] -> [N, d_sae]`` (sequence SAEs get whole rows).

    Returns:
        ``(llm [n, d_in] float32, {name: [n, d_sae] float32})``.

    Raises:
        DatasetError: a row with no token to average (a text of special tokens only).
    """
    counts = keep.sum(1)
    if bool((counts == 0).any()):
        raise DatasetError("a text has no token besides special tokens: remove it or lengthen it")
    h = h.float()
    w = keep.to(h.dtype).unsqueeze(-1) / counts.to(h.dtype)[:, None, None]  # [n, T, 1]
    llm = (h * w).sum(1)
    out = {}
    for name, sae in saes.items():
        f = encode_rows(sae, h, None, keep).reshape(*h.shape[:2], -1).float()
        out[name] = (f * w).sum(1)
    return llm, out


# ----------------------------------------------------------------------------- residual sources
class LMResiduals:
    """Token residuals of ``docs`` straight from the LM: one forward per batch, stopped after the deepest block.

    One of the two residual sources :func:`collect_features` pools (the other is
    :class:`CachedResiduals`); both yield the same batches (documents sorted by token count, stable,
    ``batch_rows`` per batch, right-padded), so the pooled features agree to fp32 rounding.

    Args:
        lm: the loaded model.
        docs: the documents, in result order.
        layers: blocks whose ``blocks.<layer>.hook_resid_post`` is read (validated by the caller).
        context_length: tokens per document, BOS included (:func:`article_ids`).
        rows: precomputed :func:`article_ids` of ``docs`` (None: tokenised here).

    Raises:
        ValueError: ``context_length < 2`` or a tokenizer without BOS (:func:`article_ids`).
    """

    def __init__(self, lm: LoadedModel, docs: list[Document], layers: Iterable[int], context_length: int,
                 rows: list[np.ndarray] | None = None):
        self.lm, self.layers, self.d_model = lm, sorted(set(layers)), lm.d_model
        self.rows = rows if rows is not None else article_ids(lm.tokenizer, [d.text for d in docs], context_length)
        self.lengths = np.array([len(r) for r in self.rows], dtype=np.int64)
        self.n_docs = len(self.rows)
        self.special = torch.tensor(sorted(lm.tokenizer.all_special_ids))
        tok = lm.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.bos_token_id

    def batches(self, batch_rows: int) -> Iterator[tuple[np.ndarray, dict[int, torch.Tensor], torch.Tensor]]:
        """``(doc indices [n] int64, {layer: [n, T, d_model] lm dtype, on the LM's device}, keep [n, T] bool)``.

        ``keep`` marks the tokens to average: real (not padding) and not a special id.
        """
        for idx in _batch_order(self.lengths, batch_rows):
            ids, real = pad_rows([self.rows[i] for i in idx], self.pad)
            keep = real & ~torch.isin(ids, self.special)
            with torch.inference_mode():
                hs = residuals(self.lm, ids, self.layers)
            yield idx, hs, keep


def _batch_order(lengths: np.ndarray, batch_rows: int) -> Iterator[np.ndarray]:
    """Document indices per batch: sorted by length (stable), ``batch_rows`` each (similar lengths: less padding)."""
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_rows):
        yield order[start: start + batch_rows]


RESIDUAL_CACHE_VERSION = 1  # bump when the cache's layout or content rule changes (it is part of the key)


def residual_cache_key(lm: LoadedModel, docs: list[Document], rows: list[np.ndarray], layers: Iterable[int],
                       context_length: int) -> str:
    """sha256 hex digest of everything that determines the cached residuals of ``docs``.

    Hashed: :data:`RESIDUAL_CACHE_VERSION`, the model's name/path (``lm.model_id``), its
    ``weights_hash`` (names, sizes and first MiB of the weight files), its HF config and parameter
    count (which also catch a hub name's weights), the dtype it computes in, the layers, the context
    length, the tokenizer's special ids, and every document's key, text and token ids in order.
    Not hashed: the batch size and the device (they change the residuals only by float rounding).
    """
    config = getattr(lm.model, "config", None)
    head = {"version": RESIDUAL_CACHE_VERSION, "model_id": str(lm.model_id), "weights_hash": lm.weights_hash,
            "model_config": config.to_dict() if hasattr(config, "to_dict") else repr(config),
            "n_params": int(sum(p.numel() for p in lm.model.parameters())), "lm_dtype": lm.dtype,
            "layers": sorted(set(layers)), "context_length": int(context_length),
            "special_ids": sorted(int(i) for i in lm.tokenizer.all_special_ids)}
    h = hashlib.sha256(json.dumps(head, sort_keys=True, default=str).encode())
    for doc, ids in zip(docs, rows, strict=True):
        for part in (doc.key, doc.text):
            b = part.encode("utf-8")
            h.update(len(b).to_bytes(8, "little") + b)
        h.update(len(ids).to_bytes(8, "little") + np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    return h.hexdigest()


class CachedResiduals:
    """Token residuals of a document list read back (memory-mapped) from a :func:`cached_residuals` folder.

    Folder layout: ``resid_<layer>.npy`` ``[N, d_model]`` float32 (every real token of every
    document, BOS included, documents in order, no padding), ``keep.npy`` ``[N]`` bool (tokens to
    average: not a special id), ``offsets.npy`` ``[n_docs + 1]`` int64 (document ``i`` is rows
    ``offsets[i]:offsets[i+1]``), ``meta.json`` (the key's inputs, sizes).

    Args:
        folder: a finished cache folder.
        device: where the yielded residuals go (the SAEs' device).

    Raises:
        FileNotFoundError: ``folder`` is not a finished cache (no ``meta.json``).
    """

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        self.folder, self.device = Path(folder), torch.device(device)
        meta_path = self.folder / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.folder} is not a finished probe residual cache (no meta.json): delete it")
        self.meta = json.loads(meta_path.read_text())
        self.layers, self.d_model, self.n_docs = list(self.meta["layers"]), int(self.meta["d_model"]), int(self.meta["n_docs"])
        self.offsets = np.load(self.folder / "offsets.npy")
        self.keep = np.load(self.folder / "keep.npy", mmap_mode="r")
        self.resid = {layer: np.load(self.folder / f"resid_{layer}.npy", mmap_mode="r") for layer in self.layers}
        self.lengths = np.diff(self.offsets)

    def batches(self, batch_rows: int) -> Iterator[tuple[np.ndarray, dict[int, torch.Tensor], torch.Tensor]]:
        """The batches :meth:`LMResiduals.batches` yields for the same documents (residuals float32, zero padding)."""
        for idx in _batch_order(self.lengths, batch_rows):
            width = int(self.lengths[idx].max())
            keep = torch.zeros((len(idx), width), dtype=torch.bool)
            hs = {layer: torch.zeros((len(idx), width, self.d_model), dtype=torch.float32) for layer in self.layers}
            for j, i in enumerate(idx):
                lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
                keep[j, : hi - lo] = torch.from_numpy(np.array(self.keep[lo:hi]))
                for layer in self.layers:
                    hs[layer][j, : hi - lo] = torch.from_numpy(np.array(self.resid[layer][lo:hi]))
            yield idx, {layer: h.to(self.device) for layer, h in hs.items()}, keep


def cached_residuals(lm: LoadedModel, docs: list[Document], layers: Iterable[int], context_length: int,
                     root: str | Path, batch_rows: int = 8, progress: bool = False,
                     desc: str = "probe texts") -> CachedResiduals:
    """The residuals of ``docs`` from the cache under ``root``, running the LM once when they are missing.

    The folder is ``root/<key>`` (:func:`residual_cache_key`): written into a temp folder beside it
    (memory-mapped ``.npy`` files filled batch by batch, so the residuals never sit in RAM whole),
    flushed, then renamed into place, so a folder that exists is complete; an interrupted write
    leaves only a hidden ``.<key>.<pid>.tmp`` folder, removed on the next write. Reads are
    memory-mapped. Size: ``n_tokens x d_model x 4`` bytes per layer (Gemma 3 270M, 1,800 articles of
    ~93 tokens: ~0.4 GB).

    Args:
        lm: the loaded model (its tokenizer always; its forward only on a miss).
        docs: the documents, in the order results are wanted.
        layers: blocks to cache (``blocks.<layer>.hook_resid_post``).
        context_length: tokens per document, BOS included.
        root: the cache's parent folder (the benchmark's ``work/probe-residuals``).

    Returns:
        :class:`CachedResiduals` on the LM's device.

    Raises:
        ValueError: ``context_length < 2`` or a tokenizer without BOS; an empty ``docs``; a cache folder
            whose content does not match its key (edited by hand).
    """
    if not docs:
        raise ValueError("no documents to cache residuals of")
    layers = sorted(set(layers))
    rows = article_ids(lm.tokenizer, [d.text for d in docs], context_length)
    key = residual_cache_key(lm, docs, rows, layers, context_length)
    root = Path(root)
    folder = root / key
    if not (folder / "meta.json").exists():
        _write_residual_cache(LMResiduals(lm, docs, layers, context_length, rows), folder, batch_rows, progress, desc,
                              {"key": key, "model_id": str(lm.model_id), "weights_hash": lm.weights_hash,
                               "lm_dtype": lm.dtype, "context_length": int(context_length)})
    cached = CachedResiduals(folder, lm.device)
    if cached.n_docs != len(docs) or cached.layers != layers or cached.d_model != lm.d_model:
        raise ValueError(f"probe residual cache {folder} holds {cached.n_docs} texts of layers {cached.layers}, not "
                         f"{len(docs)} of layers {layers}: delete that folder")
    return cached


@torch.inference_mode()
def _write_residual_cache(src: LMResiduals, folder: Path, batch_rows: int, progress: bool, desc: str,
                          meta: dict) -> None:
    """Fill a temp folder from ``src`` (layout: :class:`CachedResiduals`), then rename it to ``folder``."""
    import shutil

    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{folder.name}.*.tmp"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    offsets = np.concatenate([[0], np.cumsum(src.lengths)]).astype(np.int64)
    t0 = time.perf_counter()
    try:
        tmp.mkdir()
        out = {layer: np.lib.format.open_memmap(tmp / f"resid_{layer}.npy", mode="w+", dtype=np.float32,
                                                shape=(int(offsets[-1]), src.d_model)) for layer in src.layers}
        keep = np.zeros(int(offsets[-1]), dtype=bool)
        n_batches = math.ceil(src.n_docs / batch_rows)
        for idx, hs, keep_b in tqdm(src.batches(batch_rows), total=n_batches, desc=desc, unit="batch",
                                    disable=not progress):
            host = {layer: h.float().cpu().numpy() for layer, h in hs.items()}
            for j, i in enumerate(idx):
                lo, hi = int(offsets[i]), int(offsets[i + 1])
                keep[lo:hi] = keep_b[j, : hi - lo].numpy()
                for layer in src.layers:
                    out[layer][lo:hi] = host[layer][j, : hi - lo]
        for arr in out.values():
            arr.flush()
        del out
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "keep.npy", keep)
        (tmp / "meta.json").write_text(json.dumps({**meta, "layers": src.layers, "d_model": src.d_model,
                                                   "n_docs": src.n_docs, "n_tokens": int(offsets[-1]),
                                                   "forward_s": time.perf_counter() - t0}, indent=2))
        for path in tmp.iterdir():  # the bytes must be on disk before the rename makes the folder visible
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, folder)
        except OSError:  # another writer finished the same key first: keep theirs
            if not (folder / "meta.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@torch.inference_mode()
def collect_features(source: LMResiduals | CachedResiduals, saes: dict[str, tuple[object, int]],
                     batch_rows: int = 8, progress: bool = False, desc: str = "probe texts") -> Features:
    """Pooled residuals and latents of every document of ``source`` (:func:`pool_rows` per batch).

    The one pooling path of sparse probing, whatever the residuals come from (the LM directly,
    :class:`LMResiduals`, or the cache, :class:`CachedResiduals`).

    Args:
        source: the documents' token residuals.
        saes: ``{name: (sae, layer)}``; every SAE reads ``blocks.<layer>.hook_resid_post``.

    Returns:
        :class:`Features` in document order (float32).

    Raises:
        ModelError: an SAE reads a layer ``source`` does not hold.
        DatasetError: a document with no token besides special tokens.
    """
    t0 = time.perf_counter()
    layers = sorted({layer for _, layer in saes.values()})
    missing = [layer for layer in layers if layer not in source.layers]
    if missing:
        raise ModelError(f"the residuals hold layers {source.layers}, not layer {missing[0]} an SAE reads")
    llm = {layer: np.zeros((source.n_docs, source.d_model), np.float32) for layer in layers}
    lat = {name: np.zeros((source.n_docs, sae.d_sae), np.float32) for name, (sae, _) in saes.items()}
    n_tok = np.zeros(source.n_docs, np.int64)
    n_batches = math.ceil(source.n_docs / batch_rows)
    for idx, hs, keep in tqdm(source.batches(batch_rows), total=n_batches, desc=desc, unit="batch",
                              disable=not progress):
        for layer in layers:
            group = {n: s for n, (s, lay) in saes.items() if lay == layer}
            pooled, per_sae = pool_rows(hs[layer], keep.to(hs[layer].device), group)
            llm[layer][idx] = pooled.cpu().numpy()
            for name, f in per_sae.items():
                lat[name][idx] = f.cpu().numpy()
        n_tok[idx] = keep.sum(1).numpy()
    return Features(llm, lat, n_tok, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- probing
def balanced_one_vs_rest(labels: np.ndarray, cls: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows and binary targets of SAEBench's ``prepare_probe_data`` for class ``cls`` (one vs rest).

    All rows of ``cls`` are positives; from each other class ``ceil(n_pos / (n_classes - 1))``
    rows are drawn without replacement (all of a smaller class), pooled, shuffled and cut to
    ``n_pos``. If fewer negatives exist, the positives are cut to their number.

    Args:
        labels: ``[n]`` class names (str).

    Returns:
        ``(row indices [m] int64, targets [m] int64 in {0, 1})``, shuffled.
    """
    pos = np.flatnonzero(labels == cls)
    others = sorted(set(labels.tolist()) - {cls})
    per = math.ceil(len(pos) / max(len(others), 1))
    neg = []
    for other in others:
        rows = np.flatnonzero(labels == other)
        neg.append(rng.permutation(rows)[:per])
    neg = rng.permutation(np.concatenate(neg))[: len(pos)] if neg else np.array([], np.int64)
    pos = rng.permutation(pos)[: len(neg)]
    rows = np.concatenate([pos, neg]).astype(np.int64)
    target = np.concatenate([np.full(len(pos), POSITIVE), np.full(len(neg), NEGATIVE)]).astype(np.int64)
    perm = rng.permutation(len(rows))
    return rows[perm], target[perm]


def top_k_mean_diff(x: np.ndarray, y: np.ndarray, k: int, candidates: np.ndarray | None = None) -> np.ndarray:
    """The ``k`` columns of ``x`` with the largest ``|mean(x[y == 1]) - mean(x[y == 0])|`` (SAEBench
    ``get_top_k_mean_diff_mask``), restricted to ``candidates`` when given; ties: lower index first.

    Args:
        x: ``[n, d]`` float features of the *train* split only.
        y: ``[n]`` int targets in {0, 1}.
        candidates: optional int column indices to choose from (a latent group).

    Returns:
        ``[min(k, #candidates)]`` int64 column indices, best first.
    """
    cols = np.arange(x.shape[1]) if candidates is None else np.asarray(candidates, dtype=np.int64)
    diff = np.abs(x[y == POSITIVE][:, cols].mean(0) - x[y == NEGATIVE][:, cols].mean(0))
    return cols[np.argsort(-diff, kind="stable")[:k]]


def probe_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Test accuracy of ``LogisticRegression(penalty="l2", C=1.0, max_iter=1000)`` fitted on the train rows
    (SAEBench ``train_sklearn_probe``); features cast to float32 as there. A train set of one class
    predicts that class."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y_train)) < 2:
        return float(np.mean(y_test == y_train[0]))
    probe = LogisticRegression(C=1.0, max_iter=1000)  # default penalty: L2 (passing penalty= is deprecated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # raw residual scale; SAEBench keeps them too
        probe.fit(x_train.astype(np.float32), y_train)
    return float(np.mean(probe.predict(x_test.astype(np.float32)) == y_test))


@dataclass
class ClassSplit:
    """One class's balanced train and test rows (:func:`balanced_one_vs_rest`)."""

    cls: str
    train_rows: np.ndarray
    train_y: np.ndarray
    test_rows: np.ndarray
    test_y: np.ndarray


def class_splits(train_labels: np.ndarray, test_labels: np.ndarray, seed: int) -> list[ClassSplit]:
    """Balanced one-vs-rest rows of every class, drawn once and shared by all feature sets (LLM, each SAE)."""
    out = []
    for i, cls in enumerate(sorted(set(train_labels.tolist()))):
        tr = balanced_one_vs_rest(train_labels, cls, np.random.default_rng([seed, i, 0]))
        te = balanced_one_vs_rest(test_labels, cls, np.random.default_rng([seed, i, 1]))
        out.append(ClassSplit(cls, *tr, *te))
    return out


def probe_features(train_x: np.ndarray, test_x: np.ndarray, splits: list[ClassSplit], k_values: Iterable[int],
                   prefix: str, full: bool = True, candidates: np.ndarray | None = None) -> dict:
    """Per-class accuracies of the top-``k`` probes (and of the all-channel probe when ``full``).

    Selection (:func:`top_k_mean_diff`) sees only ``train_x`` rows; the test rows are only scored.

    Args:
        train_x / test_x: ``[n_train, d]`` / ``[n_test, d]`` pooled features.
        prefix: ``llm`` or ``sae`` (SAEBench's key prefixes).
        candidates: restrict selection to these columns (a latent group); ``k`` above their
            number is skipped.

    Returns:
        ``{f"{prefix}_top_{k}_test_accuracy": {class: acc}, ...,
        f"{prefix}_test_accuracy": {class: acc}, "selected": {class: {k: [indices]}}}``.
    """
    n_cand = train_x.shape[1] if candidates is None else len(candidates)
    out: dict = {"selected": {}}
    for s in splits:
        xtr, xte = train_x[s.train_rows], test_x[s.test_rows]
        if full:
            out.setdefault(f"{prefix}_test_accuracy", {})[s.cls] = probe_accuracy(xtr, s.train_y, xte, s.test_y)
        out["selected"][s.cls] = {}
        for k in k_values:
            if k > n_cand:
                continue
            cols = top_k_mean_diff(xtr, s.train_y, k, candidates)
            out["selected"][s.cls][k] = cols.tolist()
            acc = probe_accuracy(xtr[:, cols], s.train_y, xte[:, cols], s.test_y)
            out.setdefault(f"{prefix}_top_{k}_test_accuracy", {})[s.cls] = acc
    return out


def mean_over_classes(per_class: dict) -> dict:
    """``{metric: mean over classes}`` of the ``*_accuracy`` entries of :func:`probe_features`'s result."""
    return {key: float(np.mean(list(v.values()))) for key, v in per_class.items() if key.endswith("_accuracy")}


# ----------------------------------------------------------------------------- the eval
def _load_saes(paths: list[Path], lm: LoadedModel) -> dict[str, tuple]:
    """``{name: (sae, layer, cfg)}`` on the model's device; ModelError on a layer or width mismatch."""
    out = {}
    for path in paths:
        sae, cfg = load_sae(path)
        layer = layer_of_hook(cfg["hook_name"])
        check_layers([layer], lm.n_layers, lm.model_id)
        if sae.d_in != lm.d_model:
            raise ModelError(f"SAE {Path(path).name} has d_in {sae.d_in} but {lm.model_id} has d_model {lm.d_model}")
        name = Path(path).name
        while name in out:
            name += "_"
        out[name] = (sae.to(lm.device).eval(), layer, cfg)
    return out


def labelled_docs(cfg: ProbeConfig) -> tuple[list[Document], list[Document], str, str]:
    """``(train docs, test docs, dataset name, source description)`` for ``cfg`` (wiki topics or ``--labels``)."""
    if cfg.labels is None:
        train, test = wiki_topic_split(cfg.train_per_class, cfg.test_per_class, cfg.seed)
        return train, test, WIKI_DATASET_NAME, f"{EMBEDDED_DATASET}: topic of each article summary"
    train, test = load_labelled_jsonl(cfg.labels, cfg.train_per_class, cfg.test_per_class, cfg.seed)
    return train, test, Path(cfg.labels).name, f"labelled JSONL {cfg.labels}"


def run_sparse_probing(cfg: ProbeConfig, lm: LoadedModel, progress: bool = True,
                       cache: str | Path | None = None) -> list[dict]:
    """SAEBench ``sparse_probing`` of every SAE in ``cfg.saes``: one JSON dict each (SAEBench layout).

    The one code path of ``saestrata probe`` and the benchmark's ``probe`` stage: token residuals
    (from the LM, or from the residual cache under ``cache``) -> pooled residual and per-token
    latents pooled over the same tokens (:func:`collect_features`) -> top-k probes
    (:func:`probe_features`) -> SAEBench's JSON.

    Cost: one forward pass (to the deepest SAE block) over all train and test texts, shared
    by every SAE (none when ``cache`` already holds them: :func:`cached_residuals`); then
    ``n_classes x (len(k_values) + 1)`` logistic regressions per feature set.

    Args:
        cfg: what to run.
        lm: the loaded model (the SAEs' model).
        progress: tqdm bars.
        cache: folder of the residual cache (e.g. the benchmark's ``work/probe-residuals``);
            None = residuals straight from the LM, not stored.

    Raises:
        FileNotFoundError: not a saved SAE.
        ModelError: a layer out of range or ``d_in`` != the model's d_model.
        DatasetError: unavailable corpus or bad ``--labels`` file.
    """
    train, test, dataset, source = labelled_docs(cfg)
    saes = _load_saes(cfg.saes, lm)
    enc = {name: (sae, layer) for name, (sae, layer, _) in saes.items()}
    layers = sorted({layer for _, layer in enc.values()})
    if cache is None:
        src_train = LMResiduals(lm, train, layers, cfg.context_length)
        src_test = LMResiduals(lm, test, layers, cfg.context_length)
    else:
        src_train = cached_residuals(lm, train, layers, cfg.context_length, cache, cfg.batch_rows, progress,
                                     "probe train texts (cache)")
        src_test = cached_residuals(lm, test, layers, cfg.context_length, cache, cfg.batch_rows, progress,
                                    "probe test texts (cache)")
    f_train = collect_features(src_train, enc, cfg.batch_rows, progress, "probe train texts")
    f_test = collect_features(src_test, enc, cfg.batch_rows, progress, "probe test texts")
    y_train = np.array([d.meta[LABEL_KEY] for d in train])
    y_test = np.array([d.meta[LABEL_KEY] for d in test])
    splits = class_splits(y_train, y_test, cfg.seed)
    llm_cache: dict[int, dict] = {}
    residual_cache = None if cache is None else {"train": src_train.folder.name, "test": src_test.folder.name}
    results = []
    for name, (sae, layer, sae_cfg) in saes.items():
        t0 = time.perf_counter()
        if layer not in llm_cache:
            llm_cache[layer] = probe_features(f_train.llm[layer], f_test.llm[layer], splits, cfg.k_values, "llm")
        per_sae = probe_features(f_train.sae[name], f_test.sae[name], splits, cfg.k_values, "sae")
        groups = {gname: _group_result(f_train.sae[name], f_test.sae[name], splits, cfg.k_values, idx.numpy())
                  for gname, idx in latent_groups_of(sae)}
        counts = _counts(train, test, splits, f_train, f_test)
        timing = {"features_s": f_train.seconds + f_test.seconds, "probes_s": time.perf_counter() - t0}
        result = _result(cfg, lm, layer, sae_cfg, dataset, source, llm_cache[layer], per_sae, groups, counts, timing)
        result["eval_result_unstructured"]["residual_cache"] = residual_cache
        results.append(result)
    return results


def _group_result(train_x, test_x, splits, k_values, idx: np.ndarray) -> dict:
    """Top-k probes restricted to one latent group: mean accuracies, per class, selected latents."""
    per = probe_features(train_x, test_x, splits, k_values, "sae", full=False, candidates=idx)
    return {"n_latents": int(len(idx)), **mean_over_classes(per),
            "per_class": {k: v for k, v in per.items() if k != "selected"}, "selected": per["selected"]}


def _counts(train, test, splits: list[ClassSplit], f_train: Features, f_test: Features) -> dict:
    """Texts per class and split, probe rows per class, mean pooled tokens per text."""
    def per_label(docs):
        """``{label: number of docs}``, sorted by label."""
        return dict(sorted(Counter(d.meta[LABEL_KEY] for d in docs).items()))

    return {"train_texts_per_class": per_label(train), "test_texts_per_class": per_label(test),
            "probe_rows_per_class": {s.cls: {"train": int(len(s.train_rows)), "test": int(len(s.test_rows))}
                                     for s in splits},
            "mean_tokens_per_text": {"train": float(f_train.n_tokens.mean()), "test": float(f_test.n_tokens.mean())},
            "classes": [s.cls for s in splits]}


def _result(cfg, lm, layer, sae_cfg, dataset, source, llm_per: dict, sae_per: dict, groups: dict, counts: dict,
            timing: dict) -> dict:
    """Assemble SAEBench's ``sparse_probing`` JSON (``SparseProbingEvalOutput``) plus our extras."""
    config = {
        "random_seed": cfg.seed, "dataset_names": [dataset], "probe_train_set_size": sum(counts["train_texts_per_class"].values()),
        "probe_test_set_size": sum(counts["test_texts_per_class"].values()), "context_length": cfg.context_length,
        "sae_batch_size": cfg.batch_rows, "llm_batch_size": cfg.batch_rows, "llm_dtype": cfg.dtype,
        "model_name": lm.model_id, "k_values": list(cfg.k_values), "lower_vram_usage": False,
        # ours
        "hook_layer": layer, "dataset_source": source, "train_per_class": cfg.train_per_class,
        "test_per_class": cfg.test_per_class, "labels_file": str(cfg.labels) if cfg.labels else None,
        "split": {"selection_and_fit": "train", "score": "eval",
                  "rule": "article-title hash (harvest/text.py split_of)" if cfg.labels is None
                  else "the line's 'split' field, else a hash of its text (harvest/text.py split_of)"},
        "pooling": "mean over each text's tokens (BOS first, truncated to context_length) whose id is not a "
                   "special id; latents encoded per token, then averaged over the same tokens",
        "selection": "top-k by |mean_pos - mean_neg| of pooled features on the balanced train rows (SAEBench)",
        "probe": "sklearn LogisticRegression(penalty='l2', C=1.0, max_iter=1000)",
        "balance": "one-vs-rest, negatives drawn evenly from the other classes, as many as positives (SAEBench)",
        "saebench_defaults": SAEBENCH_DEFAULTS,
        "deviations_from_saebench": list(DEVIATIONS),
    }
    llm_mean, sae_mean = mean_over_classes(llm_per), mean_over_classes(sae_per)
    detail = {"dataset_name": dataset, **llm_mean, **sae_mean}
    return {
        "eval_type_id": EVAL_TYPE_ID,
        "eval_config": config,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": {"llm": llm_mean, "sae": sae_mean},
        "eval_result_details": [detail],
        "eval_result_unstructured": {
            f"{dataset}_results": {k: v for k, v in {**llm_per, **sae_per}.items() if k != "selected"},
            "selected_latents": sae_per["selected"],
            "selected_llm_channels": llm_per["selected"],
            "latent_groups": groups,
            "counts": counts,
            "timing_s": timing,
        },
        "sae_bench_commit_hash": None,
        "sae_lens_id": None,
        "sae_lens_release_id": None,
        "sae_lens_version": None,
        "sae_cfg_dict": sae_cfg,
    }


def markdown_table(results: list[tuple[str, dict]]) -> str:
    """A Markdown table of ``[(name, sparse_probing result)]``: mean test accuracy at each k, all latents,
    then the raw-residual rows (``llm_*`` of the first result), then one row per latent group."""
    ks = list(results[0][1]["eval_config"]["k_values"])
    head = "| features | " + " | ".join(f"k={k}" for k in ks) + " | all |\n|---|" + "---|" * (len(ks) + 1) + "\n"

    def row(label: str, metrics: dict, prefix: str) -> str:
        """One table row: ``prefix``'s top-k accuracies and its all-features accuracy, 3 decimals."""
        cells = [metrics.get(f"{prefix}_top_{k}_test_accuracy") for k in ks] + [metrics.get(f"{prefix}_test_accuracy")]
        return f"| {label} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |\n"

    body = "".join(row(name, r["eval_result_metrics"]["sae"], "sae") for name, r in results)
    body += row("raw residual (d_in channels)", results[0][1]["eval_result_metrics"]["llm"], "llm")
    for name, r in results:
        for group, g in r["eval_result_unstructured"]["latent_groups"].items():
            body += row(f"{name} / {group} ({g['n_latents']} latents)", g, "sae")
    return head + body


__all__ = ["DEVIATIONS", "EVAL_TYPE_ID", "K_VALUES", "CachedResiduals", "LMResiduals", "ProbeConfig",
           "balanced_one_vs_rest", "cached_residuals", "collect_features", "residual_cache_key",
           "load_labelled_jsonl", "markdown_table", "pool_rows", "probe_features", "run_sparse_probing", "top_k_mean_diff",
           "wiki_topic_split"]
