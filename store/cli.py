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
from .location import is_url, parse_storage_options

STORAGE_OPTIONS_HELP = (
    "JSON object of fsspec/s3fs options for an s3:// store, e.g. '{\"endpoint_url\": \"http://127.0.0.1:9000\", "
    "\"key\": \"...\", \"secret\": \"...\"}' (they win over the environment). Without it, credentials and "
    "endpoint come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL, "
    "AWS_DEFAULT_REGION and ~/.aws, as for the AWS CLI."
)


class StorePath(click.ParamType):
    """A store given as a local folder (``Path``; checked to exist when ``exists``) or an object-store URL (``str``).

    URLs (``s3://bucket/prefix``) are passed on as strings: whether they exist is checked
    when the store is opened, with the ``--storage-options`` of the command.
    """

    name = "PATH|URL"

    def __init__(self, exists: bool = False, file_okay: bool = True):
        self._local = click.Path(exists=exists, file_okay=file_okay, path_type=Path)

    def convert(self, value, param, ctx):
        """``value`` as a ``str`` URL or a ``Path`` (click's folder checks apply to local paths)."""
        if isinstance(value, str) and is_url(value):
            if not value.startswith(("s3://", "s3a://", "gs://", "gcs://", "az://", "abfs://", "memory://")):
                self.fail(f"{value}: unsupported URL scheme (use s3://bucket/prefix or a local folder)", param, ctx)
            return value.rstrip("/")
        return self._local.convert(value, param, ctx)


def storage_options_option(fn):
    """The ``--storage-options JSON`` click option (parsed to a dict; one-line error on bad JSON)."""

    def parse(_ctx, _param, value):
        """The option's JSON text -> dict (``{}`` when absent); click.BadParameter on bad JSON."""
        try:
            return parse_storage_options(value)
        except StoreError as err:
            raise click.BadParameter(str(err)) from None

    return click.option("--storage-options", "storage_options", metavar="JSON", callback=parse,
                        help=STORAGE_OPTIONS_HELP)(fn)


def _one_line(fn):
    """Report StoreError / ValueError / OSError as one line and exit 1."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        """``fn`` with ValueError / OSError (StoreError is a ValueError) turned into a one-line ClickException."""
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
@click.argument("path", type=StorePath(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@storage_options_option
@_one_line
def info(path, as_json: bool, storage_options: dict):
    """Model, layers, tokens, dataset, bytes on disk and per token, activation statistics of one store.

    PATH is a store folder or an object-store URL (s3://bucket/prefix).
    """
    data = store_info(path, storage_options)
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
@click.argument("path", type=StorePath(exists=True))
@storage_options_option
@_one_line
def verify(path, storage_options: dict):
    """Read every committed chunk (crc32c), check files, indexes, shapes and NaN/Inf; exit 1 on any problem.

    PATH is a store folder or an object-store URL (s3://bucket/prefix).
    """
    report = verify_store(path, storage_options)
    for line in report.warnings:
        click.echo(f"warning: {line}")
    for line in report.problems:
        click.echo(f"BAD: {line}", err=True)
    if not report.ok:
        raise StoreError(f"{path} failed verification: {report.problems[0]} ({len(report.problems)} problems)")
    click.echo(f"{path}: OK, {report.shards_checked} committed shards verified, "
               f"NaN/Inf {sum(report.nonfinite.values())}")
