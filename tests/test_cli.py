"""The CLI as a user runs it: `prunekit run` on real MNIST (tiny budget) and `prunekit report`."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "prunekit.cli.main", *args], capture_output=True, text=True,
                          cwd=cwd, env={**__import__("os").environ, "PRUNEKIT_NO_PROGRESS": "1"})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = _cli("run", "recipes/lenet5_oneshot.yaml", "--set", "data.limit=600", "--set", "train.epochs=0.5",
             "--set", "prune.structure=block:4x4", "--set", "prune.sparsity=0.75", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_run_writes_results_and_checkpoint(run_dir):
    res = json.loads((run_dir / "results.json").read_text())
    for key in ("metrics", "sparsity", "compression_rate", "layers"):
        assert key in res
    assert {l["name"] for l in res["layers"]} == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    assert all(set(l) >= {"name", "shape", "structure", "sparsity"} for l in res["layers"])
    assert all(l["structure"] == "block:4x4" for l in res["layers"])
    # block:4x4 at 75% of the groups: fc1 500x800 has exactly 125*200 full blocks → exactly 75%
    fc1 = next(l for l in res["layers"] if l["name"] == "fc1.weight")
    assert fc1["sparsity"] == 0.75
    w = load_file(str(run_dir / "model.safetensors"))["fc1.weight"]
    blocks = w.reshape(125, 4, 200, 4).permute(0, 2, 1, 3).reshape(-1, 16)
    nz_blocks = (blocks != 0).any(1)
    assert int(nz_blocks.sum()) == 125 * 200 // 4          # whole blocks kept / removed, after retraining
    assert (run_dir / "manifest.json").is_file() and (run_dir / "recipe.yaml").is_file()
    assert 0 <= res["metrics"]["final"]["accuracy"] <= 100


def test_report_prints_layer_table(run_dir):
    r = _cli("report", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "| fc1.weight | 500×800 | block:4x4 | 75.00% | 100000 |" in r.stdout


def test_bad_recipe_fails_before_work_with_clear_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune: {sparsity: 1.5}\n")
    r = _cli("run", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "sparsity: 1.5 is out of range" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
    r = _cli("run", "recipes/lenet5_oneshot.yaml", "--set", "prune.blocks=4", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unknown recipe key prune.blocks" in r.stderr
    r = _cli("run", "recipes/lenet5_oneshot.yaml", "--set", "prune.structure=block:64x64", "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "block:64x64 does not fit" in r.stderr


def test_help_lists_subcommands():
    r = _cli("--help")
    assert r.returncode == 0 and "run" in r.stdout and "report" in r.stdout
