"""Graph-driven compaction: physically remove fully pruned units of coupled groups, verified.

:func:`compact` takes a model, its masks (a :class:`~prunekit.masks.MaskSet` or ``{name: bool
tensor}``, True = kept; ``None`` = the weights' own zero pattern) and example inputs:

1. the *masked* model (a deep copy with the masks applied) is the reference;
2. coupled groups come from its traced graph (:func:`prunekit.graph.coupled_groups`) unless given;
3. units of removable groups are removed as described below (at least one unit per group is always
   kept, so every shape stays valid);
4. on a second copy every slice's tensor — parameters and buffers — is ``index_select`` ed along its
   dim (fresh contiguous tensors, ``nn.Parameter`` s replaced, tied parameters stay tied), then module
   attributes are fixed: Linear ``in/out_features``, Conv ``in/out_channels`` (and ``groups`` for
   depthwise), BatchNorm ``num_features``, LayerNorm ``normalized_shape``, HF ``Conv1D.nf``, attention
   head counts (``num_attention_heads``/``num_heads``/``n_head``, ``num_key_value_heads``,
   ``all_head_size``, GPT-2 ``split_size``) and, for HF models where every layer agrees and the family
   reads it, ``config.num_attention_heads`` / ``num_key_value_heads`` / ``head_dim`` /
   ``intermediate_size``;
5. the compacted copy and the masked reference run on ``example_inputs`` and on a second input with
   one more example (float values jittered) and, for sequence inputs (integer ``(batch, length)``
   tensors), a shorter length (:func:`second_inputs`; dropped only when the reference model itself
   does not run on it).  **Every output tensor is compared on its own scale**:
   ``max|out_c - out_m| <= rtol * max|out_m| + atol`` (defaults 1e-4 and 1e-5), so a small output
   beside large logits is checked as strictly as they are (:class:`OutputCheck`, ``result.checks``).
   If removing *dead* units (below) fails the check — an activation that does not map 0 to 0 — they
   are kept and the rest is tried again; otherwise :class:`CompactionError` names the offending
   group(s) (each group is then tried alone) and the user's model is left untouched.  On success the
   user's model object takes the compacted state (``inplace=True``, the default) and
   :class:`CompactResult` reports per group.

Which units go (:func:`plan_removals`): a unit that is zero in every weight slice (its source rows and
its consumer columns), unless the group is also read by an op without a weight (``group.readers``: a
``sum`` over the channels would still see the bias or BatchNorm shift the unit carries); and a *dead*
unit — zero source rows and zero one-dimensional parameters (bias, BatchNorm weight and bias), so it is
zero wherever it is read — whatever its consumer columns hold.  Units kept although they look pruned
somewhere are explained in the group's ``reason``.

:func:`macs` counts multiply-accumulates from the same trace (Linear, Conv, Conv1D, attention).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from prunekit.core.errors import ModelError

from ..core.groups import CoupledGroup
from ..graph import analyze_model, build_groups, call_model, macs_of
from ..graph import macs as graph_macs

__all__ = ["compact", "CompactResult", "GroupReport", "CompactionError", "OutputCheck", "macs", "apply_keeps",
           "second_inputs", "plan_removals", "unit_status"]

macs = graph_macs


class CompactionError(ModelError, RuntimeError):
    """Compaction would change the model's function (or could not be done); the model is untouched."""


@dataclass
class GroupReport:
    name: str
    kind: str
    count: int
    removed: int
    kept: int
    removable: bool
    reason: str = ""


@dataclass
class CompactResult:
    model: nn.Module
    groups: list[GroupReport]
    params_before: int
    params_after: int
    max_abs_diff: float
    rel_err: float
    macs_before: int | None = None
    macs_after: int | None = None
    config_updates: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    keeps: dict[tuple[str, int], Tensor] = field(default_factory=dict, repr=False)   # (tensor, dim) → kept bool
    attrs: dict[str, dict[str, int]] = field(default_factory=dict)                    # module → head attributes
    checks: list[OutputCheck] = field(default_factory=list, repr=False)   # every output on every input

    @property
    def removed(self) -> dict[str, int]:
        return {g.name: g.removed for g in self.groups if g.removed}


# ------------------------------------------------------------------------------------------- masks
def _state(model: nn.Module) -> dict[str, Tensor]:
    out = dict(model.named_buffers())
    out.update(dict(model.named_parameters()))
    return out


def _mask_dict(model: nn.Module, masks: Any) -> dict[str, Tensor]:
    if masks is None:   # the weights' own zero pattern; biases and norm parameters ride along (see unit_status)
        return {n: p.detach() != 0 for n, p in model.named_parameters() if p.dim() >= 2}
    items = masks.items() if hasattr(masks, "items") else masks
    return {k: torch.as_tensor(v).bool() for k, v in items}


@torch.no_grad()
def _apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    state = _state(model)
    for name, m in masks.items():
        if name not in state:
            raise KeyError(f"mask for {name!r}: the model has no such parameter")
        t = state[name]
        if tuple(m.shape) != tuple(t.shape):
            raise ModelError(f"mask for {name!r} has shape {tuple(m.shape)}, tensor {tuple(t.shape)}")
        t.mul_(m.to(t.device, t.dtype))


@dataclass
class UnitStatus:
    """Per unit of a group (``(count,)`` bool tensors), see :func:`unit_status`."""

    pruned: Tensor          # zero in every weight slice (masks, else values)
    dead: Tensor            # provably zero: zero sources and zero 1-D parameters
    zero_sources: Tensor    # the rows that write the unit are zero
    some_zero: Tensor       # zero in at least one weight slice
    alive_in: dict[str, Tensor]   # weight → its units that are nonzero there
    sources: set[str]       # the weights that write the units

    def kept_in(self, units: Tensor, readers_only: bool = False) -> list[str]:
        """The weights where some of ``units`` are nonzero (only the reading ones: not sources)."""
        return [t for t, a in self.alive_in.items() if (a & units).any() and not (readers_only and t in self.sources)]

    def removable(self, readers: Sequence[str], use_dead: bool = True) -> Tensor:
        """Dead units (unless ``use_dead`` is False), and pruned ones when nothing reads the units
        without a weight."""
        return (self.dead & use_dead) | (self.pruned & (not readers))


def unit_status(g: CoupledGroup, masks: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> UnitStatus:
    """Which units of ``g`` are pruned / dead (``state`` holds the masked values).

    *pruned*: zero in every weight slice (a parameter of 2+ dims: the mask, or the values where there
    is no mask) and all False in every other slice that has a mask — biases, norm parameters and
    buffers without masks ride along, since whatever they hold only reaches zero weights.
    *dead*: provably zero wherever it is read — every source slice (``g.sources``: the rows that write
    the unit) and every one-dimensional parameter slice (bias, norm affine) is zero; a BatchNorm without
    affine parameters in the group also needs a zero ``running_mean``."""
    n = g.count
    pruned, some = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    dead, zero_src = torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
    alive_in: dict[str, Tensor] = {}
    sources = {(x.tensor, x.dim) for x in g.sources}
    affine = {x.tensor.rsplit(".", 1)[0] for x in g.slices if x.tensor.endswith(".weight")}
    for s in g.slices:
        t, m = state.get(s.tensor), masks.get(s.tensor)
        if t is None:
            continue
        nonzero = s.unit_view(t.detach() != 0, n).any(1)
        is_param, is_weight = isinstance(t, nn.Parameter), isinstance(t, nn.Parameter) and t.dim() >= 2
        if (s.tensor, s.dim) in sources:
            zero_src &= ~nonzero
        if (s.tensor, s.dim) in sources or (is_param and t.dim() == 1) or \
                (s.tensor.endswith("running_mean") and s.tensor.rsplit(".", 1)[0] not in affine):
            dead &= ~nonzero
        if m is None and not is_weight:
            continue
        alive = s.unit_view(m.bool(), n).any(1) if m is not None else nonzero
        if is_weight:
            some |= ~alive
            alive_in[s.tensor] = alive_in.get(s.tensor, torch.zeros(n, dtype=torch.bool)) | alive
        pruned &= ~alive
    if not g.sources:
        dead = torch.zeros(n, dtype=torch.bool)
    return UnitStatus(pruned, dead, zero_src & bool(g.sources), some, alive_in, {x.tensor for x in g.sources})


def _which(names: Sequence[str], k: int = 4) -> str:
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def _stay_note(g: CoupledGroup, st: UnitStatus) -> str:
    """Why units that look pruned somewhere stay (empty when none do)."""
    stay = ~st.removable(g.readers)
    notes = []
    read = stay & st.pruned
    if read.any():
        notes.append(f"{int(read.sum())} units are zero in every weight but read by {_which(list(g.readers), 2)} "
                     "and not provably zero (a bias or BatchNorm shift reaches it): they stay")
    const = stay & ~st.pruned & st.zero_sources
    if const.any():
        notes.append(f"{int(const.sum())} units have zero source rows but a nonzero bias or norm affine, read by "
                     f"{_which(st.kept_in(const, readers_only=True))}: they carry a constant and stay (zero the bias and the BatchNorm "
                     "weight and bias too to remove them)")
    partner = stay & ~st.pruned & ~st.zero_sources & st.some_zero
    if partner.any():
        notes.append(f"{int(partner.sum())} units are zero in some weights but kept in coupled tensors "
                     f"({_which(st.kept_in(partner))}), e.g. a residual partner: they stay")
    return "; ".join(notes)


def plan_removals(groups: Sequence[CoupledGroup], masks: Mapping[str, Tensor], state: Mapping[str, Tensor],
                  use_dead: bool = True) -> tuple[list[tuple[CoupledGroup, Tensor]], dict[str, str]]:
    """``(group, keep)`` for every removable group with units to remove (at least one unit kept), and
    per group a note on units that look pruned somewhere but stay.

    A unit goes when it is dead (:func:`unit_status`: provably zero, whatever its consumers hold), or
    when it is pruned in every weight slice and nothing reads the units without a weight
    (``g.readers``: a ``sum`` over them would see a bias or BatchNorm shift that no weight multiplies)."""
    plan, notes = [], {}
    for g in groups:
        if not g.removable:
            continue
        st = unit_status(g, masks, state)
        note = _stay_note(g, st)
        if note:
            notes[g.name] = note
        remove = st.removable(g.readers, use_dead)
        if not remove.any():
            continue
        keep = ~remove
        if not keep.any():
            keep[0] = True
        plan.append((g, keep))
    return plan, notes


# ------------------------------------------------------------------------------------------- slicing
def _keep_vectors(plan, state: Mapping[str, Tensor]) -> dict[tuple[str, int], Tensor]:
    keeps: dict[tuple[str, int], Tensor] = {}
    for g, keep in plan:
        for s in g.slices:
            if s.tensor not in state:
                raise CompactionError(f"group {g.name}: the model has no tensor {s.tensor!r}")
            size = state[s.tensor].shape[s.dim]
            along = keeps.setdefault((s.tensor, s.dim), torch.ones(size, dtype=torch.bool))
            start, stop = s.span(g.count)
            along[start:stop] &= keep.repeat_interleave(s.width)
    return keeps


def _select(t: Tensor, dim: int, idx: Tensor) -> Tensor:
    """The kept entries along ``dim`` as a fresh contiguous tensor (a hook for tests)."""
    return t.detach().index_select(dim, idx.to(t.device)).contiguous().clone()


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    out: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None:
                out.setdefault(id(t), []).append((mod, attr, attr in mod._parameters))
    return out


@torch.no_grad()
def _slice_tensors(model: nn.Module, keeps: Mapping[tuple[str, int], Tensor]) -> set[int]:
    """Cut every tensor along its kept indices; returns the ids of the modules touched."""
    state, owners, touched = _state(model), _owners(model), set()
    by_tensor: dict[str, list[tuple[int, Tensor]]] = {}
    for (name, dim), along in keeps.items():
        by_tensor.setdefault(name, []).append((dim, along))
    for name, cuts in by_tensor.items():
        old = state[name]
        new = old.detach()
        for dim, along in cuts:
            new = _select(new, dim, torch.nonzero(along).reshape(-1))
        for mod, attr, is_param in owners.get(id(old), []):
            if is_param:
                mod._parameters[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
            else:
                mod._buffers[attr] = new
            touched.add(id(mod))
        if is_param_shared(owners.get(id(old), [])):
            p = owners[id(old)][0][0]._parameters[owners[id(old)][0][1]]
            for mod, attr, is_param in owners[id(old)]:
                if is_param:
                    mod._parameters[attr] = p
    return touched


def is_param_shared(owned: list[tuple[nn.Module, str, bool]]) -> bool:
    return sum(1 for _, _, p in owned if p) > 1


# ------------------------------------------------------------------------------------------- attributes
def _depthwise(model: nn.Module) -> set[int]:
    return {id(m) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)
            and m.groups > 1 and m.groups == m.in_channels == m.out_channels}


def _fix_module(m: nn.Module, depthwise: bool) -> None:
    w: Tensor | None = getattr(m, "weight", None)
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = int(m.weight.shape[0]), int(m.weight.shape[1])
    elif isinstance(m, nn.modules.conv._ConvNd):
        m.out_channels = int(m.weight.shape[0])
        if depthwise:
            m.groups = m.in_channels = int(m.weight.shape[0])
        else:
            m.in_channels = int(m.weight.shape[1]) * m.groups
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        ref = cast(Tensor, w if w is not None else m.running_mean)   # affine or tracking stats: one is set
        m.num_features = int(ref.shape[0])
    elif isinstance(m, nn.LayerNorm) and w is not None:
        m.normalized_shape = tuple(int(s) for s in w.shape)
    elif isinstance(m, nn.GroupNorm) and w is not None:
        m.num_channels = int(w.shape[0])
    elif isinstance(m, nn.Embedding):
        m.num_embeddings, m.embedding_dim = int(m.weight.shape[0]), int(m.weight.shape[1])
    elif type(m).__name__ == "Conv1D" and w is not None:   # HF GPT-2 style (in, out) weight
        setattr(m, "nf", int(w.shape[1]))  # noqa: B010 - HF Conv1D attribute, not declared on nn.Module
        if hasattr(m, "nx"):
            setattr(m, "nx", int(w.shape[0]))  # noqa: B010


_HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_head", "n_heads")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_WIDTH_ATTRS = ("all_head_size", "split_size", "inner_dim")


def _fix_attention(model: nn.Module, g: CoupledGroup, keep: Tensor) -> None:
    """Head counts on the attention module (and its children) after removing units of ``g``."""
    if not g.attention:
        return
    kept = int(keep.sum())
    heads = kept * g.heads_per_unit
    for _, m in model.get_submodule(g.attention).named_modules():
        for a in _HEAD_ATTRS:
            if isinstance(getattr(m, a, None), int):
                setattr(m, a, heads)
        for a in _KV_ATTRS:
            if isinstance(getattr(m, a, None), int):
                setattr(m, a, kept if g.kind == "kv_groups" else heads)
        for a in _WIDTH_ATTRS:
            if isinstance(getattr(m, a, None), int):
                setattr(m, a, heads * g.head_dim)


def _apply(model: nn.Module, plan) -> None:
    """Slice ``model`` in place according to ``plan`` and fix module attributes."""
    apply_keeps(model, _keep_vectors(plan, _state(model)))
    for g, keep in plan:
        _fix_attention(model, g, keep)


def apply_keeps(model: nn.Module, keeps: Mapping[tuple[str, int], Tensor],
                attrs: Mapping[str, Mapping[str, int]] | None = None) -> None:
    """Cut ``model``'s tensors to ``keeps`` (``(tensor, dim) → kept bool``), fix the touched modules'
    sizes and set ``attrs`` (module → attribute values, e.g. head counts): how a saved compaction is
    replayed on a fresh dense model (:func:`prunekit.deploy.compact.apply_manifest`)."""
    dw = _depthwise(model)
    touched = _slice_tensors(model, keeps)
    for m in model.modules():
        if id(m) in touched:
            _fix_module(m, id(m) in dw)
    for name, values in (attrs or {}).items():
        mod = model.get_submodule(name)
        for k, v in values.items():
            setattr(mod, k, v)


def _head_attrs(model: nn.Module, plan) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for g, _ in plan:
        if not g.attention:
            continue
        for sub, m in model.get_submodule(g.attention).named_modules():
            vals = {a: getattr(m, a) for a in _HEAD_ATTRS + _KV_ATTRS + _WIDTH_ATTRS
                    if isinstance(getattr(m, a, None), int) and not isinstance(getattr(m, a), bool)}
            if vals:
                out[f"{g.attention}.{sub}" if sub else g.attention] = vals
    return out


# ------------------------------------------------------------------------------------------- config
_FFN_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "hidden_dim", "d_ff")


def _uniform(values: Iterable[int]) -> int | None:
    vals = set(values)
    return vals.pop() if len(vals) == 1 else None


DEPLOY_INSTEAD = ("deploy it with prunekit's own format instead (model.safetensors + compact.json: "
                  "prunekit.deploy.compact.save_compacted / load_compacted(DIR, factory), written by `prunekit "
                  "compact`) or as ONNX (prunekit.deploy.export.export_onnx)")


def is_hf_model(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (has a config and ``save_pretrained`` / ``from_pretrained``)."""
    return getattr(model, "config", None) is not None and hasattr(model, "save_pretrained") \
        and hasattr(type(model), "from_pretrained")


def config_mismatches(model: nn.Module, updates: Mapping[str, Any] | None = None) -> list[str]:
    """``"name: config gives (a, b), compacted (c, d)"`` for every tensor of ``model`` that a fresh
    ``type(model)(config)`` (``config`` + ``updates``, built on the meta device) shapes differently; a
    one-item list naming the error when the model cannot be built from its config."""
    cfg = copy.deepcopy(model.config)
    for k, v in (updates or {}).items():
        setattr(cfg, k, v)
    try:
        with torch.device("meta"):
            fresh = type(model)(cfg)
    except Exception as e:  # noqa: BLE001 - any failure to build means the config does not express the model
        return [f"{type(model).__name__}(config) fails: {type(e).__name__}: {str(e).splitlines()[0][:200]}"]
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return [f"{k}: config gives {tuple(v.shape)}, compacted {want[k]}"
            for k, v in fresh.state_dict().items() if k in want and tuple(v.shape) != want[k]]


def _update_config(model: nn.Module, groups: Sequence[CoupledGroup], plan) -> tuple[dict, list[str]]:
    """Set HF config sizes where every layer agrees and the family's config can express them: head and KV-head
    counts with an explicit ``head_dim`` (checked by building the model from the config on the meta device),
    the FFN width (``intermediate_size`` / ``n_inner`` / ``hidden_dim`` ...).  The notes say what the config
    cannot express (then :func:`prunekit.deploy.hf_folder.save_hf_folder` writes no HF folder)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}, []
    keep_of = {g.name: keep for g, keep in plan}
    kept = {g.name: int(keep_of[g.name].sum()) if g.name in keep_of else g.count for g in groups if g.removable}
    heads, notes = _head_updates(cfg, groups, kept, keep_of)
    ffn, ffn_notes = _ffn_update(cfg, groups, kept, keep_of)
    notes += ffn_notes
    if heads and is_hf_model(model):
        attn = {s.tensor for g in groups if g.name in keep_of and g.attention for s in g.slices}
        bad = [b for b in config_mismatches(model, {**heads, **ffn}) if b.split(":", 1)[0] in attn]
        if bad:
            notes.append(f"{type(cfg).__name__} cannot express the removed heads for from_pretrained ({bad[0]}): "
                         "this family derives "
                         "the head size from hidden_size / num_attention_heads and transformers 5 has no "
                         "prune_heads / pruned_heads")
            heads = {}
    upd = {**heads, **ffn}
    for k, v in upd.items():
        setattr(cfg, k, v)
    if notes:
        notes.append(f"the compacted model does not reload with from_pretrained: {DEPLOY_INSTEAD}")
    return upd, notes


def _head_updates(cfg: Any, groups: Sequence[CoupledGroup], kept: Mapping[str, int],
                  keep_of: Mapping[str, Tensor]) -> tuple[dict[str, int], list[str]]:
    attn = [g for g in groups if g.kind in ("heads", "kv_groups") and g.name in kept]
    if not any(g.name in keep_of for g in attn):
        return {}, []
    counts = {kind: sorted({kept[g.name] for g in attn if g.kind == kind}) for kind in ("heads", "kv_groups")}
    kv, heads = _uniform(counts["kv_groups"]), _uniform(counts["heads"])
    if kv is None and heads is None:
        per = "; ".join(f"{k}: {v}" for k, v in counts.items() if v)
        return {}, [f"attention head counts differ across layers ({per} kept): one config.num_attention_heads "
                    "cannot express them"]
    g0, units = attn[0], kv if kv is not None else heads
    assert units is not None                                     # one of them is uniform (checked above)
    upd = {"head_dim": g0.head_dim, "num_attention_heads": units * g0.heads_per_unit if kv is not None else units}
    if hasattr(cfg, "num_key_value_heads"):
        upd["num_key_value_heads"] = units
    return upd, []


def _ffn_update(cfg: Any, groups: Sequence[CoupledGroup], kept: Mapping[str, int],
                keep_of: Mapping[str, Tensor]) -> tuple[dict[str, int], list[str]]:
    key = next((k for k in _FFN_KEYS if hasattr(cfg, k)), None)
    neurons = [g for g in groups if g.kind == "neurons" and g.name in kept]
    if key is None or not any(g.name in keep_of for g in neurons):
        return {}, []
    old = getattr(cfg, key)
    ffn = [g for g in neurons if g.count == old] if isinstance(old, int) else neurons   # GPT-2 n_inner=None: 4*hidden
    sizes = sorted({kept[g.name] for g in ffn})
    if not any(g.name in keep_of for g in ffn):
        return {}, []
    if len(sizes) > 1:
        return {}, [f"FFN widths differ across layers ({sizes[0]} to {sizes[-1]} neurons kept): one "
                    f"config.{key} cannot express them"]
    return ({key: sizes[0]} if sizes[0] != old else {}), []


# ------------------------------------------------------------------------------------------- verify
def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def _vary(t: Any, extra: int, length: int | None, seed: int) -> Any:
    """``t`` with ``extra`` more rows (the first rows again, float values jittered) and, for an integer
    ``(batch, length, ...)`` tensor, the sequence cut to ``length``."""
    if not isinstance(t, Tensor) or t.dim() == 0:
        return t
    out = torch.cat([t, t[:1].expand(extra, *t.shape[1:])]) if extra else t
    if t.is_floating_point():
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(out.shape, generator=g, dtype=torch.float32).to(out.device, out.dtype)
        out = out + 0.1 * (float(t.float().std()) if t.numel() > 1 else 1.0) * noise
    elif length is not None and out.dim() >= 2:
        out = out[:, :length]
    return out.contiguous()


def second_inputs(x: Any) -> Any:
    """The check's second input: one more example (batch ``b+1``) and, for sequence inputs (integer
    ``(batch, length)`` tensors such as ``input_ids`` / ``attention_mask``), a shorter length."""
    leaves = [v for v in (x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else [x])]
    seqs = [v for v in leaves if isinstance(v, Tensor) and v.dim() == 2 and not v.is_floating_point()]
    length = int(seqs[0].shape[1]) - max(1, int(seqs[0].shape[1]) // 4) if seqs and seqs[0].shape[1] > 1 else None
    if isinstance(x, Mapping):
        return {k: _vary(v, 1, length if v is not None and getattr(v, "dim", lambda: 0)() == 2 else None, i)
                for i, (k, v) in enumerate(x.items())}
    if isinstance(x, (tuple, list)):
        return type(x)(_vary(v, 1, length, i) for i, v in enumerate(x))
    return _vary(x, 1, length, 0)


@dataclass
class OutputCheck:
    """One output tensor on one input: ``max|new - ref| <= rtol * max|ref| + atol``."""

    input: int
    output: int
    shape: tuple[int, ...]
    max_abs_diff: float
    scale: float
    ok: bool

    @property
    def rel_err(self) -> float:
        return self.max_abs_diff / max(self.scale, 1e-12)

    def describe(self) -> str:
        return (f"output {self.output} on input {self.input} (shape {list(self.shape)}): max abs diff "
                f"{self.max_abs_diff:.3g}, relative {self.rel_err:.3g} of its own scale {self.scale:.3g}")


def _compare(a: Any, b: Any, i: int, rtol: float, atol: float) -> list[OutputCheck]:
    xs, ys = _tensors(a), _tensors(b)
    if len(xs) != len(ys):
        return [OutputCheck(i, -1, (), float("inf"), 0.0, False)]
    out = []
    for k, (x, y) in enumerate(zip(xs, ys)):
        if x.shape != y.shape:
            out.append(OutputCheck(i, k, tuple(y.shape), float("inf"), 0.0, False))
            continue
        diff = float((x.float() - y.float()).abs().max()) if x.numel() else 0.0
        scale = float(x.float().abs().max()) if x.numel() else 0.0
        out.append(OutputCheck(i, k, tuple(x.shape), diff, scale, diff <= rtol * scale + atol))
    return out


def reference_outputs(ref: nn.Module, example_inputs: Any) -> list[tuple[Any, Any]]:
    """``(input, outputs of ref)`` for the example input and its variant (:func:`second_inputs`); the
    variant is dropped when the reference model itself does not run on it."""
    pairs = [(example_inputs, call_model(ref, example_inputs))]
    try:
        x2 = second_inputs(example_inputs)
        pairs.append((x2, call_model(ref, x2)))
    except Exception:  # noqa: BLE001 - a model fixed to one shape is checked on its own input only
        pass
    return pairs


def check_outputs(refs: Sequence[tuple[Any, Any]], new: nn.Module, rtol: float, atol: float) -> list[OutputCheck]:
    """Every output tensor of ``new`` against the reference on every input, each on its own scale."""
    return [c for i, (x, want) in enumerate(refs) for c in _compare(want, call_model(new, x), i, rtol, atol)]


def _try(ref: nn.Module, plan, refs, rtol: float, atol: float) -> tuple[nn.Module | None, list[OutputCheck], str]:
    new = copy.deepcopy(ref)
    try:
        _apply(new, plan)
        checks = check_outputs(refs, new, rtol, atol)
    except Exception as e:  # noqa: BLE001 - any failure of the compacted model is a refusal
        return None, [], f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return new, checks, ""


def _failed(checks: Sequence[OutputCheck]) -> list[OutputCheck]:
    return [c for c in checks if not c.ok]


def _culprits(ref: nn.Module, plan, refs, rtol: float, atol: float) -> list[str]:
    bad = []
    for g, keep in plan:
        _, checks, err = _try(ref, [(g, keep)], refs, rtol, atol)
        worst = _failed(checks)
        if err or worst:
            bad.append(f"{g.name} ({err or worst[0].describe()})")
    return bad


def _swap(model: nn.Module, new: nn.Module, training: bool) -> None:
    """Give ``model`` (the user's object) the compacted state of ``new``."""
    model.__dict__.clear()
    model.__dict__.update(new.__dict__)
    model.train(training)


def _nparams(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------- entry
def _verified(ref: nn.Module, groups, mdict, refs, rtol: float, atol: float):
    """``(new, plan, notes, checks)``: the compacted copy that passes the check.  When removing the dead
    units (zero sources, consumer columns not zero) fails it — an activation that maps 0 elsewhere —
    they are kept and the rest is tried again.  Raises :class:`CompactionError` naming the groups."""
    state = _state(ref)
    plan, notes = plan_removals(groups, mdict, state)
    new, checks, err = _try(ref, plan, refs, rtol, atol)
    if new is not None and not _failed(checks):
        return new, plan, notes, checks
    plan2, notes2 = plan_removals(groups, mdict, state, use_dead=False)
    if [(g.name, k.tolist()) for g, k in plan2] != [(g.name, k.tolist()) for g, k in plan]:
        new2, checks2, err2 = _try(ref, plan2, refs, rtol, atol)
        if new2 is not None and not _failed(checks2):
            return new2, plan2, notes2, checks2
    bad = _culprits(ref, plan, refs, rtol, atol) or [g.name for g, _ in plan]
    why = err or "; ".join(c.describe() for c in _failed(checks)[:3]) + f" > rtol {rtol:g} + atol {atol:g}"
    raise CompactionError(f"compaction refused, the model is unchanged: {why}; offending group(s): " + "; ".join(bad))


def compact(model: nn.Module, masks: Any, example_inputs: Any, *, groups: Sequence[CoupledGroup] | None = None,
            rtol: float = 1e-4, atol: float = 1e-5, inplace: bool = True, count_macs: bool = True) -> CompactResult:
    """Remove the fully pruned and the dead units of every removable coupled group, verified (module
    docstring).

    Raises :class:`CompactionError` (model untouched) when an output tensor of the compacted model
    differs from the masked model's by more than ``rtol`` × its own largest value + ``atol``, on the
    example input or its variant with another batch size (and sequence length), naming the group(s);
    :class:`prunekit.graph.TraceError` (a :class:`ModelError`) when the model cannot be traced."""
    training = model.training
    ref = copy.deepcopy(model).eval()
    mdict = _mask_dict(ref, masks)
    _apply_masks(ref, mdict)
    analysis = analyze_model(ref, example_inputs) if groups is None or count_macs else None
    if groups is None:
        assert analysis is not None
        groups = build_groups(analysis)
    refs = reference_outputs(ref, example_inputs)
    new, plan, partial, checks = _verified(ref, groups, mdict, refs, rtol, atol)
    updates, notes = _update_config(new, groups, plan)
    keep_of = {g.name: keep for g, keep in plan}
    reports = [GroupReport(g.name, g.kind, g.count, int((~keep_of[g.name]).sum()) if g.name in keep_of else 0,
                           int(keep_of[g.name].sum()) if g.name in keep_of else g.count,
                           g.removable and (g.name not in partial or g.name in keep_of),
                           g.reason or partial.get(g.name, ""))
               for g in groups]
    diff = max((c.max_abs_diff for c in checks), default=0.0)
    rel = max((c.rel_err for c in checks), default=0.0)
    res = CompactResult(new, reports, _nparams(ref), _nparams(new), diff, rel, config_updates=updates, notes=notes,
                        keeps=_keep_vectors(plan, _state(ref)), attrs=_head_attrs(new, plan), checks=checks)
    if count_macs:
        assert analysis is not None
        res.macs_before = macs_of(analysis.traced)["total"]
        res.macs_after = graph_macs(new, example_inputs)["total"]
    if inplace:
        _swap(model, new, training)
        res.model = model
    else:
        new.train(training)
    return res
