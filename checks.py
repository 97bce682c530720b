"""Checks of user-given folders and files at the CLI boundary, before any stage runs.

Each raises :class:`InputError` (a ``ValueError``: the CLI prints it as one ``Error:`` line)
saying what is wrong and what to pass instead, and none writes or deletes anything:

- :func:`check_sae_folder`: a saved SAE (``cfg.json`` + ``sae_weights.safetensors``) that loads;
- :func:`check_same_model`: an SAE is evaluated on the model whose activations it was trained on;
- :func:`result_targets`: where evaluate/unlearn write their result JSONs, refusing targets
  that would overwrite something that is not a result, collide, or lie inside a store;
- :func:`check_output_dir`: an output folder outside every activation store;
- :func:`check_dashboard_out`: an ``inspect --out`` folder that is new, empty or an earlier dashboard;
- :func:`check_run_dir`: a training run directory holding no finished SAE of the same name
  (unless ``--overwrite``) and no interrupted run (unless ``--resume`` / ``--overwrite``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .store.format import enclosing_store
from .train.checkpoint import checkpoint_path
from .train.sae_io import CFG_FILE, WEIGHTS_FILE


class InputError(ValueError):
    """A path given on the command line cannot be used (one line: what is wrong, what to do)."""


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def check_sae_folder(folder: str | Path) -> dict:
    """Check that ``folder`` holds a complete, loadable saved SAE; returns its ``cfg.json`` dict.

    Checks, in order: ``cfg.json`` present (a run directory is named as such), valid JSON,
    the fields ``d_in``, ``d_sae`` (positive integers), ``hook_name`` and an arch; a known arch
    with hyperparameters in their declared ranges; ``sae_weights.safetensors`` present and
    readable (safetensors header and length); finally a trial load (:func:`load_sae`), so
    the tensors' names and shapes must fit the arch cfg.json describes (HSAE's ``W_enc`` is
    ``[d_in, d_sae / 2]``, so no fixed shape is assumed here).

    Raises:
        InputError: the first problem found.
    """
    from safetensors import safe_open

    from .harvest.model import layer_of_hook
    from .train.hparams import check_hparams
    from .train.sae_io import load_sae

    folder = Path(folder)
    cfg_path, weights = folder / CFG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file():
        inner = sorted(p.parent.name for p in folder.glob(f"*/{CFG_FILE}"))
        if inner:
            raise InputError(f"{folder} is a run directory, not an SAE folder: pass one of its SAEs, "
                             f"e.g. --sae {folder / inner[0]} (it holds {', '.join(inner)})")
        if weights.is_file():
            raise InputError(f"{folder} has weights but no {CFG_FILE}: its save was interrupted; retrain it "
                             "(saestrata train --resume continues an interrupted run)")
        raise InputError(f"{folder} is not a saved SAE (no {CFG_FILE}): pass a folder written by saestrata train")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise InputError(f"{cfg_path} is not valid JSON ({_one_line(err)}): the SAE folder is damaged; "
                         "retrain the SAE or restore the file") from err
    if not isinstance(cfg, dict):
        raise InputError(f"{cfg_path} is not a JSON object: the SAE folder is damaged; retrain or restore it")
    ours = cfg.get("saestrata") if isinstance(cfg.get("saestrata"), dict) else {}
    arch = ours.get("arch") or cfg.get("architecture")
    missing = [k for k in ("d_in", "d_sae", "hook_name") if k not in cfg] + ([] if arch else ["architecture"])
    if missing:
        raise InputError(f"{cfg_path} lacks {', '.join(missing)}: it is not a complete SAE config; "
                         "retrain the SAE or restore the file")
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (d_in, d_sae)):
        raise InputError(f"{cfg_path} has d_in={d_in!r}, d_sae={d_sae!r}: both must be positive integers")
    try:
        layer_of_hook(cfg["hook_name"])
        check_hparams(arch, ours.get("hparams") or {}, d_sae, finite=False)
    except ValueError as err:
        raise InputError(f"{cfg_path}: {_one_line(err)}") from err
    if not weights.is_file():
        raise InputError(f"{folder} has no {WEIGHTS_FILE}: the SAE was not saved completely; retrain it "
                         "or restore the file")
    try:
        with safe_open(str(weights), "pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError (not an OSError) for bad files
        raise InputError(f"{weights} is corrupt or truncated ({_one_line(err)}): retrain the SAE or restore "
                         "the file") from err
    if not shapes:
        raise InputError(f"{weights} holds no tensors: it is not the weights of an SAE; retrain or restore it")
    try:
        load_sae(folder)  # builds the arch from cfg.json and loads every tensor: names and shapes must match
    except Exception as err:  # load_state_dict's RuntimeError, an arch's own ArchError, a corrupt extra file ...
        text = _one_line(err)
        if "size mismatch" in text or "Missing key" in text or "Unexpected key" in text:
            first = text[text.find("size mismatch"):] if "size mismatch" in text else text
            raise InputError(f"{weights} does not fit {CFG_FILE} (d_in={d_in}, d_sae={d_sae}): the two files "
                             f"belong to different SAEs; retrain or restore them ({first[:200]})") from err
        raise InputError(f"{folder} cannot be loaded ({text[:300]}): retrain the SAE or restore it") from err
    return cfg


def check_same_model(folder: str | Path, cfg: dict, model_id: str, weights_hash: str | None,
                     allow_other: bool = False) -> None:
    """Refuse evaluating an SAE on a model other than the one its training store was harvested from.

    The store records the model's ``weights_hash`` (harvest/model.py ``LoadedModel``) and
    training copies it into the SAE's ``cfg.json``; SAEs without one (e.g. from SAELens)
    are not checked. ``allow_other`` (``--allow-other-model``) skips the check.

    Raises:
        InputError: the hashes differ (one line naming both models and the way out).
    """
    ours = cfg.get("saestrata") if isinstance(cfg.get("saestrata"), dict) else {}
    trained = ours.get("weights_hash")
    if allow_other or not trained or not weights_hash or trained == weights_hash:
        return
    origin = ours.get("model_id") or cfg.get("model_name") or "another model"
    raise InputError(f"SAE {folder} was trained on activations of {origin} (weights {trained}) but {model_id} "
                     f"has weights {weights_hash}: evaluate it with --model {origin}, or pass --allow-other-model")


def _is_result(path: Path) -> bool:
    """True for a JSON object file with an ``eval_type_id`` (a result evaluate/unlearn may replace)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "eval_type_id" in data


def result_targets(saes: list[Path], out: Path | None, default_name: str, suffix: str) -> list[Path]:
    """The result JSON path of each SAE: ``<sae>/<default_name>``, ``out`` (one SAE) or ``out/<sae name>_<suffix>.json``.

    ``out`` is a directory when several SAEs are given or when it already is one.

    Raises:
        InputError: ``out`` is a file but several SAEs are given; two SAEs would write the same
            file; a target lies inside an activation store; a target exists and is not a result JSON.
    """
    if out is None:
        targets = [Path(sae) / default_name for sae in saes]
    elif len(saes) > 1 or out.is_dir():
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} is a file: give a directory for {len(saes)} SAEs")
        targets = [out / f"{Path(sae).name}_{suffix}.json" for sae in saes]
    else:
        targets = [out]
    twice = [t for t, n in Counter(targets).items() if n > 1]
    if twice:
        raise InputError(f"two SAEs would both write {twice[0]} (same folder name): give them separate "
                         "--out directories")
    for target in targets:
        store = enclosing_store(target)
        if store is not None:
            raise InputError(f"--out {target} lies inside the activation store {store}: write results outside it")
        if target.exists() and not _is_result(target):
            raise InputError(f"{target} exists and is not a result JSON: choose another --out (it was not touched)")
    return targets


def check_output_dir(path: Path, option: str = "--out") -> None:
    """Refuse an output folder that is, or lies inside, an activation store (writing there would corrupt it).

    Raises:
        InputError: one line naming the option and the store.
    """
    store = enclosing_store(path)
    if store is not None:
        raise InputError(f"{option} {path} lies inside the activation store {store}: choose a folder outside it")


def check_run_dir(out: Path, names: list[str], resume: bool, overwrite: bool) -> list[Path]:
    """Check a training ``--out`` against what it already holds; returns the SAE folders ``--overwrite`` replaces.

    A finished SAE (its ``cfg.json`` is written last, atomically) with the name of one
    to train, or an interrupted run (``checkpoint.pt``), is refused unless ``overwrite``;
    with ``resume`` the trainer checks the checkpoint itself.

    Raises:
        InputError: ``resume`` with ``overwrite``, a finished SAE of the same name, or an interrupted run.
    """
    if resume and overwrite:
        raise InputError("--resume continues the run in --out and --overwrite replaces it: pass only one")
    check_output_dir(out)
    if resume:
        return []
    finished = [name for name in names if (out / name / CFG_FILE).is_file()]
    if not overwrite:
        if finished:
            raise InputError(f"--out {out} already holds the finished SAE(s) {', '.join(finished)}: pass "
                             "--overwrite to replace them, or choose a new --out")
        if checkpoint_path(out).is_file():
            raise InputError(f"--out {out} holds an interrupted run ({checkpoint_path(out).name}): pass --resume "
                             "to continue it, --overwrite to start afresh, or choose a new --out")
    return [out / name for name in finished]


def check_dashboard_out(out: Path) -> None:
    """Refuse an ``inspect --out`` that holds anything but an earlier dashboard (its files would be mixed in).

    Raises:
        InputError: ``out`` is a non-empty folder without a dashboard ``index.json``, or lies inside a store.
    """
    check_output_dir(out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        fmt = json.loads((out / "index.json").read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt != "saestrata-dashboard":
        raise InputError(f"--out {out} already holds files that are not a dashboard: choose a new or empty folder")
