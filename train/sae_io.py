"""Save and load SAEs in the SAELens layout: ``cfg.json`` + ``sae_weights.safetensors``.

``cfg.json`` carries SAELens' legacy top-level keys (``architecture``, ``d_in``,
``d_sae``, ``hook_name``, ``hook_layer``, ``activation_fn_str`` ...), the newer
``metadata`` block, and a ``saestrata`` block with our arch name and
hyperparameters, so SAELens loads the baselines and saestrata reloads every arch.
Weights are saved after :meth:`SAE.fold_input_scale`, so the SAE takes raw
activations (``normalize_activations: "none"``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path, write_text_atomic
from .base import SAE
from .registry import build

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
# SAELens architecture / activation names for the archs it knows; others load only in saestrata.
_SAELENS_ARCH = {"standard": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu",
                 "matryoshka": "jumprelu"}  # batchtopk/matryoshka save their global threshold as `threshold [d_sae]`


def sae_config(sae: SAE, meta: dict) -> dict:
    """The ``cfg.json`` dict for ``sae``; ``meta`` holds model/hook/dataset facts from the store."""
    arch = _SAELENS_ARCH.get(sae.arch, sae.arch)
    hp = sae.hparams()
    act_kwargs = {"k": hp["k"]} if "k" in hp and arch == "topk" else {}
    common = {
        "model_name": meta.get("model_id"), "hook_name": meta.get("hook_name"), "hook_layer": meta.get("layer"),
        "hook_head_index": None, "context_size": meta.get("context_length"), "dataset_path": meta.get("dataset"),
        "prepend_bos": True, "model_from_pretrained_kwargs": {},
    }
    return {
        "architecture": arch, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "finetuning_scaling_factor": False,
        "activation_fn_str": "topk" if arch == "topk" else "relu", "activation_fn_kwargs": act_kwargs,
        **({"k": hp["k"]} if act_kwargs else {}),
        **common,
        "metadata": {**common, "sae_lens_training_version": None},
        "saestrata": {"arch": sae.arch, "hparams": hp, **meta},
    }


def save_sae(sae: SAE, folder: str | Path, meta: dict) -> Path:
    """Write ``cfg.json`` and ``sae_weights.safetensors`` (fp32) into ``folder``; returns it.

    Both files are written atomically (temp + rename) and ``cfg.json`` last: it marks the
    SAE as saved. An old ``cfg.json`` is removed first, so an interrupted save never
    leaves a folder that pairs the old config with new weights.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in sae.state_dict().items()
               if k != "tokens_since_fired"}
    cfg_text = json.dumps(sae_config(sae, meta), indent=2)  # before touching the disk: may raise TypeError
    (folder / CFG_FILE).unlink(missing_ok=True)
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    write_text_atomic(folder / CFG_FILE, cfg_text)
    return folder


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> tuple[SAE, dict]:
    """Load an SAE saved by :func:`save_sae`; returns ``(sae in eval mode, cfg dict)``.

    Raises:
        FileNotFoundError: ``folder`` lacks ``cfg.json`` or the weights (one-line message).
    """
    folder = Path(folder)
    if not (folder / CFG_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{folder} is not a saved SAE (needs {CFG_FILE} and {WEIGHTS_FILE})")
    cfg = json.loads((folder / CFG_FILE).read_text())
    ours = cfg.get("saestrata", {})
    sae = build(ours.get("arch", cfg["architecture"]), cfg["d_in"], cfg["d_sae"], **ours.get("hparams", {}))
    state = load_file(str(folder / WEIGHTS_FILE))
    state["tokens_since_fired"] = torch.zeros(cfg["d_sae"], dtype=torch.long)
    sae.load_state_dict(state)
    return sae.to(device).eval(), cfg
