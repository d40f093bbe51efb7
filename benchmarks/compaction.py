"""Graph-driven compaction vs Torch-Pruning: params, MACs and CPU latency at matched parameter counts.

Rows (``benchmarks/results/compaction.json``): CIFAR ResNet-18 and a torchvision-style ResNet-50
(built here) at 50% channels (every removable channel group, residual streams included); BERT-base
shape (random init) at 50% heads + 50% FFN neurons; a Llama-style GQA model at 50% KV groups + 50%
neurons.  Units are chosen by the L2 norm over all of a group's slices (prunekit ``CoupledGroup``),
masked, then :func:`prunekit.deploy.surgery.compact` removes them (verified against the masked
model).  Torch-Pruning (MetaPruner + MagnitudeImportance(p=2)) prunes a fresh copy; for the CNNs its
ratio is bisected to the same parameter count.  Latency: ``torch.set_num_threads(1)``,
``inference_mode``, median of ``reps`` after one warm-up, dense / prunekit / Torch-Pruning interleaved (deploy.timing.interleaved_ms).

Usage: ``PYTHONPATH=src python benchmarks/compaction.py [--quick] [--out PATH]``.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from prunekit.deploy.surgery import compact
from prunekit.deploy.timing import interleaved_ms
from prunekit.graph import call_model, coupled_groups, macs
from prunekit.models.resnet import resnet18_cifar


# ------------------------------------------------------------------------------------------ models
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, out, 1, bias=False), nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + idt)


class ResNet50(nn.Module):
    """torchvision's ResNet-50 layout (stem 7x7/2 + maxpool, [3, 4, 6, 3] bottlenecks, fc)."""

    def __init__(self, layers=(3, 4, 6, 3), width: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, n in enumerate(layers):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(cin, width * 2 ** i, 2 if (j == 0 and i > 0) else 1))
                cin = width * 2 ** i * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _randomize_bn(m: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return m.eval()


def build(name: str, quick: bool):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM  # noqa: PLC0415
    if name == "resnet18_cifar":
        return _randomize_bn(resnet18_cifar()), lambda b: torch.randn(b, 3, 32, 32), ("channels",), "32x32"
    if name == "resnet50":
        res = 64 if quick else 96
        return _randomize_bn(ResNet50()), lambda b: torch.randn(b, 3, res, res), ("channels",), f"{res}x{res}"
    if name == "bert_base":
        cfg = BertConfig(num_hidden_layers=2 if quick else 12)
        seq = 128
        return BertModel(cfg).eval(), lambda b: {"input_ids": torch.randint(0, 30000, (b, seq))}, \
            ("heads", "neurons"), f"seq {seq}"
    if name == "llama":
        cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2 if quick else 8,
                          num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=32000)
        seq = 64
        return LlamaForCausalLM(cfg).eval(), lambda b: {"input_ids": torch.randint(0, 32000, (b, seq))}, \
            ("kv_groups", "neurons"), f"seq {seq}"
    raise KeyError(name)


# ------------------------------------------------------------------------------------------ ours
def half_masks(model: nn.Module, groups, kinds) -> dict[str, torch.Tensor]:
    """Keep the top half of every removable group of ``kinds`` by L2 norm over all its slices."""
    sd = model.state_dict()
    params = {n: p.shape for n, p in model.named_parameters()}
    masks: dict[str, torch.Tensor] = {}
    for g in groups:
        if not g.removable or g.kind not in kinds:
            continue
        score = g.partition(sd).norm(dim=1)
        keep = torch.zeros(g.count, dtype=torch.bool)
        keep[score.argsort(descending=True)[: g.count - g.count // 2]] = True
        for k, m in g.element_masks(keep, params).items():
            masks[k] = masks[k] & m if k in masks else m
    return masks


def nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------ Torch-Pruning
def tp_prune(name: str, model: nn.Module, x, ratio: float) -> nn.Module:
    import torch_pruning as tp  # noqa: PLC0415
    m = copy.deepcopy(model)
    imp = tp.importance.MagnitudeImportance(p=2)
    if name.startswith("resnet"):
        pruner = tp.pruner.MetaPruner(m, x, importance=imp, pruning_ratio=ratio, ignored_layers=[m.fc])
    else:
        attn = _tp_attention(m)
        keep_hidden = [mod for n, mod in m.named_modules() if isinstance(mod, (nn.Embedding, nn.LayerNorm))
                       or "norm" in type(mod).__name__.lower() or n.endswith(("o_proj", "down_proj", "output.dense",
                                                                              "attention.output.dense", "pooler.dense",
                                                                              "lm_head"))]
        pruner = tp.pruner.MetaPruner(
            m, x, importance=imp, pruning_ratio=ratio, ignored_layers=keep_hidden, num_heads=attn,
            prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
            output_transform=lambda out: sum(t.float().sum() for t in (out.values() if hasattr(out, "values") else [out])
                                             if torch.is_tensor(t)))
    pruner.step()
    _tp_fix_heads(m)
    return m.eval()


def _tp_attention(m: nn.Module) -> dict:
    heads = {}
    for mod in m.modules():
        if hasattr(mod, "query") and hasattr(mod, "num_attention_heads"):       # BERT self-attention
            for lin in (mod.query, mod.key, mod.value):
                heads[lin] = mod.num_attention_heads
        if hasattr(mod, "q_proj") and hasattr(mod, "k_proj"):                   # Llama attention
            cfg = m.config
            heads[mod.q_proj] = cfg.num_attention_heads
            heads[mod.k_proj] = heads[mod.v_proj] = cfg.num_key_value_heads
    return heads


def _tp_fix_heads(m: nn.Module) -> None:
    for mod in m.modules():
        if hasattr(mod, "query") and hasattr(mod, "num_attention_heads"):
            mod.num_attention_heads = mod.query.out_features // mod.attention_head_size
            mod.all_head_size = mod.query.out_features


def tp_matched(name: str, model: nn.Module, x, target: int) -> tuple[nn.Module, float]:
    """Torch-Pruning at the ratio whose parameter count is closest to ``target`` (bisection for CNNs)."""
    if not name.startswith("resnet"):
        pm = tp_prune(name, model, x, 0.5)
        return pm, 0.5
    lo, hi, best = 0.2, 0.8, None
    for _ in range(6):
        mid = (lo + hi) / 2
        pm = tp_prune(name, model, x, mid)
        n = nparams(pm)
        if best is None or abs(n - target) < abs(nparams(best[0]) - target):
            best = (pm, mid)
        lo, hi = (mid, hi) if n > target else (lo, mid)
    return best


# ------------------------------------------------------------------------------------------ rows
SKIP_TP = {"llama": "not run: Torch-Pruning 1.6 MetaPruner on this Llama (GQA, unwrapped RMSNorm weights) did not "
                    "finish within the 10-minute smoke-run budget on this 2-core machine"}


def rows_for(name: str, quick: bool, batches, reps: dict[int, int]) -> list[dict]:
    torch.manual_seed(0)
    model, make_x, kinds, note = build(name, quick)
    x1 = make_x(1)
    groups = coupled_groups(model, x1)
    masks = half_masks(model, groups, kinds)
    t = time.perf_counter()
    res = compact(copy.deepcopy(model), masks, x1, groups=groups, inplace=False)
    compact_s = time.perf_counter() - t
    ours = res.model.eval()
    used = sorted({g.kind for g in groups if g.removable and g.kind in kinds})
    n_groups = sum(1 for g in groups if g.removable and g.kind in kinds)
    out = []
    try:
        if name in SKIP_TP:
            raise RuntimeError(SKIP_TP[name])
        theirs, ratio = tp_matched(name, model, x1, res.params_after)
        tp_err = ""
    except Exception as e:  # noqa: BLE001 - record the peer's failure in the JSON
        theirs, ratio, tp_err = None, None, f"{type(e).__name__}: {str(e)[:300]}"
    for b in batches:
        xb = make_x(b)
        variants = {"dense": model, "prunekit": ours, **({"torch-pruning": theirs} if theirs is not None else {})}
        ms = interleaved_ms({k: functools.partial(call_model, m, xb) for k, m in variants.items()},
                            repeats=reps[b], warmup=1, threads=1)     # interleaved: load hits every variant alike
        dense = ms["dense"]
        for tool, m in (("prunekit", ours), ("torch-pruning", theirs)):
            row = {"model": name, "input": note, "groups": f"{n_groups} groups ({'+'.join(used)})",
                   "sparsity": "50% of the units of every removable group", "batch": b, "threads": 1,
                   "tool": tool, "params_before": nparams(model), "latency_ms_dense": round(dense, 2)}
            if m is None:
                row["error"] = tp_err
                out.append(row)
                continue
            with torch.inference_mode():
                ref = call_model(model, xb)
            row.update(params_after=nparams(m), macs_before=macs(model, xb)["total"], macs_after=macs(m, xb)["total"],
                       latency_ms=round(ms[tool], 2))
            row["speedup"] = round(dense / row["latency_ms"], 3)
            if tool == "prunekit":
                row.update(max_abs_diff=res.max_abs_diff, rel_err_vs_masked=res.rel_err,
                           compact_seconds=round(compact_s, 2))
            else:
                row.update(max_abs_diff=None, tp_pruning_ratio=ratio,
                           note="Torch-Pruning output differs from the dense model by design (it removes "
                                "nonzero units); prunekit's max_abs_diff is against the masked model")
            out.append(row)
            print(json.dumps(row), flush=True)
            del ref
    return out


def graph_time_bert(quick: bool) -> dict:
    model, make_x, _, note = build("bert_base", quick)
    t = time.perf_counter()
    gs = coupled_groups(model, make_x(1))
    s = time.perf_counter() - t
    by = {}
    for g in gs:
        by[g.kind] = by.get(g.kind, 0) + 1
    return {"model": "bert_base", "input": note, "seconds": round(s, 2), "groups": by,
            "removable": sum(g.removable for g in gs)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/compaction.json")
    ap.add_argument("--models", default="resnet18_cifar,resnet50,bert_base,llama")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    batches, reps = (1, 32), {1: 5, 32: 2}
    result = {"command": "PYTHONPATH=src python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(),
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread, "
                         f"torch {torch.__version__}", "graph_build": graph_time_bert(args.quick), "rows": []}
    print(json.dumps(result["graph_build"]), flush=True)
    for name in args.models.split(","):
        result["rows"].extend(rows_for(name, args.quick, batches, reps))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
