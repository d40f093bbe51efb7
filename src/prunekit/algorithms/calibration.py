"""Calibration data and the block-sequential driver of post-training pruning (SparseGPT, Wanda, OBS).

Post-training pruning needs, per pruned layer, statistics of that layer's *input* on a few calibration
samples: the Hessian of the layer-wise reconstruction loss ``H = 2/n Σ x xᵀ`` (SparseGPT, OBS) or the
per-input squared norms ``Σ x_j²`` (Wanda).  The rows ``x`` are the layer's input vectors:

* ``nn.Linear`` / HF ``Conv1D``: every token (every leading position) is one row of ``in`` features;
* ``nn.Conv2d``: the im2col view (``torch.nn.functional.unfold``), one row of ``in·kh·kw`` per output
  position, in the order of :func:`prunekit.structures.as_matrix` (``(out, in, kh, kw) → (out, in·kh·kw)``).

:func:`run_blockwise` (the SparseGPT/Wanda scheme) finds the model's repeated blocks (the largest
``nn.ModuleList``: HF ``encoder.layer``, GPT-2 ``h``, ``layers``), captures the inputs of the first block
with a forward pre-hook that raises (the "Catcher"), then for each block in turn collects the statistics
of its target layers, calls ``prune_block`` (which may change weights), and re-runs the block to produce
the (pruned) inputs of the next block.  Memory: one block's activations and statistics.  A model with no
block list (CNNs, MLPs) is a single block run by its full forward.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from prunekit.algorithms.base import Algorithm
from prunekit.algorithms.owl import owl_allocation
from prunekit.core.errors import RecipeError
from prunekit.core.masks import MaskSet
from prunekit.core.structures import Structure
from prunekit.core.targets import find_targets

__all__ = [
    "CalibrationConfig",
    "LayerStats",
    "owl_plan",
    "PostTraining",
    "PostTrainingParams",
    "collect_batches",
    "collect_stats",
    "find_blocks",
    "is_hf_conv1d",
    "model_inputs",
    "run_blockwise",
    "set_weight_matrix",
    "weight_matrix",
]


# --------------------------------------------------------------------------------------------- data
def _truncate(batch: Any, max_length: int | None) -> Any:
    if max_length is None or not isinstance(batch, dict):
        return batch
    return {k: (v[:, :max_length] if isinstance(v, Tensor) and v.dim() >= 2 and k != "labels" else v)
            for k, v in batch.items()}


def collect_batches(loader: Any, samples: int, batch_size: int, max_length: int | None = None,
                    seed: int = 0) -> list[Any]:
    """``samples`` calibration examples drawn (seeded, without replacement) from ``loader``'s data set,
    collated by the loader's own ``collate_fn`` into batches of ``batch_size``; token tensors are cut
    to ``max_length``.  A loader without a map-style ``dataset`` is read in order instead."""
    for k, v in (("calibration.samples", samples), ("calibration.batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise RecipeError(f"{k} must be a positive integer, got {v!r}")
    if max_length is not None and max_length < 1:
        raise RecipeError(f"max_length must be a positive integer or None, got {max_length!r}")
    data = getattr(loader, "dataset", None)
    if data is not None and hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        collate = getattr(loader, "collate_fn", None) or torch.utils.data.default_collate
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(len(data), generator=g)[:samples].tolist()
        chunks = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
        return [_truncate(collate([data[i] for i in c]), max_length) for c in chunks]
    out, n = [], 0
    for b in loader:
        out.append(_truncate(b, max_length))
        n += _batch_len(b)
        if n >= samples:
            break
    return out


def _batch_len(batch: Any) -> int:
    x = model_inputs(batch)
    if isinstance(x, dict):
        x = next(v for v in x.values() if isinstance(v, Tensor))
    return int(x.shape[0])


def model_inputs(batch: Any) -> Any:
    """The model's input of a batch: a dict without ``labels`` (HF), the first item of ``(x, y)``, or ``x``."""
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k != "labels"}
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def _forward(model: nn.Module, batch: Any) -> Any:
    x = model_inputs(batch)
    return model(**x) if isinstance(x, dict) else model(x)


# --------------------------------------------------------------------------------------------- weights
def is_hf_conv1d(module: nn.Module) -> bool:
    """HF GPT-2 ``Conv1D`` (weight stored ``(in, out)``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def weight_matrix(module: nn.Module) -> Tensor:
    """The ``(out, in')`` float32 matrix view of a target's weight (a copy): Linear as is, Conv2d im2col,
    HF Conv1D transposed."""
    w = cast(Tensor, module.weight).detach()
    if is_hf_conv1d(module):
        return w.t().float().clone()
    return w.reshape(w.shape[0], -1).float().clone()


@torch.no_grad()
def set_weight_matrix(module: nn.Module, m: Tensor) -> None:
    """Write an ``(out, in')`` matrix back into the module's weight (inverse of :func:`weight_matrix`)."""
    w = cast(Tensor, module.weight)
    w.copy_((m.t() if is_hf_conv1d(module) else m.reshape(w.shape)).to(w.dtype))


def matrix_to_param(module: nn.Module, m: Tensor) -> Tensor:
    """A matrix-view tensor (e.g. a mask) in the parameter's own shape."""
    return m.t().contiguous() if is_hf_conv1d(module) else m.reshape(cast(Tensor, module.weight).shape)


def _layer_rows(module: nn.Module, x: Tensor) -> Tensor:
    """Input rows ``(n, in')`` of a target layer."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise RecipeError(f"grouped convolutions (groups={module.groups}) are not supported by calibration")
        if isinstance(module.padding, str):
            raise RecipeError(f"Conv2d padding={module.padding!r} is not supported by calibration; use integers")
        cols = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


# --------------------------------------------------------------------------------------------- statistics
@dataclass
class LayerStats:
    """Running input statistics of one layer: ``xtx = Σ x xᵀ`` (if ``hessian``) and ``sq = Σ x²``."""

    size: int
    hessian: bool = True
    n: int = 0
    sq: Tensor = field(init=False)
    xtx: Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.sq = torch.zeros(self.size, dtype=torch.float64)
        if self.hessian:
            self.xtx = torch.zeros(self.size, self.size, dtype=torch.float64)

    def add(self, rows: Tensor) -> None:
        r = rows.detach().float()
        if self.n == 0 and self.sq.device != r.device:     # sums on the rows' device (a block on a GPU)
            self.sq = self.sq.to(r.device)
            self.xtx = None if self.xtx is None else self.xtx.to(r.device)
        self.n += int(r.shape[0])
        self.sq += r.pow(2).sum(0).double()
        if self.xtx is not None:
            self.xtx += (r.t() @ r).double()

    @property
    def H(self) -> Tensor:
        """``2/n Σ x xᵀ`` (float32)."""
        if self.xtx is None:
            raise RecipeError("these statistics were collected without the Hessian (hessian=False)")
        return (self.xtx * (2.0 / max(self.n, 1))).float()

    @property
    def col_norms(self) -> Tensor:
        """``‖X_j‖₂`` per input column (float32)."""
        return self.sq.sqrt().float()


def _hook_layers(modules: dict[str, nn.Module], hessian: bool) -> tuple[dict[str, LayerStats], list[RemovableHandle]]:
    stats: dict[str, LayerStats] = {}
    handles: list[RemovableHandle] = []
    for name, mod in modules.items():
        st = LayerStats(weight_matrix(mod).shape[1], hessian)
        stats[name] = st

        def hook(m: nn.Module, args: tuple[Any, ...], _out: Any, st: LayerStats = st) -> None:
            st.add(_layer_rows(m, args[0]))
        handles.append(mod.register_forward_hook(hook))
    return stats, handles


@torch.no_grad()
def collect_stats(model: nn.Module, batches: Iterable[Any], modules: dict[str, nn.Module],
                  hessian: bool = True) -> dict[str, LayerStats]:
    """Statistics of every layer in ``modules`` from full forwards of the (unchanged) model."""
    stats, handles = _hook_layers(modules, hessian)
    try:
        for b in batches:
            _forward(model, b)
    finally:
        for h in handles:
            h.remove()
    return stats


# --------------------------------------------------------------------------------------------- blocks
def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(name, list)`` of the largest ``nn.ModuleList`` of >= 2 same-type modules (the repeated
    transformer blocks), or None."""
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1:
            size = sum(p.numel() for p in m.parameters())
            if best is None or size > best[0]:
                best = (size, name, m)
    return (best[1], best[2]) if best else None


BlockCall = tuple[tuple[Any, ...], dict[str, Any]]   # ``(args, kwargs)`` of one call of a block


class _Caught(Exception):
    """Raised by the pre-hook on the first block once its inputs are recorded."""


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, batches: Iterable[Any]) -> list[BlockCall]:
    """``(args, kwargs)`` of ``block``'s call for each batch (the forward stops at the block)."""
    seen: list[BlockCall] = []

    def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((tuple(args), dict(kwargs)))
        raise _Caught

    h = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for b in batches:
            try:
                _forward(model, b)
            except _Caught:
                pass
    finally:
        h.remove()
    return seen


def _first(out: Any) -> Tensor:
    first: Tensor = out[0] if isinstance(out, (tuple, list)) else out   # a block's output: HF tuple or tensor
    return first


def _next_inputs(args: tuple[Any, ...], kwargs: dict[str, Any], hidden: Tensor) -> BlockCall:
    """The next block's call: the hidden states replaced (first positional argument, else ``hidden_states``)."""
    if args:
        return (hidden, *args[1:]), kwargs
    if "hidden_states" not in kwargs:
        raise RecipeError(f"cannot find the hidden states among the block's arguments {sorted(kwargs)}")
    return args, {**kwargs, "hidden_states": hidden}


PruneBlock = Callable[[dict[str, nn.Module], dict[str, LayerStats]], None]
MakePruneBlock = Callable[[MaskSet], PruneBlock]   # the prune_block of an algorithm, recording into a MaskSet


@torch.no_grad()
def run_blockwise(model: nn.Module, batches: list[Any], targets: dict[str, nn.Module], prune_block: PruneBlock,
                  hessian: bool = True) -> None:
    """Block-sequential post-training pruning (see the module doc).  ``targets`` = ``{param_name: module}``;
    ``prune_block(modules, stats)`` is called once per block with that block's targets and their input
    statistics, and prunes (and may update) them in place.  Targets outside the block list (e.g. a
    classifier head) are handled as one last block, from the full forward of the pruned model."""
    was_training = model.training
    model.eval()
    cfg: Any = getattr(model, "config", None)   # an HF config, or None
    use_cache = getattr(cfg, "use_cache", None)
    if use_cache:
        cfg.use_cache = False
    try:
        _run_blocks(model, batches, targets, prune_block, hessian)
    finally:
        if use_cache:
            cfg.use_cache = use_cache
        model.train(was_training)


def _run_blocks(model: nn.Module, batches: list[Any], targets: dict[str, nn.Module], prune_block: PruneBlock,
                hessian: bool) -> None:
    found = find_blocks(model)
    done: set[str] = set()
    if found is not None:
        _, blocks = found
        inputs = capture_block_inputs(model, blocks[0], batches)
        for block in blocks:
            ids = {id(m) for m in block.modules()}
            mods = {n: m for n, m in targets.items() if id(m) in ids}
            if mods:
                stats, handles = _hook_layers(mods, hessian)
                try:
                    for args, kwargs in inputs:
                        block(*args, **kwargs)
                finally:
                    for h in handles:
                        h.remove()
                prune_block(mods, stats)
                done.update(mods)
            inputs = [_next_inputs(a, k, _first(block(*a, **k))) for a, k in inputs]
    rest = {n: m for n, m in targets.items() if n not in done}
    if rest:
        prune_block(rest, collect_stats(model, batches, rest, hessian))


# --------------------------------------------------------------------------------------------- algorithm base
@dataclass
class CalibrationConfig:
    """The calibration data of the post-training algorithms: the recipe's top-level ``calibration`` section.

    ``samples`` examples are drawn (seeded by ``seed``, without replacement) from the training set and
    collated into batches of ``batch_size``; token inputs are cut to ``max_length`` positions (null: as
    tokenized, i.e. ``data.max_length``).  The batch size changes memory and speed only: the statistics are
    sums over all calibration rows."""

    samples: int = 128
    batch_size: int = 8
    max_length: int | None = 128
    seed: int = 0
    offload: bool = False               # prune block by block from the model folder's shards (prunekit.algorithms.offload)
    max_memory: int | str | None = None   # offload: bytes of calibration activations kept in memory ("1GB"), rest on disk

    def __post_init__(self) -> None:
        for k in ("samples", "batch_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RecipeError(f"calibration.{k} must be a positive integer, got {v!r}")
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
                                            or self.max_length < 1):
            raise RecipeError(f"calibration.max_length must be a positive integer or null, got {self.max_length!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise RecipeError(f"calibration.seed must be a non-negative integer, got {self.seed!r}")


# keys that used to live in ``algorithm.params`` (now the ``calibration`` section)
MOVED_TO_CALIBRATION = {"calibration_samples": "samples", "calibration_batch_size": "batch_size",
                        "max_length": "max_length", "seed": "seed"}


@dataclass
class PostTrainingParams:
    """Shared parameters of the post-training algorithms (``algorithm.params`` in a recipe).  The calibration
    data is not here: it is the recipe's ``calibration`` section (:class:`CalibrationConfig`)."""

    allocation: str = "uniform"         # uniform | owl (layer-wise sparsity, Yin et al. 2023)
    owl_m: float = 5.0
    owl_lambda: float = 0.08

    def __post_init__(self) -> None:
        if self.allocation not in ("uniform", "owl"):
            raise RecipeError(f"algorithm.params.allocation must be 'uniform' or 'owl', got {self.allocation!r}")
        if not self.owl_m > 0:
            raise RecipeError(f"algorithm.params.owl_m must be > 0, got {self.owl_m}")
        if not 0 <= self.owl_lambda < 1:
            raise RecipeError(f"algorithm.params.owl_lambda must be in [0, 1), got {self.owl_lambda}")


def owl_plan(model: nn.Module, targets: dict[str, nn.Module], plan: dict[str, tuple[Structure, float]],
             batches: list[Any], m: float, lam: float) -> dict[str, tuple[Structure, float]]:
    """The layer plan with OWL sparsities (Wanda scores from one dense forward pass over ``batches``)."""
    sps = {sp for _, sp in plan.values()}
    if len(sps) != 1:
        raise RecipeError("allocation 'owl' re-allocates one uniform sparsity; remove the per-layer overrides")
    for n, (st, _) in plan.items():
        if st.fixed_sparsity(cast(Tensor, targets[n].weight).shape) is not None:
            raise RecipeError(f"allocation 'owl' needs a structure with a free sparsity; {n} uses {st}")
    mods = {n: targets[n] for n in plan}
    stats = collect_stats(model, batches, mods, hessian=False)
    scores = {n: weight_matrix(mod).abs() * stats[n].col_norms[None, :] for n, mod in mods.items()}
    alloc = owl_allocation(scores, next(iter(sps)), m, lam)
    return {n: (st, alloc[n]) for n, (st, _) in plan.items()}


PT = TypeVar("PT", bound=PostTrainingParams)


class PostTraining(Algorithm[PT]):
    """Base of one-shot post-training pruning from calibration data.  No search phase; ``final_masks``
    draws the calibration batches from ``calibration_loader`` as ``calibration`` says (both set by
    :func:`prunekit.pipelines.runner.run_pipeline`: the workload's train loader and the recipe's ``calibration``
    section; Python users set them on the instance), runs :func:`run_blockwise` and calls :meth:`prune_matrix`
    on every target's ``(out, in')`` matrix view.  Weights are changed in place; the masks match the zeros."""

    has_search = False
    hessian = True
    calibration_loader: Any = None
    calibration: CalibrationConfig = CalibrationConfig()

    def calibration_batches(self) -> list[Any]:
        if self.calibration_loader is None:
            raise RecipeError(f"algorithm {self.name!r} needs calibration data: set .calibration_loader "
                             "(run_pipeline sets it to the workload's train loader)")
        c = self.calibration
        return collect_batches(self.calibration_loader, c.samples, c.batch_size, c.max_length, c.seed)

    def layer_plan(self, model: nn.Module, batches: list[Any]) -> dict[str, tuple[Structure, float]]:
        """``{param: (structure, sparsity)}``: the spec's plan, re-allocated by OWL if asked."""
        if self.spec.scope != "layer":
            raise RecipeError(f"algorithm {self.name!r} prunes layer by layer; prune.scope must be 'layer', "
                             f"got {self.spec.scope!r}")
        targets = find_targets(model, self.spec.targets)
        plan = self.spec.layer_plan(list(targets))   # names only: this module handles Conv1D's (in, out) itself
        if self.params.allocation == "owl":
            plan = owl_plan(model, targets, plan, batches, self.params.owl_m, self.params.owl_lambda)
        return plan

    def final_masks(self, model: nn.Module) -> MaskSet:
        batches = self.calibration_batches()
        targets, make_prune_block = self.block_pruner(model, batches)
        masks = MaskSet()
        run_blockwise(model, batches, targets, make_prune_block(masks), hessian=self.hessian)
        return masks

    def block_pruner(self, model: nn.Module, batches: list[Any]) -> tuple[dict[str, nn.Module], MakePruneBlock]:
        """``(targets, make_prune_block)``: the target modules and a factory of the ``prune_block`` callback of
        :func:`run_blockwise` that records the masks into the given :class:`MaskSet` (the offloaded driver,
        :mod:`prunekit.algorithms.offload`, gives each block its own set and writes it to disk)."""
        plan = self.layer_plan(model, batches)
        targets = {n: m for n, m in find_targets(model, self.spec.targets).items() if n in plan}
        return targets, lambda masks: self._prune_block(plan, masks)

    def _prune_block(self, plan: dict[str, tuple[Structure, float]], masks: MaskSet) -> PruneBlock:
        def prune_block(mods: dict[str, nn.Module], stats: dict[str, LayerStats]) -> None:
            for name, mod in mods.items():
                st, sp = plan[name]
                W = weight_matrix(mod)
                shape = tuple(cast(Tensor, mod.weight).shape) if not is_hf_conv1d(mod) else tuple(W.shape)
                W_new, keep = self.prune_matrix(W, stats[name], st, sp, shape)
                W_new = W_new * keep
                set_weight_matrix(mod, W_new)
                masks.set(name, matrix_to_param(mod, keep).bool(), str(st))
        return prune_block

    def prune_matrix(self, W: Tensor, stats: LayerStats, structure: Structure, sparsity: float,
                     shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """``(W_new, keep)`` for one ``(out, in')`` matrix; ``shape`` = what the structure sees."""
        raise NotImplementedError
