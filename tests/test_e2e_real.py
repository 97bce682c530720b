"""End to end on the real Gemma 3 270M and real Wikipedia text, through the CLI, at tiny scale."""

import json
import math

import numpy as np
from click.testing import CliRunner

from saestrata.cli import main
from saestrata.harvest.model import EMBEDDED_MODEL
from saestrata.store import ActivationStore


def _ok(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_harvest_train_evaluate_real_gemma(tmp_path, embedded_dir):
    store, run, res = tmp_path / "store", tmp_path / "run", tmp_path / "topk.json"
    _ok(["harvest", "--model", EMBEDDED_MODEL, "--layers", "6", "--tokens", "8192", "--out", str(store)])
    s = ActivationStore(store)
    acts = s.activations("blocks.6.hook_resid_post").float()
    assert s.n_tokens == 8192 and s.attrs["model_id"] == EMBEDDED_MODEL and s.attrs["split"] == "train"
    assert np.isfinite(acts.numpy()).all() and acts.norm(dim=-1).mean() > 100  # real residuals, not zeros

    _ok(["train", "--store", str(store), "--layer", "6", "--arch", "topk", "--d-sae", "1024",
         "--tokens", str(120 * 1024), "--out", str(run)])
    _ok(["evaluate", "--sae", str(run / "topk"), "--tokens", "1024", "--out", str(res)])
    m = json.loads(res.read_text())["eval_result_metrics"]
    perf = m["model_performance_preservation"]
    assert 1.0 < perf["ce_loss_without_sae"] < 6.0  # a real LM on real text
    assert perf["ce_loss_without_sae"] < perf["ce_loss_with_sae"] < perf["ce_loss_with_ablation"]
    assert perf["ce_loss_score"] > 0.5
    assert m["reconstruction_quality"]["explained_variance"] > 0.5
    assert m["sparsity"]["l0"] == 32
    assert all(math.isfinite(v) for group in m.values() for v in group.values())
