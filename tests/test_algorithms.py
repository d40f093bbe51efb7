"""Math of the ADMM / progressive ADMM / SLR / reweighted group lasso algorithms on tiny tensors, and
every algorithm × structure on a tiny conv+MLP model ending with masks of the requested structure."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prunekit.algorithms import get_algorithm_class
from prunekit.algorithms.admm import ADMM, ProgressiveADMM, admm_penalty, project_masks
from prunekit.algorithms.group_lasso import GroupLasso, group_lasso_penalty, reweight
from prunekit.algorithms.hooks import TrainContext
from prunekit.algorithms.slr import SLR, slr_alpha, slr_step_size
from prunekit.core.plan import PruneSpec
from prunekit.core.schedules import cubic_sparsity
from prunekit.core.structures import Row, Unstructured, as_matrix, parse_structure
from prunekit.pipelines.recipe import from_dict
from prunekit.training.config import TrainConfig
from prunekit.training.loop import fit, seed_everything
from prunekit.training.tasks import ClassificationTask


class Lin(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.fc = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(w)

    def forward(self, x):
        return self.fc(x)


def ctx_for(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return TrainContext(model, opt, None, None, ClassificationTask(), total_steps=10, steps_per_epoch=10)


# -- projection ---------------------------------------------------------------------------------------
def test_projection_keeps_exactly_the_top_groups():
    w = torch.tensor([[1.0, 1.0, 0.0, 0.0],     # row norm sqrt2
                      [3.0, 0.0, 0.0, 4.0],     # 5
                      [0.0, 0.5, 0.5, 0.0],     # ~0.71
                      [0.0, 0.0, 2.0, 0.0]])    # 2
    model = Lin(w)
    ms = project_masks(model, PruneSpec("row", 0.5), {"fc.weight": w})
    assert ms["fc.weight"].tolist() == [[False] * 4, [True] * 4, [False] * 4, [True] * 4]
    # the projection of W + U, not of W: U flips which rows win
    u = torch.zeros(4, 4)
    u[2] = 10.0
    ms = project_masks(model, PruneSpec("row", 0.5), {"fc.weight": w + u})
    assert ms["fc.weight"][:, 0].tolist() == [False, True, True, False]
    # unstructured: the 7 largest |w| entries (here: exactly the nonzeros) are kept
    ms = project_masks(model, PruneSpec("unstructured", 9 / 16), {"fc.weight": w})
    assert torch.equal(ms["fc.weight"], w != 0)
    # block:2x2 keeps the 2 blocks of largest norm
    ms = project_masks(model, PruneSpec("block:2x2", 0.5), {"fc.weight": w})
    # blocks: TL norm sqrt(11)=3.3, TR 4, BL .5, BR sqrt(4.25)=2.06 → keep TR and TL
    exp = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(ms["fc.weight"], exp)


# -- ADMM -----------------------------------------------------------------------------------------------
def test_admm_penalty_gradient_matches_rho_w_minus_z_plus_u():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, generator=g, requires_grad=True)
    Z, U = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    rho = 0.37
    pen = admm_penalty({"w": w}, {"w": Z}, {"w": U}, rho)
    pen.backward()
    assert torch.allclose(w.grad, rho * (w.detach() - Z + U), atol=1e-6)
    assert math.isclose(float(pen.detach()), 0.5 * rho * float((w.detach() - Z + U).pow(2).sum()), rel_tol=1e-6)


def test_admm_z_and_u_update_exact():
    w = torch.tensor([[4.0, -1.0, 0.5, -3.0]])
    model = Lin(w)
    algo = ADMM(from_dict(ADMM.Params, {"rho": 0.1, "rho_growth": 2.0, "rho_max": 0.15}), PruneSpec("unstructured", 0.5))
    ctx = ctx_for(model)
    algo.begin(ctx)
    assert torch.equal(algo.Z["fc.weight"], torch.tensor([[4.0, 0.0, 0.0, -3.0]]))   # Z⁰ = Π(W)
    assert torch.equal(algo.U["fc.weight"], torch.zeros(1, 4))
    U0 = torch.tensor([[0.0, 2.5, 0.0, 0.0]])
    algo.U["fc.weight"] = U0.clone()
    algo.update(ctx)
    # Z = Π(W + U) = Π([4, 1.5, .5, -3]): keep the 2 largest |.|, 4 and -3
    Z = torch.tensor([[4.0, 0.0, 0.0, -3.0]])
    assert torch.equal(algo.Z["fc.weight"], Z)
    # U = (U0 + W − Z) · ρ_old/ρ_new   with ρ: 0.1 → min(0.2, 0.15) = 0.15
    assert algo.rho == pytest.approx(0.15)
    assert torch.allclose(algo.U["fc.weight"], (U0 + w - Z) * (0.1 / 0.15))
    # without dual rescaling U is the plain U + W − Z
    algo2 = ADMM(from_dict(ADMM.Params, {"rho": 0.1, "rescale_dual": False}), PruneSpec("unstructured", 0.5))
    algo2.begin(ctx)
    algo2.U["fc.weight"] = torch.tensor([[0.0, 4.0, 0.0, 0.0]])
    algo2.update(ctx)
    # W + U = [4, 3, .5, -3]: |3| ties, the lower index is pruned first (stable selection)
    Zk = algo2.Z["fc.weight"]
    assert torch.equal(Zk, torch.tensor([[4.0, 0.0, 0.0, -3.0]]))
    assert torch.allclose(algo2.U["fc.weight"], torch.tensor([[0.0, 4.0, 0.0, 0.0]]) + w - Zk)


def test_admm_state_dict_round_trip():
    model = Lin(torch.randn(4, 8))
    a = ADMM(ADMM.Params(rho=0.01, rho_growth=1.5), PruneSpec("row", 0.5))
    ctx = ctx_for(model)
    a.begin(ctx)
    a.update(ctx)
    b = ADMM(ADMM.Params(rho=0.01, rho_growth=1.5), PruneSpec("row", 0.5))
    b.load_state_dict(a.state_dict())
    assert b.rho == a.rho == pytest.approx(0.015) and b.updates == 1
    assert torch.equal(b.Z["fc.weight"], a.Z["fc.weight"]) and torch.equal(b.U["fc.weight"], a.U["fc.weight"])
    assert set(a.state_dict()) == {"rho", "updates", "Z", "U"}


def test_progressive_targets_validated():
    with pytest.raises(ValueError, match="must end at prune.sparsity"):
        ProgressiveADMM(ProgressiveADMM.Params(targets=[0.5, 0.8]), PruneSpec("unstructured", 0.9))
    with pytest.raises(ValueError, match="increase strictly"):
        ProgressiveADMM.Params(targets=[0.8, 0.5])
    with pytest.raises(ValueError, match="rho_growth"):
        ADMM.Params(rho_growth=0.5)


# -- SLR ------------------------------------------------------------------------------------------------
def test_slr_step_size_sequence_by_hand():
    # α_j = 1 − 1/(M j^(1 − 1/j^r)); M = 2, r = 0.5
    assert slr_alpha(1, 2, 0.5) == pytest.approx(0.5)               # 1^(anything) = 1
    assert slr_alpha(4, 2, 0.5) == pytest.approx(0.75)              # 4^(1 − 1/2) = 2 → 1 − 1/4
    assert slr_alpha(9, 3, 0.5) == pytest.approx(1 - 1 / (3 * 9 ** (2 / 3)))
    # s_j = α_j s_{j−1} ‖g_{j−1}‖/‖g_j‖
    assert slr_step_size(1.0, 4, 2, 0.5, 2.0, 1.0) == pytest.approx(1.5)
    s, seq = 0.1, []
    for j, (gp, gc) in enumerate([(1.0, 1.0), (1.0, 0.5), (0.5, 0.25)], start=1):
        s = slr_step_size(s, j, 300, 0.1, gp, gc)
        seq.append(s)
    a1, a2, a3 = (1 - 1 / (300 * j ** (1 - 1 / j ** 0.1)) for j in (1, 2, 3))
    assert seq == pytest.approx([0.1 * a1, 0.1 * a1 * a2 * 2, 0.1 * a1 * a2 * 2 * a3 * 2])
    with pytest.raises(ValueError):
        slr_alpha(0, 2, 0.5)


def test_slr_multiplier_updates_follow_conditions():
    torch.manual_seed(0)
    model = Lin(torch.tensor([[4.0, -1.0, 0.5, -3.0], [0.2, 2.0, -0.1, 1.0]]))
    slr = SLR(SLR.Params(rho=1.0, s0=0.5, M=2.0, r=0.5), PruneSpec("unstructured", 0.5))
    ctx = ctx_for(model)
    slr.begin(ctx)
    W0 = model.fc.weight.detach().clone()
    Z0 = slr.Z["fc.weight"].clone()
    g0 = float((W0 - Z0).norm())
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    pen = slr.extra_loss(ctx, (x, y), None)        # probe batch fixed; L(W⁰, Z⁰, Λ⁰) recorded
    assert float(pen.detach()) == pytest.approx(0.5 * float((W0 - Z0).pow(2).sum()))
    assert slr.L_prev == pytest.approx(float(nn.functional.cross_entropy(model(x), y).detach()) + float(pen.detach()))
    # a W-step that lowers L (shrink the pruned weights) → condition (eq. 5) holds → Λ += s₁ (W − Z⁰)
    with torch.no_grad():
        model.fc.weight.mul_(torch.where(Z0 != 0, 1.0, 0.5))
    W1 = model.fc.weight.detach().clone()
    g1 = W1 - Z0
    slr.L_prev = 1e9                                 # force: any L satisfies eq. 5
    slr.update(ctx)
    s1 = slr_step_size(0.5, 1, 2.0, 0.5, g0, float(g1.norm()))
    Lam_half = s1 * g1
    Z1 = W1 + Lam_half / 1.0
    keep = Z1.abs().flatten().argsort(descending=True)[:4]
    m = torch.zeros(8, dtype=torch.bool)
    m[keep] = True
    Z1 = Z1 * m.reshape(2, 4)
    assert torch.allclose(slr.Z["fc.weight"], Z1)
    # Z-step condition (eq. 10) holds whenever Z changes to the exact minimiser
    assert slr.accepted["w_step"] == 1
    if slr.accepted["z_step"]:
        s2 = slr_step_size(s1, 2, 2.0, 0.5, float(g1.norm()), float((W1 - Z1).norm()))
        assert torch.allclose(slr.Lam["fc.weight"], Lam_half + s2 * (W1 - Z1), atol=1e-6)
        assert slr.s == pytest.approx(s2)
    else:
        assert torch.allclose(slr.Lam["fc.weight"], Lam_half, atol=1e-6)
    # a failing W-step condition (eq. 5) leaves the first multiplier step out
    slr.L_prev = -1e9
    slr.update(ctx)
    assert slr.accepted["w_step"] == 1 and slr.iterations == 2
    st = slr.state_dict()
    s2 = SLR(SLR.Params(rho=1.0, s0=0.5, M=2.0, r=0.5), PruneSpec("unstructured", 0.5))
    s2.load_state_dict(st)
    assert s2.j == slr.j and s2.s == slr.s and torch.equal(s2.Lam["fc.weight"], slr.Lam["fc.weight"])


# -- group lasso ----------------------------------------------------------------------------------------
def test_group_lasso_penalty_value_and_gradient():
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0]], requires_grad=True)
    alpha = torch.tensor([1.0, 2.0])
    pen = group_lasso_penalty(Row(), w, alpha, lam=0.1)
    assert float(pen) == pytest.approx(0.1 * (5.0 + 2.0 * 1.0))
    pen.backward()
    assert torch.allclose(w.grad, torch.tensor([[0.1 * 0.6, 0.1 * 0.8], [0.0, 0.1 * 2.0]]))
    # unstructured: reweighted L1, gradient λ α_i sign(w_i), finite at 0 thanks to the smoothing
    v = torch.tensor([[-2.0, 0.0, 0.5]], requires_grad=True)
    a = torch.tensor([1.0, 3.0, 2.0])
    pen = group_lasso_penalty(Unstructured(), v, a, lam=0.5, smooth=1e-8)
    assert float(pen) == pytest.approx(0.5 * (2.0 + 0.0 + 1.0), abs=1e-6)
    pen.backward()
    assert torch.allclose(v.grad, torch.tensor([[-0.5, 0.0, 1.0]]), atol=1e-6)
    # autograd vs a hand-derived formula on a conv weight with block groups
    g = torch.Generator().manual_seed(1)
    cw = torch.randn(4, 2, 3, 3, generator=g, requires_grad=True)
    st = parse_structure("block:2x3")
    al = torch.rand(st.num_groups(cw.shape), generator=g)
    group_lasso_penalty(st, cw, al, lam=0.3).backward()
    part = st.partition(cw.detach())
    hand = st.unpartition(0.3 * al[:, None] * part / part.norm(dim=1, keepdim=True), cw.shape)
    assert torch.allclose(cw.grad, hand, atol=1e-6)


def test_reweighting_values():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(reweight(Row(), w, 0.5), torch.tensor([1 / 5.5, 1 / 0.5]))
    assert torch.allclose(reweight(Unstructured(), w, 1.0), torch.tensor([1 / 4, 1 / 5, 1.0, 1.0]))
    # N:M and pattern groups are the structure's own: the M-runs, the tiles
    wn = torch.tensor([[3.0, 4.0, 0.0, 0.0, 1.0, 0.0]])
    assert torch.allclose(reweight(parse_structure("nm:2:4"), wn, 1.0), torch.tensor([1 / 6, 1 / 2]))
    gl = GroupLasso(GroupLasso.Params(lam=0.1, eps=0.5, reweight_every=2), PruneSpec("row", 0.5))
    model = Lin(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
    ctx = ctx_for(model)
    gl.begin(ctx)
    assert torch.allclose(gl.alpha["fc.weight"], torch.tensor([1 / 5.5, 1 / 1.5]))
    with torch.no_grad():
        model.fc.weight.mul_(2)
    ctx.step = 1
    gl.after_step(ctx)                 # not a reweighting step
    assert torch.allclose(gl.alpha["fc.weight"], torch.tensor([1 / 5.5, 1 / 1.5]))
    ctx.step = 2
    gl.after_step(ctx)
    assert torch.allclose(gl.alpha["fc.weight"], torch.tensor([1 / 10.5, 1 / 2.5]))
    assert gl.state_dict()["reweights"] == 2


def test_cubic_schedule_endpoints():
    assert cubic_sparsity(0, 0.9, 0.0, 0, 100, 10) == 0.0
    assert cubic_sparsity(100, 0.9, 0.0, 0, 100, 10) == 0.9
    assert cubic_sparsity(500, 0.9, 0.1, 0, 100, 10) == 0.9
    assert cubic_sparsity(5, 0.9, 0.1, 10, 100, 10) == 0.1
    assert cubic_sparsity(50, 0.8, 0.0, 0, 100, 10) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)


# -- every algorithm × every structure on a tiny model ---------------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3)          # matrix view 8 × 18, 3×3 kernels
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


ALGOS = {
    "admm": {"rho": 0.01, "rho_growth": 1.5, "update_every": 1},
    "admm_progressive": {"targets": [0.25, 0.5], "rho": 0.01, "update_every": 1},
    "slr": {"rho": 0.01, "update_every": 1},
    "group_lasso": {"lam": 1e-3, "reweight_every": 1},
}
STRUCTS = ["unstructured", "row", "column", "block:4x4", "nm:2:4", "pattern"]


def _check_structure(st: str, m: torch.Tensor, sparsity: float, nested: bool = False):
    M = as_matrix(m).float()
    R, C = M.shape
    kept = int(m.sum())
    if st == "unstructured":
        assert m.numel() - kept == round(sparsity * m.numel())
    elif st == "row":
        assert bool(((M.sum(1) == 0) | (M.sum(1) == C)).all())
        assert int((M.sum(1) == 0).sum()) == round(sparsity * R)
    elif st == "column":
        assert bool(((M.sum(0) == 0) | (M.sum(0) == R)).all())
        assert int((M.sum(0) == 0).sum()) == round(sparsity * C)
    elif st == "block:4x4":
        st_ = parse_structure(st)
        g, v = st_.partition(M), st_.valid(m.shape)
        per = g.sum(1)
        assert bool(((per == 0) | (per == v.sum(1))).all())
        # partial edge blocks (conv 8x18): weights pruned within one block of the target
        assert 0 <= round(sparsity * m.numel()) - (m.numel() - kept) < 16
    elif st == "nm:2:4":
        st_ = parse_structure(st)
        g, v = st_.partition(M), st_.valid(m.shape)
        assert bool((g.sum(1) <= 2).all())
        assert kept == int(v.sum(1).clamp(max=2).sum())   # a partial run of k < 4 keeps min(2, k)
    elif st == "pattern":
        g = parse_structure(st).partition(m.float())
        per = g.sum(1)
        tile = g.shape[1]
        k = math.ceil((1 - sparsity) * tile)
        if nested and m.dim() == 2:
            # progressive: a Linear 4x4 tile has a generated set of 8 patterns, so the stage-2 pattern
            # ANDed with the stage-1 one may keep fewer than k entries (never more)
            assert bool((per <= k).all()), per.unique()
            return
        # plain pattern: every tile keeps exactly k (only +conn removes whole tiles)
        assert bool((per == k).all()), per.unique()


@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize("st", STRUCTS)
def test_algorithm_structure_masks(algo, st):
    seed_everything(0)
    model = Tiny()
    spec = PruneSpec(st, 0.5)
    cls = get_algorithm_class(algo)
    a = cls(from_dict(cls.Params, ALGOS[algo], "algorithm.params"), spec)
    x = torch.randn(32, 2, 6, 6)
    y = torch.randint(0, 4, (32,))
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 32, 16)]   # 2 steps
    cfg = TrainConfig(epochs=1, lr=0.01, optimizer="sgd", scheduler="none")
    fit(model, ClassificationTask(), loader, None, cfg, hooks=[a], masks=a.masks_during_search(model), desc=algo)
    masks = a.final_masks(model)
    assert set(masks.names()) == {"conv.weight", "fc1.weight", "fc2.weight"}
    for n, m in masks.items():
        _check_structure(st, m, 0.5, nested=algo == "admm_progressive")
    if algo == "admm_progressive":      # stage 1 (25%) was hard-pruned during search
        assert a.stage == 1
        for n, p in model.named_parameters():
            if n in masks:
                stage1 = a.masks[n]
                assert bool((p.detach()[~stage1] == 0).all())
                assert bool((~masks[n] | stage1).all())    # final ⊆ stage-1 masks
    masks.apply(model)
    for n, p in model.named_parameters():
        if n in masks:
            assert bool((p[~masks[n]] == 0).all())
    expected = {"alpha", "reweights"} if algo == "group_lasso" else {"rho", "Z"}
    assert expected <= set(a.state_dict())
