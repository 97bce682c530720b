"""``saestrata evaluate``: SAEBench-style core metrics by splicing an SAE into the LM.

Definitions (DESIGN.md, "Metrics"; SAEBench ``core`` eval layout):

- ``ce_loss_score = (CE_zero_abl - CE_sae) / (CE_zero_abl - CE_clean)``
- ``kl_div_score = (KL_abl - KL_sae) / KL_abl`` with ``KL_* = KL(p_clean || p_*)`` per token
- ``explained_variance = 1 - E||x - x_hat||^2 / (E||x||^2 - sum_d E[x_d]^2)`` over all
  evaluated tokens (SAEBench's current per-batch formula has a known bug; not copied)
- ``mse``: mean squared error per element; ``cossim``: mean cosine(x, x_hat) per token
- ``l0``: mean non-zero latents per token; ``l1``: mean sum of latents per token
- ``frac_alive``: latents firing at least once; ``feature_utilisation``: latents whose
  mean activation exceeds 1e-4 (seed 004, sec. 5.3)

Special tokens (BOS, pad, EOS) are masked: their activations are never replaced and
no CE/KL is counted where the input or the target token is special.
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
from .diagnostics import Diagnostics
from .splice import sae_replacement, splice, zero_replacement


@dataclass
class EvalConfig:
    """What to evaluate on. ``tokens`` is rounded up to whole context rows."""

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
    extra: dict = field(default_factory=dict)


class _Sums:
    """Token-weighted reconstruction/sparsity accumulators of one SAE (float64)."""

    def __init__(self, d_sae: int):
        self.n_tok = 0
        self.sq_err = self.sq_x = self.cos = self.l0 = self.l1 = 0.0
        self.sum_x: torch.Tensor | None = None
        self.fire_count = torch.zeros(d_sae, dtype=torch.float64)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64)


def _token_mask(token_ids: torch.Tensor, special: set[int]) -> torch.Tensor:
    """``[n, T]`` bool, True at special tokens."""
    return torch.isin(token_ids, torch.tensor(sorted(special), dtype=token_ids.dtype))


def _accumulate_logits(ce: list, kl: list, logits: torch.Tensor, token_ids: torch.Tensor,
                       special_mask: torch.Tensor, chunk: int = 16) -> int:
    """Add each group's summed CE and KL(clean || group) over positions with non-special input and target.

    ``logits`` is ``[n_groups * n, T, vocab]``, group 0 clean. Returns the number of positions.
    ``KL(p || q) = sum_v p_v log p_v - sum_v p_v log q_v``. Positions are processed ``chunk``
    at a time so each fp32 ``[chunk, vocab]`` block stays in cache (the 262k-vocab softmax,
    not the forward, dominates evaluation on a CPU).
    """
    n = token_ids.shape[0]
    valid = (~special_mask[:, :-1]) & (~special_mask[:, 1:])
    target = token_ids[:, 1:][valid][:, None]
    groups = [logits[g * n : (g + 1) * n, :-1][valid] for g in range(len(ce))]  # [P, vocab] each
    for lo in range(0, len(target), chunk):
        tgt = target[lo : lo + chunk]
        clean = torch.log_softmax(groups[0][lo : lo + chunk].float(), dim=-1)
        p_clean = clean.exp()
        neg_entropy = torch.einsum("pv,pv->p", p_clean, clean)
        for g in range(len(ce)):
            lp = clean if g == 0 else torch.log_softmax(groups[g][lo : lo + chunk].float(), dim=-1)
            ce[g] += float(-lp.gather(-1, tgt).sum())
            if g:
                kl[g] += float((neg_entropy - torch.einsum("pv,pv->p", p_clean, lp)).sum())
    return int(valid.sum())


def _accumulate_recon(sums: _Sums, record: dict, keep_flat: torch.Tensor) -> None:
    """Reconstruction and sparsity sums over non-special tokens."""
    use = ~keep_flat
    x, x_hat, f = record["x"][use].double(), record["x_hat"][use].double(), record["f"][use].double()
    sums.n_tok += len(x)
    sums.sq_err += float((x - x_hat).pow(2).sum())
    sums.sq_x += float(x.pow(2).sum())
    sums.sum_x = x.sum(0) if sums.sum_x is None else sums.sum_x + x.sum(0)
    sums.cos += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum())
    sums.l0 += float((f > 0).sum())
    sums.l1 += float(f.sum())
    sums.fire_count += (f > 0).sum(0).cpu()
    sums.act_sum += f.sum(0).cpu()
    if getattr(sums, "diag", None) is not None:
        sums.diag.update(f)


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
                  progress: bool = True) -> list[dict]:
    """Core metrics of several SAEs from ONE batched forward per batch of rows.

    The batch holds a clean group, one zero-ablated group per distinct layer and one
    spliced group per SAE, so the clean and ablated passes are shared by all SAEs.

    Raises:
        FileNotFoundError: a folder is not a saved SAE.
        ModelError: an SAE's layer is out of range, or its ``d_in`` differs from the model's d_model.
        DatasetError: no evaluation text.
    """
    folders = [Path(f) for f in folders]
    model_id = cfg.model or sae_model_id(folders[0])
    lm = lm or load_model(model_id, cfg.device, cfg.dtype)
    loaded = [_load_checked(f, lm, model_id) for f in folders]
    layers = sorted({layer for _, _, layer in loaded})
    n_groups = 1 + len(layers) + len(loaded)
    zero_group = {layer: 1 + i for i, layer in enumerate(layers)}
    plan = {layer: [None] * n_groups for layer in layers}
    records = [{} for _ in loaded]
    rows_ctx: dict = {}  # document boundaries of the current batch, for sequence SAEs (temporal)
    for layer in layers:
        plan[layer][zero_group[layer]] = zero_replacement
    for i, (sae, _, layer) in enumerate(loaded):
        plan[layer][1 + len(layers) + i] = sae_replacement(sae, records[i], rows_ctx)

    ctx = cfg.context_length or loaded[0][1].get("saestrata", {}).get("context_length") or 128
    n_rows = max(1, -(-cfg.tokens // ctx))
    special = set(lm.tokenizer.all_special_ids)
    rows = pack_documents(iter_documents(cfg.dataset, cfg.split, cfg.seed, cfg.text_field), lm.tokenizer, ctx)
    sums = [_Sums(sae.d_sae) for sae, _, _ in loaded]
    for s, (sae, _, _) in zip(sums, loaded):
        s.diag = Diagnostics(sae)  # evaluate/diagnostics.py: density, group structure, silhouette
    ce, kl, n_ce = [0.0] * n_groups, [0.0] * n_groups, 0
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
            with splice(lm.layers, plan, keep.to(lm.device)):
                logits = lm.model(input_ids=ids.repeat(n_groups, 1).to(lm.device), use_cache=False).logits
            n_ce += _accumulate_logits(ce, kl, logits.cpu(), ids, keep)
            for s, record in zip(sums, records):
                _accumulate_recon(s, {k: v.cpu() for k, v in record.items()}, keep.reshape(-1))
            seconds += time.perf_counter() - t0
            done += len(batch)
            bar.update(len(batch) * ctx)
    bar.close()
    if n_ce == 0 or sums[0].n_tok == 0:
        raise DatasetError(f"no evaluation tokens from {cfg.dataset!r} split {cfg.split!r}: the dataset is empty")
    results = []
    for i, ((_, sae_cfg, layer), s) in enumerate(zip(loaded, sums)):
        g_sae, g_zero = 1 + len(layers) + i, zero_group[layer]
        group_ce = {"clean": ce[0] / n_ce, "sae": ce[g_sae] / n_ce, "zero": ce[g_zero] / n_ce}
        group_kl = {"sae": kl[g_sae] / n_ce, "zero": kl[g_zero] / n_ce}
        timing = {"n_tokens": done * ctx, "n_ce_positions": n_ce, "n_forward_groups": n_groups,
                  "eval_tokens_per_s": done * ctx / max(seconds, 1e-9)}
        results.append(_result(replace(cfg, sae=folders[i]), sae_cfg, s, group_ce, group_kl, model_id, layer, ctx,
                               timing))
    return results


def _result(cfg, sae_cfg, s: _Sums, ce: dict, kl: dict, model_id, layer, ctx, timing: dict) -> dict:
    """Assemble SAEBench's ``core`` layout from the accumulators (``ce``/``kl``: per-position means)."""
    mean_x = s.sum_x / s.n_tok
    total_var = s.sq_x / s.n_tok - float(mean_x.pow(2).sum())
    freq = (s.fire_count / s.n_tok).numpy()
    mean_act = (s.act_sum / s.n_tok).numpy()
    ce_den = ce["zero"] - ce["clean"]
    metrics = {
        "model_behavior_preservation": {
            "kl_div_score": (kl["zero"] - kl["sae"]) / kl["zero"] if kl["zero"] > 0 else float("nan"),
            "kl_div_with_ablation": kl["zero"], "kl_div_with_sae": kl["sae"],
        },
        "model_performance_preservation": {
            "ce_loss_score": (ce["zero"] - ce["sae"]) / ce_den if ce_den != 0 else float("nan"),
            "ce_loss_with_ablation": ce["zero"], "ce_loss_with_sae": ce["sae"], "ce_loss_without_sae": ce["clean"],
        },
        "reconstruction_quality": {
            "explained_variance": 1.0 - (s.sq_err / s.n_tok) / total_var,
            "mse": s.sq_err / (s.n_tok * len(mean_x)), "cossim": s.cos / s.n_tok,
        },
        "sparsity": {"l0": s.l0 / s.n_tok, "l1": s.l1 / s.n_tok},
        "misc_metrics": {
            "frac_alive": float((freq > 0).mean()),
            "feature_utilisation": float((mean_act > 1e-4).mean()),
            "freq_over_1_percent": float((freq > 0.01).mean()),
            "freq_over_10_percent": float((freq > 0.1).mean()),
            "n_reconstructed_tokens": s.n_tok, **timing,
        },
    }
    hist, edges = np.histogram(np.log10(freq[freq > 0]), bins=40, range=(-6, 0)) if (freq > 0).any() else ([], [])
    return {
        "eval_type_id": "core",
        "eval_config": {**{k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                        "model_name": model_id, "hook_layer": layer, "context_size": ctx,
                        "exclude_special_tokens_from_reconstruction": True},
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": [],
        "eval_result_unstructured": {
            "log10_feature_density_histogram": {"counts": [int(c) for c in hist], "edges": [float(e) for e in edges],
                                                "n_dead": int((freq == 0).sum())},
            "diagnostics": s.diag.result() if getattr(s, "diag", None) is not None else None,
        },
        "sae_cfg_dict": sae_cfg,
    }
