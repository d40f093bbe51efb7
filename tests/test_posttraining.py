"""Post-training pruning from calibration data: SparseGPT, Wanda, OBS-structured, OWL and the
block-sequential calibration driver."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from prunekit.algorithms.base import get_algorithm_class
from prunekit.algorithms.calibration import (
    CalibrationConfig,
    LayerStats,
    collect_batches,
    collect_stats,
    find_blocks,
    run_blockwise,
)
from prunekit.algorithms.obs_structured import obs_group_prune
from prunekit.algorithms.owl import owl_allocation
from prunekit.algorithms.sparsegpt import sparsegpt_prune
from prunekit.algorithms.wanda import wanda_mask, wanda_scores
from prunekit.core.plan import PruneSpec
from prunekit.core.targets import TargetSpec, find_targets
from prunekit.pipelines.recipe import from_dict

transformers = pytest.importorskip("transformers")


def _layer(seed=0, rows=16, cols=64, n=512):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    # correlated inputs with uneven scales: the case where the Hessian matters
    X = (torch.randn(cols, cols, generator=g) * 0.3 + torch.eye(cols)) @ torch.randn(cols, n, generator=g)
    X = X * (torch.rand(cols, 1, generator=g) * 3 + 0.1)
    return W, X, 2.0 / n * X @ X.t()


# --------------------------------------------------------------------------------------------- SparseGPT / OBS
def test_sparsegpt_one_weight_equals_obs_closed_form():
    torch.manual_seed(0)
    W = torch.tensor([[0.01, 2.0, -1.5, 0.7, 1.2]], dtype=torch.float32)
    A = torch.randn(5, 5)
    H = A @ A.t() + torch.eye(5)
    W_new, keep = sparsegpt_prune(W, H, "unstructured", 0.2, percdamp=0.0)
    assert keep.tolist() == [[False, True, True, True, True]]
    Hinv = torch.linalg.inv(H.double())
    expected = W.double() - W[0, 0].double() / Hinv[0, 0] * Hinv[:, 0][None, :]
    assert torch.allclose(W_new.double(), expected, atol=1e-5)
    assert W_new[0, 0] == 0


def test_sparsegpt_later_column_is_obs_over_remaining_columns():
    """Pruning column q updates only columns > q: OBS with the Hessian restricted to columns q.."""
    torch.manual_seed(1)
    W = torch.tensor([[2.0, -1.0, 0.001, 0.8, 1.1, -0.9]])
    A = torch.randn(6, 6)
    H = A @ A.t() + torch.eye(6)
    W_new, keep = sparsegpt_prune(W, H, "unstructured", 1 / 6, percdamp=0.0)
    assert keep[0].tolist() == [True, True, False, True, True, True]
    Hq = torch.linalg.inv(H.double()[2:, 2:])
    expected = W.double().clone()
    expected[0, 2:] -= W[0, 2].double() / Hq[0, 0] * Hq[:, 0]
    assert torch.allclose(W_new.double(), expected, atol=1e-5)


def test_reconstruction_error_sparsegpt_below_wanda_and_magnitude():
    W, X, H = _layer()

    def err(Wn):
        return float((W @ X - Wn @ X).norm())

    Ws, ks = sparsegpt_prune(W, H, "unstructured", 0.5)
    kw = wanda_mask(W, X.pow(2).sum(1).sqrt(), "unstructured", 0.5)
    km = W.abs() > W.abs().median()
    e_s, e_w, e_m = err(Ws), err(W * kw), err(W * km)
    assert e_s < e_w and e_s < e_m
    assert e_w <= e_m
    assert int((~ks).sum()) == W.numel() // 2 and bool((Ws[~ks] == 0).all())


def test_sparsegpt_nm_and_block_masks_exact():
    W, _, H = _layer(2, rows=8, cols=48)
    Wn, keep = sparsegpt_prune(W, H, "nm:2:4", 0.5, blocksize=16)
    assert (keep.reshape(8, 12, 4).sum(-1) == 2).all()
    assert ((Wn != 0) <= keep).all()
    Wb, kb = sparsegpt_prune(W, H, "block:4x4", 0.5)
    tiles = kb.reshape(2, 4, 12, 4).permute(0, 2, 1, 3).reshape(24, 16)
    assert ((tiles.sum(1) == 0) | (tiles.sum(1) == 16)).all()
    assert int((tiles.sum(1) == 0).sum()) == 12
    assert ((Wb != 0) <= kb).all()


def test_sparsegpt_dead_inputs_and_bad_params():
    W, _, H = _layer(3, rows=4, cols=16)
    H[5, :] = 0
    H[:, 5] = 0
    Wn, keep = sparsegpt_prune(W, H, "unstructured", 0.25)
    assert torch.isfinite(Wn).all() and (Wn[:, 5] == 0).all()
    with pytest.raises(ValueError, match="blocksize"):
        from_dict(get_algorithm_class("sparsegpt").Params, {"blocksize": 0}, "algorithm.params")
    with pytest.raises(ValueError, match="allocation"):
        from_dict(get_algorithm_class("wanda").Params, {"allocation": "x"}, "algorithm.params")


# --------------------------------------------------------------------------------------------- Wanda
def test_wanda_scores_and_exact_mask():
    W = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]])
    norms = torch.tensor([4.0, 1.0, 0.5, 2.0])
    s = wanda_scores(W, norms)
    assert torch.equal(s, torch.tensor([[4.0, 2.0, 1.5, 1.0], [16.0, 1.0, 0.5, 4.0]]))
    keep = wanda_mask(W, norms, "unstructured", 0.5)
    assert keep.tolist() == [[True, True, False, False], [True, False, False, True]]
    keep24 = wanda_mask(W, norms, "nm:1:4", 0.75)
    assert keep24.tolist() == [[True, False, False, False], [True, False, False, False]]


# --------------------------------------------------------------------------------------------- OWL
def test_owl_weighted_mean_and_bound():
    g = torch.Generator().manual_seed(0)
    scores = {f"l{i}": torch.rand(100 * (i + 1), generator=g) ** (1 + 3 * i) for i in range(5)}
    sizes = {n: s.numel() for n, s in scores.items()}
    alloc = owl_allocation(scores, 0.6, m=5.0, lam=0.08)
    mean = sum(alloc[n] * sizes[n] for n in alloc) / sum(sizes.values())
    assert abs(mean - 0.6) < 1e-6
    assert all(abs(v - 0.6) <= 0.08 + 1e-9 for v in alloc.values())
    assert max(alloc.values()) - min(alloc.values()) > 0.05
    # more outliers → lower sparsity
    assert alloc["l4"] < alloc["l0"]
    with pytest.raises(ValueError, match="owl_lambda"):
        owl_allocation(scores, 0.95, lam=0.08)


# --------------------------------------------------------------------------------------------- OBS structured
def test_obs_group_prune_refit_is_least_squares():
    W, X, H = _layer(4, rows=6, cols=24)
    W_new, keep = obs_group_prune(W, H, count=6, size=4, n_prune=2, percdamp=0.0)
    assert int(keep.sum()) == 4
    cols = keep.repeat_interleave(4)
    assert (W_new[:, ~cols] == 0).all()
    Y = W @ X
    sol = torch.linalg.lstsq(X[cols].t().double(), Y.t().double()).solution.t()
    assert torch.allclose(W_new[:, cols].double(), sol, atol=1e-3)
    err = float((Y - W_new @ X).norm())
    assert err < float((Y - (W * cols) @ X).norm())
    # the OBS choice beats the magnitude choice of groups, both re-fitted
    from prunekit.algorithms.obs_structured import least_squares_refit
    mag = torch.ones(6, dtype=torch.bool)
    mag[torch.argsort(W.reshape(6, 6, 4).pow(2).sum((0, 2)))[:2]] = False
    W_mag = least_squares_refit(W, H, mag.repeat_interleave(4), 0.0)
    assert err <= float((Y - W_mag @ X).norm()) + 1e-4


# --------------------------------------------------------------------------------------------- driver
def _tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    return transformers.BertForSequenceClassification(cfg).eval()


def _tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _token_batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (4, 12), generator=g)
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[1, 8:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(4, dtype=torch.long)})
    return out


@pytest.mark.parametrize("make,types", [(_tiny_bert, ["Linear"]), (_tiny_gpt2, ["HFConv1D"])])
def test_blockwise_driver_matches_whole_model_hooks(make, types):
    model = make()
    name, blocks = find_blocks(model)
    assert len(blocks) == 2
    targets = find_targets(model, TargetSpec(include=[f"{name}.*"], types=types))
    batches = _token_batches()
    whole = collect_stats(model, batches, targets)
    seen: dict[str, LayerStats] = {}
    run_blockwise(model, batches, targets, lambda mods, stats: seen.update(stats))
    assert set(seen) == set(targets)
    for n in targets:         # no pruning: every block sees exactly the full model's activations
        assert seen[n].n == whole[n].n
        assert torch.allclose(seen[n].H, whole[n].H, rtol=1e-4, atol=1e-5), n


def _run_algo(name, model, batches, structure="unstructured", sparsity=0.5, targets=None, **params):
    cls = get_algorithm_class(name)
    spec = PruneSpec(structure, sparsity, targets=targets or TargetSpec(include=["bert.encoder.*"], types=["Linear"]))
    algo = cls(from_dict(cls.Params, params, "algorithm.params"), spec)
    algo.calibration = CalibrationConfig(samples=8, batch_size=4)
    algo.calibration_loader = torch.utils.data.DataLoader(batches, batch_size=None)
    return algo.final_masks(model)


def _loader_items(n=16):
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(0, 100, (12,), generator=g), "attention_mask": torch.ones(12, dtype=torch.long),
             "labels": torch.tensor(0)} for _ in range(n)]


def test_sparsegpt_on_bert_deterministic_and_masks_match_zeros():
    items = _loader_items()
    res = []
    for _ in range(2):
        model = _tiny_bert()
        loader = torch.utils.data.DataLoader(items, batch_size=4)
        cls = get_algorithm_class("sparsegpt")
        spec = PruneSpec("unstructured", 0.5, targets=TargetSpec(include=["bert.encoder.*"], types=["Linear"]))
        algo = cls(cls.Params(), spec)
        algo.calibration = CalibrationConfig(samples=8, batch_size=4)
        algo.calibration_loader = loader
        masks = algo.final_masks(model)
        params = dict(model.named_parameters())
        for n, m in masks.items():
            assert abs(1 - m.float().mean().item() - 0.5) < 1e-6
            assert (params[n][~m] == 0).all()
        res.append({n: params[n].detach().clone() for n in masks.names()})
    assert all(torch.equal(res[0][n], res[1][n]) for n in res[0])
    b1 = collect_batches(loader, 8, 4, 6, seed=3)
    b2 = collect_batches(loader, 8, 4, 6, seed=3)
    assert len(b1) == 2 and b1[0]["input_ids"].shape == (4, 6)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(b1, b2))


def test_obs_structured_heads_neurons_on_bert():
    model = _tiny_bert()
    loader = torch.utils.data.DataLoader(_loader_items(), batch_size=4)
    cls = get_algorithm_class("obs_structured")
    spec = PruneSpec("unstructured", 0.5)
    algo = cls(cls.Params(), spec)
    algo.calibration = CalibrationConfig(samples=8, batch_size=4)
    algo.calibration_loader = loader
    masks = algo.final_masks(model)
    params = dict(model.named_parameters())
    inter = masks["bert.encoder.layer.0.intermediate.dense.weight"]
    assert int(inter.all(1).sum()) == 32                     # 32 of 64 neurons kept
    out = masks["bert.encoder.layer.1.attention.output.dense.weight"]
    assert int(out.all(0).sum()) == 16                       # one of two 16-wide heads kept
    for n, m in masks.items():
        assert (params[n][~m] == 0).all()


# --------------------------------------------------------------------------------------------- pipeline
def test_posttraining_recipe_through_run_pipeline(tmp_path):
    from prunekit.pipelines.recipe import parse_recipe
    from prunekit.pipelines.runner import run_pipeline
    _mnist_or_skip()
    r = {"name": "ptq", "seed": 0, "model": {"name": "lenet5"},
         "data": {"name": "mnist", "limit": 256, "eval_limit": 128, "batch_size": 64, "eval_batch_size": 128},
         "prune": {"structure": "unstructured", "sparsity": 0.6},
         "algorithm": {"name": "sparsegpt", "params": {"allocation": "owl", "owl_lambda": 0.1}},
         "calibration": {"samples": 64, "batch_size": 32},
         "train": {"optimizer": "adam", "lr": 1e-3, "epochs": 0.25, "scheduler": "none"},
         "dense": {"epochs": 0.25}, "retrain": {"epochs": 0}}
    res = run_pipeline(parse_recipe(r), tmp_path, log=lambda *_: None)
    assert abs(res["sparsity"] - 0.6) < 2e-3                                  # targeted weights
    assert len({round(x["sparsity"], 3) for x in res["layers"]}) > 1        # OWL: non-uniform


def _mnist_or_skip():
    from prunekit.data.paths import resolve_data_root
    try:
        ok = (Path(resolve_data_root(None)) / "mnist" / "train-images-idx3-ubyte.gz").exists()
    except Exception:  # noqa: BLE001
        ok = False
    if not ok:
        pytest.skip("MNIST not in the data folder")
    os.environ["PRUNEKIT_NO_PROGRESS"] = "1"


def test_sparsegpt_then_one_retraining_epoch_keeps_the_masks(tmp_path):
    """Composable: SparseGPT's masks are the hard-prune masks of retraining; sparsity holds, weights move."""
    from prunekit.io.checkpoint import load_checkpoint
    from prunekit.models.registry import get_model
    from prunekit.pipelines.recipe import parse_recipe
    from prunekit.pipelines.runner import run_pipeline
    _mnist_or_skip()
    r = {"name": "ptq-rt", "seed": 0, "model": {"name": "lenet5"},
         "data": {"name": "mnist", "limit": 256, "eval_limit": 128, "batch_size": 64, "eval_batch_size": 128},
         "prune": {"structure": "nm:2:4", "sparsity": 0.5}, "algorithm": {"name": "sparsegpt"},
         "calibration": {"samples": 64, "batch_size": 32},
         "train": {"optimizer": "adam", "lr": 1e-3, "epochs": 0.25, "scheduler": "none"},
         "dense": {"epochs": 0.25}, "retrain": {"epochs": 1}}
    res = run_pipeline(parse_recipe(r), tmp_path, log=lambda *_: None)
    assert abs(res["sparsity"] - 0.5) < 1e-4 and len(res["history"]["retrain"]) >= 1
    model = get_model("lenet5")
    load_checkpoint(tmp_path, model)
    params = dict(model.named_parameters())
    for lay in res["layers"]:
        w = params[lay["name"]].detach()
        w = w.reshape(w.shape[0], -1)
        full = w[:, : w.shape[1] // 4 * 4]                                        # conv1: 25 inputs, a ragged tail
        assert int((full.reshape(-1, 4) != 0).sum(1).max()) <= 2, lay["name"]    # 2:4 holds after retraining
        assert float((full == 0).float().mean()) >= 0.5


def test_calibration_section_typed_and_old_keys_point_to_it():
    from prunekit.core.errors import RecipeError
    from prunekit.pipelines.recipe import CalibrationConfig as RC
    from prunekit.pipelines.recipe import parse_recipe
    base = {"model": {"name": "lenet5"}, "algorithm": {"name": "wanda"}}
    r = parse_recipe(base, ["calibration.samples=32", "calibration.max_length=null"])
    assert RC is CalibrationConfig
    assert (r.calibration.samples, r.calibration.batch_size, r.calibration.max_length, r.calibration.seed) == \
        (32, 8, None, 0)
    assert parse_recipe(base).calibration == CalibrationConfig(128, 8, 128, 0)
    with pytest.raises(RecipeError, match="unknown recipe key calibration.sample"):
        parse_recipe(base, ["calibration.sample=3"])
    with pytest.raises(RecipeError, match="calibration.batch_size must be a positive integer"):
        parse_recipe(base, ["calibration.batch_size=0"])
    with pytest.raises(RecipeError, match="moved to the top-level calibration section: calibration.samples"):
        parse_recipe({**base, "algorithm": {"name": "sparsegpt", "params": {"calibration_samples": 8}}})


def test_calibration_section_drives_the_algorithm():
    """samples/batch_size/max_length/seed of ``algo.calibration`` decide the batches; same seed, same masks."""
    items = _loader_items(32)
    loader = torch.utils.data.DataLoader(items, batch_size=4)
    cls = get_algorithm_class("wanda")
    spec = PruneSpec("unstructured", 0.5, targets=TargetSpec(include=["bert.encoder.*"], types=["Linear"]))
    algo = cls(cls.Params(), spec)
    algo.calibration_loader = loader
    algo.calibration = CalibrationConfig(samples=12, batch_size=5, max_length=7, seed=2)
    bs = algo.calibration_batches()
    assert [b["input_ids"].shape for b in bs] == [(5, 7), (5, 7), (2, 7)]
    m1 = algo.final_masks(_tiny_bert())
    m2 = algo.final_masks(_tiny_bert())
    algo.calibration = CalibrationConfig(samples=12, batch_size=5, max_length=7, seed=3)
    m3 = algo.final_masks(_tiny_bert())
    assert all(torch.equal(m1[n], m2[n]) for n in m1.names())
    assert any(not torch.equal(m1[n], m3[n]) for n in m1.names())


def test_recipes_for_posttraining_parse():
    from prunekit.pipelines.recipe import load_recipe
    root = Path(__file__).resolve().parents[1] / "recipes"
    for name, algo, epochs in [("glue_sst2_sparsegpt", "sparsegpt", 0), ("glue_mrpc_wanda", "wanda", 0),
                               ("lenet5_sparsegpt", "sparsegpt", 0), ("lenet5_sparsegpt_retrain", "sparsegpt", 1)]:
        r = load_recipe(root / f"{name}.yaml")
        assert r.algorithm.name == algo and r.phase("retrain").epochs == epochs, name
        assert r.calibration.samples == 128


def test_obs_rounds_close_to_greedy_and_exact_count():
    W, X, H = _layer(6, rows=12, cols=48)
    Y = W @ X
    err = {}
    for rounds in (1, 4, 24):
        Wn, keep = obs_group_prune(W, H, count=48, size=1, n_prune=24, percdamp=0.0, rounds=rounds)
        assert int(keep.sum()) == 24 and (Wn[:, ~keep] == 0).all()
        err[rounds] = float((Y - Wn @ X).norm() / Y.norm())
    assert err[24] <= err[1] + 1e-6                          # greedy (24 rounds of 1) no worse than single-shot
    assert err[4] <= err[1] * 1.02 + 1e-6 and err[4] <= err[24] * 1.25
    with pytest.raises(ValueError, match="rounds"):
        obs_group_prune(W, H, 48, 1, 3, rounds=0)


def test_python_api_pruner_with_calibration_section():
    """``prunekit.Pruner`` from a recipe dict: the calibration section + ``calibration_data`` drive sparsegpt."""
    import prunekit
    model = _tiny_bert()
    loader = torch.utils.data.DataLoader(_loader_items(), batch_size=4)
    recipe = {"prune": {"structure": "nm:2:4", "sparsity": 0.5,
                        "targets": {"include": ["bert.encoder.*"], "types": ["Linear"]}},
              "algorithm": {"name": "sparsegpt"}, "calibration": {"samples": 8, "batch_size": 4, "max_length": 10}}
    pruner = prunekit.Pruner(model, recipe, calibration_data=loader)
    assert pruner.algorithm.calibration == CalibrationConfig(8, 4, 10, 0)
    masks = pruner.finalize()
    params = dict(model.named_parameters())
    assert len(masks) == 12
    for n, m in masks.items():
        assert (m.reshape(-1, 4).sum(1) == 2).all() and (params[n][~m] == 0).all()
    pruner.detach()
