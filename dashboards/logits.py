"""Direct logit effects of latents: the top and bottom vocabulary entries of ``direction_i @ W_U^T``.

The "logit weights" panel of SAE-Vis / Neuronpedia: each latent's residual-space direction
(:meth:`saestrata.train.base.SAE.latent_directions`, ``W_dec[i]`` for the built-in decoders,
right for every arch) times the unembedding. No forward pass and no final norm: it reads the
direction's direct effect on the logits up to the final RMSNorm's per-token scale (the norm's
learned gain is not folded in, as SAE-Vis). Gemma ties its unembedding to the input
embedding (``lm_head.weight is embed_tokens.weight``), so ``get_output_embeddings()`` serves both.
"""

from __future__ import annotations

import torch


def unembedding(model: torch.nn.Module) -> torch.Tensor:
    """The unembedding ``W_U`` of a Hugging Face causal LM: ``[vocab, d_model]`` (its own dtype and device).

    Raises:
        ValueError: the model has no output embeddings.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings: logit effects need an LM head")
    return head.weight


@torch.no_grad()
def logit_effects(sae, w_u: torch.Tensor, n: int = 10, block: int = 64) -> dict[str, torch.Tensor]:
    """Top and bottom ``n`` tokens of ``latent_directions(i) @ W_U^T`` for every latent.

    Args:
        sae: any saestrata SAE (``d_sae``, ``d_in``, ``latent_directions``).
        w_u: ``[vocab, d_in]`` unembedding (any float dtype); used in fp32 ``block`` rows at a time.
        n: tokens per side.
        block: latents per matmul (memory ``block x vocab`` fp32).

    Returns:
        ``{"top_ids", "bottom_ids"}`` int64 ``[d_sae, n]`` and ``{"top_values", "bottom_values"}``
        fp32 ``[d_sae, n]`` (logit change per unit of latent activation; top descending, bottom ascending).

    Raises:
        ValueError: ``w_u``'s width is not the SAE's ``d_in``.
    """
    if w_u.shape[-1] != sae.d_in:
        raise ValueError(f"unembedding width {w_u.shape[-1]} != SAE d_in {sae.d_in}: the SAE belongs to another model")
    w = w_u.float()
    n = min(n, w.shape[0])
    out = {name: [] for name in ("top_ids", "top_values", "bottom_ids", "bottom_values")}
    for lo in range(0, sae.d_sae, block):
        idx = torch.arange(lo, min(lo + block, sae.d_sae))
        logits = sae.latent_directions(idx).to(w.device) @ w.T  # [b, vocab]
        top, bottom = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        out["top_ids"].append(top.indices.cpu())
        out["top_values"].append(top.values.cpu())
        out["bottom_ids"].append(bottom.indices.cpu())
        out["bottom_values"].append(bottom.values.cpu())
    return {name: torch.cat(parts) for name, parts in out.items()}
