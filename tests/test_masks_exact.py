"""Masks stay exact in a user's own loop: any optimizer, any order of ``pruner.step()`` and
``optimizer.step()``, gradient accumulation, with or without the optimizer given to the Pruner."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.core.masks import clear_optimizer_state

OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adam_amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, weight_decay=1e-3),
}


def _setup(opt_name: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(48, 8), torch.randint(0, 4, (48,))
    opt = OPTIMIZERS[opt_name](model.parameters())
    for _ in range(4):                                   # dense steps: the optimizer state is non-zero everywhere
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y, opt


def _train(model, pruner, opt, x, y, *, order: str, accumulate: int, steps: int = 6) -> None:
    for _ in range(steps):
        opt.zero_grad()
        for xb, yb in zip(x.chunk(accumulate), y.chunk(accumulate)):
            out = model(xb)
            pruner.loss(F.cross_entropy(out, yb) / accumulate, (xb, yb), out).backward()
        if order == "before":
            pruner.step()
            opt.step()
        else:
            opt.step()
            pruner.step()


def _assert_exact(model, masks, x):
    params = dict(model.named_parameters())
    revived = sum(int((params[n][~m] != 0).sum()) for n, m in masks.items())
    assert revived == 0
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for n, m in masks.items():
            dict(ref.named_parameters())[n].mul_(m)
    assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adamw"])
@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize("bind", ["none", "given"])
def test_oneshot_pruner_masks_exact_in_any_loop(opt_name, order, accumulate, bind):
    """The issue's case (bind=none, step before optimizer.step(), momentum SGD) left 80 weights non-zero."""
    model, x, y, opt = _setup(opt_name)
    pruner = prunekit.Pruner(model, {"structure": "unstructured", "sparsity": 0.5},
                             opt if bind == "given" else None)
    masks = pruner.finalize()
    assert masks.sparsity() == pytest.approx(0.5, abs=0.01)
    _train(model, pruner, opt, x, y, order=order, accumulate=accumulate)
    _assert_exact(model, masks, x)
    # the optimizer state is zero at the pruned positions, so even without hard-pruning it cannot revive them
    params = dict(model.named_parameters())
    for n, m in masks.items():
        for v in opt.state[params[n]].values():
            if isinstance(v, torch.Tensor) and v.shape == m.shape:
                assert int((v[~m] != 0).sum()) == 0, (n, opt_name)
    pruner.detach()


@pytest.mark.parametrize("opt_name", ["sgd_nesterov", "adam_amsgrad"])
def test_other_optimizers_cannot_revive_either(opt_name):
    model, x, y, opt = _setup(opt_name)
    pruner = prunekit.Pruner(model, {"structure": "block:4x4", "sparsity": 0.5})
    masks = pruner.finalize()
    _train(model, pruner, opt, x, y, order="before", accumulate=2)
    _assert_exact(model, masks, x)


@pytest.mark.parametrize("order", ["before", "after"])
def test_gradual_pruner_without_optimizer_keeps_every_mask_exact(order):
    """Masks that grow during the search (gradual schedule) are exact after every step, no optimizer given."""
    model, x, y, opt = _setup("sgd_momentum")
    pruner = prunekit.Pruner(model, {"structure": "row", "sparsity": 0.5}, algorithm="gradual",
                             params={"end": 0.8, "frequency": 1}, total_steps=6)
    _train(model, pruner, opt, x, y, order=order, accumulate=2)
    masks = pruner.finalize()
    _train(model, pruner, opt, x, y, order=order, accumulate=2, steps=3)
    assert masks.sparsity() >= 0.5 - 1e-6
    _assert_exact(model, masks, x)


def test_finalize_clears_the_given_optimizer_state_at_pruned_positions():
    model, x, y, opt = _setup("adamw")
    params = dict(model.named_parameters())
    before = copy.deepcopy(opt.state_dict()["state"])
    masks = prunekit.Pruner(model, {"structure": "unstructured", "sparsity": 0.7}, opt).finalize()
    assert len(masks) == 3
    for i, (n, p) in enumerate(params.items()):
        st = opt.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            if n in masks:
                m = masks[n]
                assert int((before[i][key][~m] != 0).sum()) > 0          # dense steps left state there
                assert int((st[key][~m] != 0).sum()) == 0
                assert torch.equal(st[key][m], before[i][key][m])        # kept positions untouched
            else:
                assert torch.equal(st[key], before[i][key])             # biases untouched
    sgd_model, _, _, sgd = _setup("sgd_momentum")
    w = sgd_model[0].weight
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep[:, :4] = True
    buf = sgd.state[w]["momentum_buffer"].clone()
    assert clear_optimizer_state(sgd, {id(w): keep.float()}) == 1
    assert torch.equal(sgd.state[w]["momentum_buffer"], buf * keep)


def test_attach_without_optimizer_binds_an_optimizer_created_later_and_detach_unbinds():
    model, x, y, _ = _setup("sgd_momentum")
    masks = prunekit.prune(model, "unstructured", 0.5)
    hp = masks.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    w = model[0].weight
    opt.state[w]["momentum_buffer"] = torch.ones_like(w)     # stale state that would revive every weight
    _train(model, type("NoPruner", (), {"loss": staticmethod(lambda l, *a: l), "step": staticmethod(lambda: None)}),
           opt, x, y, order="after", accumulate=1, steps=2)
    _assert_exact(model, masks, x)
    hp.detach()
    opt.state[w]["momentum_buffer"] = torch.ones_like(w)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()                                               # detached: nothing re-masks any more
    assert int((w[~masks["0.weight"]] != 0).sum()) == int((~masks["0.weight"]).sum())


def test_pruner_watches_an_optimizer_it_was_not_given():
    """Given a fresh optimizer, retrained with another one whose dense-phase momentum would revive weights."""
    model, x, y, dense_opt = _setup("sgd_momentum")
    pruner = prunekit.Pruner(model, {"structure": "unstructured", "sparsity": 0.5},
                             torch.optim.SGD(model.parameters(), lr=0.1))
    masks = pruner.finalize()
    _train(model, pruner, dense_opt, x, y, order="before", accumulate=1)
    _assert_exact(model, masks, x)
