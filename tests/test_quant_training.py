"""Exact after training: quantization-aware retraining (straight-through estimator), weight sharing and
joint ADMM end with every quantized weight == decode(codes) bit for bit and every pruned weight 0 — for each
quantizer with SGD-momentum and AdamW; the recipe pipeline writes an artefact that reloads to the identical
model; a killed joint ADMM run resumes to the identical result."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn

import prunekit
from prunekit.algorithms.calibration import CalibrationConfig, LayerStats
from prunekit.algorithms.quantize import QuantTrainer
from prunekit.algorithms.sparsegpt import SparseGPT, sparsegpt_prune
from prunekit.core.errors import RecipeError
from prunekit.core.plan import PruneSpec
from prunekit.core.quant import ConstraintSet, QuantSpec, parse_quantizer
from prunekit.core.targets import TargetSpec
from prunekit.deploy.quant_storage import load_artefact
from prunekit.io.checkpoint import load_checkpoint
from prunekit.models.registry import get_model
from prunekit.pipelines.recipe import parse_recipe
from prunekit.pipelines.runner import run_pipeline

QUANTIZERS = ["int:4", "int:3:asym:tensor", "pow2:3", "binary", "ternary", "cluster:8", "fp16", "bf16"]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 5))


def _data(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    return x, (x[:, :5] * 3).argmax(1)


def _opt(kind, model):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def _train(pruner, model, opt, steps=12):
    x, y = _data()
    for i in range(steps):
        xb, yb = x[i % 4 * 16:(i % 4 + 1) * 16], y[i % 4 * 16:(i % 4 + 1) * 16]
        out = model(xb)
        loss = pruner.loss(F.cross_entropy(out, yb), (xb, yb), out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()


def _assert_exact(model, pruner, qcodes):
    params = dict(model.named_parameters())
    assert set(qcodes) == {"0.weight", "2.weight"}
    for n, qc in qcodes.items():
        w = params[n].detach()
        v = parse_quantizer(qc.quantizer).decode(qc)
        assert torch.equal(w.view(torch.int32), v.view(torch.int32)), n          # bit for bit
        m = pruner.masks[n]
        assert torch.equal(m, qc.mask)
        assert bool((w[~m] == 0).all()) and bool((w[m] != 0).all())           # zeros = pruned, no silent zero


@pytest.mark.parametrize("opt_kind", ["sgd", "adamw"])
@pytest.mark.parametrize("q", QUANTIZERS)
def test_qat_exact_after_training(q, opt_kind):
    model = _mlp()
    opt = _opt(opt_kind, model)
    pruner = prunekit.Pruner(model, {"structure": "unstructured", "sparsity": 0.5}, opt, quant=q)
    masks = pruner.finalize()
    kept0 = {n: int(m.sum()) for n, m in masks.items()}
    w0 = model[0].weight.detach().clone()
    _train(pruner, model, opt)
    assert not torch.equal(w0, model[0].weight) or q in ("binary",)          # it trained
    qc = pruner.quantized()
    _assert_exact(model, pruner, qc)
    for n in kept0:
        assert int(pruner.masks[n].sum()) <= kept0[n]                        # masks only shrink
        assert pruner.masks.sparsity() >= 0.5 - 1e-6


@pytest.mark.parametrize("opt_kind", ["sgd", "adamw"])
def test_weight_sharing_fine_tunes_centroids_keeps_codes(opt_kind):
    model = _mlp()
    opt = _opt(opt_kind, model)
    pruner = prunekit.Pruner(model, {"structure": "unstructured", "sparsity": 0.5}, opt, quant="cluster:4",
                             quant_method="share")
    pruner.finalize()
    hook = pruner.quant_hook
    assert isinstance(hook, QuantTrainer)
    codes0 = {n: q.codes.clone() for n, q in hook.codes().items()}
    cb0 = {n: q.params["codebook"].clone() for n, q in hook.codes().items()}
    _train(pruner, model, opt)
    for n, q in hook.codes().items():
        assert torch.equal(q.codes, codes0[n])                               # membership fixed
        assert not torch.equal(q.params["codebook"], cb0[n])                 # centroids moved
        assert torch.unique(dict(model.named_parameters())[n][q.mask]).numel() <= 4
    _assert_exact(model, pruner, pruner.quantized())


def test_share_needs_cluster():
    model = _mlp()
    with pytest.raises(RecipeError, match="share needs cluster:K"):
        prunekit.Pruner(model, {"sparsity": 0.5}, _opt("sgd", model), quant="int:4", quant_method="share").finalize()


def test_rtn_quantize_counts_zeros_as_pruned():
    model = _mlp()
    masks = prunekit.prune(model, "unstructured", 0.1)
    before = masks.sparsity()
    qc = prunekit.quantize(model, "ternary", masks=masks)
    assert masks.sparsity() > before                                          # ternary zeros are now pruned
    for n, q in qc.items():
        w = dict(model.named_parameters())[n].detach()
        assert torch.equal(w, ConstraintSet(parse_quantizer("ternary")).decode(q))
        assert torch.equal(masks[n], w != 0)


def test_admm_joint_z_is_pruned_and_quantized_with_bits_schedule():
    model = _mlp()
    opt = _opt("sgd", model)
    pruner = prunekit.Pruner(model, {"structure": "unstructured", "sparsity": 0.75}, opt, algorithm="admm",
                             params={"rho": 0.01, "update_every": 2}, total_steps=12, steps_per_epoch=4,
                             quant={"scheme": "int:2:sym:tensor", "schedule": ["int:8:sym:tensor", "int:4:sym:tensor"]})
    seen = []
    algo = pruner.algorithm
    x, y = _data()
    for i in range(12):
        xb, yb = x[i % 4 * 16:(i % 4 + 1) * 16], y[i % 4 * 16:(i % 4 + 1) * 16]
        out = model(xb)
        loss = pruner.loss(F.cross_entropy(out, yb), (xb, yb), out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        u_before = {n: u.clone() for n, u in algo.U.items()}
        pruner.step()
        z = algo.Z["0.weight"]
        seen.append((algo.quant_stage, torch.unique(z[z != 0]).numel()))
        if i == 4:                                   # stage change at step 5: the duals are carried over
            assert any(not torch.equal(u_before[n], torch.zeros_like(u_before[n])) for n in u_before)
    stages = [s for s, _ in seen]
    assert stages[0] == 0 and stages[-1] == 2 and stages == sorted(stages)
    levels = {s: n for s, n in seen}
    assert levels[2] <= 2 and levels[1] <= 15                 # Z on the 2-bit grid (±s), then the 4-bit one
    assert (algo.Z["0.weight"] != 0).float().mean() <= 0.25 + 1e-6
    pruner.finalize(opt)
    _train(pruner, model, opt, steps=4)
    _assert_exact(model, pruner, pruner.quantized())


CV = {"seed": 0, "model": {"name": "lenet5_classic"},
      "data": {"name": "mnist", "batch_size": 16, "eval_batch_size": 500, "limit": 64, "eval_limit": 100},
      "prune": {"structure": "unstructured", "sparsity": 0.8},
      "algorithm": {"name": "admm", "params": {"rho": 0.01, "update_every": 2}},
      "quant": {"scheme": "int:3", "overrides": {"conv1": "int:8", "fc3": "fp16"}, "schedule": ["int:6"]},
      "train": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "epochs": 1}, "checkpoint_every": 2}


def _quiet(*_a, **_k):
    pass


def test_pipeline_joint_admm_artefact_reloads_identical(tmp_path):
    res = run_pipeline(parse_recipe({**CV, "name": "q"}), tmp_path / "run", log=_quiet)
    q = res["quant"]
    assert q["scheme"] == "int:3" and q["weight_data_compression"] > 1 and q["whole_artefact_compression"] > 1
    byl = {l["name"]: l for l in q["layers"]}
    assert byl["conv1.weight"]["quantizer"] == "int:8:sym:channel" and byl["fc3.weight"]["quantizer"] == "fp16"
    assert sum(q["bytes"].values()) == q["file_bytes"] == (tmp_path / "run" / "model.pkq").stat().st_size
    state = load_artefact(tmp_path / "run" / "model.pkq")
    net = get_model("lenet5_classic")
    load_checkpoint(tmp_path / "run", net)
    ref = net.state_dict()
    assert ref.keys() == state.keys()
    for k, v in ref.items():
        assert torch.equal(v.reshape(-1).view(torch.uint8), state[k].reshape(-1).view(torch.uint8)), k
    w = state["fc1.weight"]
    assert torch.unique(w[w != 0]).numel() <= 7 * w.shape[0]                # 3-bit symmetric per channel
    assert res["metrics"]["final"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("kill_at,stage", [(7, "search"), (10, "retrain")])
def test_killed_joint_admm_run_resumes_identical(kill_at, stage, tmp_path):
    """SIGKILL mid-search (joint ADMM Z/U with the bits schedule) or mid-QAT-retraining (latent weights and codes),
    resume: the same weights, masks, metrics and artefact bytes as the uninterrupted run."""
    raw = {**CV, "name": "q-resume"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PRUNEKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PRUNEKIT_TEST_KILL_AT_STEP": str(kill_at)}
    r = subprocess.run([sys.executable, "-m", "prunekit.cli.main", "run", str(tmp_path / "r.yaml"), "--out",
                        str(tmp_path / "run")], capture_output=True, text=True, env=env)
    assert r.returncode == -9, r.stderr
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = run_pipeline(parse_recipe(raw), tmp_path / "ref", log=_quiet)
        got = run_pipeline(parse_recipe(raw), tmp_path / "run", resume=True, log=_quiet)
    finally:
        torch.set_num_threads(n)
    assert got["resumed"][0]["stage"] == stage
    for f in ("model.safetensors", "masks.safetensors"):
        a, b = load_file(str(tmp_path / "ref" / f)), load_file(str(tmp_path / "run" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    assert got["metrics"] == ref["metrics"] and got["history"] == ref["history"]
    assert (tmp_path / "ref" / "model.pkq").read_bytes() == (tmp_path / "run" / "model.pkq").read_bytes()


def test_sparsegpt_joint_gptq_rounding_beats_prune_then_round():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 64, generator=g)
    X = torch.randn(64, 512, generator=g) * torch.linspace(0.2, 2.0, 64)[:, None]
    H = 2 / 512 * X @ X.T
    q = parse_quantizer("int:3:sym:channel")
    Wj, keep = sparsegpt_prune(W, H, "unstructured", 0.5, quant=q)
    levels = q.levels(q.encode(W))
    on_grid = (Wj[:, :, None] == levels[:, None, :]).any(-1)
    assert bool(on_grid.all())                                              # every weight on its row's grid
    assert torch.equal(keep, Wj != 0) and float((~keep).float().mean()) >= 0.5
    Ws, keep_s = sparsegpt_prune(W, H, "unstructured", 0.5)
    Wr = ConstraintSet(q).project(Ws, keep_s)[0]                            # prune, then round to nearest
    err = lambda A: float(((W - A) @ X).pow(2).sum())                        # noqa: E731
    assert err(Wj) < err(Wr)


def test_sparsegpt_joint_false_prunes_only_then_the_quantize_stage_rounds():
    """``algorithm.params.joint: false`` with a quant scheme: SparseGPT prunes exactly as without one (the
    "prune, then round-to-nearest" comparison row); ``joint: true`` (default) leaves ≤ 8 levels per row."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(8, 32, generator=g)
    st = LayerStats(32)
    st.add(torch.randn(256, 32, generator=g))
    spec = PruneSpec("unstructured", 0.5)
    ref, keep_ref = sparsegpt_prune(W, st.H, "unstructured", 0.5)
    algos = {j: SparseGPT(SparseGPT.Params(joint=j), spec) for j in (False, True)}
    for a in algos.values():
        a.quant = QuantSpec("int:3")
    Wn, keep_n = algos[False].prune_matrix(W.clone(), st, "unstructured", 0.5, tuple(W.shape))
    assert torch.equal(Wn, ref) and torch.equal(keep_n, keep_ref)
    Wj, _ = algos[True].prune_matrix(W.clone(), st, "unstructured", 0.5, tuple(W.shape))
    assert max(int(torch.unique(r[r != 0]).numel()) for r in Wj) <= 8 < min(int((r != 0).sum()) for r in Wn)
    with pytest.raises(RecipeError, match="joint"):
        SparseGPT.Params(joint="no")


def test_sparsegpt_joint_on_hf_conv1d_keeps_its_grid_through_the_quantize_stage():
    """GPT-2's Conv1D stores (in, out) and its per-channel grid is per stored row; the joint sweep rounds the
    (out, in) matrix view, so its grids must be per matrix column.  Before the fix every row's grid differed
    and the quantize stage re-rounded all of them (all 3,584 rows of the 4-layer decoder benchmark)."""
    import transformers  # noqa: PLC0415 - optional dependency of this one test
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(5)
    items = [{"input_ids": torch.randint(0, 100, (12,), generator=g),
              "attention_mask": torch.ones(12, dtype=torch.long)} for _ in range(16)]
    spec = PruneSpec("unstructured", 0.5, targets=TargetSpec(include=["transformer.h.*"], types=["HFConv1D"]))
    algo = SparseGPT(SparseGPT.Params(), spec)
    algo.quant = QuantSpec("int:4")
    algo.calibration = CalibrationConfig(samples=16, batch_size=4)
    algo.calibration_loader = torch.utils.data.DataLoader(items, batch_size=4)
    masks = algo.final_masks(model)
    q, params = parse_quantizer("int:4"), dict(model.named_parameters())
    assert len(masks.names()) == 8 and not algo.transposed
    changed = rows = 0
    for n in masks.names():
        W = params[n].detach()
        changed += int((q.decode(q.encode(W, masks[n])) != W).any(1).sum())
        rows += W.shape[0]
    assert rows == 448 and changed <= rows // 10       # only rows whose outermost level ended unused


def test_polarized_qat_exact_and_one_sign_per_fragment():
    model = _mlp()
    opt = _opt("adamw", model)
    pruner = prunekit.Pruner(model, {"structure": "unstructured", "sparsity": 0.3}, opt,
                             quant={"scheme": "int:4", "polarize": 4})
    pruner.finalize()
    _train(pruner, model, opt)
    _assert_exact(model, pruner, pruner.quantized())
    w = model[0].weight.detach()                                        # (24, 12): 6 fragments of 4 rows
    frag = w.reshape(6, 4, 12)
    assert not bool(((frag > 0).any(1) & (frag < 0).any(1)).any())
