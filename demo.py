"""``saestrata demo``: the whole pipeline at small scale on the embedded defaults.

Harvest Gemma 3 270M activations of Wikipedia text (train split) into a store,
train every requested arch per layer in one pass, evaluate each SAE on held-out
articles (eval split), and print one table row per SAE plus throughput figures.
Sized to finish in well under 15 minutes on a 2-core CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .atomic import write_json_atomic, write_text_atomic
from .evaluate.core import EvalConfig, evaluate_saes
from .harvest.harvester import HarvestConfig, harvest
from .harvest.model import load_model
from .store import ActivationStore, StoreError
from .train.trainer import SAESpec, TrainConfig, train


@dataclass
class DemoConfig:
    """Demo sizes: ``steps`` of ``batch_size`` tokens per SAE, on ``d_sae`` latents."""

    out: Path = Path("demo-out")
    train_tokens: int = 98_304  # 12 whole shards of 8,192 tokens: no padded chunk, extensible
    eval_tokens: int = 8192
    steps: int = 600
    batch_size: int = 1024
    d_sae: int = 4096
    layers: list[int] = field(default_factory=lambda: [4, 8])
    archs: list[str] = field(default_factory=lambda: ["standard", "topk"])
    eval_batch_rows: int = 4
    device: str = "auto"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _store_ready(path: Path, cfg: DemoConfig) -> bool:
    """True if ``path`` holds a finished store with (at least) the demo's layers and enough tokens."""
    if not path.exists():
        return False
    try:
        store = ActivationStore(path)
    except StoreError as err:
        raise StoreError(f"{err} (delete {path} to start the demo afresh)") from err
    return (store.attrs.get("complete") and set(cfg.layers) <= set(store.attrs.get("layers", []))
            and store.n_tokens >= cfg.train_tokens)


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] = print) -> list[dict]:
    """Run harvest -> train -> evaluate; returns one summary dict per SAE and writes ``out/summary.{json,md}``."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    lm = load_model(device=cfg.device, dtype="auto")  # float32 where bf16 would be emulated (~5x slower)
    timings["model_load_s"] = time.perf_counter() - t0

    store_path = cfg.out / "store-train"
    if _store_ready(store_path, cfg):
        echo(f"reusing {store_path}")
    else:
        t0 = time.perf_counter()
        harvest(HarvestConfig(layers=cfg.layers, tokens=cfg.train_tokens, out=store_path, device=cfg.device,
                              compute_dtype="auto"), lm=lm)
        timings["harvest_tokens_per_s"] = ActivationStore(store_path).n_tokens / (time.perf_counter() - t0)
    store = ActivationStore(store_path)
    timings["store_bytes_per_token"] = _dir_bytes(store_path) / store.n_tokens

    saes: list[tuple[int, str, Path]] = []
    for layer in cfg.layers:
        folders = train(TrainConfig(
            store=store_path, layer=layer, out=cfg.out / "runs" / f"layer{layer}",
            specs=[SAESpec(a, a) for a in cfg.archs], d_sae=cfg.d_sae, batch_size=cfg.batch_size,
            tokens=cfg.steps * cfg.batch_size, device=cfg.device,
        ))
        saes += [(layer, name, folder) for name, folder in folders.items()]

    rows = []
    t0 = time.perf_counter()
    results = evaluate_saes([f for _, _, f in saes], EvalConfig(tokens=cfg.eval_tokens, batch_rows=cfg.eval_batch_rows,
                                                                     device=cfg.device), lm=lm)
    timings["evaluate_s"] = time.perf_counter() - t0
    for (layer, name, folder), result in zip(saes, results):
        write_json_atomic(cfg.out / "results" / f"layer{layer}_{name}_core.json", result)
        m = result["eval_result_metrics"]
        ours = result["sae_cfg_dict"]["saestrata"]
        rows.append({
            "arch": name, "layer": layer, "d_sae": result["sae_cfg_dict"]["d_sae"],
            "l0": m["sparsity"]["l0"], "explained_variance": m["reconstruction_quality"]["explained_variance"],
            "ce_loss_score": m["model_performance_preservation"]["ce_loss_score"],
            "kl_div_score": m["model_behavior_preservation"]["kl_div_score"],
            "frac_alive": m["misc_metrics"]["frac_alive"],
            "train_tokens_per_s": ours["train_tokens_per_s"], "eval_tokens_per_s": m["misc_metrics"]["eval_tokens_per_s"],
        })
    table = _markdown(rows)
    write_json_atomic(cfg.out / "summary.json", {"rows": rows, "timings": timings})
    write_text_atomic(cfg.out / "summary.md", table + "\n")
    echo("\n" + table)
    echo("\n" + "  ".join(f"{k} {v:,.1f}" for k, v in timings.items()))
    return rows


def _markdown(rows: list[dict]) -> str:
    """One markdown table row per SAE."""
    head = "| layer | arch | d_sae | L0 | explained var | CE loss score | KL score | alive | train tok/s | eval tok/s |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['arch']} | {r['d_sae']} | {r['l0']:.1f} | {r['explained_variance']:.3f} | "
                     f"{r['ce_loss_score']:.3f} | {r['kl_div_score']:.3f} | {r['frac_alive']:.3f} | "
                     f"{r['train_tokens_per_s']:,.0f} | {r['eval_tokens_per_s']:,.0f} |")
    return "\n".join(lines)
