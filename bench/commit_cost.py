"""Benchmark: per-shard commit cost at two store sizes, commit markers (now) vs the attribute list (before) (issue 12).

A harvest commits every shard. Before commit markers, a commit rewrote the whole
commit record in the group attributes (``committed_shards`` list + ``shard_records``
dict, then a metadata re-consolidation): O(shards) per commit, O(shards^2) per
harvest. Now a commit writes one small marker object ``commits/<shard>.json``.

For each size N (default 200 and 2,000 tiny shards), in one run, both layouts:
- ``markers``: a real :class:`StoreWriter`; shards 0..N-K-1 are committed untimed
  (markers written directly), then the last K commits are timed through
  ``StoreWriter._commit`` (what ``write_shard`` calls after the data is written);
- ``attrs list``: the same store with the old commit code reproduced here (the
  attributes update of the old ``StoreWriter._commit`` plus the re-consolidation the
  old ``write_shard`` did after it), the record pre-filled with N-K shards untimed,
  then the last K commits timed.
Records are what a 2-layer harvest commits (per-hook ``[n, norm_sum, sq_sum, max_abs]``).
Also timed, markers only: whole ``write_shard`` calls (data + commit) for the last K
shards of each size. Each figure is the median per-shard time of the K commits.

``--s3``: the markers arm only, against a real S3-compatible server: moto's standalone
server started as a subprocess on 127.0.0.1 (as bench/s3_reader.py; the tests use the same
server in-process), one bucket per size. A commit is then one PUT of the marker; the
prefilled N-K markers are PUT untimed, then the two sizes' commits alternate (load drift
during the run hits both alike). Also timed per size: one listing of
``commits/`` (``read_committed``, what ``store verify``, a resuming harvest or a reader of a
still half-written store does once per open), which does grow with the shards; readers of a
complete store skip it (``format.committed_for_reading``).

    .venv/bin/python bench/commit_cost.py [--sizes 200,2000] [--last 50]
    .venv/bin/python bench/commit_cost.py --s3 --sizes 50,500 --last 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import zarr

from _common import start_moto

from saestrata.store.format import commit_key, commit_marker, read_committed
from saestrata.store.writer import StoreWriter, _consolidate

HOOKS = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
D_MODEL, SHARD_TOKENS = 4, 4


def _record(shard: int) -> dict:
    """A per-shard record shaped like a 2-layer harvest's (floats with full JSON precision)."""
    rng = np.random.default_rng(shard)
    return {h: [SHARD_TOKENS, *map(float, rng.random(3) * 1e3)] for h in HOOKS}


def _writer(path, n_shards: int) -> StoreWriter:
    return StoreWriter(path, HOOKS, D_MODEL, n_shards * SHARD_TOKENS, shard_tokens=SHARD_TOKENS,
                       chunk_tokens=SHARD_TOKENS, dtype="float32", attrs={"context_length": SHARD_TOKENS})


def _payload() -> tuple[dict, dict]:
    acts = {h: np.ones((SHARD_TOKENS, D_MODEL), np.float32) for h in HOOKS}
    aligned = {"token_ids": np.arange(SHARD_TOKENS, dtype=np.int32),
               "doc_index": np.zeros(SHARD_TOKENS, np.int64), "position": np.arange(SHARD_TOKENS, dtype=np.int32)}
    return acts, aligned


def _prefilled_writer(path, n: int, last: int):
    """A writer for ``n`` shards whose first ``n - last`` are already committed (markers only, no data)."""
    w = _writer(path, n)
    for s in range(n - last):
        w.loc.write_atomic(commit_key(s), commit_marker(s, _record(s)))
        w.committed.add(s)
    return w


def _seconds(w, shards, commit) -> list[float]:
    """Wall seconds of ``commit(s)`` for each of ``shards``; closes the writer ``w`` afterwards."""
    times = []
    for s in shards:
        t0 = time.perf_counter()
        commit(s)
        times.append(time.perf_counter() - t0)
    w.close()
    return times


def _median_seconds(w, shards, commit) -> float:
    """Median of :func:`_seconds`."""
    return statistics.median(_seconds(w, shards, commit))


def markers(root: Path, n: int, last: int) -> float:
    """Median seconds of one marker commit, over the last ``last`` of ``n`` shards."""
    w = _prefilled_writer(root / f"markers-{n}", n, last)
    return _median_seconds(w, range(n - last, n), lambda s: w._commit(s, _record(s)))


def attrs_list(root: Path, n: int, last: int) -> float:
    """Median seconds of one commit with the pre-marker layout (attribute list rewritten whole + consolidation)."""
    w = _writer(root / f"attrs-{n}", n)
    group = w.group
    committed = set(range(n - last))
    group.attrs.update({"committed_shards": sorted(committed),
                        "shard_records": {str(s): _record(s) for s in committed}})
    times = []
    for s in range(n - last, n):
        t0 = time.perf_counter()
        committed.add(s)  # the old StoreWriter._commit, then the old write_shard's re-consolidation:
        group.attrs.update({"committed_shards": sorted(committed),
                            "shard_records": {**group.attrs.get("shard_records", {}), str(s): _record(s)}})
        _consolidate(w.loc)
        times.append(time.perf_counter() - t0)
    w.close()
    return statistics.median(times)


def write_shards(root: Path, n: int, last: int) -> float:
    """Median seconds of a whole ``write_shard`` (data of 5 arrays + marker) over the last ``last`` of ``n`` shards."""
    w = _prefilled_writer(root / f"write-{n}", n, last)
    acts, aligned = _payload()
    return _median_seconds(w, range(n - last, n), lambda s: w.write_shard(s, acts, aligned, record=_record(s)))


def s3_markers(sizes: tuple[int, int], last: int, rounds: int = 5) -> dict[int, dict]:
    """The markers arm against moto's S3 server (subprocess on loopback), per size ``n``:
    ``{"commit_s": [seconds of each of the last ``last`` commits], "list_s": best of ``rounds`` listings of commits/}``.

    Each size gets its own bucket (moto lists a bucket by scanning all its keys). Both stores are
    prefilled first, then their commits alternate (small, large, small, ...), as do the listings,
    so a change in the machine's load during the run hits both sizes alike.

    Raises:
        RuntimeError: the moto server did not start.
    """
    import s3fs

    from saestrata.store.location import Location

    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    proc, endpoint = start_moto()
    try:
        options = {"endpoint_url": endpoint, "key": "bench", "secret": "bench"}
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        urls = {n: f"s3://commit-cost-{n}/store" for n in sizes}
        for n in sizes:
            fs.mkdir(f"commit-cost-{n}")
        writers = {n: _prefilled_writer(Location(urls[n], options), n, last) for n in sizes}
        out = {n: {"commit_s": [], "list_s": float("inf")} for n in sizes}
        for i in range(last):
            for n, w in writers.items():
                shard = n - last + i
                t0 = time.perf_counter()
                w._commit(shard, _record(shard))
                out[n]["commit_s"].append(time.perf_counter() - t0)
        attrs = {n: dict(w.group.attrs) for n, w in writers.items()}
        for w in writers.values():
            w.close()
        readers = {n: Location(urls[n], options) for n in sizes}  # listings are not cached (store/location.py)
        for _ in range(rounds):
            for n in sizes:
                t0 = time.perf_counter()
                found = read_committed(readers[n], attrs[n])
                out[n]["list_s"] = min(out[n]["list_s"], time.perf_counter() - t0)
                assert len(found) == n, (len(found), n)
    finally:
        proc.kill()
        proc.wait()
    return out


def print_s3(sizes: tuple[int, int], last: int) -> None:
    """Run :func:`s3_markers` and print per-shard commit time at both sizes and their ratio."""
    import numpy as np

    small, large = sizes
    res = s3_markers(sizes, last)
    print(f"per-shard commit time on S3 (moto server subprocess on 127.0.0.1, one PUT per marker), "
          f"last {last} commits of each store (zarr {zarr.__version__})")
    print(f"{'':<28s} {small:>8d} shards {large:>8d} shards   ratio {large}/{small}")
    for label, fn in (("commit, median", np.median), ("commit, p90", lambda x: np.percentile(x, 90))):
        a, b = (float(fn(res[n]["commit_s"])) for n in sizes)
        print(f"{label:<28s} {a * 1e3:11.3f} ms {b * 1e3:11.3f} ms   {b / a:8.2f}x")
    a, b = res[small]["list_s"], res[large]["list_s"]
    print(f"{'list commits/ (per open)':<28s} {a * 1e3:11.3f} ms {b * 1e3:11.3f} ms   {b / a:8.2f}x  (best of 5)")


def main() -> None:
    """Time both layouts at both sizes and print the per-commit medians and their ratios (``--s3``: markers on S3)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="200,2000", help="two store sizes in shards, small,large")
    ap.add_argument("--last", type=int, default=50, help="commits timed per size (the last shards of the store)")
    ap.add_argument("--s3", action="store_true", help="markers arm only, on moto's S3 server on 127.0.0.1")
    args = ap.parse_args()
    small, large = (int(x) for x in args.sizes.split(","))
    if not 0 < args.last <= small < large:
        ap.error(f"need 0 < --last <= small < large, got --last {args.last} --sizes {args.sizes}")
    warnings.simplefilter("ignore")
    if args.s3:
        print_s3((small, large), args.last)
        return
    results: dict[str, dict[int, float]] = {"markers": {}, "attrs list": {}, "write_shard": {}}
    with tempfile.TemporaryDirectory(prefix="commit-cost-") as tmp:
        root = Path(tmp)
        for n in (small, large):
            results["markers"][n] = markers(root, n, args.last)
            results["attrs list"][n] = attrs_list(root, n, args.last)
            results["write_shard"][n] = write_shards(root, n, args.last)
    print(f"per-shard commit time, median of the last {args.last} commits (zarr {zarr.__version__}, local disk)")
    print(f"{'layout':<24s} {small:>8d} shards {large:>8d} shards   ratio {large}/{small}")
    labels = {"markers": "markers (now)", "attrs list": "attrs list (before)", "write_shard": "write_shard, markers"}
    for key, label in labels.items():
        a, b = results[key][small], results[key][large]
        print(f"{label:<24s} {a * 1e3:11.3f} ms {b * 1e3:11.3f} ms   {b / a:8.2f}x")
    print(f"at {large} shards: attrs list / markers = "
          f"{results['attrs list'][large] / results['markers'][large]:.1f}x per commit")


if __name__ == "__main__":
    main()
