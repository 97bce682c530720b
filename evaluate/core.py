"""``saestrata evaluate``: SAEBench's ``core`` metrics by splicing an SAE into the LM.

Source of the definitions: SAEBench ``sae_bench/evals/core/main.py`` at commit
:data:`SAEBENCH_COMMIT` (``get_recons_loss``, ``get_downstream_reconstruction_metrics``,
``get_sparsity_and_variance_metrics``, ``calculate_misc_metrics``), checked against
SAELens ``sae_lens/evals.py``. Every deviation is listed in :data:`DEVIATIONS_FROM_SAEBENCH`
and in each result's ``eval_config``. Special tokens are SAEBench's ``ignore_tokens``
``{bos, eos, pad}``; "masked" below means "those positions are left out".

Under SAEBench's keys, with SAEBench's definitions:

- ``ce_loss_score = (CE_abl - CE_sae) / (CE_abl - CE_clean)``, ``kl_div_score =
  (KL_abl - KL_sae) / KL_abl``, ``KL_* = KL(p_clean || p_*)``. The ablation zeros the
  residual at EVERY position, BOS included (``standard_zero_ablate_hook``); the SAE
  replaces only non-special positions (``exclude_special_tokens_from_reconstruction``).
  CE: mean over the T-1 positions t (t predicts t+1) whose INPUT token is non-special;
  KL: mean over all T positions whose input token is non-special. Gemma has no biases, so
  after a residual of zeros every later block adds zeros and the ablated model predicts the
  uniform distribution: CE_abl = ln(vocab) = 12.4766 at any layer (measured on Gemma 3 270M,
  layer 8: 12.476648).
- ``l0``: mean number of latents ``!= 0`` per token; ``l1``: mean ``sum_i f_i`` (no abs).
- ``mse``: SAEBench's literal mean over tokens of ``||x - x_hat||^2 / n_batch`` with
  ``n_batch`` the batch's non-special token count, so it scales with 1 / batch size (SAELens
  PRs #665, #711); a batch is ``batch_rows`` rows (``eval_config["mse_batch_tokens"]``
  = ``batch_rows * context_size`` tokens before masking).
- ``explained_variance_legacy``: mean over tokens of ``1 - ||x - x_hat||^2 / ||x - mean_batch(x)||^2``
  (the paper-era number).
- ``cossim``: mean over tokens of ``cos(x, x_hat)``.
- ``frac_alive``, ``freq_over_{1,10}_percent``, ``normalized_freq_over_{1,10}_percent``: from
  the firing frequency (``f > 0``) of each latent over non-special tokens.

Our definitions (DESIGN.md, "Metrics"), declared as deviations:

- ``explained_variance = 1 - E||x - x_hat||^2 / (E||x||^2 - sum_d E[x_d]^2)`` over all
  evaluated tokens: the centred formula SAEBench's code comment intends. The literal value
  of SAEBench's current code, total variance ``E||x||^2 - (mean_d E[x_d^2])^2`` from
  batch means, is ``explained_variance_saebench_code``; it mixes x^2 with x^4, so it is
  not a variance ratio: with ``E||x||^2 > d_in^2`` its "total variance" is negative and it
  exceeds 1 (x = 4.5 + N(0, 1) in 16 dims, so E||x||^2 ~ 340 > 256, x_hat = x + noise of
  std 0.5, 4 batches of 128 tokens: 1.0386 against the centred 0.7414; tests/test_eval_parity.py). Where
  ``E||x||^2 << d_in^2`` it is close to the uncentred ``1 - E||x - x_hat||^2 / E||x||^2``.
- ``mse_per_token = E||x - x_hat||^2`` (independent of batching), ``mse_per_element`` = that / d_in.
- ``*_strict``: CE and KL over the T-1 positions whose input AND target are non-special
  (saestrata's previous masking; no score for predicting a document's BOS).
- ``*_bos_kept`` (with ``EvalConfig.bos_kept_ablation``): the ablation keeps special-token
  positions as the SAE does (saestrata's previous ablation); ``ce_loss_score_bos_kept_strict``
  is saestrata's previous ``ce_loss_score`` (which also masked <unk> and <mask>). It costs one
  more forward group per layer (3 -> 4 groups for a single SAE; +10-20% wall time measured on
  Gemma 3 270M), so it is off by default.
- ``feature_utilisation``: latents whose mean activation exceeds 1e-4 (seed 004, sec. 5.3).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..harvest.model import LoadedModel, ModelError, check_layers, layer_of_hook, load_model
from ..harvest.packing import pack_documents
from ..harvest.text import EMBEDDED_DATASET, DatasetError, iter_documents
from ..train.sae_io import load_sae
from .branch import BranchForward, Head, OpTimer, head_stats, prepare_kernels, supports_branch
from .diagnostics import Diagnostics
from .splice import sae_replacement, splice, zero_replacement


@dataclass
class EvalConfig:
    """What to evaluate on. ``tokens`` is rounded up to whole context rows.

    ``batch_rows`` rows make one batch (SAEBench's ``batch_size_prompts``; ``mse`` depends on
    it). ``bos_kept_ablation`` also runs the zero ablation that keeps special-token positions
    (one more forward group per layer) and adds the ``*_bos_kept`` keys.
    """

    sae: Path | None = None  # filled per SAE in results; evaluate_saes takes the folders
    dataset: str = EMBEDDED_DATASET
    split: str = "eval"
    tokens: int = 8192
    batch_rows: int = 4
    context_length: int | None = None  # default: the SAE's training context length
    model: str | None = None  # default: the SAE's model
    device: str = "auto"
    dtype: str = "bfloat16"
    seed: int = 0
    text_field: str = "text"
    bos_kept_ablation: bool = False  # one more forward group per layer for the *_bos_kept scores
    extra: dict = field(default_factory=dict)


SAEBENCH_COMMIT = "8042bb3828c6340da8d12062324e92b2077c571c"  # sae_bench/evals/core/main.py checked against

DEVIATIONS_FROM_SAEBENCH = (
    "explained_variance = 1 - E||x-x_hat||^2 / (E||x||^2 - sum_d E[x_d]^2) over all tokens, the centred formula "
    "SAEBench's code comment intends; its literal code value is explained_variance_saebench_code",
    "CE and KL from fp32 log_softmax of the logits, KL divided by sum_v p_v to cancel fp32 normaliser error "
    "(SAEBench: TransformerLens log_softmax, and softmax then log for KL, in the logits' dtype)",
    "cossim counts a token with ||x|| = 0 or ||x_hat|| = 0 as 0 (SAEBench: NaN)",
    "the clean, ablated and spliced groups share forwards (default: each group branches off the clean rows at its "
    "layer and the token-independent zero ablation is computed once per layer; reference=True: one batched "
    "forward of all groups) (SAEBench: separate forwards); same values up to floating-point batching effects",
    "CE/KL and reconstruction/sparsity use the same rows (SAEBench: n_eval_reconstruction_batches and "
    "n_eval_sparsity_variance_batches, each drawn from the start of its activation store)",
    "rows are saestrata-packed documents of the chosen split (BOS at every row start and before every document; "
    "SAEBench: its ActivationsStore rows, default openwebtext, context 128, 16 prompts per batch)",
    "not computed: shrinkage (l2_norm_in, l2_norm_out, l2_ratio, relative_reconstruction_bias), token_stats, "
    "average_max_encoder/decoder_cosine_sim, per-latent eval_result_details",
    "extra keys, not in SAEBench: *_strict (CE/KL where input and target are non-special), *_bos_kept "
    "(ablation keeps special-token positions, with bos_kept_ablation), mse_per_token, mse_per_element, "
    "feature_utilisation, diagnostics",
)


def special_token_ids(tokenizer) -> set[int]:
    """SAEBench's ``ignore_tokens``: ``{pad, eos, bos}`` ids of ``tokenizer`` (None entries dropped)."""
    return {t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) if t is not None}


class ReconSums:
    """float64 accumulators of the reconstruction and sparsity metrics of one SAE, batch by batch.

    Feed each batch's non-special tokens with :meth:`add`; :meth:`metrics` gives SAEBench's
    per-token means over all batches (``get_sparsity_and_variance_metrics``) and our variants.
    The SAEBench values that are per-batch (``mse``, ``explained_variance_legacy``,
    ``explained_variance_saebench_code``) depend on how tokens are batched, as in SAEBench.

    Args:
        d_sae: number of latents (for the per-latent firing counts).
    """

    def __init__(self, d_sae: int):
        self.n_tok = self.n_batches = 0
        self.rss = self.sq_x = self.cos = self.l0 = self.l1 = 0.0
        self.mse_saebench = self.ev_legacy = 0.0  # sums over tokens of SAEBench's per-token values
        self.batch_mean_sq = self.batch_mean_x2 = self.batch_mean_rss = 0.0  # sums over batches of batch means
        self.sum_x: torch.Tensor | None = None
        self.fire_count = torch.zeros(d_sae, dtype=torch.float64)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64)
        self.diag: Diagnostics | None = None

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        """Add one batch: ``x``, ``x_hat`` ``[n, d_in]`` and latents ``f`` ``[n, d_sae]`` of its non-special tokens.

        A batch without tokens is skipped (SAEBench would average an empty tensor into NaN).
        """
        if len(x) == 0:
            return
        x, x_hat, f = x.double(), x_hat.double(), f.double()
        n = len(x)
        rss = (x - x_hat).pow(2).sum(-1)  # [n] residual sum of squares per token
        sq = x.pow(2).sum(-1)
        self.n_tok += n
        self.n_batches += 1
        self.rss += float(rss.sum())
        self.sq_x += float(sq.sum())
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        # SAEBench: mse = resid_sum_of_squares / flattened_mask.sum() per token, i.e. divided by
        # the batch's unmasked token count (scales with 1/batch size; SAELens PRs #665, #711).
        self.mse_saebench += float(rss.sum()) / n
        # SAEBench's explained_variance_legacy: per token, against the batch mean.
        self.ev_legacy += float((1 - rss / (x - x.mean(0)).pow(2).sum(-1)).sum())
        # SAEBench's explained_variance code: batch means of ||x||^2, of x_d^2 (over tokens and dims), of rss.
        self.batch_mean_sq += float(sq.mean())
        self.batch_mean_x2 += float(x.pow(2).mean())
        self.batch_mean_rss += float(rss.mean())
        den = x.norm(dim=-1) * x_hat.norm(dim=-1)
        self.cos += float(torch.where(den > 0, (x * x_hat).sum(-1) / den.clamp_min(1e-300), 0.0).sum())
        self.l0 += float((f != 0).sum())  # SAEBench: != 0 (densities below use > 0, as SAEBench)
        self.l1 += float(f.sum())  # SAEBench: plain sum, no abs
        self.fire_count += (f > 0).sum(0).cpu()
        self.act_sum += f.sum(0).cpu()
        if self.diag is not None:
            self.diag.update(f)

    def metrics(self) -> dict[str, float]:
        """Scalar metrics (see the module docstring) plus ``density`` (``[d_sae]`` numpy, firing frequency).

        Raises:
            ValueError: no tokens were added.
        """
        if self.n_tok == 0:
            raise ValueError("no tokens were added to ReconSums")
        n, nb = self.n_tok, self.n_batches
        mean_x = self.sum_x / n
        total_var = self.sq_x / n - float(mean_x.pow(2).sum())
        code_total_var = self.batch_mean_sq / nb - (self.batch_mean_x2 / nb) ** 2  # x^2 minus x^4: the bug
        return {
            "explained_variance": 1.0 - (self.rss / n) / total_var,
            "explained_variance_legacy": self.ev_legacy / n,
            "explained_variance_saebench_code": 1.0 - (self.batch_mean_rss / nb) / code_total_var,
            "mse": self.mse_saebench / n,
            "mse_per_token": self.rss / n,
            "mse_per_element": self.rss / (n * len(mean_x)),
            "cossim": self.cos / n,
            "l0": self.l0 / n,
            "l1": self.l1 / n,
            "density": (self.fire_count / n).numpy(),
            "mean_act": (self.act_sum / n).numpy(),
        }


def _token_mask(token_ids: torch.Tensor, special: set[int]) -> torch.Tensor:
    """``[n, T]`` bool, True at special tokens."""
    return torch.isin(token_ids, torch.tensor(sorted(special), dtype=token_ids.dtype))


class _LogitSums:
    """Per-group summed CE and KL(clean || group) under SAEBench's masks and the strict masks.

    SAEBench (``get_downstream_reconstruction_metrics``): CE at the T-1 positions t < T-1
    (t predicts t+1) whose INPUT token is non-special; KL at all T positions whose input
    token is non-special. Strict: t < T-1 with input AND target non-special, for both.
    """

    def __init__(self, n_groups: int):
        self.ce, self.kl = [0.0] * n_groups, [0.0] * n_groups
        self.ce_strict, self.kl_strict = [0.0] * n_groups, [0.0] * n_groups
        self.n_ce = self.n_kl = self.n_strict = 0

    def add(self, logits: torch.Tensor, token_ids: torch.Tensor, special_mask: torch.Tensor, chunk: int = 16) -> None:
        """Add one batch: ``logits`` ``[n_groups * n, T, vocab]`` (group 0 clean), ``token_ids`` and
        ``special_mask`` ``[n, T]``.

        ``KL(p || q) = (sum_v p_v log p_v - sum_v p_v log q_v) / sum_v p_v`` in fp32. Dividing by
        ``sum_v p_v`` (1 up to rounding) removes most of the fp32 error: torch's CPU log_softmax
        normalises 262k logits to ~2e-5 (measured), which times ``log p - log q`` is ~1e-4 of
        KL; the sums are ``torch.sum`` (``einsum`` was ~1e-4 off too). Positions are processed
        ``chunk`` at a time so each fp32 ``[chunk, vocab]`` block stays in cache (the 262k-vocab
        softmax, not the forward, dominates evaluation on a CPU).
        """
        n, T = token_ids.shape
        scored = ~special_mask  # input token non-special
        has_next = torch.ones_like(scored)
        has_next[:, -1] = False
        target = torch.roll(token_ids, -1, dims=1)  # last column wraps around; never used (has_next False)
        strict = has_next & ~torch.roll(special_mask, -1, dims=1)
        tgt, ce_m, st_m = target[scored][:, None], has_next[scored], strict[scored]
        groups = [logits[g * n : (g + 1) * n][scored] for g in range(len(self.ce))]  # [P, vocab] each
        for lo in range(0, len(tgt), chunk):
            sl = slice(lo, lo + chunk)
            cm, sm = ce_m[sl], st_m[sl]
            clean = torch.log_softmax(groups[0][sl].float(), dim=-1)
            p_clean = clean.exp()
            p_sum = p_clean.sum(-1)
            neg_entropy = (p_clean * clean).sum(-1)
            for g in range(len(self.ce)):
                lp = clean if g == 0 else torch.log_softmax(groups[g][sl].float(), dim=-1)
                ce = -lp.gather(-1, tgt[sl])[:, 0]
                self.ce[g] += float(ce[cm].sum())
                self.ce_strict[g] += float(ce[sm].sum())
                if g:
                    kl = (neg_entropy - (p_clean * lp).sum(-1)) / p_sum
                    self.kl[g] += float(kl.sum())
                    self.kl_strict[g] += float(kl[sm].sum())
        self.n_ce += int(ce_m.sum())
        self.n_kl += len(tgt)
        self.n_strict += int(st_m.sum())

    def add_positions(self, ce: torch.Tensor, kl: torch.Tensor, groups: list[int], token_ids: torch.Tensor,
                      special_mask: torch.Tensor) -> None:
        """Add one batch from per-position values at the scored positions (the fast path, evaluate/branch.py).

        Args:
            ce, kl: ``[R, P]`` float64, row ``r`` belonging to group ``groups[r]``; the ``P``
                positions are ``token_ids[~special_mask]`` in row-major order. ``ce`` at position
                t is the loss of predicting token t+1 (any value at t = T-1, which is masked
                out); ``kl`` of the clean group is ignored.
            token_ids, special_mask: ``[n, T]``, as :meth:`add`.

        Same masks as :meth:`add`: CE over positions with a next token, KL over all scored
        positions, strict over positions whose target is non-special too.
        """
        scored = ~special_mask
        has_next = torch.ones_like(scored)
        has_next[:, -1] = False
        strict = has_next & ~torch.roll(special_mask, -1, dims=1)
        ce_m, st_m = has_next[scored], strict[scored]
        for r, g in enumerate(groups):
            self.ce[g] += float(ce[r][ce_m].sum())
            self.ce_strict[g] += float(ce[r][st_m].sum())
            if g:
                self.kl[g] += float(kl[r].sum())
                self.kl_strict[g] += float(kl[r][st_m].sum())
        self.n_ce += int(ce_m.sum())
        self.n_kl += int(scored.sum())
        self.n_strict += int(st_m.sum())


def _accumulate_recon(sums: ReconSums, record: dict, keep_flat: torch.Tensor) -> None:
    """Reconstruction and sparsity sums over non-special tokens of one batch (on the record's device: on a GPU,
    moving ``f`` ``[tokens, d_sae]`` to the host to reduce it there would cost more than the SAE)."""
    use = ~keep_flat.to(record["x"].device)
    sums.add(record["x"][use], record["x_hat"][use], record["f"][use])


def sae_model_id(sae_folder: str | Path) -> str:
    """Model id recorded in a saved SAE's ``cfg.json`` (raises FileNotFoundError if absent)."""
    cfg_path = Path(sae_folder) / "cfg.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{sae_folder} is not a saved SAE (no cfg.json)")
    cfg = json.loads(cfg_path.read_text())
    return cfg.get("saestrata", {}).get("model_id") or cfg["model_name"]


def _load_checked(folder: Path, lm: LoadedModel, model_id: str):
    """Load an SAE and check its layer and width against the model (ModelError otherwise)."""
    sae, sae_cfg = load_sae(folder)
    layer = layer_of_hook(sae_cfg["hook_name"])
    check_layers([layer], lm.n_layers, model_id)
    if sae.d_in != lm.d_model:
        raise ModelError(
            f"SAE {Path(folder).name} has d_in {sae.d_in} but {model_id} has d_model {lm.d_model}: "
            "evaluate it on the model it was trained on"
        )
    return sae.to(lm.device), sae_cfg, layer


def evaluate_sae(cfg: EvalConfig, lm: LoadedModel | None = None, progress: bool = True) -> dict:
    """Core metrics of the SAE at ``cfg.sae`` in SAEBench's JSON layout (see :func:`evaluate_saes`)."""
    return evaluate_saes([cfg.sae], cfg, lm, progress)[0]


def evaluate_saes(folders: list[Path], cfg: EvalConfig, lm: LoadedModel | None = None,
                  progress: bool = True, reference: bool = False, timer: OpTimer | None = None) -> list[dict]:
    """Core metrics of several SAEs, all from the same batches of ``cfg.batch_rows`` rows.

    Groups: a clean one, one zero-ablated group per distinct layer (every position zeroed, as
    SAEBench), with ``cfg.bos_kept_ablation`` one more per layer that keeps the special-token
    positions, and one spliced group per SAE (special-token positions kept clean, SAEBench's
    ``exclude_special_tokens_from_reconstruction=True``). The clean and ablated groups are
    shared by all SAEs. Each result is SAEBench's ``core`` layout (see the module docstring
    for every key).

    Two ways to compute them, same definitions, same numbers up to floating-point order
    (tests/test_eval_fast.py checks 1e-4):

    - default (fast, evaluate/branch.py): the clean rows run the blocks once and each group
      branches off at its layer; SAEBench's ablated logits are computed once per layer for
      the whole evaluation (they do not depend on the tokens); CE/KL come from the LM head
      in position x vocabulary chunks, never materialising the logits. Used when the model
      has the Gemma 3 structure (:func:`~saestrata.evaluate.branch.supports_branch`).
    - ``reference=True`` (and any other model): ONE batched HF forward of all groups per
      batch through evaluate/splice.py's hook, full logits, chunked fp32 log_softmax.

    Args:
        folders: saved SAE folders (``cfg.json`` + weights).
        cfg: what to evaluate on.
        lm: the loaded model (loaded from ``cfg.model`` or the first SAE's model if None).
        progress: show a progress bar.
        reference: use the reference path (above).
        timer: per-op wall times (``bench/eval_throughput.py``'s profile table), optional.

    Raises:
        FileNotFoundError: a folder is not a saved SAE.
        ModelError: an SAE's layer is out of range, or its ``d_in`` differs from the model's d_model.
        DatasetError: no evaluation text.
    """
    timer = timer or OpTimer(enabled=False)
    folders = [Path(f) for f in folders]
    model_id = cfg.model or sae_model_id(folders[0])
    lm = lm or load_model(model_id, cfg.device, cfg.dtype)
    loaded = [_load_checked(f, lm, model_id) for f in folders]
    layers = sorted({layer for _, _, layer in loaded})
    zero_group = {layer: 1 + i for i, layer in enumerate(layers)}
    kept_group = {layer: 1 + len(layers) + i for i, layer in enumerate(layers)} if cfg.bos_kept_ablation else {}
    first_sae = 1 + len(zero_group) + len(kept_group)
    n_groups = first_sae + len(loaded)
    records = [{} for _ in loaded]
    rows_ctx: dict = {}  # document boundaries of the current batch, for sequence SAEs (temporal)
    replacements = [sae_replacement(sae, records[i], rows_ctx) for i, (sae, _, _) in enumerate(loaded)]
    fast = not reference and supports_branch(lm.model)
    if fast:
        prepare_kernels(lm.device)  # a first build of the CPU kernels, if any, before the clock runs
        batch_fn = _fast_batch(lm, loaded, replacements, layers, zero_group, kept_group, first_sae, timer)
    else:
        batch_fn = _reference_batch(lm, loaded, replacements, layers, zero_group, kept_group, first_sae, n_groups,
                                    cfg.bos_kept_ablation, timer)

    ctx = cfg.context_length or loaded[0][1].get("saestrata", {}).get("context_length") or 128
    n_rows = max(1, -(-cfg.tokens // ctx))
    special = special_token_ids(lm.tokenizer)
    rows = pack_documents(iter_documents(cfg.dataset, cfg.split, cfg.seed, cfg.text_field), lm.tokenizer, ctx)
    sums = [ReconSums(sae.d_sae) for sae, _, _ in loaded]
    for s, (sae, _, _) in zip(sums, loaded):
        s.diag = Diagnostics(sae)  # evaluate/diagnostics.py: density, group structure, silhouette
    logit_sums = _LogitSums(n_groups)
    done, seconds = 0, 0.0
    bar = tqdm(total=n_rows * ctx, unit="tok", desc=f"evaluate {len(loaded)} SAE(s)", disable=not progress)
    with torch.inference_mode():
        while done < n_rows:
            batch = [r for r in (next(rows, None) for _ in range(min(cfg.batch_rows, n_rows - done))) if r is not None]
            if not batch:
                break
            ids = torch.from_numpy(np.stack([r.token_ids for r in batch])).long()
            keep = _token_mask(ids, special)
            rows_ctx.update(doc_index=torch.from_numpy(np.stack([r.doc_index for r in batch])), valid=~keep)
            t0 = time.perf_counter()
            batch_fn(ids, keep, logit_sums)
            with timer("recon_metrics"):
                for s, record in zip(sums, records):
                    _accumulate_recon(s, record, keep.reshape(-1))  # reduced where the SAE ran
            seconds += time.perf_counter() - t0
            done += len(batch)
            bar.update(len(batch) * ctx)
    bar.close()
    if logit_sums.n_ce == 0 or sums[0].n_tok == 0:
        raise DatasetError(f"no evaluation tokens from {cfg.dataset!r} split {cfg.split!r}: the dataset is empty")
    ls = logit_sums
    results = []
    for i, ((_, sae_cfg, layer), s) in enumerate(zip(loaded, sums)):
        groups = {"clean": 0, "sae": first_sae + i, "zero": zero_group[layer]}
        if cfg.bos_kept_ablation:
            groups["bos_kept"] = kept_group[layer]
        ce = {name: ls.ce[g] / ls.n_ce for name, g in groups.items()}
        kl = {name: ls.kl[g] / ls.n_kl for name, g in groups.items()}
        ce_strict = {name: _ratio(ls.ce_strict[g], ls.n_strict) for name, g in groups.items()}
        kl_strict = {name: _ratio(ls.kl_strict[g], ls.n_strict) for name, g in groups.items()}
        timing = {"n_tokens": done * ctx, "n_ce_positions": ls.n_ce, "n_kl_positions": ls.n_kl,
                  "n_strict_positions": ls.n_strict, "n_forward_groups": n_groups,
                  "eval_tokens_per_s": done * ctx / max(seconds, 1e-9)}
        results.append(_result(replace(cfg, sae=folders[i], dtype=lm.dtype), sae_cfg, s,
                               (ce, kl, ce_strict, kl_strict), model_id, layer, ctx, timing, special,
                               "branch" if fast else "reference"))
    return results


def _reference_batch(lm, loaded, replacements, layers, zero_group, kept_group, first_sae, n_groups, bos_kept, timer):
    """The reference path's batch step ``(ids [n, T], keep [n, T], logit_sums) -> None``.

    ONE HF forward of ``n_groups * n`` rows with evaluate/splice.py's hooks (group g = rows
    ``[g*n, (g+1)*n)``), the full ``[n_groups * n, T, vocab]`` logits, then
    :meth:`_LogitSums.add`. The SAE replacements fill their records (reconstruction metrics).
    """
    plan = {layer: [None] * n_groups for layer in layers}
    for layer in layers:
        plan[layer][zero_group[layer]] = zero_replacement
        if bos_kept:
            plan[layer][kept_group[layer]] = zero_replacement
    for i, (_, _, layer) in enumerate(loaded):
        plan[layer][first_sae + i] = replacements[i]
    keep_groups = set(kept_group.values()) | set(range(first_sae, n_groups))  # not SAEBench's zero groups

    def step(ids, keep, logit_sums):
        """One batch: ids/keep ``[n, T]`` (int64 / bool) -> CE/KL sums added to ``logit_sums``."""
        with timer("forward (blocks + head)"), splice(lm.layers, plan, keep.to(lm.device), keep_groups):
            logits = lm.model(input_ids=ids.repeat(n_groups, 1).to(lm.device), use_cache=False).logits
        with timer("log_softmax CE/KL"):
            logit_sums.add(logits, ids.to(logits.device), keep.to(logits.device))  # on the LM's device

    return step


def _fast_batch(lm, loaded, replacements, layers, zero_group, kept_group, first_sae, timer):
    """The fast path's batch step ``(ids [n, T], keep [n, T], logit_sums) -> None`` (evaluate/branch.py).

    Branches at each layer: the ``bos_kept`` ablation (if requested) then the layer's SAEs in
    folder order, each keeping special-token positions clean as :func:`splice` does for
    ``keep_groups``. SAEBench's zero ablation is a fixed group (:meth:`BranchForward.zero_logits`).
    Only positions whose input token is non-special reach the head.
    """
    bf, head = BranchForward(lm.model, timer), Head(lm.model)
    sae_layers = [layer for _, _, layer in loaded]

    def step(ids, keep, logit_sums):
        """One batch: ids/keep ``[n, T]`` (int64 / bool) -> CE/KL sums added to ``logit_sums``."""
        n, T = ids.shape
        keep_d = keep.to(lm.device)[..., None]  # [n, T, 1]

        def masked(fn):
            """``fn`` applied only where ``keep`` is False (special-token positions stay clean, as splice does)."""
            return lambda x: torch.where(keep_d, x, fn(x).to(x.dtype))

        branches: dict[int, list] = {layer: [] for layer in layers}
        groups = [0]  # logit_sums group of each row block of bf.run's output
        for layer in layers:
            if kept_group:
                branches[layer].append(masked(torch.zeros_like))
                groups.append(kept_group[layer])
            for i, fn in enumerate(replacements):
                if sae_layers[i] == layer:
                    branches[layer].append(masked(fn))
                    groups.append(first_sae + i)
        hidden = bf.run(ids.to(lm.device), branches)  # [len(groups) * n, T, d]
        scored = ~keep
        with timer("gather scored positions"):  # on the LM's device: the head runs where its weight is
            h = hidden.view(len(groups), n, T, -1)[:, scored.to(lm.device)]  # [G, P, d]
            target = torch.roll(ids, -1, dims=1)[scored]  # the wrapped last column is masked by add_positions
            tpos = torch.arange(T).expand(n, T)[scored]
        with timer("zero ablation (once per layer)"):
            fixed = [bf.zero_logits(layer, T, head) for layer in layers]
        stats = head_stats(head, h, target, fixed, tpos, timer=timer)
        with timer("head_combine"):
            logit_sums.add_positions(stats["ce"].cpu(), stats["kl"].cpu(), groups + [zero_group[l] for l in layers],
                                     ids, keep)

    return step


def _ratio(num: float, den: float) -> float:
    """``num / den``, NaN when ``den`` is 0 (a score without a baseline gap, or no positions)."""
    return num / den if den != 0 else float("nan")


def _behaviour(ce: dict, kl: dict, suffix: str, with_parts: bool) -> tuple[dict, dict]:
    """``(model_behavior_preservation, model_performance_preservation)`` entries of one masking ``suffix``."""
    kl_out = {f"kl_div_score{suffix}": _ratio(kl["zero"] - kl["sae"], kl["zero"])}
    ce_out = {f"ce_loss_score{suffix}": _ratio(ce["zero"] - ce["sae"], ce["zero"] - ce["clean"])}
    if with_parts:
        kl_out.update({f"kl_div_with_ablation{suffix}": kl["zero"], f"kl_div_with_sae{suffix}": kl["sae"]})
        ce_out.update({f"ce_loss_with_ablation{suffix}": ce["zero"], f"ce_loss_with_sae{suffix}": ce["sae"],
                       f"ce_loss_without_sae{suffix}": ce["clean"]})
    if "bos_kept" in ce:
        kl_out[f"kl_div_score_bos_kept{suffix}"] = _ratio(kl["bos_kept"] - kl["sae"], kl["bos_kept"])
        ce_out[f"ce_loss_score_bos_kept{suffix}"] = _ratio(ce["bos_kept"] - ce["sae"], ce["bos_kept"] - ce["clean"])
        if with_parts:
            kl_out[f"kl_div_with_ablation_bos_kept{suffix}"] = kl["bos_kept"]
            ce_out[f"ce_loss_with_ablation_bos_kept{suffix}"] = ce["bos_kept"]
    return kl_out, ce_out


def _result(cfg, sae_cfg, s: ReconSums, logit_means: tuple, model_id, layer, ctx, timing: dict,
            special: set[int], eval_path: str = "reference") -> dict:
    """Assemble SAEBench's ``core`` layout (``logit_means``: per-position means ``(ce, kl, ce_strict, kl_strict)``;
    ``eval_path``: ``"branch"`` or ``"reference"``, recorded in ``eval_config``)."""
    ce, kl, ce_strict, kl_strict = logit_means
    kl_main, ce_main = _behaviour(ce, kl, "", with_parts=True)
    kl_st, ce_st = _behaviour(ce_strict, kl_strict, "_strict", with_parts=True)
    m = s.metrics()
    freq, mean_act = m.pop("density"), m.pop("mean_act")
    total = float(freq.sum())
    metrics = {
        "model_behavior_preservation": {**kl_main, **kl_st},
        "model_performance_preservation": {**ce_main, **ce_st},
        "reconstruction_quality": {k: m[k] for k in ("explained_variance", "explained_variance_legacy",
                                                     "explained_variance_saebench_code", "mse", "mse_per_token",
                                                     "mse_per_element", "cossim")},
        "sparsity": {"l0": m["l0"], "l1": m["l1"]},
        "misc_metrics": {
            "frac_alive": float((freq > 0).mean()),
            "feature_utilisation": float((mean_act > 1e-4).mean()),
            "freq_over_1_percent": float((freq > 0.01).mean()),
            "freq_over_10_percent": float((freq > 0.1).mean()),
            # SAEBench calculate_misc_metrics: share of the total density held by latents above 1% / 10%
            "normalized_freq_over_1_percent": float(freq[freq > 0.01].sum()) / total if total > 0 else 0.0,
            "normalized_freq_over_10_percent": float(freq[freq > 0.1].sum()) / total if total > 0 else 0.0,
            "n_reconstructed_tokens": s.n_tok, **timing,
        },
    }
    hist, edges = np.histogram(np.log10(freq[freq > 0]), bins=40, range=(-6, 0)) if (freq > 0).any() else ([], [])
    return {
        "eval_type_id": "core",
        "eval_config": {**{k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                        "model_name": model_id, "hook_layer": layer, "context_size": ctx,
                        "exclude_special_tokens_from_reconstruction": True,
                        "ignore_tokens": sorted(special),
                        "mse_batch_tokens": cfg.batch_rows * ctx,
                        "llm_dtype": cfg.dtype,  # the LM's actual dtype (SAEBench's key)
                        "saebench_commit": SAEBENCH_COMMIT,
                        "eval_path": eval_path,  # evaluate_saes: fast branch splice or the reference forward
                        "deviations_from_saebench": list(DEVIATIONS_FROM_SAEBENCH)},
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": [],
        "eval_result_unstructured": {
            "log10_feature_density_histogram": {"counts": [int(c) for c in hist], "edges": [float(e) for e in edges],
                                                "n_dead": int((freq == 0).sum())},
            "diagnostics": s.diag.result() if s.diag is not None else None,
        },
        "sae_cfg_dict": sae_cfg,
    }
