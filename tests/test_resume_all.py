"""Kill (SIGKILL after a given optimizer step, in a subprocess) and resume a real run of every algorithm — and the
shared-levels runs — on tiny models and data subsets; the resumed run must end bitwise-identical (CPU, one thread)
to the uninterrupted one: final weights, masks, metrics, histories.  Resuming progressive distillation uses the
dense teacher, never the resumed (already sparse) student."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from prunekit.algorithms.distill import ProgressiveDistill
from prunekit.io.checkpoint import StateStore, load_checkpoint
from prunekit.pipelines.recipe import parse_recipe
from prunekit.pipelines.runner import run_pipeline
from prunekit.pipelines.shared import run_shared

# lenet5_classic, 64 MNIST examples / batch 16 = 4 steps per phase: dense = steps 1-4, search = 5-8,
# retrain = 9-12 (global count); checkpoints every 2 steps.  Killed after step 7 = mid-search (its snapshot at
# step 6 is resumed: the algorithm's begin() runs, then its state is restored over it).
CV = {"seed": 0, "model": {"name": "lenet5_classic"},
      "data": {"name": "mnist", "batch_size": 16, "eval_batch_size": 500, "limit": 64, "eval_limit": 100},
      "prune": {"structure": "unstructured", "sparsity": 0.8},
      "train": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "epochs": 1}, "checkpoint_every": 2}
ALGOS = {
    "gradual": ({}, {}),
    "admm": ({"rho": 0.01, "update_every": 2}, {}),
    "admm_progressive": ({"targets": [0.5, 0.8], "rho": 0.01, "update_every": 1}, {}),
    "slr": ({"rho": 0.1, "update_every": 2}, {}),
    "group_lasso": ({"lam": 1e-4, "reweight_every": 2}, {"structure": "row"}),
    "progressive_distill": ({"alpha": 0.5, "temperature": 2.0}, {}),
}
BERT = {"seed": 0, "task": "glue",
        "model": {"name": "bert-base-config", "args": {"hidden_size": 16, "num_hidden_layers": 2,
                                                        "num_attention_heads": 4, "intermediate_size": 32}},
        "data": {"name": "mrpc", "limit": 16, "eval_limit": 16, "batch_size": 4, "max_length": 32},
        "prune": {"sparsity": 0.5},
        "algorithm": {"name": "heads_neurons", "params": {"structure": "heads+neurons"}},
        "train": {"epochs": 1, "optimizer": "adamw", "lr": 1e-3}, "checkpoint_every": 2}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)            # as the subprocess (OMP_NUM_THREADS=1): bitwise-comparable
    yield
    torch.set_num_threads(n)


def _cli(*args, kill_at):
    env = {**os.environ, "PRUNEKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PRUNEKIT_TEST_KILL_AT_STEP": str(kill_at)}
    return subprocess.run([sys.executable, "-m", "prunekit.cli.main", *args], capture_output=True, text=True, env=env)


def _killed(cmd: str, raw: dict, tmp: Path, kill_at, *extra) -> tuple[Path, object]:
    (tmp / "r.yaml").write_text(yaml.safe_dump(raw))
    out = tmp / "run"
    r = _cli(cmd, str(tmp / "r.yaml"), "--out", str(out), *extra, kill_at=kill_at)
    assert r.returncode == -9, r.stderr
    assert StateStore(out / "state").checkpoints(), "killed before any checkpoint"
    return out, parse_recipe(raw)


def _same_tensors(a: Path, b: Path):
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{a.name}:{k} differs after resume"


def _quiet(*_a, **_k):
    pass


@pytest.mark.parametrize("algo", list(ALGOS))
def test_kill_mid_search_and_resume_is_bitwise_identical(algo, tmp_path):
    params, prune = ALGOS[algo]
    raw = {**CV, "name": f"resume-{algo}", "prune": {**CV["prune"], **prune},
           "algorithm": {"name": algo, "params": params}}
    run, recipe = _killed("run", raw, tmp_path, 7)
    ref = run_pipeline(recipe, tmp_path / "ref", log=_quiet)
    got = run_pipeline(recipe, run, resume=True, log=_quiet)
    assert got["resumed"][0]["stage"] == "search" and got["resumed"][0]["step"] == 6
    for f in ("model.safetensors", "masks.safetensors"):
        _same_tensors(tmp_path / "ref" / f, run / f)
    assert got["metrics"] == ref["metrics"] and got["history"] == ref["history"]
    assert got["algorithm_state_keys"] == ref["algorithm_state_keys"] and got["sparsity"] == ref["sparsity"]
    assert not (run / "state").exists()


def test_progressive_distill_resume_distils_from_the_dense_teacher(tmp_path, monkeypatch):
    raw = {**CV, "name": "resume-pd", "algorithm": {"name": "progressive_distill", "params": {}}}
    run, recipe = _killed("run", raw, tmp_path, 7)
    teachers = []
    begin = ProgressiveDistill.begin

    def spy(self, ctx):
        begin(self, ctx)
        teachers.append({k: v.clone() for k, v in self.distiller.teacher.state_dict().items()})

    monkeypatch.setattr(ProgressiveDistill, "begin", spy)
    res = run_pipeline(recipe, run, resume=True, log=_quiet)
    dense, _, _ = load_checkpoint(run / "dense")
    assert len(teachers) == 1 and teachers[0].keys() == dense.keys()
    for k, v in dense.items():
        assert torch.equal(teachers[0][k], v), k
    for n in ("fc1.weight", "fc2.weight", "fc3.weight", "conv1.weight", "conv2.weight"):
        if n in dense:
            assert float((teachers[0][n] == 0).float().mean()) < 0.01, f"teacher {n} has pruned zeros"
    assert res["sparsity"] == pytest.approx(0.8, abs=1e-3)        # …while the student is 80% zeros


def test_heads_neurons_bert_kill_in_retrain_and_resume(tmp_path):
    pytest.importorskip("transformers")
    # 16 examples / batch 4 = 4 steps per phase: dense 1-4, no search, retrain 5-8; killed after step 7
    run, recipe = _killed("run", {**BERT, "name": "resume-hn"}, tmp_path, 7)
    ref = run_pipeline(recipe, tmp_path / "ref", log=_quiet)
    recipe = parse_recipe({**BERT, "name": "resume-hn"})   # the GLUE workload writes default targets into it
    got = run_pipeline(recipe, run, resume=True, log=_quiet)
    assert got["resumed"][0]["stage"] == "retrain" and got["resumed"][0]["step"] == 6
    for f in ("model.safetensors", "masks.safetensors"):
        _same_tensors(tmp_path / "ref" / f, run / f)
    assert got["metrics"] == ref["metrics"] and got["history"] == ref["history"]


@pytest.mark.parametrize("mode,kill_at", [("sequential", 15), ("joint", 11)])
def test_shared_levels_kill_and_resume(mode, kill_at, tmp_path):
    # sequential (gradual at the sparsest level): dense 1-4, L0 search 5-8, L0 retrain 9-12, L1 13-16, L2 17-20
    # joint: dense 1-4, L0 search 5-8, joint 9-12
    raw = {**CV, "name": f"resume-shared-{mode}", "algorithm": {"name": "gradual", "params": {}},
           "extra": {"shared": {"levels": [0.8, 0.5, 0.3], "mode": mode}}}
    run, recipe = _killed("shared", raw, tmp_path, kill_at)
    ref = run_shared(recipe, tmp_path / "ref", log=_quiet)
    got = run_shared(recipe, run, resume=True, log=_quiet)
    assert got["resumed"][0]["step"] == kill_at - 1
    _same_tensors(tmp_path / "ref" / "shared.safetensors", run / "shared.safetensors")
    assert [r["score"] for r in got["levels"]] == [r["score"] for r in ref["levels"]]
    assert got["history"] == ref["history"]
    assert json.loads((run / "results.json").read_text())["levels"][0]["sparsity"] == ref["levels"][0]["sparsity"]
