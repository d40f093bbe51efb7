"""Hand-written layouts of BERT-family encoders (documented fallback): default targets, attention heads and FFN neurons as coupled groups."""
from __future__ import annotations

import re
from collections.abc import Callable

from torch import Tensor, nn

from prunekit.core.errors import ModelError
from prunekit.core.groups import CoupledGroup, Slice
from prunekit.core.masks import MaskSet
from prunekit.core.scoring import resolve_score, select_keep
from prunekit.core.targets import TargetSpec, block_lists, block_targets  # noqa: F401  (block_lists: re-exported)

# --------------------------------------------------------------------------------------------- targets
_FAMILIES: dict[str, tuple[str, ...]] = {
    # (regex of the layer prefix, then the 6 per-layer matrices in order)
    "bert": (r"encoder\.layer\.(\d+)\.",
             "attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "intermediate.dense", "output.dense"),
    "distilbert": (r"transformer\.layer\.(\d+)\.",
                   "attention.q_lin", "attention.k_lin", "attention.v_lin",
                   "attention.out_lin", "ffn.lin1", "ffn.lin2"),
}


def encoder_family(model: nn.Module) -> str:
    """``"bert"`` (BERT, MiniLM, RoBERTa, … naming) or ``"distilbert"``, from the module names."""
    names = [n for n, _ in model.named_modules()]
    for fam, (prefix, first, *_rest) in _FAMILIES.items():
        rx = re.compile(rf"(^|\.){prefix}{re.escape(first)}$")
        if any(rx.search(n) for n in names):
            return fam
    mt = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise ModelError(f"no BERT-style ({'/'.join(_FAMILIES)}) encoder layers found in a {mt!r} model; "
                     "give prune.targets explicitly")


def default_targets(model: nn.Module) -> TargetSpec:
    """Every Linear / HF Conv1D inside the repeated blocks — all attention and MLP matrices of every
    layer (BERT/MiniLM/RoBERTa/ELECTRA/DeBERTa/ViT/DistilBERT: 6, ALBERT: the 6 shared ones, GPT-2: 4,
    Llama/Qwen2: 7); embeddings, LM head, pooler and classifier stay dense unless a recipe asks.  The same
    targets every entry point uses for the default ``include: ["*"]`` (:func:`prunekit.core.targets.resolve_targets`)."""
    spec = block_targets(model)
    if spec is None:
        mt = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ModelError(f"no list of repeated transformer blocks found in a {mt!r} model; give prune.targets "
                         "explicitly (module name patterns)")
    return spec



# --------------------------------------------------------------------------------------------- heads / neurons
def _num_heads(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for k in ("num_attention_heads", "n_heads"):
        if cfg is not None and getattr(cfg, k, None):
            return int(getattr(cfg, k))
    raise ModelError("cannot find the number of attention heads (config.num_attention_heads / n_heads)")


def coupled_groups(model: nn.Module, kinds: tuple[str, ...] = ("heads", "neurons")) -> list[CoupledGroup]:
    """Heads and FFN neurons of every encoder layer, as :class:`~prunekit.core.groups.CoupledGroup` (layer
    order; the hand-written fallback for BERT-family encoders — :func:`prunekit.graph.coupled_groups` finds the
    same groups, and those of any traceable model, from the model's own graph)."""
    fam = encoder_family(model)
    prefix, q, k, v, o, f1, f2 = _FAMILIES[fam]
    params = dict(model.named_parameters())
    rx = re.compile(rf"^(.*?{prefix}){re.escape(q)}\.weight$")
    layers = [m.group(1) for n in params if (m := rx.match(n))]
    if not layers:
        raise ModelError("no encoder layers found")
    heads = _num_heads(model)
    out = []
    for base in layers:
        if "heads" in kinds:
            rows = params[base + q + ".weight"].shape[0]
            if rows % heads:
                raise ModelError(f"{base}{q}: {rows} rows do not split into {heads} heads")
            d = rows // heads
            slices: tuple[Slice, ...] = (Slice(base + q + ".weight", 0, d), Slice(base + k + ".weight", 0, d),
                      Slice(base + v + ".weight", 0, d), Slice(base + o + ".weight", 1, d))
            out.append(CoupledGroup(f"heads:{base}{q.rsplit('.', 1)[0]}", "heads", heads, slices, head_dim=d))
        if "neurons" in kinds:
            n = params[base + f1 + ".weight"].shape[0]
            slices = (Slice(base + f1 + ".weight", 0, 1), Slice(base + f2 + ".weight", 1, 1))
            out.append(CoupledGroup(f"neurons:{base}{f1}", "neurons", n, slices))
    return out


def head_neuron_masks(model: nn.Module, head_sparsity: float = 0.0, neuron_sparsity: float = 0.0,
                      score: str | Callable[[Tensor], Tensor] = "l2") -> MaskSet:
    """Masks removing ``round(head_sparsity * heads)`` heads and ``round(neuron_sparsity * ffn)``
    neurons in *every* layer, the lowest by ``score`` over all of a group's slices (``l2``: the norm of
    the concatenated q/k/v rows and output columns of a head; of the FFN row + column of a neuron).
    Masks cover only the matrices of the kinds asked (sparsity > 0); ties prune the lower index."""
    fn = resolve_score(score)
    for nm, s in (("head_sparsity", head_sparsity), ("neuron_sparsity", neuron_sparsity)):
        if not (0.0 <= float(s) < 1.0):
            raise ModelError(f"{nm} must be in [0, 1), got {s}")
    kinds = tuple(k for k, s in (("heads", head_sparsity), ("neurons", neuron_sparsity)) if s > 0)
    params = dict(model.named_parameters())
    masks = MaskSet()
    for g in coupled_groups(model, kinds):
        sp = head_sparsity if g.kind == "heads" else neuron_sparsity
        scores = fn(g.partition(params).float())
        keep = select_keep(scores, float(sp))
        for name, m in g.element_masks(keep, {n: params[n].shape for n in g.tensors}).items():
            masks.set(name, m, g.kind)
    return masks
