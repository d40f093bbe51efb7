"""``heads_neurons``: one-shot removal of whole attention heads and FFN neurons of a BERT-family
encoder (the coupled structures of :func:`prunekit.graph.families.coupled_groups`), then the pipeline's
hard-pruned retraining.

Recipe::

    algorithm: {name: heads_neurons, params: {structure: heads+neurons, head_sparsity: 0.25, neuron_sparsity: 0.3}}

``prune.sparsity`` is the default of both sparsities; ``prune.score`` (l2/l1) scores each group over
all its slices.  ``prune.structure`` is not used.

A thin alias of one-shot with the group structure ``heads`` / ``neurons`` / ``heads+neurons`` and
per-kind sparsities (overrides ``heads:*`` / ``neurons:*``): when the spec carries the model's coupled
groups (the runner traces the model for this algorithm) the masks come from
:func:`prunekit.core.plan.compute_masks`; without them (a model that does not trace, or a bare
``PruneSpec``) from the hand-written BERT/DistilBERT layouts of :mod:`prunekit.graph.families`.
Equivalent recipe: ``prune: {structure: heads+neurons, sparsity: 0.3, overrides: {"heads:*": 0.25}}``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from prunekit.algorithms.base import Algorithm, register
from prunekit.core.errors import RecipeError
from prunekit.core.masks import MaskSet
from prunekit.core.plan import compute_masks
from prunekit.graph.families import head_neuron_masks


@register
class HeadsNeurons(Algorithm["HeadsNeurons.Params"]):
    """One-shot removal of whole attention heads and/or FFN neurons (coupled structures), then the
    pipeline's hard-pruned retraining.  ``structure``: ``heads`` | ``neurons`` | ``heads+neurons``;
    ``head_sparsity`` / ``neuron_sparsity`` default to the recipe's ``prune.sparsity``."""

    name = "heads_neurons"
    has_search = False
    uses_groups = ("heads", "neurons")      # the runner fills spec.groups when the model traces

    @dataclass
    class Params:
        structure: str = "heads+neurons"
        head_sparsity: float | None = None
        neuron_sparsity: float | None = None

        def __post_init__(self) -> None:
            if self.structure not in ("heads", "neurons", "heads+neurons"):
                raise RecipeError(f"structure {self.structure!r} is not one of ['heads', 'neurons', 'heads+neurons']")
            for k in ("head_sparsity", "neuron_sparsity"):
                v = getattr(self, k)
                if v is not None and not (0 <= v < 1):
                    raise RecipeError(f"{k} must be in [0, 1), got {v}")

    def sparsities(self) -> tuple[float, float]:
        p, s = self.params, float(self.spec.sparsity)
        hs = (p.head_sparsity if p.head_sparsity is not None else s) if "heads" in p.structure else 0.0
        ns = (p.neuron_sparsity if p.neuron_sparsity is not None else s) if "neurons" in p.structure else 0.0
        return hs, ns

    def final_masks(self, model: nn.Module) -> MaskSet:
        hs, ns = self.sparsities()
        groups = self.spec.groups
        if groups is None or not any(g.kind in ("heads", "neurons") and g.removable for g in groups):
            return head_neuron_masks(model, hs, ns, self.spec.score)
        kinds = [k for k, s in (("heads", hs), ("neurons", ns)) if s > 0]
        if not kinds:
            return MaskSet()
        ov = {f"{k}:*": s for k, s in (("heads", hs), ("neurons", ns)) if s > 0
              and any(g.kind == k and g.removable for g in groups)}
        spec = replace(self.spec, structure="+".join(kinds), sparsity=max(hs, ns), scope="layer", overrides=ov)
        return compute_masks(model, spec)
