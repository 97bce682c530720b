"""``saestrata store ls | info | verify``: inspect the activation stores a team shares.

Registered in the top-level CLI with one ``main.add_command(store)`` line. Imports
nothing else of saestrata (click only), like the rest of ``store``.
"""

from __future__ import annotations

import json
from functools import wraps
from pathlib import Path

import click

from .audit import list_stores, store_info, verify_store
from .format import StoreError


def _one_line(fn):
    """Report StoreError / ValueError / OSError as one line and exit 1."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError) as err:
            raise click.ClickException(str(err).splitlines()[0] if str(err) else type(err).__name__) from err

    return wrapper


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@click.group("store")
def store():
    """List, describe and verify activation stores written by 'saestrata harvest'."""


@store.command("ls")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path), default=Path("."))
@_one_line
def ls(directory: Path):
    """One line per store in DIRECTORY: tokens committed/planned, status, model, layers, size."""
    infos = list_stores(directory)
    if not infos:
        click.echo(f"no activation stores in {directory}")
        return
    for info in infos:
        status = "complete" if info["complete"] else f"partial {info['shards_committed']}/{info['n_shards']} shards"
        click.echo(f"{info['path']}  {info['tokens_committed']}/{info['tokens_planned']} tok  {status}  "
                   f"{info['model']}  layers {info['layers']}  {_mib(info['bytes_on_disk'])}")


@store.command("info")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_one_line
def info(path: Path, as_json: bool):
    """Model, layers, tokens, dataset, bytes on disk and per token, activation statistics of one store."""
    data = store_info(path)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"store        {data['path']} (identity {data['identity_key']})")
    click.echo(f"model        {data['model']} (weights {data['weights_hash']}), {data['dtype']}, "
               f"d_model {data['d_model']}")
    click.echo(f"layers       {data['layers']}")
    click.echo(f"dataset      {data['dataset']} split {data['split']} seed {data['order_seed']}, "
               f"context {data['context_length']}")
    click.echo(f"tokens       {data['tokens_committed']} committed of {data['tokens_planned']} planned "
               f"({data['shards_committed']}/{data['n_shards']} shards, "
               f"{'complete' if data['complete'] else 'partial'})")
    click.echo(f"disk         {_mib(data['bytes_on_disk'])}, {data['bytes_per_token']:.0f} bytes per token")
    for hook, stats in data["activation_stats"].items():
        click.echo(f"{hook}  mean_norm {stats['mean_norm']:.4g}  rms_norm {stats['rms_norm']:.4g}  "
                   f"max_abs {stats['max_abs']:.4g}  over {stats['n']} non-BOS tokens")
    if not data["activation_stats"]:
        click.echo("statistics   none yet (the harvest has not finished)")


@store.command("verify")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@_one_line
def verify(path: Path):
    """Read every committed chunk (crc32c), check files, indexes, shapes and NaN/Inf; exit 1 on any problem."""
    report = verify_store(path)
    for line in report.warnings:
        click.echo(f"warning: {line}")
    for line in report.problems:
        click.echo(f"BAD: {line}", err=True)
    if not report.ok:
        raise StoreError(f"{path} failed verification: {report.problems[0]} ({len(report.problems)} problems)")
    click.echo(f"{path}: OK, {report.shards_checked} committed shards verified, "
               f"NaN/Inf {sum(report.nonfinite.values())}")
