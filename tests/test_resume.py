"""Resume after a crash: a real `prunekit run` killed with SIGKILL (dense, ADMM search, retrain) and
resumed ends bitwise-identical to an uninterrupted run; corrupt checkpoints fall back; NaN stops cleanly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit.algorithms import list_algorithms
from prunekit.core.masks import MaskSet
from prunekit.io.checkpoint import CheckpointError, StateStore, load_state
from prunekit.pipelines.recipe import parse_recipe
from prunekit.training.config import TrainConfig
from prunekit.training.distributed import ResumableSampler
from prunekit.training.loop import NonFiniteLoss, fit
from prunekit.training.tasks import ClassificationTask

ALGO = "admm" if "admm" in list_algorithms() else "gradual"
RECIPE = f"""\
name: resume-test
seed: 0
model: {{name: lenet5_classic}}
data: {{name: mnist, batch_size: 32, eval_batch_size: 500, limit: 128}}
prune: {{structure: unstructured, sparsity: 0.8}}
algorithm: {{name: {ALGO}, params: {{{'rho: 0.01, update_every: 3' if ALGO == 'admm' else ''}}}}}
train: {{optimizer: sgd, lr: 0.05, momentum: 0.9, epochs: 1}}
checkpoint_every: 2
"""
# 128 examples / batch 32 = 4 steps per phase: dense = steps 1-4, search = 5-8, retrain = 9-12 (global count)


def _cli(*args, kill_at=None):
    env = {**os.environ, "PRUNEKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PRUNEKIT_TEST_KILL_AT_STEP", None)
    if kill_at is not None:
        env["PRUNEKIT_TEST_KILL_AT_STEP"] = str(kill_at)
    return subprocess.run([sys.executable, "-m", "prunekit.cli.main", *args], capture_output=True, text=True, env=env)


def _compare(a: Path, b: Path):
    for f in ("model.safetensors", "masks.safetensors"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f"{f} differs after resume"
    ra, rb = json.loads((a / "results.json").read_text()), json.loads((b / "results.json").read_text())
    assert ra["metrics"] == rb["metrics"]
    assert ra["history"] == rb["history"]
    assert ra["layers"] == rb["layers"] and ra["sparsity"] == rb["sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_sigkill_dense_search_retrain_then_resume_is_bitwise_identical(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = _cli("run", str(recipe), "--out", str(ref))
    assert r.returncode == 0, r.stderr
    assert not (ref / "state").exists()                    # a finished run leaves no run state behind

    # killed in dense training after step 3 (checkpoint at step 2, mid-epoch)
    r = _cli("run", str(recipe), "--out", str(run), kill_at=3)
    assert r.returncode == -9, r.stderr
    assert [p.name for p in StateStore(run / "state").checkpoints()] == ["ckpt-000001"]
    # rerunning without --resume refuses, in one line, exit 2
    r = _cli("run", str(recipe), "--out", str(run))
    assert r.returncode == 2 and "--resume" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # resumed, then killed in the algorithm's search phase (global step 7 = search step 3)
    r = _cli("run", str(recipe), "--out", str(run), "--resume", kill_at=7)
    assert r.returncode == -9, r.stderr
    assert "resuming from" in r.stdout and "stage dense, step 2" in r.stdout
    # resumed, then killed in hard-pruned retraining (global step 11 = retrain step 3)
    r = _cli("run", str(recipe), "--out", str(run), "--resume", kill_at=11)
    assert r.returncode == -9, r.stderr
    assert "stage search, step 6" in r.stdout
    cks = StateStore(run / "state").checkpoints()
    assert len(cks) == 2                                    # the newest two are kept
    # the newest checkpoint gets truncated: resume falls back to the previous good one, same end result
    f = cks[-1] / "state.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = _cli("run", str(recipe), "--out", str(run), "--resume")
    assert r.returncode == 0, r.stderr
    assert "falling back" in r.stdout and "corrupt" in r.stdout
    _compare(ref, run)


def test_state_store_keeps_previous_and_falls_back(tmp_path):
    st = StateStore(tmp_path / "state", keep=2)
    for i in range(3):
        st.save({"w": torch.full((4,), float(i)), "opt": {0: {"m": torch.ones(2) * i}}, "t": (i, None)}, {"i": i})
    assert [p.name for p in st.checkpoints()] == ["ckpt-000002", "ckpt-000003"]
    obj, meta, path = st.load_latest()
    assert meta["i"] == 2 and torch.equal(obj["w"], torch.full((4,), 2.0)) and obj["opt"][0]["m"].tolist() == [2.0, 2.0]
    assert obj["t"] == (2, None)
    (path / "state.safetensors").write_bytes(b"garbage")
    msgs = []
    obj, meta, path = st.load_latest(warn=msgs.append)
    assert meta["i"] == 1 and path.name == "ckpt-000002"
    assert len(msgs) == 1 and "ckpt-000003" in msgs[0] and "sha256" in msgs[0]
    (path / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        st.load_latest()


# --- in-process: fit() resume is exact for Adam, masks, a hook with state, mid-epoch, both loader kinds ---
class _Counter:
    """A hook with state (like an algorithm): counts steps and adds a tiny penalty that depends on it."""

    def __init__(self):
        self.n = 0

    def begin(self, ctx):
        self.n = 0

    def extra_loss(self, ctx, batch, outputs):
        return 1e-3 * self.n * sum(p.pow(2).sum() for p in ctx.model.parameters())

    def after_step(self, ctx):
        self.n += 1

    def epoch_end(self, ctx):
        pass

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, s):
        self.n = int(s["n"])


def _setup(kind):
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    ds = torch.utils.data.TensorDataset(x, y)
    if kind == "sampler":
        loader = torch.utils.data.DataLoader(ds, batch_sampler=ResumableSampler(40, 8, seed=3),
                                             generator=torch.Generator().manual_seed(1))
    else:   # a plain shuffled DataLoader: replayed from its generator state
        loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 3))
    masks = MaskSet({"0.weight": torch.rand(16, 6) > 0.5})
    return model, loader, masks


@pytest.mark.parametrize("kind", ["sampler", "dataloader"])
def test_fit_resume_mid_epoch_is_exact(kind, tmp_path):
    cfg = TrainConfig(epochs=3, lr=0.01, optimizer="adam", scheduler="cosine", warmup_ratio=0.2)
    model, loader, masks = _setup(kind)
    ref = fit(model, ClassificationTask(), loader, loader, cfg, hooks=[_Counter()], masks=masks, restore_best=True)
    want = {k: v.clone() for k, v in model.state_dict().items()}

    store = StateStore(tmp_path / "s")
    model, loader, masks = _setup(kind)

    class Crash(Exception):
        pass

    def on_ck(make):
        store.save(make())
        if make()["position"]["step"] == 7:      # mid-epoch 1 (5 steps per epoch)
            raise Crash

    with pytest.raises(Crash):
        fit(model, ClassificationTask(), loader, loader, cfg, hooks=[_Counter()], masks=masks, restore_best=True,
            checkpoint_every=7, on_checkpoint=on_ck)
    snap, _, _ = store.load_latest()
    assert snap["position"] == {"step": 7, "epoch": 1, "batch": 2}
    model, loader, masks = _setup(kind)
    torch.manual_seed(123)            # a different process state: everything must come from the snapshot
    got = fit(model, ClassificationTask(), loader, loader, cfg, hooks=[_Counter()], masks=masks, restore_best=True,
              resume=snap)
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert got["history"] == ref["history"] and got["steps"] == ref["steps"] == 15


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    from prunekit.pipelines.runner import run_pipeline
    recipe = parse_recipe({"name": "nan", "model": {"name": "lenet5_classic"},
                           "data": {"name": "mnist", "limit": 128, "batch_size": 16, "eval_batch_size": 500},
                           "algorithm": {"name": "oneshot"}, "train": {"lr": 1e9, "momentum": 0.9, "epochs": 1,
                                                                        "scheduler": "none"},
                           "checkpoint_every": 1})
    with pytest.raises(NonFiniteLoss, match=r"dense: loss is not finite \((nan|inf)\) at step") as e:
        run_pipeline(recipe, tmp_path / "out", log=lambda *_: None)
    assert "last good checkpoint is" in str(e.value)
    cks = StateStore(tmp_path / "out" / "state").checkpoints()
    assert cks, "no checkpoint was kept"
    state, meta = load_state(cks[-1])
    assert meta["stage"] == "dense" and meta["step"] >= 1
    assert all(bool(torch.isfinite(v).all()) for v in state["fit"]["model"].values())


def test_fit_without_a_bar_prints_one_line_per_evaluation(monkeypatch, capsys):
    """Log files / CI have no progress bar; the per-epoch dev metrics must still reach stderr."""
    monkeypatch.setenv("PRUNEKIT_NO_PROGRESS", "1")
    model, loader, masks = _setup("dataloader")
    r = fit(model, ClassificationTask(), loader, loader, TrainConfig(epochs=2, lr=0.01), masks=masks, desc="dense")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[dense] epoch")]
    assert [ln.split(":")[0] for ln in lines] == ["[dense] epoch 1", "[dense] epoch 2"]
    assert f"accuracy={r['history'][1]['accuracy']:.4f}" in lines[1]


def test_retraining_that_never_beats_the_entry_weights_gives_them_back():
    """``baseline`` = metrics of the entering weights: with restore_best they compete as epoch 0."""
    model, loader, masks = _setup("dataloader")
    task = ClassificationTask()
    masks.apply(model)                             # fit's hard-prune would apply it on entry anyway
    entry = {k: v.clone() for k, v in model.state_dict().items()}
    base = task.evaluate(model, loader)
    unbeatable = {**base, "accuracy": 101.0}      # no epoch can beat it -> entry weights restored, patience 1 stops
    r = fit(model, task, loader, loader, TrainConfig(epochs=3, lr=0.05, patience=1), masks=masks,
            restore_best=True, baseline=unbeatable)
    assert len(r["history"]) == 1 and r["best"]["epoch"] == 0
    assert all(torch.equal(v, entry[k]) for k, v in model.state_dict().items())
    model2, loader2, masks2 = _setup("dataloader")
    r2 = fit(model2, task, loader2, loader2, TrainConfig(epochs=2, lr=0.05), masks=masks2, restore_best=True,
             baseline={**base, "accuracy": -1.0})   # beaten at once: the best epoch's weights, as before
    assert r2["best"]["epoch"] >= 1 and r2["best"]["accuracy"] == max(h["accuracy"] for h in r2["history"])
