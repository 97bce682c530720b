"""Bad input gives a one-line error naming what to do, through the real CLI."""

import pytest
from click.testing import CliRunner

from saestrata.cli import main
from saestrata.train.sae_io import save_sae
from saestrata.train.topk import TopKSAE

from conftest import TINY_LAYERS


def _run(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_layer_out_of_range(tiny_model_dir, tmp_path):
    line = _run(["harvest", "--model", str(tiny_model_dir), "--layers", f"1,{TINY_LAYERS}", "--tokens", "256",
                 "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert f"layer {TINY_LAYERS} out of range" in line and f"0..{TINY_LAYERS - 1}" in line
    assert not (tmp_path / "s").exists()  # nothing written for a refused harvest


def test_unknown_arch(tiny_store, tmp_path):
    line = _run(["train", "--store", str(tiny_store), "--layer", "1", "--arch", "topk,nonsense", "--out",
                 str(tmp_path / "run")])
    assert "unknown arch 'nonsense'" in line and "topk" in line


def test_layer_missing_from_store(tiny_store, tmp_path):
    line = _run(["train", "--store", str(tiny_store), "--layer", "3", "--out", str(tmp_path / "run")])
    assert "no layer 3" in line and "1, 2" in line


def test_not_a_store(tmp_path):
    line = _run(["train", "--store", str(tmp_path), "--layer", "1", "--out", str(tmp_path / "run")])
    assert "not an activation store" in line


def test_sae_d_model_mismatch(tiny_model_dir, tmp_path):
    folder = save_sae(TopKSAE(32, 64, k=4), tmp_path / "narrow",
                      {"model_id": str(tiny_model_dir), "hook_name": "blocks.1.hook_resid_post", "layer": 1})
    line = _run(["evaluate", "--sae", str(folder), "--tokens", "128", "--device", "cpu"])
    assert "d_in 32" in line and "d_model 64" in line


def test_bad_set_syntax(tiny_store, tmp_path):
    line = _run(["train", "--store", str(tiny_store), "--layer", "1", "--set", "k", "--out", str(tmp_path / "r")])
    assert "NAME=V1,V2" in line


@pytest.mark.parametrize("split", ["test"])
def test_unknown_split(split, tmp_path):
    result = CliRunner().invoke(main, ["harvest", "--layers", "1", "--split", split, "--out", str(tmp_path)])
    assert result.exit_code != 0 and "Invalid value for '--split'" in result.output


def test_empty_dataset(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = _run(["harvest", "--model", str(tiny_model_dir), "--layers", "1", "--dataset", str(empty),
                 "--tokens", "256", "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert "empty" in line
    assert not (tmp_path / "s").exists()
