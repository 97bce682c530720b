"""Save and load SAEs in the SAELens layout: ``cfg.json`` + ``sae_weights.safetensors``.

``cfg.json`` carries SAELens' legacy top-level keys (``architecture``, ``d_in``,
``d_sae``, ``hook_name``, ``hook_layer``, ``activation_fn_str`` ...), the newer
``metadata`` block, and a ``saestrata`` block with our arch name and
hyperparameters. Weights are saved after :meth:`SAE.fold_input_scale`, so the SAE
takes raw activations (``normalize_activations: "none"``).

Every arch whose inference SAELens can represent (:meth:`SAE.saelens_export` is not
None) writes that SAELens ``architecture`` and exactly SAELens' tensors into
``sae_weights.safetensors`` (SAELens loads its state dict strictly, so no extra key may
be there), with masks or gates folded in. Whatever saestrata needs beyond them to
rebuild the full arch (training-only tensors, and the unfolded originals of folded
tensors) goes into ``saestrata_extra.safetensors``; ``load_sae`` overlays it, so the
reload is bit-identical. The others keep their saestrata arch name as
``architecture`` and all their tensors in ``sae_weights.safetensors``; their
``saestrata`` block says ``"saelens_loadable": false`` and why.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import write_text_atomic
from .base import SAE
from .registry import build

CFG_FILE, WEIGHTS_FILE, EXTRA_FILE = "cfg.json", "sae_weights.safetensors", "saestrata_extra.safetensors"


def sae_config(sae: SAE, meta: dict) -> dict:
    """The ``cfg.json`` dict for ``sae``; ``meta`` holds model/hook/dataset facts from the store.

    ``architecture`` is :meth:`SAE.saelens_export`'s SAELens architecture, or the saestrata
    arch name when it returns None.
    """
    export = sae.saelens_export()
    arch = sae.arch if export is None else export[0]
    hp = sae.hparams()
    topk = export is not None and arch == "topk"
    act_kwargs = {"k": hp["k"]} if topk else {}
    common = {
        "model_name": meta.get("model_id"), "hook_name": meta.get("hook_name"), "hook_layer": meta.get("layer"),
        "hook_head_index": None, "context_size": meta.get("context_length"), "dataset_path": meta.get("dataset"),
        "prepend_bos": True, "model_from_pretrained_kwargs": {},
    }
    saelens = ({"saelens_loadable": False, "saelens_reason": sae.saelens_unsupported} if export is None
               else {"saelens_loadable": True, "saelens_architecture": arch})
    return {
        "architecture": arch, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "finetuning_scaling_factor": False,
        "activation_fn_str": "topk" if topk else "relu", "activation_fn_kwargs": act_kwargs,
        # SAELens' TopK would otherwise be free to divide latents by decoder-row norms.
        **({"k": hp["k"], "rescale_acts_by_decoder_norm": False} if topk else {}),
        **common,
        "metadata": {**common, "sae_lens_training_version": None},
        "saestrata": {"arch": sae.arch, "hparams": hp, **meta, **saelens},
    }


def _write(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Save ``tensors`` to ``path`` through a temporary file (never a half-written file in place)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def save_sae(sae: SAE, folder: str | Path, meta: dict) -> Path:
    """Write ``cfg.json``, ``sae_weights.safetensors`` and, when needed, ``saestrata_extra.safetensors`` (fp32).

    Call it on an eval-mode SAE after :meth:`SAE.fold_input_scale` (SAELens' tensors
    describe eval-mode inference). Returns ``folder``. Every file is written atomically
    (temp + rename) and ``cfg.json`` last: it marks the SAE as saved. An old ``cfg.json`` is
    removed first, so an interrupted save never pairs the old config with new weights.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu() for k, v in sae.state_dict().items() if k != "tokens_since_fired"}
    export = sae.saelens_export()
    if export is None:
        weights, extra = state, {}
    else:
        weights = export[1]
        # Kept for saestrata: tensors SAELens does not take, and the originals of folded ones.
        extra = {k: v for k, v in state.items() if k not in weights or not torch.equal(weights[k], v)}
    cfg = sae_config(sae, meta)
    cfg["saestrata"]["extra_tensors"] = EXTRA_FILE if extra else None
    # Tensors written only for SAELens (none of the built-in archs has one; load_sae drops them).
    cfg["saestrata"]["saelens_only_tensors"] = sorted(set(weights) - set(state))
    cfg_text = json.dumps(cfg, indent=2)  # before touching the disk: may raise TypeError
    (folder / CFG_FILE).unlink(missing_ok=True)
    _write(weights, folder / WEIGHTS_FILE)
    if extra:
        _write(extra, folder / EXTRA_FILE)
    else:
        (folder / EXTRA_FILE).unlink(missing_ok=True)  # a stale one from an earlier save must not overlay
    write_text_atomic(folder / CFG_FILE, cfg_text)
    return folder


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> tuple[SAE, dict]:
    """Load an SAE saved by :func:`save_sae` as its saestrata arch; returns ``(sae in eval mode, cfg dict)``.

    Raises:
        FileNotFoundError: ``folder`` lacks ``cfg.json``, the weights, or the extra tensors its cfg names.
    """
    folder = Path(folder)
    if not (folder / CFG_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{folder} is not a saved SAE (needs {CFG_FILE} and {WEIGHTS_FILE})")
    cfg = json.loads((folder / CFG_FILE).read_text())
    ours = cfg.get("saestrata", {})
    sae = build(ours.get("arch", cfg["architecture"]), cfg["d_in"], cfg["d_sae"], **ours.get("hparams", {}))
    state = load_file(str(folder / WEIGHTS_FILE))
    if ours.get("extra_tensors"):
        extra_path = folder / ours["extra_tensors"]
        if not extra_path.exists():
            raise FileNotFoundError(f"{folder} lacks {ours['extra_tensors']} (named in its {CFG_FILE}); copy it too")
        state.update(load_file(str(extra_path)))
    for name in ours.get("saelens_only_tensors", []):
        state.pop(name, None)
    state["tokens_since_fired"] = torch.zeros(cfg["d_sae"], dtype=torch.long)
    sae.load_state_dict(state)
    return sae.to(device).eval(), cfg
