"""The ``saestrata`` command line: harvest -> train -> evaluate, plus the offline demo.

Every error the user can fix is reported as one line (``click.ClickException``),
never a traceback.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import replace
from functools import wraps
from pathlib import Path

import click

from .allocator import tune_allocator
from .harvest.model import EMBEDDED_MODEL
from .harvest.text import EMBEDDED_DATASET
from .store.cli import StorePath, storage_options_option

# Every error a user can cause is one of these (the project's errors subclass ValueError;
# OSError covers unreadable/unwritable paths and a full disk).
_USER_ERRORS = (ValueError, OSError, FloatingPointError)
_COMMAND_HINT = {  # what Ctrl-C left behind, per command
    "harvest": "the store keeps its committed shards and counts no other; rerun the same command to resume it",
    "train": "SAEs without cfg.json were not saved and count as untrained; rerun with --resume to continue from "
             "the last checkpoint (or without it to start again)",
    "evaluate": "no result JSON was written or changed; rerun the command",
    "unlearn": "results printed above are saved, the others were not written; rerun for those",
    "probe": "no result JSON was written or changed; rerun the command",
    "report": "report.md/report.html were not replaced; rerun the command",
    "inspect": "the dashboard folder may be incomplete (index.json is written last); rerun the command",
    "demo": "rerun the same command: a finished store is reused, a partial one resumed",
}


class Interrupted(click.ClickException):
    """Ctrl-C: one line saying what was kept, exit status 130 (128 + SIGINT) as shells expect."""

    exit_code = 130


def _one_line(err: BaseException) -> str:
    """An exception's message on one line (whitespace collapsed), or its type name."""
    return " ".join(str(err).split()) or type(err).__name__


def _end_progress_bars() -> None:
    """Close every open tqdm bar, so the ``Error:`` line starts a line of its own (a bar leaves none)."""
    from tqdm.std import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _one_line_errors(fn):
    """Turn the project's user-facing errors (ValueError subclasses, OSError) and Ctrl-C into one-line CLI errors."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        """``fn``, with a user error re-raised as ``click.ClickException`` (its message on one line)."""
        try:
            return fn(*args, **kwargs)
        except _USER_ERRORS as err:
            _end_progress_bars()
            raise click.ClickException(_one_line(err)) from err
        except KeyboardInterrupt as err:
            _end_progress_bars()
            raise Interrupted(f"interrupted (Ctrl-C) during {fn.__name__}: {_COMMAND_HINT[fn.__name__]}") from err

    return wrapper


def _float_list(value: str | None, option: str) -> list[float] | None:
    """``"32,64"`` -> ``[32.0, 64.0]``; raises click.BadParameter naming ``option`` for a non-positive or bad item."""
    if not value:
        return None
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: use positive numbers, e.g. 32,64", param_hint=f"'{option}'") from None
    if not out or any(not (0 < v < math.inf) for v in out):  # NaN fails both comparisons
        raise click.BadParameter(f"{value!r}: every target must be a finite number > 0", param_hint=f"'{option}'")
    return out


class FiniteFloat(click.FloatRange):
    """``click.FloatRange`` that also refuses NaN and +-inf (they pass every range comparison)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        """The float, or a click usage error naming the option and the allowed range."""
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{rv} is not a finite number in the range {self._describe_range()}", param, ctx)
        return rv


class Device(click.ParamType):
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, refused at once when this machine lacks it."""

    name = "device"

    def convert(self, value, param, ctx):
        """``value`` unchanged, or a usage error saying which devices exist here."""
        if value == "auto":
            return value
        import torch

        try:
            device = torch.device(value)
        except (RuntimeError, TypeError, ValueError):
            self.fail(f"{value!r} is not a device: use auto, cpu, cuda or cuda:N", param, ctx)
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                self.fail(f"{value!r}: this machine has no CUDA device: use auto or cpu", param, ctx)
            if device.index is not None and device.index >= count:
                self.fail(f"{value!r}: this machine has CUDA devices 0..{count - 1}", param, ctx)
        elif device.type == "mps" and not torch.backends.mps.is_available():
            self.fail(f"{value!r}: MPS is not available here: use auto or cpu", param, ctx)
        elif device.type not in ("cpu", "cuda", "mps"):
            self.fail(f"{value!r} is not supported: use auto, cpu, cuda or cuda:N", param, ctx)
        return value


POS_INT, NONNEG_INT, DEVICE = click.IntRange(min=1), click.IntRange(min=0), Device()


def _unique_ints(value: str, example: str, empty: str, too_small, twice, minimum: int) -> list[int]:
    """Comma-separated integers, each ``>= minimum`` and given once; ``click.BadParameter`` with the
    caller's one-line messages otherwise (``too_small``/``twice``: item -> message)."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise click.BadParameter(empty)
    try:
        numbers = [int(v) for v in items]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. {example}") from None
    for n in numbers:
        if n < minimum:
            raise click.BadParameter(too_small(n))
        if numbers.count(n) > 1:
            raise click.BadParameter(twice(n))
    return numbers


def _int_list(_ctx, _param, value: str | None) -> list[int] | None:
    """``--layers 4,8`` -> ``[4, 8]``; refuses an empty list, non-integers, negatives and repeats."""
    if value is None:
        return None
    return _unique_ints(value, "4,8", "no layers given: pass block indices, e.g. 4,8",
                        lambda n: f"layer {n} is negative: blocks are numbered from 0, e.g. 4,8",
                        lambda n: f"layer {n} is given twice: list each block once, e.g. 4,8", minimum=0)


def _model_source(_ctx, _param, value: str | None) -> str | None:
    """``--model``: a local folder must be a complete model folder (harvest/model.py ``check_model_source``)."""
    from .harvest.model import ModelError, check_model_source

    if value is not None:
        try:
            check_model_source(value)
        except ModelError as err:
            raise click.BadParameter(str(err)) from None
    return value


def _dataset_source(_ctx, _param, value: str) -> str:
    """``--dataset``: a local file must exist, be non-empty and have a supported suffix."""
    from .harvest.text import DatasetError, check_dataset_source

    try:
        check_dataset_source(value)
    except DatasetError as err:
        raise click.BadParameter(str(err)) from None
    return value


def _non_empty(_ctx, param, value: str) -> str:
    """A text option that must not be empty (e.g. ``--text-field``)."""
    if not value.strip():
        raise click.BadParameter("must not be empty: name the column holding the text (default 'text')")
    return value.strip()


def _outside_stores(_ctx, _param, value: Path | None) -> Path | None:
    """An output folder that is not, and does not lie inside, an activation store."""
    from .checks import InputError, check_output_dir

    if value is not None:
        try:
            check_output_dir(value, "folder")
        except InputError as err:
            raise click.BadParameter(str(err)) from None
    return value


def _store_out(_ctx, _param, value):
    """``harvest --out``: new, empty, or an existing store (resumed/reused/extended); never inside another store.

    Object-store URLs are checked in the command, once ``--storage-options`` is known.
    """
    from .store.format import enclosing_store
    from .store.location import is_url
    from .store.writer import is_empty_store_dir

    if is_url(value):
        return value
    store = enclosing_store(value)
    if store is not None and store != value.expanduser().resolve():
        raise click.BadParameter(f"{value} lies inside the activation store {store}: choose a folder outside it")
    if store is None and not is_empty_store_dir(value):
        raise click.BadParameter(f"{value} already exists and is not an activation store: choose a new --out "
                                 "or delete it")
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="saestrata")
def main():
    """Cached-activation pipeline for sparse-autoencoder research on Gemma models.

    \b
    saestrata harvest   write residual-stream activations into a Zarr v3 store
    saestrata train     train one or many SAEs from a store in one pass
    saestrata evaluate  splice an SAE into the LM and score it (CE/KL recovery, FVU, L0)
    saestrata probe     SAEBench sparse probing: top-k latents vs the raw residual on labelled texts
    saestrata inspect   feature dashboards + HTML browser from a store (no LM forward pass)
    saestrata store     ls / info / verify activation stores
    saestrata demo      all three on the embedded Gemma 3 270M + Wikipedia, offline

    Freed large buffers are kept for reuse (glibc malloc settings: ~1.3x faster training
    on CPU); SAESTRATA_MALLOC=system keeps the system defaults.
    """
    tune_allocator()


# Where ``auto`` dtypes choose bf16 (saestrata.device.native_bf16); emulated bf16 ran ~5x slower than fp32.
_NATIVE_BF16 = "native bf16 matmuls (CUDA Ampere+, AVX-512 BF16, AMX)"
_device_opt = click.option("--device", default="auto", show_default=True, type=DEVICE,
                           help="auto = CUDA when available, else CPU; or cpu, cuda, cuda:N.")
_model_opts = [
    _device_opt,
    click.option("--dtype", default="auto", show_default=True,
                 type=click.Choice(["auto", "bfloat16", "float32", "float16"]),
                 help=f"Dtype the model computes in. auto = bfloat16 where the device has {_NATIVE_BF16}, else "
                      "float32 (emulated bf16 ran ~5x slower). Gemma residuals overflow float16."),
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
@click.option("--model", default=EMBEDDED_MODEL, show_default=True, callback=_model_source,
              help="gemma-3-270m (embedded), a hub name or a local folder.")
@click.option("--layers", required=True, callback=_int_list, help="Blocks whose resid_post to store, e.g. 4,8.")
@click.option("--dataset", default=EMBEDDED_DATASET, show_default=True, callback=_dataset_source,
              help="wiki-vital (embedded), a datasets name, a local folder, a .txt/.jsonl/.parquet file or a "
                   "quoted glob of such files ('data/*.jsonl', read in sorted order).")
@click.option("--split", default="train", show_default=True, type=click.Choice(["train", "eval"]))
@click.option("--tokens", default=98_304, show_default=True, type=POS_INT,
              help="Tokens to harvest (rounded up to whole rows; whole shards of 8,192 keep the store extensible).")
@click.option("--context-length", default=128, show_default=True, type=click.IntRange(min=2),
              help="Tokens per row, BOS included (at most the model's max_position_embeddings).")
@click.option("--batch-rows", default=16, show_default=True, type=POS_INT, help="Rows per forward pass.")
@click.option("--text-field", default="text", show_default=True, callback=_non_empty)
@click.option("--seed", default=0, show_default=True, type=NONNEG_INT, help="Text order seed (embedded corpus).")
@click.option("--rows-per-chunk", default=8, show_default=True, type=POS_INT,
              help="Context rows per inner chunk (read unit).")
@click.option("--chunks-per-shard", default=8, show_default=True, type=POS_INT,
              help="Inner chunks per shard (write/commit unit).")
@click.option("--out", required=True, type=StorePath(file_okay=False), callback=_store_out,
              help="Store directory or object-store URL (s3://bucket/prefix): new, or an existing store of the same "
                   "harvest to resume, reuse or extend.")
@storage_options_option
@click.option("--workers", default=0, show_default=True, type=NONNEG_INT,
              help="Shard-writer processes on a dask LocalCluster (0 = harvest in this process).")
@click.option("--scheduler", metavar="ADDRESS",
              help="Use an existing dask scheduler (tcp://host:8786) instead; its workers must see --out and the model.")
@click.option("--compute-dtype", default="auto", show_default=True, type=click.Choice(["auto", "bfloat16", "float32"]),
              help="Dtype the model computes in (activations are rounded to --dtype to be stored). auto = the "
                   f"existing store's when resuming or extending one, else --dtype where the device has {_NATIVE_BF16}, "
                   "else float32 (emulated bf16 ran ~5x slower).")
@_device_opt
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(["bfloat16", "float32", "float16"]),
              help="Store dtype (Gemma residuals overflow float16).")
@_one_line_errors
def harvest(model, layers, dataset, split, tokens, context_length, batch_rows, text_field, seed, rows_per_chunk,
            chunks_per_shard, out, storage_options, workers, scheduler, compute_dtype, device, dtype):
    """Write residual-stream activations (blocks.L.hook_resid_post) into a Zarr v3 store.

    Rerunning on an existing store of the same harvest resumes it from its first
    uncommitted shard, reuses it when complete, or extends it to more --tokens; a
    store of a different harvest is refused, naming the differing fields.
    With --workers N (or --scheduler) shards are forwarded and written by dask
    workers, each shard by exactly one, and committed here; the store is the same.
    """
    from .harvest.harvester import HarvestConfig, harvest as run

    t0 = time.perf_counter()
    _check_remote_out(out, storage_options)
    path = run(HarvestConfig(layers=layers, tokens=tokens, out=out, model=model, dataset=dataset, split=split,
                             context_length=context_length, batch_rows=batch_rows, seed=seed, text_field=text_field,
                             device=device, dtype=dtype, compute_dtype=compute_dtype, rows_per_chunk=rows_per_chunk,
                             chunks_per_shard=chunks_per_shard, workers=workers, scheduler=scheduler,
                             storage_options=storage_options or None))
    click.echo(f"store {path} ready in {time.perf_counter() - t0:.0f} s")


def _check_remote_out(out, storage_options: dict) -> None:
    """``harvest --out s3://...``: the bucket must be reachable, and the prefix empty or a store (before any model loads).

    Raises:
        StoreError: unreachable server / missing bucket / credentials (one line each), or objects
            under the prefix that are not an activation store.
    """
    from .store.format import StoreError
    from .store.location import Location, is_url
    from .store.writer import is_empty_store_dir

    if not is_url(out):
        return
    loc = Location(out, storage_options)
    if not is_empty_store_dir(loc) and not loc.is_file("zarr.json"):
        raise StoreError(f"--out {out} already holds objects and is not an activation store: choose a new --out "
                         "or delete them")


def _check_specs(specs, d_sae: int) -> None:
    """Every spec's hyperparameters against their arch's declared types and ranges (train/hparams.py).

    Raises:
        click.BadParameter: a ``--set`` value (or ``lr``) is refused, naming ``--set``, the arch and the range.
        ArchError: a preset value or an arch default does not fit this ``d_sae`` (e.g. topk's k=32 > 16).
    """
    from .train.arch_info import ArchError
    from .train.hparams import check_hparams
    from .train.registry import resolve

    for spec in specs:
        given = {**spec.hparams, **({"lr": spec.lr} if spec.lr is not None else {})}
        try:
            check_hparams(spec.arch, given, d_sae, defaults=False)
        except ArchError as err:
            raise click.BadParameter(str(err), param_hint="'--set'") from None
        check_hparams(spec.arch, {**resolve(spec.arch)[1], **given}, d_sae)


@main.command()
@click.option("--store", type=StorePath(exists=True, file_okay=False),
              help="Store written by 'saestrata harvest': a folder (memory-mapped) or an object-store URL "
                   "(s3://bucket/prefix: whole chunks fetched ahead in parallel).")
@storage_options_option
@click.option("--layer", type=NONNEG_INT, help="Block whose activations to train on.")
@click.option("--arch", "archs", default="topk", show_default=True,
              help="Comma-separated arch or preset names; 'all' = every arch/preset.")
@click.option("--set", "sets", multiple=True, metavar="NAME=V1,V2",
              help="Hyperparameter (sweep): --set k=16,32; lists as 1:2:4. Types and ranges per arch are checked. "
                   "Two are the trainer's: lr, and l0_start (with --target-l0: the controller's first multiplier on "
                   "the arch's sparsity coefficients, default 1).")
@click.option("--d-sae", type=POS_INT, help="Latents per SAE (default: --expansion x d_model).")
@click.option("--expansion", default=8, show_default=True, type=POS_INT)
@click.option("--tokens", default=600 * 1024, show_default=True, type=POS_INT, help="Training tokens per SAE.")
@click.option("--batch-size", default=1024, show_default=True, type=POS_INT)
@click.option("--lr", type=FiniteFloat(min=0, min_open=True),
              help="Learning rate of every SAE of the run (a --set lr= sweep wins over it). Default: a preset's "
                   "own lr (the seed papers' 3e-4), else 2e-4 / sqrt(d_sae / 16384).")
@click.option("--seed", default=0, show_default=True, type=NONNEG_INT)
@click.option("--device", default="auto", show_default=True, type=DEVICE)
@click.option("--autocast/--no-autocast", default=None,
              help=f"bf16 autocast with fp32 master weights, or fp32 throughout. Default: autocast where the device has "
                   f"{_NATIVE_BF16}, else fp32; a --resume keeps the run's own.")
@click.option("--allow-partial", is_flag=True, help="Train on the committed part of a half-written store.")
@click.option("--list-archs", is_flag=True, help="List every arch and preset with its source, then exit.")
@click.option("--checkpoint-every", default=100, show_default=True, type=NONNEG_INT,
              help="Steps between checkpoints in --out (0 = off); removed when the run finishes.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint (same settings).")
@click.option("--overwrite", is_flag=True,
              help="Replace finished SAEs of the same names (and an interrupted run) in --out.")
@click.option("--sae-threads", default=1, show_default=True, type=NONNEG_INT,
              help="SAEs stepped side by side on CPU, one intra-op thread each (0 = one per core); "
                   "faster on a busy shared machine, slower on an idle one.")
@click.option("--target-l0", "target_l0", metavar="L1,L2",
              help="Calibrate sparsity to these mean active latents per token: k = L for the TopK family, "
                   "a controller on the sparsity coefficient for penalty archs, jumprelu's own (L0/L-1)^2 loss "
                   "with thresholds started at the target rate (one SAE per target).")
@click.option("--workers", default=0, show_default=True, type=NONNEG_INT,
              help="Spread the SAEs over N local dask worker processes, one SAE per task (0 = one pass here).")
@click.option("--scheduler", metavar="ADDRESS",
              help="Use an existing dask scheduler (tcp://host:8786) instead; its workers must see --store and --out.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory: one sub-folder per SAE.")
@_one_line_errors
def train(store, storage_options, layer, archs, sets, d_sae, expansion, tokens, batch_size, lr, seed, device, autocast,
          allow_partial, list_archs, checkpoint_every, resume, overwrite, sae_threads, target_l0, workers, scheduler,
          out):
    """Train SAEs from a store in one pass: every batch is read once and fed to every SAE.

    With --resume, an interrupted run continues from its last checkpoint and ends with
    the same SAEs and logs as an uninterrupted run; other settings are refused. A run
    directory holding finished SAEs of the same names is refused unless --overwrite.
    With --workers N / --scheduler each SAE trains as its own task on a dask worker (the
    same SAE, bit for bit, at the same torch thread count); --resume then skips the SAEs
    already saved and resumes the others' task checkpoints.
    """
    from .checks import check_run_dir
    from .store import ActivationStore
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
    # Everything the run will refuse is checked before a file is touched (store, layer, hyperparameters, --out).
    acts = ActivationStore(store, allow_partial=allow_partial, storage_options=storage_options or None)
    acts.stats(acts.hook_for_layer(layer))
    _check_specs(specs, d_sae or expansion * acts.d_model)
    for folder in check_run_dir(out, [s.name for s in specs], resume, overwrite):
        shutil.rmtree(folder)  # --overwrite: the old SAE and its results go; other folders stay
    cfg = TrainConfig(store=store, layer=layer, out=out, specs=specs, d_sae=d_sae, expansion=expansion,
                      batch_size=batch_size, tokens=tokens, lr=lr, seed=seed, device=device,
                      autocast=autocast, allow_partial=allow_partial,
                      checkpoint_every=checkpoint_every, resume=resume, sae_threads=sae_threads,
                      storage_options=storage_options or None)
    if workers or scheduler:
        from .train.distributed import DistributedTrainingError, train_distributed

        todo = [s for s in specs if not (resume and (out / s.name / "cfg.json").is_file())]
        try:
            folders = train_distributed(replace(cfg, specs=todo, resume=False), workers, scheduler) if todo else {}
        except DistributedTrainingError as err:
            raise click.ClickException(str(err)) from None
    else:
        folders = run(cfg)
    for name, folder in folders.items():
        click.echo(f"saved {name} -> {folder}")


def _model_of(saes: list[Path], cfgs: list[dict], model: str | None) -> str:
    """``--model``, else the model recorded in the first SAE's cfg.json (UsageError if it records none)."""
    if model is not None:
        return model
    ours = cfgs[0].get("saestrata") if isinstance(cfgs[0].get("saestrata"), dict) else {}
    recorded = ours.get("model_id") or cfgs[0].get("model_name")
    if not recorded:
        raise click.UsageError(f"{saes[0]} records no model in cfg.json: pass --model")
    from .harvest.model import ModelError, check_model_source

    try:
        check_model_source(recorded)
    except ModelError as err:  # e.g. the folder it was trained from was moved or deleted
        raise click.UsageError(f"{saes[0]} was trained on {recorded}, which cannot be loaded now ({err}): "
                               "pass --model") from None
    return recorded


@main.command()
@click.option("--sae", "saes", required=True, multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path), help="Saved SAE folder (repeatable).")
@click.option("--dataset", default=EMBEDDED_DATASET, show_default=True, callback=_dataset_source)
@click.option("--split", default="eval", show_default=True, type=click.Choice(["train", "eval"]))
@click.option("--tokens", default=8192, show_default=True, type=POS_INT)
@click.option("--batch-rows", default=4, show_default=True, type=POS_INT)
@click.option("--model", default=None, callback=_model_source, help="Default: the model the SAE was trained on.")
@click.option("--allow-other-model", is_flag=True,
              help="Evaluate even when the SAE was trained on activations of other model weights.")
@click.option("--out", type=click.Path(path_type=Path), help="Result JSON (one SAE) or directory (several).")
@_with(_model_opts)
@_one_line_errors
def evaluate(saes, dataset, split, tokens, batch_rows, model, allow_other_model, out, device, dtype):
    """Splice SAEs into the LM and report CE/KL recovery, reconstruction and sparsity (SAEBench layout)."""
    from .atomic import write_json_atomic
    from .checks import check_same_model, check_sae_folder, result_targets
    from .evaluate.core import EvalConfig, evaluate_saes
    from .harvest.model import load_model

    cfgs = [check_sae_folder(sae) for sae in saes]
    targets = result_targets(list(saes), out, "core_eval.json", "core")
    lm = load_model(_model_of(list(saes), cfgs, model), device, dtype)
    for sae, cfg in zip(saes, cfgs):
        check_same_model(sae, cfg, lm.model_id, lm.weights_hash, allow_other_model)
    results = evaluate_saes(list(saes), EvalConfig(dataset=dataset, split=split, tokens=tokens, batch_rows=batch_rows,
                                                   model=model, device=device, dtype=lm.dtype), lm=lm)
    for sae, result, target in zip(saes, results, targets):
        write_json_atomic(target, result)
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
@click.option("--stages", help="Comma-separated subset of: store,lr,matched,published,evaluate,seeds,unlearn,probe,speed,report (speed: time every variant's training step on an idle machine).")
@click.option("--quick", is_flag=True, help="A short version: 5 variants, L0 24/40, 256k tokens each, no unlearning or probing (36 min on 2 idle CPU cores); its tables say they are not the benchmark's numbers.")
@click.option("--device", default="auto", show_default=True, type=DEVICE)
@click.option("--lm-dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16"]),
              help="Dtype the LM computes in for harvest, evaluation and unlearning (the store is bf16 either way); "
                   "keep one value for a whole benchmark.")
@click.option("--autocast/--no-autocast", default=False, show_default=True,
              help="Train the SAEs under bf16 autocast (fast only on GPUs / CPUs with native bf16).")
@click.option("--readme", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Also write the matched-L0 and probing tables into this README at the report stage, between "
                   "its '<!-- benchmark:matched -->' ... '<!-- /benchmark:matched -->' (and 'probing') markers.")
@_one_line_errors
def benchmark(out, work, layer, variants, targets, tokens_per_sae, d_sae, seeds, eval_tokens, no_unlearn, stages,
              quick, device, lm_dtype, autocast, readme):
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
    cfg.device, cfg.lm_dtype, cfg.autocast, cfg.readme = device, lm_dtype, autocast, readme
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
@click.option("--out", default=Path("demo-out"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path), callback=_outside_stores)
@click.option("--train-tokens", default=98_304, show_default=True, type=POS_INT, help="Harvested training tokens.")
@click.option("--eval-tokens", default=8192, show_default=True, type=POS_INT)
@click.option("--steps", default=600, show_default=True, type=POS_INT, help="Training steps of 1024 tokens per SAE.")
@click.option("--layers", default="4,8", show_default=True, callback=_int_list)
@click.option("--archs", default="standard,topk", show_default=True, help="Comma-separated; 'all' = every arch/preset.")
@click.option("--d-sae", default=4096, show_default=True, type=POS_INT)
@click.option("--eval-batch-rows", default=4, show_default=True, type=POS_INT,
              help="Rows per evaluation forward (memory ~ rows x SAEs).")
@click.option("--device", default="auto", show_default=True, type=DEVICE)
@_one_line_errors
def demo(out, train_tokens, eval_tokens, steps, layers, archs, d_sae, eval_batch_rows, device):
    """Harvest -> train -> evaluate on the embedded Gemma 3 270M and Wikipedia text, offline."""
    from .demo import DemoConfig, run_demo
    from .train.registry import expand_names
    from .train.sweep import expand_specs

    names = expand_names([a for a in archs.split(",") if a])
    _check_specs(expand_specs(names, []), d_sae)  # e.g. topk's k=32 > --d-sae 16: refused before the harvest
    run_demo(DemoConfig(out=out, train_tokens=train_tokens, eval_tokens=eval_tokens, steps=steps, layers=layers,
                        archs=names, d_sae=d_sae, eval_batch_rows=eval_batch_rows, device=device), echo=click.echo)


def _questions_dir(ctx, _param, value: Path | None) -> Path | None:
    """``--questions-dir`` (wmdp only) must hold every question file, so nothing is fetched from the hub."""
    from .evaluate.unlearning import MMLU_RETAIN, WMDP_FORGET

    if value is None:
        return None
    if ctx.params.get("benchmark", "wiki") != "wmdp":
        raise click.BadParameter("is read only with --benchmark wmdp (put --benchmark before it)")
    missing = [name for name in (WMDP_FORGET, *MMLU_RETAIN)
               if not any((value / f"{name}{sfx}").is_file() for sfx in (".jsonl", ".json", ".parquet"))]
    if missing:
        raise click.BadParameter(f"{value} lacks {', '.join(f'{m}.jsonl' for m in missing)}: add them, or omit "
                                 "--questions-dir to load cais/wmdp and cais/mmlu with datasets")
    return value


@main.command()
@click.option("--sae", "saes", required=True, multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path), help="Saved SAE folder (repeatable).")
@click.option("--benchmark", default="wiki", show_default=True, type=click.Choice(["wiki", "wmdp"]), is_eager=True,
              help="wiki: embedded, offline; wmdp: wmdp-bio vs 4 MMLU subjects (SAEBench).")
@click.option("--questions-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              callback=_questions_dir,
              help="Local wmdp-bio.jsonl / <mmlu subject>.jsonl files (question, choices, answer).")
@click.option("--full-grid", is_flag=True, help="SAEBench's whole sweep (16 settings) instead of the 8-setting default.")
@click.option("--max-retain-questions", default=300, show_default=True, type=POS_INT,
              help="A seeded sample of at most this many retain questions.")
@click.option("--all-retain-questions", is_flag=True,
              help="Every retain question (the benchmark's setting: the 0.99 retain bar needs several hundred "
                   "known questions to tolerate more than one wrong answer); overrides --max-retain-questions.")
@click.option("--no-prefix-cache", is_flag=True,
              help="Rerun the whole model for each setting instead of keeping the questions' residuals after the "
                   "SAE's block (up to 2 GiB of CPU memory) and rerunning only the later blocks (same scores up to "
                   "float rounding).")
@click.option("--no-control", is_flag=True, help="Skip the random-latent control.")
@click.option("--batch-rows", default=32, show_default=True, type=POS_INT)
@click.option("--model", default=None, callback=_model_source, help="Default: the model the SAE was trained on.")
@click.option("--allow-other-model", is_flag=True,
              help="Run even when the SAE was trained on activations of other model weights.")
@click.option("--out", type=click.Path(path_type=Path), help="Result JSON (one SAE) or directory (several).")
@_with(_model_opts)
@_one_line_errors
def unlearn(saes, benchmark, questions_dir, full_grid, max_retain_questions, all_retain_questions, no_prefix_cache,
            no_control, batch_rows, model, allow_other_model, out, device, dtype):
    """SAEBench unlearning: clamp forget-specific latents, score forgotten vs retained knowledge."""
    from .atomic import write_json_atomic
    from .checks import check_same_model, check_sae_folder, result_targets
    from .evaluate.unlearning import UnlearnConfig, run_unlearning
    from .harvest.model import load_model

    cfgs = [check_sae_folder(sae) for sae in saes]
    targets = result_targets(list(saes), out, "unlearning_eval.json", "unlearning")
    lm = load_model(_model_of(list(saes), cfgs, model), device, dtype)
    for sae, cfg in zip(saes, cfgs):
        check_same_model(sae, cfg, lm.model_id, lm.weights_hash, allow_other_model)
    for sae, target in zip(saes, targets):
        result = run_unlearning(UnlearnConfig(sae=sae, benchmark=benchmark, questions_dir=questions_dir,
                                              full_grid=full_grid, max_retain_questions=None if all_retain_questions else max_retain_questions,
                                              prefix_cache_gib=0.0 if no_prefix_cache else UnlearnConfig.prefix_cache_gib,
                                              random_control=not no_control, batch_rows=batch_rows,
                                              model=lm.model_id, device=device, dtype=lm.dtype), lm=lm)
        write_json_atomic(target, result)
        m = result["eval_result_metrics"]["unlearning"]
        click.echo(f"{sae}: unlearning_score {m['unlearning_score']:.3f} (random-latent control "
                   f"{m['random_latent_control_score'] if m['random_latent_control_score'] is not None else 'skipped'}) "
                   f"-> {target}")


def _k_list(_ctx, _param, value: str) -> tuple[int, ...]:
    """``--k 1,2,5`` -> ``(1, 2, 5)``: positive integers, each once, in the given order."""
    return tuple(_unique_ints(value, "1,2,5", "no k given: pass latent counts, e.g. 1,2,5,10,20,50",
                              lambda k: f"k={k}: every k must be >= 1, e.g. 1,2,5",
                              lambda k: f"k={k} is given twice: list each k once, e.g. 1,2,5", minimum=1))


def _labels_file(_ctx, _param, value: Path | None) -> Path | None:
    """``--labels``: a readable JSONL of {"text", "label"} lines with two labels in both splits, checked now."""
    from .evaluate.sparse_probing import load_labelled_jsonl
    from .harvest.text import DatasetError

    if value is not None:
        try:
            load_labelled_jsonl(value)
        except DatasetError as err:
            raise click.BadParameter(_one_line(err)) from None
    return value


@main.command()
@click.option("--sae", "saes", required=True, multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path), help="Saved SAE folder (repeatable).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), callback=_labels_file,
              help='Your own labelled texts: JSONL of {"text": ..., "label": ...[, "split": "train"|"eval"]} '
                   "(default: the embedded corpus's 12 article topics).")
@click.option("--k", "k_values", default="1,2,5,10,20,50", show_default=True, callback=_k_list,
              help="Numbers of latents (and residual channels) the sparse probes get.")
@click.option("--train-per-class", default=100, show_default=True, type=POS_INT,
              help="At most this many train-split texts per class (SAEBench: 2000).")
@click.option("--test-per-class", default=50, show_default=True, type=POS_INT,
              help="At most this many eval-split texts per class (SAEBench: 500).")
@click.option("--context-length", default=128, show_default=True, type=click.IntRange(min=2),
              help="Tokens per text, BOS included; longer texts are truncated (SAEBench: 128).")
@click.option("--batch-rows", default=8, show_default=True, type=POS_INT, help="Texts per forward pass.")
@click.option("--seed", default=42, show_default=True, type=NONNEG_INT, help="Sampling seed (SAEBench: 42).")
@click.option("--model", default=None, callback=_model_source, help="Default: the model the SAE was trained on.")
@click.option("--allow-other-model", is_flag=True,
              help="Run even when the SAE was trained on activations of other model weights.")
@click.option("--out", type=click.Path(path_type=Path), help="Result JSON (one SAE) or directory (several).")
@_with(_model_opts)
@_one_line_errors
def probe(saes, labels, k_values, train_per_class, test_per_class, context_length, batch_rows, seed, model,
          allow_other_model, out, device, dtype):
    """SAEBench sparse probing: per class, a logistic regression on the top-k latents vs on the raw residual."""
    from .atomic import write_json_atomic
    from .checks import check_same_model, check_sae_folder, result_targets
    from .harvest.model import load_model

    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise click.ClickException("scikit-learn is not installed: pip install scikit-learn") from None
    from .evaluate.sparse_probing import ProbeConfig, run_sparse_probing

    cfgs = [check_sae_folder(sae) for sae in saes]
    targets = result_targets(list(saes), out, "sparse_probing_eval.json", "sparse_probing")
    lm = load_model(_model_of(list(saes), cfgs, model), device, dtype)
    for sae, cfg in zip(saes, cfgs):
        check_same_model(sae, cfg, lm.model_id, lm.weights_hash, allow_other_model)
    results = run_sparse_probing(ProbeConfig(saes=list(saes), labels=labels, k_values=k_values,
                                             train_per_class=train_per_class, test_per_class=test_per_class,
                                             context_length=context_length, batch_rows=batch_rows, seed=seed,
                                             model=model, device=device, dtype=lm.dtype), lm)
    for sae, result, target in zip(saes, results, targets):
        write_json_atomic(target, result)
        llm, m = result["eval_result_metrics"]["llm"], result["eval_result_metrics"]["sae"]
        tops = " ".join(f"k={k} {m[f'sae_top_{k}_test_accuracy']:.3f}" for k in k_values
                        if f"sae_top_{k}_test_accuracy" in m)
        click.echo(f"{sae}: sae top-k accuracy {tops}; all latents {m['sae_test_accuracy']:.3f}; "
                   f"raw residual {llm['llm_test_accuracy']:.3f} -> {target}")


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), callback=_outside_stores,
              help="Directory for report.md/.html and PNGs.")
@click.option("--matched-l0", type=FiniteFloat(min=0, min_open=True),
              help="Also tabulate each arch's metrics at this L0 (log-L0 interpolation of a sweep).")
@_one_line_errors
def report(paths, out, matched_l0):
    """One Markdown + HTML page with plots from run directories, SAE folders or result JSONs."""
    from .evaluate.report import write_report

    click.echo(f"wrote {write_report(list(paths), out, matched_l0)} and report.html")


@main.command()
@click.option("--sae", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Saved SAE folder.")
@click.option("--store", required=True, type=StorePath(exists=True, file_okay=False),
              help="Store holding the SAE's hook (e.g. the one it was trained on): a folder or an "
                   "object-store URL (s3://bucket/prefix).")
@storage_options_option
@click.option("--tokens", type=POS_INT, help="Tokens to read from the start of the store (default: all).")
@click.option("--top-k", default=20, show_default=True, type=click.IntRange(1, 1000), help="Top examples per latent.")
@click.option("--context", default=16, show_default=True, type=click.IntRange(0, 512),
              help="Tokens shown on each side of an example (inside its row and document).")
@click.option("--intervals", default=5, show_default=True, type=click.IntRange(1, 20),
              help="Activation-quantile intervals per latent.")
@click.option("--per-interval", default=4, show_default=True, type=click.IntRange(1, 100),
              help="Examples shown per quantile interval.")
@click.option("--batch-rows", default=32, show_default=True, type=POS_INT, help="Context rows per encode batch.")
@click.option("--model", default=None, callback=_model_source,
              help="Unembedding + tokenizer source (default: the model the SAE was trained on).")
@click.option("--allow-partial", is_flag=True, help="Read the committed part of a half-written store.")
@click.option("--seed", default=0, show_default=True, type=NONNEG_INT, help="Quantile-sampling seed.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), callback=_outside_stores,
              help="Dashboard folder (new, empty, or an earlier inspect output to replace).")
@click.option("--device", default="auto", show_default=True, type=DEVICE,
              help="Where the streaming encode and the logit effects run (auto: CUDA when present).")
@_one_line_errors
def inspect(sae, store, storage_options, tokens, top_k, context, intervals, per_interval, batch_rows, model, allow_partial, seed, out,
            device):
    """Feature dashboards from the store: top examples, quantile examples, stats, logit effects, structure.

    One streaming encode over the store's activations (no LM forward pass; memory O(d_sae x
    top-k)); writes plain files (safetensors + JSON per block of latents, index.json) and a
    static browser, OUT/index.html, that opens from disk.
    """
    from .checks import check_dashboard_out, check_sae_folder
    from .dashboards.run import InspectConfig, inspect_sae

    cfg = check_sae_folder(sae)
    check_dashboard_out(out)
    from tqdm import tqdm

    with tqdm(desc="inspect", unit="tok", unit_scale=True) as bar:
        def progress(done, total):
            """Advance the bar to ``done`` of ``total`` tokens."""
            bar.total = total
            bar.update(done - bar.n)

        index = inspect_sae(InspectConfig(sae=sae, store=store, out=out, tokens=tokens, top_k=top_k, context=context,
                                          batch_rows=batch_rows, n_intervals=intervals, per_interval=per_interval,
                                          allow_partial=allow_partial, seed=seed,
                                          storage_options=storage_options or None, device=device),
                            model=_model_of([sae], [cfg], model), progress=progress)
    alive = sum(1 for r in index["latents"] if r["fire_count"])
    click.echo(f"{sae}: {index['tokens']} tokens in {index['seconds']:.1f} s ({index['tokens_per_s']:.0f} tok/s), "
               f"{alive}/{index['d_sae']} latents fired -> {out / 'index.html'}")


from .store.cli import store as _store_commands  # noqa: E402  (ls / info / verify)

main.add_command(_store_commands)

if __name__ == "__main__":
    main()
