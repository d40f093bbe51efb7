"""Graph-driven compaction: outputs equal the masked model (rel err <= 1e-4), or a refusal."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from prunekit.core.masks import MaskSet
from prunekit.deploy import surgery
from prunekit.deploy.surgery import CompactionError, compact
from prunekit.graph import coupled_groups
from prunekit.models.lenet import lenet5

IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))


def half_masks(model, x, kinds, frac=0.5):
    """Masks pruning the lowest-L2 ``frac`` of units of every removable group of ``kinds``."""
    params = {n: p.shape for n, p in model.named_parameters()}
    sd = model.state_dict()
    masks = {}
    for g in coupled_groups(model.eval(), x):
        if not g.removable or g.kind not in kinds:
            continue
        keep = torch.zeros(g.count, dtype=torch.bool)
        keep[g.partition(sd).norm(dim=1).argsort(descending=True)[: g.count - int(g.count * frac)]] = True
        for k, m in g.element_masks(keep, params).items():
            masks[k] = masks[k] & m if k in masks else m
    return masks


def masked_copy(model, masks):
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    return ref


def outputs(model, x):
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else getattr(out, "logits", out)


def assert_same(a, b):
    rel = float((a - b).abs().max() / a.abs().max())
    assert rel <= 1e-4, rel


# --------------------------------------------------------------------------------------------- CNNs
class Basic(nn.Module):
    def __init__(self, cin, c, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.downsample = None
        if stride != 1 or cin != c:
            self.downsample = nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + idt)


class Bottle(nn.Module):
    def __init__(self, cin, c, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, 4 * c, 1, bias=False), nn.BatchNorm2d(4 * c)
        self.downsample = nn.Sequential(nn.Conv2d(cin, 4 * c, 1, stride, bias=False), nn.BatchNorm2d(4 * c)) \
            if stride != 1 or cin != 4 * c else None

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        y = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return torch.relu(self.bn3(self.conv3(y)) + idt)


class TinyResNet(nn.Module):
    """torchvision layout, tiny widths: stem conv+bn+maxpool, BasicBlocks, a Bottleneck stage, fc."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.maxpool = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(Basic(8, 8), Basic(8, 8))
        self.layer2 = nn.Sequential(Basic(8, 16, 2))
        self.layer3 = nn.Sequential(Bottle(16, 4, 2), Bottle(16, 4))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _random_bn(m):
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


def test_resnet_residual_stem_downsample_compact_equal():
    torch.manual_seed(0)
    m = _random_bn(TinyResNet())
    x = torch.randn(2, 3, 16, 16)
    gs = {g.name: g for g in coupled_groups(m, x)}
    stem = gs["channels:conv1"]                                 # stem + layer1 residual stream
    assert stem.count == 8 and stem.removable
    assert {"layer1.0.conv2.weight", "layer1.1.bn2.running_var", "layer2.0.downsample.0.weight"} <= set(stem.tensors)
    l3 = next(g for g in gs.values() if any(s.tensor == "layer3.0.downsample.0.weight" and s.dim == 0
                                            for s in g.slices))
    assert l3.count == 16 and "fc.weight" in l3.tensors
    masks = half_masks(m, x, ("channels",))
    ref = masked_copy(m, masks)
    res = compact(m, masks, x)
    assert tuple(m.conv1.weight.shape) == (4, 3, 3, 3) and m.bn1.num_features == 4
    assert tuple(m.layer2[0].downsample[0].weight.shape) == (8, 4, 1, 1)
    assert tuple(m.layer3[0].conv3.weight.shape) == (8, 2, 1, 1) and m.fc.in_features == 8
    assert m.layer1[0].bn2.running_mean.shape == (4,)
    assert res.params_after == sum(p.numel() for p in m.parameters()) < res.params_before
    assert res.macs_after < res.macs_before / 3
    assert_same(outputs(ref, x), outputs(m, x))


class MBV2Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(4, 12, 1, bias=False), nn.BatchNorm2d(12)
        self.dw, self.bn2 = nn.Conv2d(12, 12, 3, 1, 1, groups=12, bias=False), nn.BatchNorm2d(12)
        self.project, self.bn3 = nn.Conv2d(12, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        y = x + self.bn3(self.project(y))
        return self.head(y.mean((2, 3)))


def test_mobilenetv2_depthwise_channel_passes_through():
    torch.manual_seed(0)
    m = _random_bn(MBV2Block())
    x = torch.randn(2, 4, 8, 8)
    g = next(g for g in coupled_groups(m, x) if "expand.weight" in g.tensors)
    assert g.count == 12 and g.removable
    assert {("expand.weight", 0), ("dw.weight", 0), ("bn2.running_mean", 0), ("project.weight", 1)} <= \
        {(s.tensor, s.dim) for s in g.slices}
    masks = half_masks(m, x, ("channels",))
    masks = {k: v for k, v in masks.items() if not k.startswith(("bn3", "project.weight")) or k == "project.weight"}
    ref = masked_copy(m, masks)
    compact(m, masks, x, count_macs=False)
    assert m.dw.groups == m.dw.in_channels == m.dw.out_channels == 6
    assert tuple(m.dw.weight.shape) == (6, 1, 3, 3) and m.project.in_channels == 6
    assert_same(outputs(ref, x), outputs(m, x))


def test_lenet_conv_flatten_fc():
    torch.manual_seed(0)
    m = lenet5().eval()
    x = torch.randn(2, 1, 28, 28)
    masks = half_masks(m, x, ("channels", "neurons"))
    ref = masked_copy(m, masks)
    res = compact(m, MaskSet(masks), x, count_macs=False)
    assert tuple(m.conv2.weight.shape) == (25, 10, 5, 5)
    assert tuple(m.fc1.weight.shape) == (250, 25 * 16)
    assert res.removed == {"channels:conv1": 10, "channels:conv2": 25, "neurons:fc1": 250}
    assert_same(outputs(ref, x), outputs(m, x))


def test_layernorm_mlp_is_not_compacted_and_says_why():
    class LNMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.fc2(F.layer_norm(torch.relu(self.fc1(x)), (16,)))

    m = LNMLP().eval()
    x = torch.randn(3, 8)
    masks = {"fc1.weight": torch.ones(16, 8, dtype=torch.bool), "fc2.weight": torch.ones(4, 16, dtype=torch.bool)}
    masks["fc1.weight"][:4] = False
    masks["fc2.weight"][:, :4] = False
    ref = masked_copy(m, masks)
    res = compact(m, masks, x, count_macs=False)
    rep = {g.name: g for g in res.groups}["neurons:fc1"]
    assert rep.removed == 0 and not rep.removable and "layer_norm" in rep.reason
    assert tuple(m.fc1.weight.shape) == (16, 8)               # unchanged, still the masked function
    assert_same(outputs(ref, x), outputs(m, x))


# --------------------------------------------------------------------------------------------- HF
def test_bert_heads_neurons_compact_and_reload(tmp_path):
    torch.manual_seed(0)
    m = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                             vocab_size=100)).eval()
    x = {"input_ids": IDS}
    masks = half_masks(m, x, ("heads", "neurons"))
    ref = masked_copy(m, masks)
    res = compact(m, masks, x, count_macs=False)
    att = m.encoder.layer[0].attention.self
    assert att.num_attention_heads == 2 and att.all_head_size == 16 and att.query.out_features == 16
    assert m.encoder.layer[1].intermediate.dense.out_features == 20
    assert res.config_updates == {"intermediate_size": 20} and "from_pretrained" in res.notes[0]
    assert_same(outputs(ref, x), outputs(m, x))
    # neurons only: sizes uniform, config updated, reload exact
    torch.manual_seed(1)
    m2 = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                              vocab_size=100)).eval()
    r2 = compact(m2, half_masks(m2, x, ("neurons",)), x, count_macs=False)
    assert r2.config_updates == {"intermediate_size": 20}
    m2.save_pretrained(tmp_path)
    back = BertModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(outputs(back, x), outputs(m2, x), atol=0, rtol=0)


def test_gpt2_conv1d_heads_and_neurons():
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100)).eval()
    x = {"input_ids": IDS}
    masks = half_masks(m, x, ("heads", "neurons"))
    ref = masked_copy(m, masks)
    compact(m, masks, x, count_macs=False)
    a = m.transformer.h[1].attn
    assert tuple(a.c_attn.weight.shape) == (32, 48) and a.split_size == 16 and a.num_heads == 2
    assert tuple(a.c_proj.weight.shape) == (16, 32) and m.transformer.h[0].mlp.c_fc.nf == 64
    assert m.lm_head.weight is m.transformer.wte.weight                # tie kept
    assert_same(outputs(ref, x), outputs(m, x))


def test_llama_gqa_compact_and_reload(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=40, vocab_size=100, head_dim=8)
    m = LlamaForCausalLM(cfg).eval()
    x = {"input_ids": IDS}
    masks = half_masks(m, x, ("kv_groups", "neurons"))
    ref = masked_copy(m, masks)
    res = compact(m, masks, x, count_macs=False)
    at = m.model.layers[0].self_attn
    assert tuple(at.q_proj.weight.shape) == (16, 32) and tuple(at.k_proj.weight.shape) == (8, 32)
    assert tuple(at.o_proj.weight.shape) == (32, 16) and at.num_key_value_groups == 2
    assert res.config_updates == {"head_dim": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
                                  "intermediate_size": 20}
    assert res.rel_err <= 1e-4
    assert_same(outputs(ref, x), outputs(m, x))
    m.save_pretrained(tmp_path)
    back = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(outputs(back, x), outputs(m, x), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------- refusal
def test_refusal_names_group_and_leaves_model_unchanged(monkeypatch):
    torch.manual_seed(0)
    m = lenet5().eval()
    x = torch.randn(2, 1, 28, 28)
    masks = half_masks(m, x, ("neurons",))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    real = surgery._select

    def corrupt(t, dim, idx):
        out = real(t, dim, idx)
        return out + 0.5 if out.shape == (250, 800) else out     # fc1's rows after slicing

    monkeypatch.setattr(surgery, "_select", corrupt)
    with pytest.raises(CompactionError, match=r"neurons:fc1 \(output 0 on input 0 \(shape \[2, 10\]\): max abs diff"):
        compact(m, masks, x, count_macs=False)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert tuple(m.fc1.weight.shape) == (500, 800)


def test_partial_mask_on_residual_keeps_the_group():
    """Residual channels pruned in one block only: the stream's other writers keep them → not removed."""
    torch.manual_seed(0)
    m = _random_bn(TinyResNet())
    x = torch.randn(1, 3, 16, 16)
    masks = {"layer1.0.conv2.weight": torch.ones_like(m.layer1[0].conv2.weight, dtype=torch.bool)}
    masks["layer1.0.conv2.weight"][:4] = False
    ref = masked_copy(m, masks)
    res = compact(m, masks, x, count_macs=False)
    rep = {g.name: g for g in res.groups}["channels:conv1"]
    assert rep.removed == 0 and not rep.removable
    assert rep.reason.startswith("4 units are zero in some weights but kept in coupled tensors (conv1.weight")
    assert m.conv1.out_channels == 8
    assert_same(outputs(ref, x), outputs(m, x))
