"""The ``saestrata`` command line: harvest -> train -> evaluate, plus the offline demo.

Every error the user can fix is reported as one line (``click.ClickException``),
never a traceback.
"""

from __future__ import annotations

import json
import time
from functools import wraps
from pathlib import Path

import click

from .allocator import tune_allocator
from .harvest.model import EMBEDDED_MODEL
from .harvest.text import EMBEDDED_DATASET

_USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


def _one_line_errors(fn):
    """Turn the project's user-facing errors (all ValueError subclasses) into one-line CLI errors."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        """``fn``, with a user error re-raised as ``click.ClickException`` (first line of its message)."""
        try:
            return fn(*args, **kwargs)
        except _USER_ERRORS as err:
            raise click.ClickException(str(err).splitlines()[0] if str(err) else type(err).__name__) from err

    return wrapper


def _float_list(value: str | None, option: str) -> list[float] | None:
    """``"32,64"`` -> ``[32.0, 64.0]``; raises click.BadParameter naming ``option`` for a non-positive or bad item."""
    if not value:
        return None
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: use positive numbers, e.g. 32,64", param_hint=option) from None
    if not out or any(not (v > 0) for v in out):
        raise click.BadParameter(f"{value!r}: every target must be > 0", param_hint=option)
    return out


def _int_list(_ctx, _param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 4,8") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="saestrata")
def main():
    """Cached-activation pipeline for sparse-autoencoder research on Gemma models.

    \b
    saestrata harvest   write residual-stream activations into a Zarr v3 store
    saestrata train     train one or many SAEs from a store in one pass
    saestrata evaluate  splice an SAE into the LM and score it (CE/KL recovery, FVU, L0)
    saestrata store     ls / info / verify activation stores
    saestrata demo      all three on the embedded Gemma 3 270M + Wikipedia, offline

    Freed large buffers are kept for reuse (glibc malloc settings: ~1.3x faster training
    on CPU); SAESTRATA_MALLOC=system keeps the system defaults.
    """
    tune_allocator()


_model_opts = [
    click.option("--device", default="auto", show_default=True, help="auto = CUDA when available, else CPU."),
    click.option("--dtype", default="bfloat16", show_default=True,
                 type=click.Choice(["bfloat16", "float32", "float16"]), help="Model dtype (Gemma residuals overflow float16)."),
]


def _with(opts):
    """Decorator applying a shared list of click options (first in the list = first in --help)."""

    def deco(fn):
        """``fn`` with every option of ``opts`` attached."""
        for opt in reversed(opts):
            fn = opt(fn)
        return fn
    return deco


@main.command()
@click.option("--model", default=EMBEDDED_MODEL, show_default=True, help="gemma-3-270m (embedded), a hub name or a local folder.")
@click.option("--layers", required=True, callback=_int_list, help="Blocks whose resid_post to store, e.g. 4,8.")
@click.option("--dataset", default=EMBEDDED_DATASET, show_default=True,
              help="wiki-vital (embedded), a datasets name, a local folder or a .txt/.jsonl/.parquet file.")
@click.option("--split", default="train", show_default=True, type=click.Choice(["train", "eval"]))
@click.option("--tokens", default=98_304, show_default=True,
              help="Tokens to harvest (rounded up to whole rows; whole shards of 8,192 keep the store extensible).")
@click.option("--context-length", default=128, show_default=True)
@click.option("--batch-rows", default=16, show_default=True, help="Rows per forward pass.")
@click.option("--text-field", default="text", show_default=True)
@click.option("--seed", default=0, show_default=True, help="Text order seed (embedded corpus).")
@click.option("--rows-per-chunk", default=8, show_default=True, help="Context rows per inner chunk (read unit).")
@click.option("--chunks-per-shard", default=8, show_default=True, help="Inner chunks per shard (write/commit unit).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Store directory: new, or an existing store of the same harvest to resume, reuse or extend.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="Shard-writer processes on a dask LocalCluster (0 = harvest in this process).")
@click.option("--scheduler", metavar="ADDRESS",
              help="Use an existing dask scheduler (tcp://host:8786) instead; its workers must see --out and the model.")
@_with(_model_opts)
@_one_line_errors
def harvest(model, layers, dataset, split, tokens, context_length, batch_rows, text_field, seed, rows_per_chunk,
            chunks_per_shard, out, workers, scheduler, device, dtype):
    """Write residual-stream activations (blocks.L.hook_resid_post) into a Zarr v3 store.

    Rerunning on an existing store of the same harvest resumes it from its first
    uncommitted shard, reuses it when complete, or extends it to more --tokens; a
    store of a different harvest is refused, naming the differing fields.
    With --workers N (or --scheduler) shards are forwarded and written by dask
    workers, each shard by exactly one, and committed here; the store is the same.
    """
    from .harvest.harvester import HarvestConfig, harvest as run

    t0 = time.perf_counter()
    path = run(HarvestConfig(layers=layers, tokens=tokens, out=out, model=model, dataset=dataset, split=split,
                             context_length=context_length, batch_rows=batch_rows, seed=seed, text_field=text_field,
                             device=device, dtype=dtype, rows_per_chunk=rows_per_chunk,
                             chunks_per_shard=chunks_per_shard, workers=workers, scheduler=scheduler))
    click.echo(f"store {path} ready in {time.perf_counter() - t0:.0f} s")


@main.command()
@click.option("--store", type=click.Path(path_type=Path), help="Store written by 'saestrata harvest'.")
@click.option("--layer", type=int, help="Block whose activations to train on.")
@click.option("--arch", "archs", default="topk", show_default=True,
              help="Comma-separated arch or preset names; 'all' = every arch/preset.")
@click.option("--set", "sets", multiple=True, metavar="NAME=V1,V2", help="Hyperparameter (sweep): --set k=16,32.")
@click.option("--d-sae", type=int, help="Latents per SAE (default: --expansion x d_model).")
@click.option("--expansion", default=8, show_default=True)
@click.option("--tokens", default=600 * 1024, show_default=True, help="Training tokens per SAE.")
@click.option("--batch-size", default=1024, show_default=True)
@click.option("--lr", type=float, help="Learning rate (default: a preset's, else 2e-4 / sqrt(d_sae / 16384)).")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--no-autocast", is_flag=True, help="Train in fp32 (default: bf16 autocast, fp32 master weights).")
@click.option("--allow-partial", is_flag=True, help="Train on the committed part of a half-written store.")
@click.option("--list-archs", is_flag=True, help="List every arch and preset with its source, then exit.")
@click.option("--checkpoint-every", default=100, show_default=True,
              help="Steps between checkpoints in --out (0 = off); removed when the run finishes.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint (same settings).")
@click.option("--sae-threads", default=1, show_default=True, type=click.IntRange(min=0),
              help="SAEs stepped side by side on CPU, one intra-op thread each (0 = one per core); "
                   "faster on a busy shared machine, slower on an idle one.")
@click.option("--target-l0", "target_l0", metavar="L1,L2",
              help="Calibrate sparsity to these mean active latents per token: k = L for the TopK family, "
                   "a controller on the sparsity coefficient for penalty archs (one SAE per target).")
@click.option("--out", type=click.Path(path_type=Path), help="Run directory: one sub-folder per SAE.")
@_one_line_errors
def train(store, layer, archs, sets, d_sae, expansion, tokens, batch_size, lr, seed, device, no_autocast,
          allow_partial, list_archs, checkpoint_every, resume, sae_threads, target_l0, out):
    """Train SAEs from a store in one pass: every batch is read once and fed to every SAE.

    With --resume, an interrupted run continues from its last checkpoint and ends with
    the same SAEs and logs as an uninterrupted run; other settings are refused.
    """
    from .train.registry import ARCHS, expand_names
    from .train.sweep import expand_specs
    from .train.trainer import TrainConfig, train as run

    if list_archs:
        for name, info in ARCHS.items():
            click.echo(f"{name}\n    source:  {info.source}")
            if info.presets:
                click.echo(f"    presets: {', '.join(info.presets)}")
        return
    if store is None or layer is None or out is None:
        raise click.UsageError("--store, --layer and --out are required (or use --list-archs)")
    names = expand_names([a.strip() for a in archs.split(",") if a.strip()])  # fail fast, before reading
    specs = expand_specs(names, list(sets), _float_list(target_l0, "--target-l0"))
    folders = run(TrainConfig(store=store, layer=layer, out=out, specs=specs, d_sae=d_sae, expansion=expansion,
                              batch_size=batch_size, tokens=tokens, lr=lr, seed=seed, device=device,
                              autocast=not no_autocast, allow_partial=allow_partial,
                              checkpoint_every=checkpoint_every, resume=resume, sae_threads=sae_threads))
    for name, folder in folders.items():
        click.echo(f"saved {name} -> {folder}")


@main.command()
@click.option("--sae", "saes", required=True, multiple=True, type=click.Path(path_type=Path),
              help="Saved SAE folder (repeatable).")
@click.option("--dataset", default=EMBEDDED_DATASET, show_default=True)
@click.option("--split", default="eval", show_default=True, type=click.Choice(["train", "eval"]))
@click.option("--tokens", default=8192, show_default=True)
@click.option("--batch-rows", default=4, show_default=True)
@click.option("--model", default=None, help="Default: the model the SAE was trained on.")
@click.option("--out", type=click.Path(path_type=Path), help="Result JSON (one SAE) or directory (several).")
@_with(_model_opts)
@_one_line_errors
def evaluate(saes, dataset, split, tokens, batch_rows, model, out, device, dtype):
    """Splice SAEs into the LM and report CE/KL recovery, reconstruction and sparsity (SAEBench layout)."""
    from .evaluate.core import EvalConfig, evaluate_saes

    results = evaluate_saes(list(saes), EvalConfig(dataset=dataset, split=split, tokens=tokens, batch_rows=batch_rows,
                                                   model=model, device=device, dtype=dtype))
    for sae, result in zip(saes, results):
        if out is None:
            target = sae / "core_eval.json"
        elif len(saes) == 1:
            target = out
        else:
            target = out / f"{sae.name}_core.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result, indent=2))
        m = result["eval_result_metrics"]
        click.echo(f"{sae}: ce_loss_score {m['model_performance_preservation']['ce_loss_score']:.3f} "
                   f"explained_variance {m['reconstruction_quality']['explained_variance']:.3f} "
                   f"l0 {m['sparsity']['l0']:.1f} -> {target}")


@main.command()
@click.option("--out", default=Path("docs/results/benchmark"), show_default=True, type=click.Path(path_type=Path),
              help="Results (JSONs, train logs, tables, report): small, meant to be committed.")
@click.option("--work", default=Path("benchmark-work"), show_default=True, type=click.Path(path_type=Path),
              help="Store and SAE weights (large).")
@click.option("--layer", default=8, show_default=True, type=click.IntRange(min=0))
@click.option("--variants", help="Comma-separated arch/preset names (default: every variant).")
@click.option("--targets", default="24,40,48,80", show_default=True,
              help="Target L0s; two on each side of 32 and of 64 give the matched rows.")
@click.option("--tokens-per-sae", default=1_048_576, show_default=True, type=click.IntRange(min=1024))
@click.option("--d-sae", default=2048, show_default=True, type=click.IntRange(min=1))
@click.option("--seeds", default=3, show_default=True, type=click.IntRange(min=1),
              help="Init seeds for topk and the best seed-paper variant.")
@click.option("--eval-tokens", default=8192, show_default=True, type=click.IntRange(min=1))
@click.option("--no-unlearn", is_flag=True, help="Skip the unlearning stage.")
@click.option("--stages", help="Comma-separated subset of: store,lr,matched,published,evaluate,seeds,unlearn,report.")
@click.option("--quick", is_flag=True, help="A ~20-minute version: 5 variants, L0 24/40, 256k tokens each, no unlearning.")
@click.option("--device", default="auto", show_default=True)
@_one_line_errors
def benchmark(out, work, layer, variants, targets, tokens_per_sae, d_sae, seeds, eval_tokens, no_unlearn, stages,
              quick, device):
    """The fair comparison: every variant on one store, at matched L0, one budget, SAEBench metrics, unlearning.

    Resumable: rerunning skips every SAE and result already written; interrupting loses at most
    one SAE's steps since its last checkpoint. See saestrata/benchmark.py for the stages.
    """
    from .benchmark import BenchmarkConfig, quick_config, run_benchmark

    if quick:
        cfg = quick_config(out, work)
    else:
        cfg = BenchmarkConfig(out=out, work=work, layer=layer, tokens_per_sae=tokens_per_sae, d_sae=d_sae,
                              targets=tuple(_float_list(targets, "--targets")), seeds=seeds, eval_tokens=eval_tokens,
                              unlearn=not no_unlearn,
                              variants=[v.strip() for v in variants.split(",") if v.strip()] if variants else None)
    cfg.device = device
    if stages:
        known = set(BenchmarkConfig().stages)
        chosen = tuple(s.strip() for s in stages.split(",") if s.strip())
        bad = [s for s in chosen if s not in known]
        if bad:
            raise click.BadParameter(f"unknown stage(s) {', '.join(bad)}: choose from {', '.join(sorted(known))}",
                                     param_hint="--stages")
        cfg.stages = chosen
    click.echo(f"results -> {run_benchmark(cfg, echo=click.echo)}")


@main.command()
@click.option("--out", default=Path("demo-out"), show_default=True, type=click.Path(path_type=Path))
@click.option("--train-tokens", default=98_304, show_default=True, help="Harvested training tokens.")
@click.option("--eval-tokens", default=8192, show_default=True)
@click.option("--steps", default=600, show_default=True, help="Training steps of 1024 tokens per SAE.")
@click.option("--layers", default="4,8", show_default=True, callback=_int_list)
@click.option("--archs", default="standard,topk", show_default=True, help="Comma-separated; 'all' = every arch/preset.")
@click.option("--d-sae", default=4096, show_default=True)
@click.option("--eval-batch-rows", default=4, show_default=True, help="Rows per evaluation forward (memory ~ rows x SAEs).")
@click.option("--device", default="auto", show_default=True)
@_one_line_errors
def demo(out, train_tokens, eval_tokens, steps, layers, archs, d_sae, eval_batch_rows, device):
    """Harvest -> train -> evaluate on the embedded Gemma 3 270M and Wikipedia text, offline."""
    from .demo import DemoConfig, run_demo
    from .train.registry import expand_names

    run_demo(DemoConfig(out=out, train_tokens=train_tokens, eval_tokens=eval_tokens, steps=steps, layers=layers,
                        archs=expand_names([a for a in archs.split(",") if a]), d_sae=d_sae,
                        eval_batch_rows=eval_batch_rows, device=device), echo=click.echo)


@main.command()
@click.option("--sae", "saes", required=True, multiple=True, type=click.Path(path_type=Path),
              help="Saved SAE folder (repeatable).")
@click.option("--benchmark", default="wiki", show_default=True, type=click.Choice(["wiki", "wmdp"]),
              help="wiki: embedded, offline; wmdp: wmdp-bio vs 4 MMLU subjects (SAEBench).")
@click.option("--questions-dir", type=click.Path(path_type=Path),
              help="Local wmdp-bio.jsonl / <mmlu subject>.jsonl files (question, choices, answer).")
@click.option("--full-grid", is_flag=True, help="SAEBench's whole sweep (16 settings) instead of the 8-setting default.")
@click.option("--max-retain-questions", default=300, show_default=True)
@click.option("--no-control", is_flag=True, help="Skip the random-latent control.")
@click.option("--batch-rows", default=32, show_default=True)
@click.option("--model", default=None, help="Default: the model the SAE was trained on.")
@click.option("--out", type=click.Path(path_type=Path), help="Result JSON (one SAE) or directory (several).")
@_with(_model_opts)
@_one_line_errors
def unlearn(saes, benchmark, questions_dir, full_grid, max_retain_questions, no_control, batch_rows, model, out,
            device, dtype):
    """SAEBench unlearning: clamp forget-specific latents, score forgotten vs retained knowledge."""
    from .evaluate.core import sae_model_id
    from .evaluate.unlearning import UnlearnConfig, run_unlearning
    from .harvest.model import load_model

    lm = load_model(model or sae_model_id(saes[0]), device, dtype)
    for sae in saes:
        result = run_unlearning(UnlearnConfig(sae=sae, benchmark=benchmark, questions_dir=questions_dir,
                                              full_grid=full_grid, max_retain_questions=max_retain_questions,
                                              random_control=not no_control, batch_rows=batch_rows,
                                              model=lm.model_id, device=device, dtype=dtype), lm=lm)
        target = sae / "unlearning_eval.json" if out is None else out if len(saes) == 1 else out / f"{sae.name}_unlearning.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result, indent=2))
        m = result["eval_result_metrics"]["unlearning"]
        click.echo(f"{sae}: unlearning_score {m['unlearning_score']:.3f} (random-latent control "
                   f"{m['random_latent_control_score'] if m['random_latent_control_score'] is not None else 'skipped'}) "
                   f"-> {target}")


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for report.md/.html and PNGs.")
@click.option("--matched-l0", type=click.FloatRange(min=0, min_open=True),
              help="Also tabulate each arch's metrics at this L0 (log-L0 interpolation of a sweep).")
@_one_line_errors
def report(paths, out, matched_l0):
    """One Markdown + HTML page with plots from run directories, SAE folders or result JSONs."""
    from .evaluate.report import write_report

    click.echo(f"wrote {write_report(list(paths), out, matched_l0)} and report.html")


from .store.cli import store as _store_commands  # noqa: E402  (ls / info / verify)

main.add_command(_store_commands)

if __name__ == "__main__":
    main()
