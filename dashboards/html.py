"""The static HTML feature browser: ``index.html`` + ``browser.js`` + ``browser.css`` + ``data/*.js``.

Plain HTML and JavaScript (dashboards/static/), no CDN, no server: the data are JavaScript files
that assign to ``window.DASH`` and are loaded with ``<script src>`` (the index and vocabulary at
page load, one block per latent view on demand), because browsers refuse ``fetch`` of
``file://`` URLs. The same folder also works behind ``python -m http.server``. ``#latent=N`` in
the URL opens latent ``N``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file

from ..atomic import write_text_atomic
from .files import block_name

STATIC = Path(__file__).parent / "static"


def _rounded(values: list[float]) -> list[float]:
    """Floats to 4 significant digits (the browser shows 3-4; keeps the data files small)."""
    return [float(f"{v:.4g}") for v in values]


def _examples(index, value, tokens, acts) -> list[list]:
    """``[[global index, value, token ids, acts], ...]`` of the non-empty slots (``index >= 0``)."""
    return [[int(i), float(f"{float(v):.5g}"), t.tolist(), _rounded(a.tolist())]
            for i, v, t, a in zip(index, value, tokens, acts) if int(i) >= 0]


def _script(path: Path, target: str, data) -> None:
    """Write ``path`` as ``window.DASH = window.DASH || {}; <target> = <json>;`` (atomically)."""
    write_text_atomic(path, f"window.DASH = window.DASH || {{}};\n{target} = {json.dumps(data)};\n")


def write_browser(out: Path, index: dict) -> Path:
    """Write the browser into ``out`` from the dashboard files already there; returns ``out / "index.html"``.

    Args:
        out: a dashboard folder (:mod:`.files` layout) holding ``index.json``'s blocks and ``vocab.json``.
        index: the ``index.json`` dict.
    """
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for block in index["blocks"]:
        stem = out / "blocks" / block_name(block["block"])
        tensors = load_file(f"{stem}.safetensors")
        meta = json.loads(Path(f"{stem}.json").read_text(encoding="utf-8"))
        latents = []
        for j, lm in enumerate(meta["latents"]):
            top = _examples(tensors["top_index"][j], tensors["top_value"][j], tensors["top_tokens"][j],
                            tensors["top_acts"][j])
            quantiles = [{"bounds": [None if b != b else float(f"{b:.4g}") for b in tensors["q_bounds"][j, q].tolist()],
                          "examples": _examples(tensors["q_index"][j, q], tensors["q_value"][j, q],
                                                tensors["q_tokens"][j, q], tensors["q_acts"][j, q])}
                         for q in range(tensors["q_index"].shape[1])]
            latents.append({**lm, "hist": tensors["hist"][j].tolist(), "top": top, "quantiles": quantiles})
        _script(data / f"{block_name(block['block'])}.js", f"window.DASH.blocks = window.DASH.blocks || {{}};\n"
                f"window.DASH.blocks[{block['block']}]", {"latents": latents})
    _script(data / "vocab.js", "window.DASH.vocab", json.loads((out / "vocab.json").read_text(encoding="utf-8")))
    _script(data / "index.js", "window.DASH.index", index)
    for name in ("index.html", "browser.js", "browser.css"):
        shutil.copyfile(STATIC / name, out / name)
    return out / "index.html"
