"""Calibration data and the block-sequential driver of post-training pruning (SparseGPT, Wanda, OBS).

Post-training pruning needs, per pruned layer, statistics of that layer's *input* on a few calibration
samples: the Hessian of the layer-wise reconstruction loss ``H = 2/n Σ x xᵀ`` (SparseGPT, OBS) or the
per-input squared norms ``Σ x_j²`` (Wanda).  The rows ``x`` are the layer's input vectors
(:func:`layer_rows`):

* ``nn.Linear`` / HF ``Conv1D``: every token (every leading position) is one row of ``in`` features;
* ``nn.Conv1d`` / ``Conv2d`` / ``Conv3d``: the im2col view (:func:`conv_rows`), one row of ``in·k₁·…`` per
  output position, in the order of the weight's matrix view ``(out, in, k₁, …) → (out, in·k₁·…)``, with the
  layer's stride, padding, dilation and padding mode.  Grouped convolutions are refused.

Only **real tokens** count: in a batch with a 2-D ``attention_mask`` the rows of padded positions are dropped
(:class:`TokenMask`), so one padded batch gives the same statistics as its sentences one by one.

:func:`run_blockwise` (the SparseGPT/Wanda scheme) finds the model's repeated blocks (:func:`find_blocks`:
the largest ``nn.ModuleList`` or ``nn.Sequential`` of one block type — HF ``encoder.layer``, GPT-2 ``h``,
``layers``), then:

1. **capture** (:func:`record_block_calls`): one dense forward per batch with hooks on every block records
   the first block's input and *each block's own call arguments* (per-layer attention masks, position
   embeddings, …), checking that block ``i+1``'s input is block ``i``'s output (else a :class:`ModelError`
   naming the model and the block);
2. for each block: **statistics** of its target layers (:func:`block_stats`, the block called with its own
   recorded arguments and the current hidden states) → ``prune_block`` (which may change weights) →
   **propagate** (:func:`propagate`: the pruned block's outputs are the next block's inputs);
3. targets outside the block list (a classifier head) are one last block, from a full forward of the pruned
   model.

Memory: the first block's inputs, references to the blocks' other arguments, one block's statistics.  A
model with no block list (CNNs, MLPs) is a single block run by its full forward.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from prunekit.algorithms.base import Algorithm
from prunekit.algorithms.owl import owl_allocation
from prunekit.core.errors import ModelError, RecipeError
from prunekit.core.masks import MaskSet
from prunekit.core.structures import Structure, Transposed
from prunekit.core.targets import find_targets

__all__ = [
    "CONV_TYPES",
    "BlockCall",
    "CalibrationConfig",
    "LayerStats",
    "RecordedBatch",
    "TokenMask",
    "block_stats",
    "check_calibration_target",
    "conv_rows",
    "layer_rows",
    "propagate",
    "real_tokens",
    "record_block_calls",
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


CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def check_calibration_target(name: str, module: nn.Module) -> None:
    """Refuse a target whose input rows the driver cannot form: a grouped convolution (its output channels see
    different inputs, so it has no one input Hessian)."""
    if isinstance(module, CONV_TYPES) and module.groups != 1:
        raise RecipeError(f"{name}: grouped convolution (groups={module.groups}) is not supported by calibration "
                          "(each group of output channels sees its own inputs, there is no one input Hessian); "
                          "exclude it from prune.targets")


def conv_rows(module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """im2col of a ``Conv1d`` / ``Conv2d`` / ``Conv3d`` input: ``(rows, lead)`` with one row of ``in·k₁·…`` per
    output position and ``lead = (batch, *output positions)``.  A row is channel-major, then the kernel offsets —
    the order of the weight ``(out, in, k₁, …)`` reshaped to ``(out, in·k₁·…)`` — and stride, dilation, padding
    (integers, ``'same'``, ``'valid'``) and ``padding_mode`` are the layer's, so ``rows @ W.T`` is its output
    (without bias)."""
    assert isinstance(module, CONV_TYPES)
    nd = len(module.kernel_size)
    if x.dim() == nd + 1:                                    # unbatched input
        x = x.unsqueeze(0)
    width = int(x.shape[1]) * math.prod(module.kernel_size)
    pad = list(module._reversed_padding_repeated_twice)
    if any(pad):
        x = nn.functional.pad(x, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    for i, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]   # window offsets appended as the last dimension
    lead = (int(x.shape[0]), *(int(v) for v in x.shape[2:2 + nd]))
    x = x.permute(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    return x.reshape(-1, width), lead


def layer_rows(module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """Input rows ``(n, in')`` of a target layer and their leading shape (``(batch, length)`` for token inputs):
    ``nn.Linear`` / HF ``Conv1D``: every leading position is a row; convolutions: :func:`conv_rows`."""
    if isinstance(module, CONV_TYPES):
        check_calibration_target(type(module).__name__, module)
        return conv_rows(module, x)
    return x.reshape(-1, x.shape[-1]), tuple(int(v) for v in x.shape[:-1])


def real_tokens(batch: Any) -> Tensor | None:
    """``(batch, length)`` bool of the real (not padded) positions of a token batch — its 2-D ``attention_mask``;
    None when every position is real or the batch has no such mask."""
    x = model_inputs(batch)
    m = x.get("attention_mask") if isinstance(x, dict) else None
    if not isinstance(m, Tensor) or m.dim() != 2:
        return None
    keep = m != 0
    return None if bool(keep.all()) else keep


class TokenMask:
    """The real-token mask of the batch being run (``mask``, set per batch): :meth:`select` keeps the rows of
    real tokens, so padding never enters the statistics."""

    def __init__(self) -> None:
        self.mask: Tensor | None = None

    def select(self, name: str, rows: Tensor, lead: tuple[int, ...]) -> Tensor:
        """Token rows (leading shape ``(batch, length)``, or flattened) restricted to real tokens; rows of
        another shape (a pooled vector per sequence, a table of position embeddings) are kept whole.  A
        ``(batch, other length, …)`` input of a padded batch is refused: which of its rows are padding is
        unknown."""
        m = self.mask
        if m is None:
            return rows
        if lead == tuple(m.shape) or (len(lead) == 1 and lead[0] == m.numel()):
            return rows[m.reshape(-1).to(rows.device)]
        if len(lead) >= 2 and lead[0] == m.shape[0] > 1:
            raise ModelError(f"{name}: its input has positions {lead} but the batch's attention mask is "
                             f"{tuple(m.shape)}, so calibration cannot tell which rows are padding; calibrate with "
                             "unpadded batches (calibration.batch_size: 1, no padding to a fixed length)")
        return rows


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
        self.n += int(r.shape[0])
        self.sq += r.pow(2).sum(0).double().cpu()
        if self.xtx is not None:
            self.xtx += (r.t() @ r).double().cpu()

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


def _hook_layers(modules: dict[str, nn.Module], hessian: bool,
                 tokens: TokenMask) -> tuple[dict[str, LayerStats], list[RemovableHandle]]:
    stats: dict[str, LayerStats] = {}
    handles: list[RemovableHandle] = []
    for name, mod in modules.items():
        check_calibration_target(name, mod)
        st = LayerStats(weight_matrix(mod).shape[1], hessian)
        stats[name] = st

        def hook(m: nn.Module, args: tuple[Any, ...], _out: Any, st: LayerStats = st, name: str = name) -> None:
            st.add(tokens.select(name, *layer_rows(m, args[0])))
        handles.append(mod.register_forward_hook(hook))
    return stats, handles


@torch.no_grad()
def collect_stats(model: nn.Module, batches: Iterable[Any], modules: dict[str, nn.Module],
                  hessian: bool = True) -> dict[str, LayerStats]:
    """Statistics of every layer in ``modules`` (real tokens only) from full forwards of the (unchanged) model."""
    tokens = TokenMask()
    stats, handles = _hook_layers(modules, hessian, tokens)
    try:
        for b in batches:
            tokens.mask = real_tokens(b)
            _forward(model, b)
    finally:
        for h in handles:
            h.remove()
    return stats


# --------------------------------------------------------------------------------------------- blocks
Blocks = nn.ModuleList | nn.Sequential


def find_blocks(model: nn.Module) -> tuple[str, Blocks] | None:
    """``(name, blocks)`` of the largest ``nn.ModuleList`` or ``nn.Sequential`` of >= 2 modules of one type
    (the repeated transformer blocks, a CNN stage), or None."""
    best = None
    for name, m in model.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= 2 and len({type(c) for c in m}) == 1:
            size = sum(p.numel() for p in m.parameters())
            if best is None or size > best[0]:
                best = (size, name, m)
    return (best[1], best[2]) if best else None


@dataclass
class BlockCall:
    """One block's own call in the dense forward: its arguments without the hidden-state input, which sits at
    ``slot`` (position ``0`` or a keyword) and is filled by :meth:`with_hidden`."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    slot: int | str

    def with_hidden(self, hidden: Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.slot == 0:
            return (hidden, *self.args[1:]), self.kwargs
        return self.args, {**self.kwargs, str(self.slot): hidden}


@dataclass
class RecordedBatch:
    """What the dense forward of one calibration batch recorded: the first block's hidden-state input, every
    block's own call (:class:`BlockCall`, in block order) and the batch's real-token mask."""

    hidden: Tensor
    calls: list[BlockCall]
    tokens: Tensor | None


class _Stop(Exception):
    """Raised after the last block: the rest of the forward (final norm, head) is not needed."""


def _model_name(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)


def _first(out: Any) -> Tensor:
    """A block's hidden-state output: the tensor itself, or the first item of an HF tuple / ModelOutput."""
    if isinstance(out, dict):
        out = list(out.values())
    first = out[0] if isinstance(out, (tuple, list)) and len(out) else out
    if not isinstance(first, Tensor):
        raise ModelError(f"a block returned {type(out).__name__} whose first item is not a tensor; block-by-block "
                         "calibration needs the hidden states as the (first) output")
    return first


def _same(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b)))


def _block_call(where: str, i: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[BlockCall, Tensor]:
    """The recorded call of block ``i`` (hidden states taken out) and its hidden-state input."""
    if args and isinstance(args[0], Tensor):
        return BlockCall((None, *args[1:]), dict(kwargs), 0), args[0]
    if isinstance(kwargs.get("hidden_states"), Tensor):
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return BlockCall(tuple(args), rest, "hidden_states"), kwargs["hidden_states"]
    raise ModelError(f"{where}: block {i} gets no tensor as its first argument nor a 'hidden_states' keyword "
                     f"(keywords: {sorted(kwargs)}); block-by-block calibration cannot find its input")


@torch.no_grad()
def record_block_calls(model: nn.Module, blocks: Blocks, batches: Iterable[Any],
                       name: str = "blocks") -> list[RecordedBatch]:
    """One dense forward per batch with hooks on every block (stopped after the last block): each block's own
    call arguments (per-layer attention masks, position embeddings, …) and the first block's input.  Refuses
    (:class:`ModelError`, naming the model and the block) a model that calls a block twice or out of order, or
    whose block ``i+1`` input is not block ``i``'s output — replaying the blocks one by one would be wrong."""
    where = f"{_model_name(model)} ({name})"
    st: dict[str, Any] = {}

    def pre(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if st["next"] != i:
                raise ModelError(f"{where}: block {i} was called when block {st['next']} was expected; block-by-block "
                                 "calibration needs every block called once, in order")
            call, hidden = _block_call(where, i, args, kwargs)
            if i == 0:
                st["hidden"] = hidden
            elif not _same(hidden, st["out"]):
                raise ModelError(f"{where}: the input of block {i} is not the output of block {i - 1} (the model "
                                 "changes the hidden states between its blocks); block-by-block calibration cannot "
                                 "replay it — use an algorithm without calibration (e.g. oneshot)")
            st["calls"].append(call)
        return hook

    def post(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
            st["out"], st["next"] = _first(out), i + 1
            if i == len(blocks) - 1:
                raise _Stop
        return hook

    handles = [h for i, b in enumerate(blocks)
               for h in (b.register_forward_pre_hook(pre(i), with_kwargs=True), b.register_forward_hook(post(i)))]
    recorded = []
    try:
        for batch in batches:
            st.update(next=0, calls=[], out=None)
            try:
                _forward(model, batch)
            except _Stop:
                pass
            if st["next"] != len(blocks):
                raise ModelError(f"{where}: the forward ran {st['next']} of its {len(blocks)} blocks; block-by-block "
                                 "calibration needs every block called once, in order")
            recorded.append(RecordedBatch(st["hidden"], st["calls"], real_tokens(batch)))
    finally:
        for h in handles:
            h.remove()
    return recorded


def _call(block: nn.Module, call: BlockCall, hidden: Tensor) -> Any:
    args, kwargs = call.with_hidden(hidden)
    return block(*args, **kwargs)


@torch.no_grad()
def block_stats(block: nn.Module, i: int, recorded: list[RecordedBatch], hidden: list[Tensor],
                modules: dict[str, nn.Module], hessian: bool = True) -> dict[str, LayerStats]:
    """Input statistics of ``modules`` (inside block ``i``) over the batches, the block called with its own
    recorded arguments and ``hidden`` (per batch) as its input; real tokens only."""
    tokens = TokenMask()
    stats, handles = _hook_layers(modules, hessian, tokens)
    try:
        for rec, h in zip(recorded, hidden):
            tokens.mask = rec.tokens
            _call(block, rec.calls[i], h)
    finally:
        for hd in handles:
            hd.remove()
    return stats


@torch.no_grad()
def propagate(block: nn.Module, i: int, recorded: list[RecordedBatch], hidden: list[Tensor]) -> list[Tensor]:
    """Block ``i``'s outputs (the next block's inputs) for each batch."""
    return [_first(_call(block, rec.calls[i], h)) for rec, h in zip(recorded, hidden)]


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
        for name, mod in targets.items():
            check_calibration_target(name, mod)
        _run_blocks(model, batches, targets, prune_block, hessian)
    finally:
        if use_cache:
            cfg.use_cache = use_cache
        model.train(was_training)


def _run_blocks(model: nn.Module, batches: list[Any], targets: dict[str, nn.Module], prune_block: PruneBlock,
                hessian: bool) -> None:
    """Capture every block's call → for each block: statistics → prune → propagate; then the other targets."""
    found = find_blocks(model)
    done: set[str] = set()
    if found is not None:
        name, blocks = found
        per_block = [{n: m for n, m in targets.items() if id(m) in {id(x) for x in b.modules()}} for b in blocks]
        last = max((i for i, mods in enumerate(per_block) if mods), default=-1)
        upto = cast(Blocks, blocks[:last + 1])          # record up to the last block holding targets
        recorded = record_block_calls(model, upto, batches, name) if last >= 0 else []
        hidden = [r.hidden for r in recorded]
        for i, block in enumerate(blocks):
            if i > last:
                break
            if per_block[i]:
                prune_block(per_block[i], block_stats(block, i, recorded, hidden, per_block[i], hessian))
                done.update(per_block[i])
            if i < last:
                hidden = propagate(block, i, recorded, hidden)
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
    max_memory: int | str | None = None   # bytes of calibration activations kept in memory ("1GB"), rest on disk; implies offload

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
    # the layer of the current prune_matrix call stores its weight transposed (HF Conv1D): its matrix view's
    # columns are the stored rows (set by the driver around each call; joint quantizers use it for their grids)
    transposed: bool = False

    def calibration_batches(self) -> list[Any]:
        if self.calibration_loader is None:
            raise RecipeError(f"algorithm {self.name!r} needs calibration data: set .calibration_loader "
                             "(run_pipeline sets it to the workload's train loader)")
        c = self.calibration
        return collect_batches(self.calibration_loader, c.samples, c.batch_size, c.max_length, c.seed)

    def targets(self, model: nn.Module) -> dict[str, nn.Module]:
        """``{param: module}`` of the spec's targets; the default ``["*"]`` on an HF-style model is its block
        matrices (:func:`~prunekit.core.targets.resolve_targets`: LM head and embeddings stay dense)."""
        return find_targets(model, self.spec.targets)

    def layer_plan(self, model: nn.Module, batches: list[Any]) -> dict[str, tuple[Structure, float]]:
        """``{param: (structure, sparsity)}``: the spec's plan, re-allocated by OWL if asked."""
        if self.spec.scope != "layer":
            raise RecipeError(f"algorithm {self.name!r} prunes layer by layer; prune.scope must be 'layer', "
                             f"got {self.spec.scope!r}")
        targets = self.targets(model)
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
        targets = {n: m for n, m in self.targets(model).items() if n in plan}
        return targets, lambda masks: self._prune_block(plan, masks)

    def _prune_block(self, plan: dict[str, tuple[Structure, float]], masks: MaskSet) -> PruneBlock:
        def prune_block(mods: dict[str, nn.Module], stats: dict[str, LayerStats]) -> None:
            for name, mod in mods.items():
                st, sp = plan[name]
                W = weight_matrix(mod)
                shape = tuple(cast(Tensor, mod.weight).shape) if not is_hf_conv1d(mod) else tuple(W.shape)
                self.transposed = is_hf_conv1d(mod)
                try:
                    W_new, keep = self.prune_matrix(W, stats[name], st, sp, shape)
                finally:
                    self.transposed = False
                W_new = W_new * keep
                set_weight_matrix(mod, W_new)
                masks.set(name, matrix_to_param(mod, keep).bool(), str(Transposed(st) if is_hf_conv1d(mod) else st))
        return prune_block

    def prune_matrix(self, W: Tensor, stats: LayerStats, structure: Structure, sparsity: float,
                     shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """``(W_new, keep)`` for one ``(out, in')`` matrix; ``shape`` = what the structure sees."""
        raise NotImplementedError
