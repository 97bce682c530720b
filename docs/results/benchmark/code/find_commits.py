"""Name the git commit behind each code fingerprint of the benchmark results: writes ``commits.json`` here.

Each ``<fingerprint>.json`` beside this script is a code version's file manifest
(``benchmark.code_manifest``: the first 16 hex digits of each file's sha256). This script walks the
repository's history and, for every manifest, finds the first commit whose files hash the same; where
none does (results produced by a pinned copy of the code that mixed files of several commits), it names
the commit whose files differ in the fewest places and, for each differing file, the first commit that
has exactly that file. The benchmark report (``provenance.md``) prints the text. Run from anywhere:

    python docs/results/benchmark/code/find_commits.py [--repo PATH]

Reads git only (``git rev-list``, ``ls-tree``, ``cat-file``); ~1 min for ~600 commits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
CODE_DIRS = ("train", "evaluate", "store", "harvest")  # as benchmark.CODE_DIRS


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=True, text=True).stdout


def _manifests(repo: Path) -> list[tuple[str, dict[str, str]]]:
    """``[(commit, {path: sha256[:16]})]`` oldest first, for the files ``benchmark.code_manifest`` hashes."""
    blob_hash: dict[str, str] = {}
    out = []
    for commit in _git(repo, "rev-list", "--reverse", "HEAD").split():
        files = {}
        for sub in CODE_DIRS:
            for line in _git(repo, "ls-tree", commit, f"{sub}/").splitlines():
                meta, path = line.split("\t")
                kind, blob = meta.split()[1:3]
                if kind != "blob" or not path.endswith(".py") or "/" in path[len(sub) + 1:]:
                    continue
                if blob not in blob_hash:
                    data = subprocess.run(["git", "-C", str(repo), "cat-file", "blob", blob], capture_output=True,
                                          check=True).stdout
                    blob_hash[blob] = hashlib.sha256(data).hexdigest()[:16]
                files[path] = blob_hash[blob]
        out.append((commit[:7], files))
    return out


def _differ(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))


def describe(want: dict[str, str], history: list[tuple[str, dict[str, str]]]) -> str:
    """Where manifest ``want`` comes from, as one line of text."""
    exact = [c for c, m in history if m == want]
    if exact:
        return f"commit {exact[0]}" + (f" (same code through {exact[-1]})" if len(exact) > 1 else "")
    commit, files = min(history, key=lambda cm: len(_differ(cm[1], want)))
    parts = []
    for f in _differ(files, want):
        src = next((c for c, m in history if f in want and m.get(f) == want[f]), None)
        parts.append(f"{f} of {src}" if src else f"{f} (in no commit)" if f in want else f"without {f}")
    return f"pinned copy: commit {commit} with " + ", ".join(parts)


def main() -> None:
    """Write ``commits.json`` for every ``<fingerprint>.json`` in this folder."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=HERE.parents[3], help="the saestrata git checkout")
    args = ap.parse_args()
    history = _manifests(args.repo)
    result = {p.stem: describe(json.loads(p.read_text()), history)
              for p in sorted(HERE.glob("*.json")) if p.name != "commits.json"}
    (HERE / "commits.json").write_text(json.dumps(result, indent=2) + "\n")
    for fp, text in result.items():
        print(fp, text)


if __name__ == "__main__":
    main()
