"""Compaction manifests (save/reload a compacted model) and the OLD hand-written ``Chain`` compaction.

The compaction users run is graph-driven and verified: :func:`prunekit.deploy.surgery.compact`
(``prunekit.compact``, ``prunekit compact RUN``).  Its result is saved with :func:`graph_manifest` +
:func:`save_compacted` (format ``prunekit-compact/2``: the kept indices of every cut ``(tensor, dim)``,
attention head attributes and config updates) and reloaded with :func:`load_compacted` — a fresh dense
model from the factory, the same cuts (:func:`prunekit.deploy.surgery.apply_keeps`), a strict load.

What follows is the hand-written path, kept only as the fallback for a model ``torch.export`` cannot
trace (``prunekit compact`` says when it uses it); its manifests have format ``prunekit-compact/1``.

Masks alone make a model neither smaller nor faster.  :func:`compact` reads the *zero pattern* of the
weights (after applying a :class:`~prunekit.core.masks.MaskSet` if one is given — how the masks were made
does not matter) and removes every channel / neuron / head whose removal provably leaves the model's
function unchanged, slicing all coupled tensors at once:

* **Coupled channel chains** (:class:`Chain`): a *producer* (``Conv2d``/``Linear``, one channel per
  weight row) feeds a *consumer* (``Conv2d``/``Linear``, one input channel, or ``spatial`` flattened
  input columns per channel) through per-channel modules (``BatchNorm``, activations, pools).
  Channel ``i`` is removed when

  - its consumer slice is all zero (the channel is unused), or
  - its producer row is all zero, so the channel carries the constant ``c = between(bias_i)``
    (bias pushed through BN/activation/pool), and either ``c == 0`` or ``c`` can be folded exactly
    into the consumer's bias: consumer ``bias += c * (sum of its slice)`` — valid for a Linear and
    for an unpadded Conv (a padded Conv sees ``c`` only away from the borders, so such channels stay).

  The producer's rows (+bias), the BatchNorm channels in between and the consumer's input
  columns/channels are sliced together.  Built-in chains (:func:`default_chains`): ``LeNet5``
  (conv1→conv2, conv2→flatten→fc1 with 4×4 = 16 columns per channel, fc1→fc2), ``LeNet5Classic``,
  and the inner ``conv1→bn1→relu→conv2`` of every ResNet ``BasicBlock``.  Other models: pass
  ``chains=`` explicitly.

* **Transformer layers** (HF BERT family: any module with ``attention.self.{query,key,value}``,
  ``attention.output.dense``, ``intermediate.dense`` and ``output.dense`` — BERT, RoBERTa, MiniLM,
  ELECTRA...).  FFN neuron ``i`` goes when its ``output.dense`` column is zero, or its
  ``intermediate.dense`` row is zero (then ``act(b_i) * column`` is folded into ``output.dense.bias``).
  Head ``h`` goes when its ``attention.output.dense`` columns are zero, or its ``value`` rows are zero
  (its output is then the constant ``b_v,h`` — softmax rows sum to one — folded into the output bias).
  Removing a head slices query/key/value rows and the output columns and updates the attention
  module's ``num_attention_heads`` / ``all_head_size`` (transformers 5.x has no ``prune_heads``;
  ``BertSelfAttention.forward`` infers the head count from the tensor, ``scaling`` stays
  ``head_size**-0.5``).  ``model.config`` is left as is; per-layer sizes live in the shape manifest.

  Speed: every sliced weight is a fresh contiguous row-major copy (``_new_param``), so a compacted
  layer runs exactly the kernels of a layer *built* at the smaller size — measured module by module
  against Torch-Pruning's pruned BERT (same shapes, strides, SDPA attention, no hooks): equal within
  noise (docs/speed.md).

Limits (documented, checked): channels coupled through a residual add (ResNet ``conv2``/``bn2``
outputs, the stem, downsample branches) and the transformer hidden size are **not** compacted —
they would have to be empty in every coupled tensor; grouped/depthwise convolutions, cross-attention
and ``AvgPool`` with ``count_include_pad`` padding are refused or left alone.  At least one channel,
neuron and head is always kept (an empty layer stays a one-unit layer of zeros), so every shape stays
valid for ONNX and HF code.

A compacted model is saved with :func:`save_compacted` (``model.safetensors`` + ``compact.json``, the
shape manifest: kept indices per sliced module, per-layer heads and intermediate sizes, new shapes)
and rebuilt with :func:`rebuild_compacted` (fresh base model → same slicing → strict load).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from prunekit.core.errors import ModelError
from prunekit.core.masks import MaskSet
from prunekit.deploy.surgery import CompactResult as GraphCompactResult
from prunekit.deploy.surgery import apply_keeps
from prunekit.io.checkpoint import CheckpointError, _atomic_replace, atomic_write_json, sha256_file, state_dict_for_save
from prunekit.models.lenet import LeNet5, LeNet5Classic
from prunekit.models.resnet import BasicBlock

__all__ = ["Chain", "default_chains", "transformer_layers", "compact", "CompactResult", "save_compacted",
    "load_compacted", "rebuild_compacted", "apply_manifest", "COMPACT_FORMAT", "GRAPH_FORMAT", "graph_manifest"]

COMPACT_FORMAT = "prunekit-compact/1"
GRAPH_FORMAT = "prunekit-compact/2"
COMPACT_MANIFEST, COMPACT_WEIGHTS = "compact.json", "model.safetensors"

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU,
                nn.Hardswish, nn.Hardtanh, nn.Identity, nn.Dropout)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool2d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class Chain:
    """``producer`` channels → per-channel ``between`` modules → ``consumer`` (see module docstring).

    ``spatial``: consumer Linear columns per channel when a flatten sits in between (LeNet-5: the
    50×4×4 conv2 output flattens to fc1's 800 columns, 16 consecutive columns per channel)."""

    producer: str
    consumer: str
    between: tuple[str, ...] = ()
    spatial: int = 1


# ------------------------------------------------------------------------------------------------
# Pure slicers: keep these output rows / these input columns of one module, in place.
# ------------------------------------------------------------------------------------------------
def _new_param(p: Tensor, data: Tensor) -> nn.Parameter:
    return nn.Parameter(data.detach().clone().contiguous(), requires_grad=p.requires_grad)


@torch.no_grad()
def _slice_out(m: nn.Module, keep: Tensor) -> None:
    """Keep output units ``keep`` (1-D long) of a Linear / Conv / BatchNorm."""
    if isinstance(m, nn.Linear):
        m.weight = _new_param(m.weight, m.weight[keep])
        if m.bias is not None:
            m.bias = _new_param(m.bias, m.bias[keep])
        m.out_features = int(keep.numel())
    elif isinstance(m, nn.Conv2d):
        _check_conv(m)
        m.weight = _new_param(m.weight, m.weight[keep])
        if m.bias is not None:
            m.bias = _new_param(m.bias, m.bias[keep])
        m.out_channels = int(keep.numel())
    elif isinstance(m, _BNS):
        if m.affine:
            m.weight = _new_param(m.weight, m.weight[keep])
            m.bias = _new_param(m.bias, m.bias[keep])
        if m.track_running_stats and m.running_mean is not None:
            m.running_mean = m.running_mean[keep].clone()
            m.running_var = cast(Tensor, m.running_var)[keep].clone()   # set with running_mean
        m.num_features = int(keep.numel())
    else:
        raise TypeError(f"cannot slice output units of a {type(m).__name__}")


@torch.no_grad()
def _slice_in(m: nn.Module, keep: Tensor) -> None:
    """Keep input columns (Linear) / input channels (Conv) ``keep``."""
    if isinstance(m, nn.Linear):
        m.weight = _new_param(m.weight, m.weight[:, keep])
        m.in_features = int(keep.numel())
    elif isinstance(m, nn.Conv2d):
        _check_conv(m)
        m.weight = _new_param(m.weight, m.weight[:, keep])
        m.in_channels = int(keep.numel())
    else:
        raise TypeError(f"cannot slice input units of a {type(m).__name__}")


def _check_conv(m: nn.Conv2d) -> None:
    if m.groups != 1:
        raise ModelError(f"grouped/depthwise Conv2d (groups={m.groups}) is not supported by compaction")


def _columns(keep_channels: Tensor, spatial: int) -> Tensor:
    """Channel indices → flattened column indices (``spatial`` consecutive columns per channel)."""
    if spatial == 1:
        return keep_channels
    return (keep_channels[:, None] * spatial + torch.arange(spatial)).reshape(-1)


# ------------------------------------------------------------------------------------------------
# Bookkeeping of what was kept (relative to the original model), for the manifest and rebuild.
# ------------------------------------------------------------------------------------------------
class _Ledger:
    def __init__(self, model: nn.Module):
        self.model = model
        self.out: dict[str, Tensor] = {}
        self.inp: dict[str, Tensor] = {}
        self.attrs: dict[str, dict[str, int]] = {}
        self.folded: dict[str, int] = {}

    def _base(self, table: dict[str, Tensor], name: str, n: int) -> Tensor:
        return table.get(name, torch.arange(n))

    def slice_out(self, name: str, keep: Tensor) -> None:
        m = self.model.get_submodule(name)
        n = cast(Tensor, m.weight).shape[0] if not isinstance(m, _BNS) else m.num_features
        self.out[name] = self._base(self.out, name, n)[keep]
        _slice_out(m, keep)

    def slice_in(self, name: str, keep: Tensor, n_before: int) -> None:
        self.inp[name] = self._base(self.inp, name, n_before)[keep]
        _slice_in(self.model.get_submodule(name), keep)


# ------------------------------------------------------------------------------------------------
# Constant propagation through the per-channel modules between producer and consumer.
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def _through(m: nn.Module, c: Tensor, name: str) -> Tensor:
    """Value of each channel after ``m`` when the channel is the constant ``c`` (shape ``(n,)``)."""
    if isinstance(m, _BNS):
        if m.training:
            raise ModelError(f"{name}: BatchNorm in training mode; call model.eval() before compacting")
        mean = m.running_mean if m.track_running_stats and m.running_mean is not None else torch.zeros_like(c)
        var = m.running_var if m.track_running_stats and m.running_var is not None else torch.ones_like(c)
        return F.batch_norm(c[None], mean, var, m.weight, m.bias, False, 0.0, m.eps)[0]
    if isinstance(m, nn.AvgPool2d) and m.padding not in (0, (0, 0)) and m.count_include_pad:
        raise ModelError(f"{name}: AvgPool2d with padding and count_include_pad does not keep constants")
    if isinstance(m, _POOLS) or isinstance(m, nn.Dropout):
        return c
    if isinstance(m, _ACTIVATIONS):
        return m(c.clone())
    raise TypeError(f"{name}: {type(m).__name__} between producer and consumer is not a known "
                    f"per-channel module ({', '.join(t.__name__ for t in _ACTIVATIONS + _POOLS + _BNS)})")


def _zero_rows(w: Tensor) -> Tensor:
    return (w.reshape(w.shape[0], -1) == 0).all(1)


def _keep_at_least_one(removable: Tensor) -> Tensor:
    keep = ~removable
    if not keep.any():
        keep[0] = True
    return keep


@torch.no_grad()
def _compact_chain(ledger: _Ledger, ch: Chain) -> int:
    model = ledger.model
    P, C = model.get_submodule(ch.producer), model.get_submodule(ch.consumer)
    for nm, m in ((ch.producer, P), (ch.consumer, C)):
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"chain module {nm!r} is a {type(m).__name__}; expected Linear or Conv2d")
    P, C = cast("nn.Linear | nn.Conv2d", P), cast("nn.Linear | nn.Conv2d", C)   # checked just above
    n = P.weight.shape[0]
    const = P.bias.detach().clone() if P.bias is not None else torch.zeros(n, dtype=P.weight.dtype)
    for b in ch.between:
        bm = model.get_submodule(b)
        if isinstance(bm, _BNS) and bm.num_features != n:
            raise ModelError(f"{b}: {bm.num_features} features but producer {ch.producer} has {n} channels")
        const = _through(bm, const, b)
    Wc = C.weight
    if isinstance(C, nn.Linear):
        if C.in_features != n * ch.spatial:
            raise ModelError(f"chain {ch.producer}→{ch.consumer}: consumer has {C.in_features} input columns, "
                             f"expected {n} channels × spatial {ch.spatial}")
        slices = Wc.reshape(Wc.shape[0], n, ch.spatial)              # (out, n, spatial)
        col_sum = slices.sum(2)                                       # (out, n)
        foldable = C.bias is not None
    else:
        _check_conv(C)
        if C.in_channels != n or ch.spatial != 1:
            raise ModelError(f"chain {ch.producer}→{ch.consumer}: consumer Conv has {C.in_channels} input "
                             f"channels, producer {n} (spatial must be 1 for a Conv consumer)")
        slices = Wc.transpose(0, 1).reshape(n, Wc.shape[0], -1).transpose(0, 1)   # (out, n, k*k)
        col_sum = slices.sum(2)
        unpadded = all(p == 0 for p in (C.padding if isinstance(C.padding, tuple) else (C.padding,))) \
            if not isinstance(C.padding, str) else C.padding == "valid"
        foldable = unpadded and C.bias is not None
    unused = (slices == 0).all(2).all(0)
    constant = _zero_rows(P.weight)
    keep_mask, fold = _removal(unused, constant, const, foldable)
    if keep_mask.all():
        return 0
    if fold.any():
        cast(Tensor, C.bias).add_((col_sum[:, fold] * const[fold]).sum(1))   # fold needs a bias (foldable)
        ledger.folded[ch.consumer] = ledger.folded.get(ch.consumer, 0) + int(fold.sum())
    keep = keep_mask.nonzero().reshape(-1)
    ledger.slice_out(ch.producer, keep)
    for b in ch.between:
        if isinstance(model.get_submodule(b), _BNS):
            ledger.slice_out(b, keep)
    ledger.slice_in(ch.consumer, _columns(keep, ch.spatial), n * ch.spatial)
    return int(n - keep.numel())


def _removal(unused: torch.Tensor, constant: torch.Tensor, const: torch.Tensor, foldable: bool):
    """Which units go: those nobody reads (``unused``), and those whose producer row is zero (``constant``)
    when the constant they carry is 0 or can be folded into the consumer's bias.  Returns
    ``(keep_mask, fold)``; ``fold`` marks removed units whose constant must be added to the consumer bias."""
    removable = unused | (constant & ((const == 0) | foldable))
    keep_mask = _keep_at_least_one(removable)
    return keep_mask, ~keep_mask & ~unused & (const != 0)


# ------------------------------------------------------------------------------------------------
# Transformer layers (HF BERT family)
# ------------------------------------------------------------------------------------------------
def _is_transformer_layer(module: nn.Module) -> bool:
    m: Any = module   # an HF layer's submodules are found by name
    try:
        sa = m.attention.self
        return all(isinstance(getattr(sa, k, None), nn.Linear) for k in ("query", "key", "value")) \
            and isinstance(m.attention.output.dense, nn.Linear) and isinstance(m.intermediate.dense, nn.Linear) \
            and isinstance(m.output.dense, nn.Linear) and hasattr(sa, "attention_head_size")
    except AttributeError:
        return False


def transformer_layers(model: nn.Module) -> list[str]:
    """Names of the BERT-family layers :func:`compact` handles (see the module docstring)."""
    return [n for n, m in model.named_modules() if _is_transformer_layer(m)]


@torch.no_grad()
def _compact_ffn(ledger: _Ledger, layer: str) -> int:
    L: Any = ledger.model.get_submodule(layer)   # an HF BERT-family layer (see _is_transformer_layer)
    W1, W2 = L.intermediate.dense, L.output.dense
    n = W1.out_features
    unused = (W2.weight == 0).all(0)
    constant = _zero_rows(W1.weight)
    b1 = W1.bias if W1.bias is not None else torch.zeros(n, dtype=W1.weight.dtype)
    const = L.intermediate.intermediate_act_fn(b1.detach().clone())
    foldable = W2.bias is not None
    keep_mask, fold = _removal(unused, constant, const, foldable)
    if keep_mask.all():
        return 0
    if fold.any():
        W2.bias.add_(W2.weight[:, fold] @ const[fold])
        ledger.folded[f"{layer}.output.dense"] = ledger.folded.get(f"{layer}.output.dense", 0) + int(fold.sum())
    keep = keep_mask.nonzero().reshape(-1)
    ledger.slice_out(f"{layer}.intermediate.dense", keep)
    ledger.slice_in(f"{layer}.output.dense", keep, n)
    return int(n - keep.numel())


@torch.no_grad()
def _compact_heads(ledger: _Ledger, layer: str) -> int:
    L: Any = ledger.model.get_submodule(layer)   # an HF BERT-family layer (see _is_transformer_layer)
    sa, Wo = L.attention.self, L.attention.output.dense
    d = int(sa.attention_head_size)
    H = sa.query.out_features // d
    if H * d != sa.query.out_features or sa.key.out_features != H * d or sa.value.out_features != H * d:
        raise ModelError(f"{layer}: query/key/value sizes {sa.query.out_features}/{sa.key.out_features}/"
                         f"{sa.value.out_features} are not heads × head size {d}")
    out_zero = (Wo.weight.reshape(Wo.out_features, H, d) == 0).all(2).all(0)
    v_zero = (sa.value.weight.reshape(H, d, -1) == 0).all(2).all(1)
    bv = sa.value.bias.reshape(H, d) if sa.value.bias is not None else torch.zeros(H, d, dtype=Wo.weight.dtype)
    v_const_zero = (bv == 0).all(1)
    removable = out_zero | (v_zero & (v_const_zero | torch.tensor(Wo.bias is not None)))
    keep_mask = _keep_at_least_one(removable)
    if keep_mask.all():
        return 0
    fold = ~keep_mask & ~out_zero & ~v_const_zero
    if fold.any():
        Wh = Wo.weight.reshape(Wo.out_features, H, d)
        Wo.bias.add_(torch.einsum("ohd,hd->o", Wh[:, fold], bv[fold]))
        ledger.folded[f"{layer}.attention.output.dense"] = int(fold.sum())
    heads = keep_mask.nonzero().reshape(-1)
    cols = _columns(heads, d)
    for k in ("query", "key", "value"):
        ledger.slice_out(f"{layer}.attention.self.{k}", cols)
    ledger.slice_in(f"{layer}.attention.output.dense", cols, H * d)
    kept = int(heads.numel())
    _set_head_attrs(sa, kept)
    ledger.attrs[f"{layer}.attention.self"] = {"num_attention_heads": kept, "all_head_size": kept * d}
    return H - kept


def _set_head_attrs(sa: Any, kept: int) -> None:
    """Head count of a compacted attention module; ``attention_head_size``, ``scaling`` and the
    attention implementation (``config._attn_implementation``, SDPA by default) stay as they are."""
    sa.num_attention_heads = kept
    sa.all_head_size = kept * int(sa.attention_head_size)


# ------------------------------------------------------------------------------------------------
# Model-level API
# ------------------------------------------------------------------------------------------------
def default_chains(model: nn.Module) -> list[Chain]:
    """Built-in channel chains for prunekit's CNNs (LeNet-5 variants, ResNet BasicBlocks)."""

    chains: list[Chain] = []
    if isinstance(model, LeNet5):
        chains += [Chain("conv1", "conv2", ("pool1",)),
                   Chain("conv2", "fc1", ("pool2",), spatial=16),
                   Chain("fc1", "fc2", ("relu",))]
    elif isinstance(model, LeNet5Classic):
        chains += [Chain("conv1", "conv2", ("relu", "pool")),
                   Chain("conv2", "fc1", ("relu", "pool"), spatial=25),
                   Chain("fc1", "fc2", ("relu",)),
                   Chain("fc2", "fc3", ("relu",))]
    for name, m in model.named_modules():
        if isinstance(m, BasicBlock):
            p = f"{name}." if name else ""
            chains.append(Chain(f"{p}conv1", f"{p}conv2", (f"{p}bn1", f"{p}relu")))
    return chains


@dataclass
class CompactResult:
    """What :func:`compact` did; ``manifest`` is the JSON shape manifest (see :func:`save_compacted`)."""

    removed: dict[str, int]          # chain / layer part → units removed
    params_before: int
    params_after: int
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def param_reduction(self) -> float:
        return self.params_before / max(self.params_after, 1)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def compact(model: nn.Module, masks: MaskSet | None = None, *, chains: Sequence[Chain] | None = None,
            transformers: bool = True, max_passes: int = 10) -> CompactResult:
    """Compact ``model`` **in place** (call ``model.eval()`` first: BatchNorm running stats are used).

    ``masks``: applied to the weights first (``MaskSet.apply``).  ``chains``: channel chains (default
    :func:`default_chains`).  ``transformers``: also compact BERT-family layers found by
    :func:`transformer_layers`.  Chains are re-scanned until nothing changes (removing folded input
    channels can empty further rows), at most ``max_passes`` times.
    """
    if masks is not None:
        masks.apply(model)
    if model.training:
        raise ModelError("compact() needs model.eval(): BatchNorm running statistics define the removed "
                         "channels' constants")
    before = _count(model)
    chains = list(default_chains(model) if chains is None else chains)
    layers = transformer_layers(model) if transformers else []
    if not chains and not layers:
        raise ModelError(f"nothing to compact in {type(model).__name__}: no built-in chains and no BERT-family "
                         "layers; pass chains=[Chain(producer, consumer, between, spatial), ...]")
    ledger = _Ledger(model)
    removed: dict[str, int] = {}
    for _ in range(max_passes):
        changed = 0
        for ch in chains:
            k = _compact_chain(ledger, ch)
            if k:
                removed[f"{ch.producer}->{ch.consumer}"] = removed.get(f"{ch.producer}->{ch.consumer}", 0) + k
                changed += k
        if not changed:
            break
    heads: dict[str, int] = {}
    inter: dict[str, int] = {}
    for layer in layers:
        removed[f"{layer}.heads"] = _compact_heads(ledger, layer)
        removed[f"{layer}.ffn"] = _compact_ffn(ledger, layer)
        L: Any = model.get_submodule(layer)
        heads[layer] = int(L.attention.self.num_attention_heads)
        inter[layer] = int(L.intermediate.dense.out_features)
    manifest: dict[str, Any] = {
        "format": COMPACT_FORMAT,
        "model_class": type(model).__name__,
        "keep_out": {k: v.tolist() for k, v in ledger.out.items()},
        "keep_in": {k: v.tolist() for k, v in ledger.inp.items()},
        "attrs": ledger.attrs,
        "heads": heads,
        "intermediate_sizes": inter,
        "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
        "folded_constants": ledger.folded,
        "params_before": before,
        "params_after": _count(model),
    }
    return CompactResult(removed, before, manifest["params_after"], manifest)


def graph_manifest(res: GraphCompactResult, model: nn.Module) -> dict[str, Any]:
    """The ``prunekit-compact/2`` manifest of a graph compaction (``model`` = the compacted model)."""
    return {
        "format": GRAPH_FORMAT,
        "model_class": type(model).__name__,
        "keep": [{"tensor": t, "dim": d, "size": int(v.numel()), "index": torch.nonzero(v).reshape(-1).tolist()}
                 for (t, d), v in res.keeps.items()],
        "attrs": {k: dict(v) for k, v in res.attrs.items()},
        "config_updates": dict(res.config_updates),
        "notes": list(res.notes),
        "groups": [{"name": g.name, "kind": g.kind, "count": g.count, "removed": g.removed, "kept": g.kept,
                    "removable": g.removable, "reason": g.reason} for g in res.groups],
        "params_before": res.params_before,
        "params_after": res.params_after,
        "macs_before": res.macs_before,
        "macs_after": res.macs_after,
    }


@torch.no_grad()
def _apply_graph_manifest(model: nn.Module, manifest: Mapping[str, Any]) -> None:
    state = dict(model.named_buffers())
    state.update(dict(model.named_parameters()))
    keeps = {}
    for k in manifest["keep"]:
        t = state.get(k["tensor"])
        if t is None or t.dim() <= k["dim"] or t.shape[k["dim"]] != k["size"]:
            raise CheckpointError(f"manifest cuts {k['tensor']!r} dim {k['dim']} of size {k['size']}, which "
                                  f"{type(model).__name__} does not have — wrong base_model_factory?")
        along = torch.zeros(k["size"], dtype=torch.bool)
        along[torch.tensor(k["index"], dtype=torch.long)] = True
        keeps[(k["tensor"], int(k["dim"]))] = along
    try:
        apply_keeps(model, keeps, manifest.get("attrs", {}))
    except AttributeError as e:
        raise CheckpointError(f"manifest does not fit {type(model).__name__}: {e}") from None
    cfg = getattr(model, "config", None)
    for k, v in manifest.get("config_updates", {}).items():
        if cfg is not None:
            setattr(cfg, k, v)


@torch.no_grad()
def apply_manifest(model: nn.Module, manifest: Mapping[str, Any]) -> nn.Module:
    """Slice a fresh base ``model`` to the shapes of ``manifest`` (weights are *not* meaningful until a
    state dict is loaded).  Checks the result against ``manifest["shapes"]``."""
    if manifest.get("format") == GRAPH_FORMAT:
        _apply_graph_manifest(model, manifest)
        return _check_shapes(model, manifest)
    if manifest.get("format") != COMPACT_FORMAT:
        raise CheckpointError(f"not a compaction manifest (format {manifest.get('format')!r}, expected "
                              f"{GRAPH_FORMAT!r} or {COMPACT_FORMAT!r})")
    mods = dict(model.named_modules())
    for table, fn in (("keep_out", _slice_out), ("keep_in", _slice_in)):
        for name, idx in manifest[table].items():
            if name not in mods:
                raise CheckpointError(f"manifest names module {name!r}, absent from {type(model).__name__}")
            try:
                fn(mods[name], torch.tensor(idx, dtype=torch.long))
            except (IndexError, RuntimeError) as e:
                raise CheckpointError(f"manifest {table}[{name!r}] does not fit {type(model).__name__}: {e} "
                                      "— wrong base_model_factory?") from None
    for name, attrs in manifest.get("attrs", {}).items():
        if name not in mods:
            raise CheckpointError(f"manifest names module {name!r}, absent from {type(model).__name__}")
        if "num_attention_heads" in attrs:
            _set_head_attrs(mods[name], int(attrs["num_attention_heads"]))
        for k, v in attrs.items():
            setattr(mods[name], k, v)
    return _check_shapes(model, manifest)


def _check_shapes(model: nn.Module, manifest: Mapping[str, Any]) -> nn.Module:
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    bad = [(k, got.get(k), s) for k, s in manifest.get("shapes", {}).items() if got.get(k) != s]
    if bad:
        k, a, b = bad[0]
        raise CheckpointError(f"rebuilt model does not match the manifest: {k!r} is {a}, manifest says {b} "
                              f"({len(bad)} mismatches) — wrong base_model_factory?")
    return model


def rebuild_compacted(manifest: Mapping[str, Any], base_model_factory: Callable[[], nn.Module],
                      state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
    """Build the dense architecture with ``base_model_factory()``, slice it to the manifest's shapes
    and, if ``state_dict`` is given, load it with ``strict=True``."""
    model = apply_manifest(base_model_factory(), manifest)
    if state_dict is not None:
        model.load_state_dict(dict(state_dict), strict=True)
    return model


def save_compacted(directory: str | os.PathLike, model: nn.Module, manifest: Mapping[str, Any],
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` (tied tensors once) and ``compact.json`` (manifest + sha256)."""

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors, aliases = state_dict_for_save(model)
    _atomic_replace(d / COMPACT_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": COMPACT_FORMAT}))
    man = dict(manifest)
    man["shapes"] = {k: list(v.shape) for k, v in model.state_dict().items()}
    man["aliases"] = aliases
    man["sha256"] = {COMPACT_WEIGHTS: sha256_file(d / COMPACT_WEIGHTS)}
    man["extra"] = dict(extra or {})
    atomic_write_json(d / COMPACT_MANIFEST, man)
    return d


def load_compacted(directory: str | os.PathLike, base_model_factory: Callable[[], nn.Module]) -> nn.Module:
    """Inverse of :func:`save_compacted`: verify the checksum, rebuild, strict load."""

    d = Path(directory)
    path = d / COMPACT_MANIFEST
    if not path.is_file():
        raise CheckpointError(f"no compaction manifest at {path}")
    man = json.loads(path.read_text(encoding="utf-8"))
    if sha256_file(d / COMPACT_WEIGHTS) != man.get("sha256", {}).get(COMPACT_WEIGHTS):
        raise CheckpointError(f"{d / COMPACT_WEIGHTS} is corrupt or was changed (sha256 mismatch)")
    state = load_file(str(d / COMPACT_WEIGHTS))
    for k, src in man.get("aliases", {}).items():
        state[k] = state[src]
    return rebuild_compacted(man, base_model_factory, state)
