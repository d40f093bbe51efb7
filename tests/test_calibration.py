"""The calibration driver of the post-training algorithms is honest: real tokens only, each block with its own
call arguments, ``nn.Sequential`` block lists, convolutions unfolded as im2col, LM head and embeddings dense."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit
from hf_tiny import COMMON, tiny
from prunekit.algorithms.base import get_algorithm_class
from prunekit.algorithms.calibration import (
    CalibrationConfig,
    LayerStats,
    collect_stats,
    conv_rows,
    find_blocks,
    run_blockwise,
)
from prunekit.core.errors import ModelError, RecipeError
from prunekit.core.plan import PruneSpec
from prunekit.core.targets import TargetSpec, find_targets

LENGTHS = (5, 9, 3, 7)


# --------------------------------------------------------------------------------------------- real tokens only
def _sentences(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 100, (n,), generator=g), "attention_mask": torch.ones(n, dtype=torch.long)}
            for n in LENGTHS]


def _pad(items: list[dict]) -> dict:
    """Dynamic right padding (pad id 0), as a tokenizer's collator does."""
    T = max(len(x["input_ids"]) for x in items)
    out = {k: torch.zeros(len(items), T, dtype=torch.long) for k in ("input_ids", "attention_mask")}
    for i, x in enumerate(items):
        for k in out:
            out[k][i, :len(x[k])] = x[k]
    return out


def _stats(model, batches, targets, blockwise: bool) -> dict[str, LayerStats]:
    if not blockwise:
        return collect_stats(model, batches, targets)
    seen: dict[str, LayerStats] = {}
    run_blockwise(model, batches, targets, lambda mods, st: seen.update(st))
    return seen


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("blockwise", [True, False])
def test_padded_batch_gives_the_statistics_of_its_sentences(family, blockwise):
    """Hessians, Wanda norms and row counts of every target (block matrices, pooler/classifier or LM head) are
    the same from one padded batch of 4 sentences as from the 4 sentences one by one (no padding)."""
    model = tiny(family)
    targets = find_targets(model, TargetSpec(types=["Linear", "HFConv1D"]))
    items = _sentences()
    padded = _stats(model, [_pad(items)], targets, blockwise)
    single = _stats(model, [_pad([x]) for x in items], targets, blockwise)
    assert set(padded) == set(single) == set(targets)
    for n in targets:
        rows = 4 if n.startswith(("bert.pooler", "classifier")) else sum(LENGTHS)
        assert padded[n].n == single[n].n == rows, n
        assert _close(padded[n].H, single[n].H), n
        assert _close(padded[n].col_norms, single[n].col_norms), n


def _loader(items, batch_size):
    return torch.utils.data.DataLoader(items, batch_size=batch_size, collate_fn=_pad)


@pytest.mark.parametrize("algorithm", ["sparsegpt", "wanda", "wanda+owl"])
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_masks_identical_padded_and_unpadded(algorithm, family):
    """Same masks (and weights) from padded batches as from the unpadded sentences; with OWL the layer
    sparsities (from outlier counts) are the same too."""
    items = _sentences(1) + _sentences(2)
    res = []
    for bs in (4, 1):                      # two padded batches of 4 vs 8 unpadded single sentences
        model = tiny(family)
        name, _, owl = algorithm.partition("+")
        cls = get_algorithm_class(name)
        params = cls.Params(allocation="owl", owl_lambda=0.2, owl_m=2.0) if owl else cls.Params()
        algo = cls(params, PruneSpec("unstructured", 0.5))
        algo.calibration_loader, algo.calibration = _loader(items, bs), CalibrationConfig(8, bs, None, 0)
        res.append((algo.final_masks(model), dict(model.named_parameters())))
    (m4, p4), (m1, p1) = res
    assert len(m4) == {"bert": 12, "gpt2": 8}[family] and set(m4.names()) == set(m1.names())
    for n in m4.names():
        assert torch.equal(m4[n], m1[n]), n
        assert _close(p4[n].detach(), p1[n].detach(), 1e-4), n
    spread = {round(float(m.float().mean()), 3) for _, m in m4.items()}
    assert (len(spread) > 1) == bool(owl)   # OWL: layer sparsities differ from 50 % (and match across batchings)


def test_mask_of_another_length_is_refused_not_guessed():
    model = nn.Sequential(nn.Linear(4, 4))
    bad = {"attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    x = torch.randn(2, 5, 4)                # 5 positions, the mask has 3

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, attention_mask):
            return self.m(x)
    with pytest.raises(ModelError, match=r"0\.weight.*cannot tell which rows are padding"):
        collect_stats(Wrap(), [bad], {"0.weight": model[0]})


# --------------------------------------------------------------------------------------------- own call per block
class Block(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, hidden_states, mask=None):
        h = hidden_states if mask is None else hidden_states * mask
        return (hidden_states + self.fc2(torch.relu(self.fc1(h))),)     # an HF-style tuple


class Alternating(nn.Module):
    """Blocks with a per-layer mask (like sliding-window / global attention layers); even blocks get the hidden
    states positionally, odd ones as ``hidden_states=``.  ``between``: a transform between blocks."""

    def __init__(self, n: int = 4, d: int = 8, between: float | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 3)
        self.register_buffer("local", (torch.arange(d) < d // 2).float())
        self.between = between

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            m = self.local if i % 2 else torch.ones_like(self.local)
            x = (b(x, mask=m) if i % 2 == 0 else b(hidden_states=x, mask=m))[0]
            if self.between is not None:
                x = x * self.between
        return self.head(x)


def test_each_block_gets_its_own_arguments():
    model = Alternating()
    targets = find_targets(model, TargetSpec(["blocks.*", "head"]))   # the head too (not a default target)
    batches = [torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    whole = collect_stats(model, batches, targets)
    seen = _stats(model, batches, targets, blockwise=True)
    assert set(seen) == set(targets) and len(targets) == 9
    for n in targets:
        assert seen[n].n == whole[n].n == 30
        assert _close(seen[n].H, whole[n].H), n     # block 1's fc1 sees half its inputs zeroed by its own mask
    assert float(whole["blocks.1.fc1.weight"].H[4:, 4:].abs().max()) == 0.0


def test_hf_sliding_window_layers_get_their_own_masks():
    """A Qwen2 whose layers alternate sliding-window (3 tokens) and full attention: block by block, every layer's
    statistics equal those of whole-model hooks (block 0's sliding mask reused for every block changed them)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(**{**COMMON, "num_key_value_heads": 2, "head_dim": 8, "num_hidden_layers": 4,
                                      "use_sliding_window": True, "sliding_window": 3, "max_window_layers": 0,
                                      "layer_types": ["sliding_attention", "full_attention"] * 2})
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    targets = find_targets(model, TargetSpec(include=["model.layers.*"], types=["Linear"]))
    batch = _pad(_sentences(5))
    whole = collect_stats(model, [batch], targets)
    seen = _stats(model, [batch], targets, blockwise=True)
    assert len(targets) == 28
    for n in targets:
        assert seen[n].n == whole[n].n == sum(LENGTHS) and _close(seen[n].H, whole[n].H), n


def test_transform_between_blocks_is_refused_naming_model_and_block():
    model = Alternating(between=2.0)
    with pytest.raises(ModelError, match=r"Alternating \(blocks\): the input of block 1 is not the output of block 0"):
        run_blockwise(model, [torch.randn(2, 5, 8)], find_targets(model), lambda mods, st: None)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x):
        for b in [self.blocks[0], self.blocks[0], self.blocks[1]]:
            x = b(x)[0]
        return x


def test_block_called_twice_is_refused():
    model = Twice()
    with pytest.raises(ModelError, match="block 0 was called when block 1 was expected"):
        run_blockwise(model, [torch.randn(2, 5, 8)], find_targets(model), lambda mods, st: None)


class SeqBlock(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_blocks_in_an_nn_sequential_are_found_and_run_in_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Sequential(*(SeqBlock() for _ in range(3))), nn.Linear(8, 2))
    name, blocks = find_blocks(model)
    assert name == "1" and len(blocks) == 3
    targets = find_targets(model)
    batches = [torch.randn(16, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    whole = collect_stats(model, batches, targets)
    order: list[str] = []

    def prune(mods, stats):                 # zero the first half of every block weight: later blocks must see it
        order.append(",".join(mods))
        ref = collect_stats(model, batches, mods)          # the full forward of the model as pruned so far
        for n, m in mods.items():
            assert _close(stats[n].H, ref[n].H), n
            m.weight.data[:, : m.weight.shape[1] // 2] = 0
    run_blockwise(model, batches, targets, prune)
    assert order[:3] == [f"1.{i}.fc1.weight,1.{i}.fc2.weight" for i in range(3)]
    assert order[3] == "0.weight,2.weight"
    assert not torch.allclose(whole["1.2.fc1.weight"].H, collect_stats(model, batches, {"x": blocks[2].fc1})["x"].H)


# --------------------------------------------------------------------------------------------- convolutions
CONVS = [
    nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2),
    nn.Conv1d(4, 6, 4, padding="same", padding_mode="circular"),
    nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), padding_mode="reflect"),
    nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 1), padding=(0, 1, 2), dilation=(2, 1, 1)),
]


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: f"{type(c).__name__}-{c.padding_mode}")
def test_conv_rows_times_weight_is_the_convolution(conv):
    """im2col rows (stride, padding, dilation, padding mode) times the weight's matrix view = the conv's output."""
    torch.manual_seed(0)
    x = torch.randn(2, conv.in_channels, *[9] * len(conv.kernel_size))
    rows, lead = conv_rows(conv, x)
    ref = conv(x) - conv.bias.reshape(1, -1, *[1] * len(conv.kernel_size))
    assert lead == (2, *ref.shape[2:])
    out = (rows @ conv.weight.reshape(conv.out_channels, -1).t()).reshape(*lead, -1)
    assert torch.allclose(out.movedim(-1, 1), ref, atol=1e-5)


def test_conv1d_hessian_equals_im2col_by_hand():
    conv = nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2)
    x = torch.randn(5, 4, 17, generator=torch.Generator().manual_seed(0))
    stats = collect_stats(nn.Sequential(conv), [x], {"0.weight": conv})["0.weight"]
    cols = torch.nn.functional.unfold(x.unsqueeze(2), (1, 3), dilation=(1, 2), padding=(0, 1), stride=(1, 2))
    X = cols.transpose(1, 2).reshape(-1, 12).double()
    assert stats.n == X.shape[0] == 5 * 8
    assert torch.allclose(stats.H.double(), 2 / X.shape[0] * X.t() @ X, atol=1e-5)


def test_grouped_conv_is_refused_naming_the_layer():
    model = nn.Sequential(nn.Conv1d(4, 4, 3, groups=2))
    with pytest.raises(RecipeError, match=r"0\.weight: grouped convolution \(groups=2\)"):
        run_blockwise(model, [torch.randn(2, 4, 9)], find_targets(model, TargetSpec(types=["Conv1d"])),
                      lambda mods, st: None)


def test_sparsegpt_on_conv1d_beats_magnitude():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(8, 16, 5, padding=2), nn.ReLU(), nn.Conv1d(16, 4, 1))
    base = torch.randn(64, 8, 1) * torch.linspace(0.1, 3, 8)[None, :, None]
    data = [((base * torch.randn(64, 1, 24)) + 0.3 * torch.randn(64, 8, 24))[i] for i in range(64)]
    x = torch.stack(data)
    dense = model[0](x).detach()
    spec = PruneSpec("unstructured", 0.5, targets=TargetSpec(include=["0"], types=["Conv1d"]))
    W = model[0].weight.detach().clone()
    cls = get_algorithm_class("sparsegpt")
    algo = cls(cls.Params(), spec)
    algo.calibration_loader, algo.calibration = torch.utils.data.DataLoader(data, batch_size=16), CalibrationConfig(64, 16)
    keep = algo.final_masks(model)["0.weight"]
    assert keep.shape == W.shape and float(keep.float().mean()) == 0.5
    err_sgpt = float((model[0](x).detach() - dense).norm())
    thr = W.abs().flatten().kthvalue(W.numel() // 2).values
    model[0].weight.data = W * (W.abs() > thr)
    err_mag = float((model[0](x).detach() - dense).norm())
    assert err_sgpt < 0.7 * err_mag


# --------------------------------------------------------------------------------------------- LM head stays dense
def _gpt2_entry(entry, algorithm, model, loader):
    cal = {"samples": 8, "batch_size": 4}
    if entry == "spec":
        return prunekit.Pruner(model, {"structure": "unstructured", "sparsity": 0.5}, algorithm=algorithm,
                               calibration_data=loader, calibration=cal).finalize()
    if entry == "recipe":
        recipe = {"prune": {"structure": "unstructured", "sparsity": 0.5}, "algorithm": {"name": algorithm},
                  "calibration": cal}
        return prunekit.Pruner(model, recipe, calibration_data=loader).finalize()
    cls = get_algorithm_class(algorithm)
    algo = cls(cls.Params(), PruneSpec("unstructured", 0.5))
    algo.calibration_loader, algo.calibration = loader, CalibrationConfig(**cal)
    return algo.final_masks(model)


@pytest.mark.parametrize("entry", ["spec", "recipe", "algorithm"])
@pytest.mark.parametrize("algorithm", ["sparsegpt", "wanda"])
def test_lm_head_and_embeddings_dense_by_default(entry, algorithm):
    model = tiny("gpt2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = _gpt2_entry(entry, algorithm, model, _loader(_sentences(3) + _sentences(4), 4))
    blocks = {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                         "mlp.c_proj")}
    assert set(masks.names()) == blocks
    for n in ("transformer.wte.weight", "transformer.wpe.weight"):
        assert torch.equal(model.get_parameter(n), before[n]), n
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(abs(float(masks[n].float().mean()) - 0.5) < 1e-6 for n in blocks)
