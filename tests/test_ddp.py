"""Data-parallel training: `prunekit run --nproc 2` (torchrun, gloo on CPU) against one process with the
same global batch.  Ranks must end bitwise identical (weights, masks, ADMM Z/U: digest all-gather); the
2-process run matches the 1-process run within float-summation tolerance:
weights |Δ| <= 1e-4, masks >= 99.9 % equal, accuracy within 1 point."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from prunekit.io.checkpoint import load_checkpoint
from prunekit.training.distributed import ResumableSampler
from test_resume import RECIPE


def _cli(*args):
    env = {**os.environ, "PRUNEKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PRUNEKIT_TEST_KILL_AT_STEP", None)
    return subprocess.run([sys.executable, "-m", "prunekit.cli.main", *args], capture_output=True, text=True, env=env)


def test_sharded_batches_union_is_the_single_process_batch():
    one = list(ResumableSampler(70, 16, seed=5))
    r0 = list(ResumableSampler(70, 16, seed=5, world=2, rank=0))
    r1 = list(ResumableSampler(70, 16, seed=5, world=2, rank=1))
    assert len(one) == len(r0) == len(r1) == 5
    for b, a0, a1 in zip(one, r0, r1):
        assert a0 + a1 == b and abs(len(a0) - len(a1)) <= 1
    s = ResumableSampler(70, 16, seed=5)
    s.set_epoch(0, skip_batches=3)
    assert list(s) == one[3:]
    s.set_epoch(1)
    assert list(s) != one and sorted(sum(list(s), [])) == list(range(70))
    with pytest.raises(ValueError, match="smaller than the 2 processes"):
        ResumableSampler(65, 16, seed=0, world=2, rank=0)   # last batch of 1 example cannot be split


def test_two_gloo_processes_match_one_process(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    r = _cli("run", str(recipe), "--out", str(single))
    assert r.returncode == 0, r.stderr
    r = _cli("run", str(recipe), "--out", str(ddp), "--nproc", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    res1 = json.loads((single / "results.json").read_text())
    res2 = json.loads((ddp / "results.json").read_text())
    dist = res2["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo"
    assert dist["ranks_identical"] is True and len(set(dist["digests"])) == 1
    assert "distributed" not in res1
    w1, w2 = load_file(str(single / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-4, rtol=0), (k, float((w1[k] - w2[k]).abs().max()))
    _, m1, _ = load_checkpoint(single)
    _, m2, _ = load_checkpoint(ddp)
    agree = sum(int((m1[n] == m2[n]).sum()) for n in m1) / sum(m1[n].numel() for n in m1)
    assert agree >= 0.999, agree
    assert abs(res1["score"] - res2["score"]) <= 1.0
    assert res1["sparsity"] == pytest.approx(res2["sparsity"], abs=1e-6)
