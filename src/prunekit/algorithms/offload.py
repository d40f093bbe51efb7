"""Post-training pruning of a model larger than memory: one block at a time from its safetensors shards.

:func:`prune_offloaded` prunes a Hugging Face model folder (``model.safetensors`` or sharded) into a new
folder without ever holding the whole model:

1. the model is built with accelerate's ``init_empty_weights`` (parameters on the ``meta`` device: no
   memory); only the tensors outside the repeated blocks that the forward needs before the first block
   (token/position embeddings) are read — lazily, with ``safe_open`` (:class:`prunekit.io.sharded.ShardReader`) —
   onto the working ``device``;
2. every block's own call arguments are recorded by the in-memory driver's
   :func:`~prunekit.algorithms.calibration.record_block_calls`, with block 0 read and run for real and the
   blocks after it passing their input through (their weights are not read: the arguments a block gets —
   attention masks, position embeddings — are computed outside the blocks); the first block's input for every
   calibration batch goes to an
   :class:`ActivationStore`: kept in CPU memory up to ``activation_budget`` bytes, spilled to safetensors
   files beyond it;
3. for each block: its weights are read from the shards onto ``device`` (accelerate's
   ``set_module_tensor_to_device``), the statistics of its targets are collected, the algorithm's own
   ``prune_block`` (:meth:`~prunekit.algorithms.calibration.PostTraining.block_pruner`) prunes it, the block
   is re-run to give the next block's inputs, the pruned block is written straight to its output part file
   (:class:`prunekit.io.sharded.ShardWriter`) with its masks, and its weights go back to ``meta``;
4. the tensors outside the blocks (embeddings, final norm, LM head) are copied unchanged; the masks of
   block ``k`` are in ``out/prune_masks/block-0000k.safetensors`` (:func:`load_offload_masks`); the parts are
   renamed to ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``, the config and
   tokenizer files copied: ``from_pretrained(out)`` loads the pruned model.

Resume: after each block the driver records it in ``out/.offload/state.json`` (with the model, algorithm and
calibration it belongs to) next to that block's outputs (``out/.offload/acts-0000k``); a killed run started again with the same arguments skips every finished
block (no recomputation: their parts, masks and outputs are on disk) and continues at the block it was in.

Memory: the non-block tensors the forward needs before the first block + one block's weights (and the
statistics of its targets: ``in²`` float64 per target for the Hessian methods) + the activation budget
(two stores: inputs and outputs of the running block) + one batch of activations of the block's
internals.  The result equals the in-memory :func:`~prunekit.algorithms.calibration.run_blockwise` run:
same calls, same statistics, same order (``tests/test_offload.py`` checks masks identical and weights to
1e-6).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from prunekit.algorithms.calibration import (
    Blocks,
    MakePruneBlock,
    PostTraining,
    RecordedBatch,
    _call,
    _first,
    block_stats,
    find_blocks,
    record_block_calls,
)
from prunekit.core.errors import CheckpointError, RecipeError
from prunekit.core.masks import MaskSet
from prunekit.io.sharded import ShardReader, ShardWriter, copy_model_files

__all__ = ["ActivationStore", "OffloadResult", "empty_model", "load_offload_masks", "parse_bytes", "prune_offloaded"]

STATE_DIR = ".offload"
MASK_DIR = "prune_masks"     # out/prune_masks/block-0000k.safetensors: the keep-masks of block k (bool)


def parse_bytes(v: int | str | None) -> int | None:
    """``1073741824``, ``"1GB"``, ``"512MiB"``, ``"300 MB"`` → bytes (GB/MB decimal, GiB/MiB binary)."""
    if v is None or (isinstance(v, int) and not isinstance(v, bool)):
        return v
    s = str(v).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for u, f in units.items():
        if s.endswith(u):
            try:
                return int(float(s[: -len(u)]) * f)
            except ValueError:
                break
    raise RecipeError(f"memory size {v!r}: expected bytes or a number with GB / MB / GiB / MiB")


class ActivationStore:
    """Hidden states of the calibration batches: in CPU memory up to ``budget`` bytes, the rest in
    safetensors files under ``folder``.  ``persist`` also writes the in-memory ones (for resume)."""

    def __init__(self, folder: Path, budget: int | None, persist: bool, fresh: bool = False):
        self.folder, self.budget, self.persist = folder, budget, persist
        if fresh:
            shutil.rmtree(folder, ignore_errors=True)
        self.mem: dict[int, Tensor] = {}
        self.used = 0
        self.spilled = 0
        folder.mkdir(parents=True, exist_ok=True)

    def _file(self, i: int) -> Path:
        return self.folder / f"batch-{i:05d}.safetensors"

    def put(self, i: int, x: Tensor) -> None:
        x = x.detach().to("cpu").contiguous()
        fits = self.budget is None or self.used + x.numel() * x.element_size() <= self.budget
        if fits:
            self.mem[i] = x
            self.used += x.numel() * x.element_size()
        else:
            self.spilled += 1
        if self.persist or not fits:
            save_file({"x": x}, str(self._file(i)))

    def get(self, i: int, device: str | torch.device) -> Tensor:
        x = self.mem[i] if i in self.mem else load_file(str(self._file(i)))["x"]
        return x.to(device)

    def clear(self) -> None:
        self.mem.clear()
        self.used = 0
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class OffloadResult:
    """What :func:`prune_offloaded` did."""

    out: Path
    blocks: int
    pruned_blocks: list[int] = field(default_factory=list)   # blocks computed by this call (resume skips the rest)
    masks: dict[str, str] = field(default_factory=dict)       # target name -> structure string
    block_seconds: list[float] = field(default_factory=list)
    spilled_batches: int = 0
    seconds: float = 0.0


def empty_model(folder: Path, trust_remote_code: bool) -> nn.Module:
    from accelerate import init_empty_weights  # noqa: PLC0415
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415
    cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code)
    cfg.use_cache = False
    with init_empty_weights():
        model: nn.Module = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)  # type: ignore[no-untyped-call]
    return model.eval()


def _load_into(module: nn.Module, prefix: str, reader: ShardReader, device: str | torch.device) -> None:
    """Read ``module``'s parameters/persistent buffers (checkpoint names ``prefix + local``) onto ``device``."""
    from accelerate.utils import set_module_tensor_to_device  # noqa: PLC0415
    local = [n for n in module.state_dict(keep_vars=True)]
    names = {n: prefix + n for n in local if prefix + n in reader.weight_map}
    missing = [prefix + n for n in local if prefix + n not in reader.weight_map
               and module.get_parameter(n) is not None and n in dict(module.named_parameters())]
    if missing:
        raise CheckpointError(f"{reader.folder}: the checkpoint lacks {missing[:3]} (of {len(missing)})")
    values = reader.load(names.values(), device)
    for n, full in names.items():
        set_module_tensor_to_device(module, n, device, value=values[full], dtype=values[full].dtype)
    for n, b in module.named_buffers():
        if n not in names and b.device.type != "meta":
            set_module_tensor_to_device(module, n, device, value=b)


def _to_meta(module: nn.Module) -> None:
    from accelerate.utils import set_module_tensor_to_device  # noqa: PLC0415
    for n, _ in list(module.named_parameters()):
        set_module_tensor_to_device(module, n, "meta")


def _embed_inputs(model: nn.Module, blocks_name: str, reader: ShardReader, device: str | torch.device) -> None:
    """The tensors outside the block list onto ``device`` (the embeddings the forward needs before the first
    block, the final norm); an untied LM head stays on ``meta`` (never run here: the forward stops at block 0)."""
    from accelerate.utils import set_module_tensor_to_device  # noqa: PLC0415
    inside = blocks_name + "."
    get_head, get_emb = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    head = get_head() if callable(get_head) else None
    emb = get_emb() if callable(get_emb) else None
    skip = set()
    if isinstance(head, nn.Module) and head is not emb and getattr(head, "weight", None) is not getattr(emb, "weight", 0):
        skip = {n + ".weight" for n, m in model.named_modules() if m is head}      # the LM head: never run here
    names = [n for n in model.state_dict(keep_vars=True)
             if not n.startswith(inside) and n in reader.weight_map and n not in skip]
    for n, t in reader.load(names, device).items():
        set_module_tensor_to_device(model, n, device, value=t, dtype=t.dtype)
    for n, b in model.named_buffers():
        if not n.startswith(inside) and b.device.type != "meta":
            set_module_tensor_to_device(model, n, device, value=b)


@contextmanager
def _pass_through(blocks: Blocks) -> Iterator[None]:
    """Blocks 1.. return their input, in the form block 0 returned its output (a tensor or an HF tuple)."""
    last: dict[str, Any] = {}

    def keep(_m: nn.Module, _a: tuple[Any, ...], out: Any) -> None:
        last["out"] = out

    def through(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        out = last["out"]
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    h = blocks[0].register_forward_hook(keep)
    for b in list(blocks)[1:]:
        b.forward = through          # an instance attribute: hooks still run, the weights are never touched
    try:
        yield
    finally:
        h.remove()
        for b in list(blocks)[1:]:
            del b.forward


def _record(model: nn.Module, blocks_name: str, blocks: Blocks, batches: list[Any], reader: ShardReader,
            device: str | torch.device) -> list[RecordedBatch]:
    """Every block's recorded call per batch (block 0 loaded for it, then back on ``meta``)."""
    _load_into(blocks[0], f"{blocks_name}.0.", reader, device)
    try:
        with _pass_through(blocks):
            return record_block_calls(model, blocks, [_to(b, device) for b in batches], blocks_name)
    finally:
        _to_meta(blocks[0])


@torch.no_grad()
def prune_offloaded(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], algorithm: PostTraining[Any],
                    batches: list[Any], *, device: str | torch.device = "cpu", activation_budget: int | str | None = None,
                    resume: bool = True, trust_remote_code: bool = False,
                    on_block_done: Callable[[int], None] | None = None) -> OffloadResult:
    """Prune the HF causal LM in ``model_dir`` block by block into ``out_dir`` (see the module doc).

    ``algorithm``: a post-training algorithm (Wanda, SparseGPT, OBS-structured; any structure its
    ``prune_matrix`` supports, N:M included) with its ``spec``; ``batches``: the calibration batches (token
    windows, on CPU); ``device``: the working device of the block being pruned (``cuda`` on a GPU);
    ``activation_budget``: bytes of hidden states kept in memory (half for the running block's inputs, half
    for its outputs; the rest spilled to disk);
    ``on_block_done(i)``: called after block ``i`` is written (tests inject a failure there)."""
    t0 = time.perf_counter()
    src, out = Path(model_dir).expanduser(), Path(out_dir).expanduser()
    budget = parse_bytes(activation_budget)
    reader = ShardReader(src)
    model = empty_model(src, trust_remote_code)
    found = find_blocks(model)
    if found is None:
        raise RecipeError(f"{src}: no list of repeated blocks found; offloaded pruning works block by block")
    blocks_name, blocks = found
    if algorithm.params.allocation != "uniform":
        raise RecipeError("offloaded pruning needs allocation 'uniform' (OWL scores a dense forward of the whole model)")
    state_dir = out / STATE_DIR
    if not resume:
        shutil.rmtree(state_dir, ignore_errors=True)
    key = {"model": str(src.resolve()), "algorithm": algorithm.name, "params": repr(algorithm.params),
           "structure": str(algorithm.spec.structure), "sparsity": float(algorithm.spec.sparsity),
           "batches": len(batches), "blocks": len(blocks)}
    state = _read_state(state_dir, key)
    writer = ShardWriter(out)
    _embed_inputs(model, blocks_name, reader, device)
    recorded = _record(model, blocks_name, blocks, batches, reader, device)
    targets, make_prune_block = algorithm.block_pruner(model, batches)
    outside = sorted(n for n in targets if not n.startswith(blocks_name + "."))
    if outside:
        raise RecipeError(f"offloaded pruning prunes the repeated blocks only; targets outside {blocks_name!r}: "
                          f"{outside[:3]} — prune them in memory or exclude them from prune.targets")
    res = OffloadResult(out, len(blocks), masks=dict(state["masks"]))
    half = None if budget is None else budget // 2           # two stores: the running block's inputs and outputs
    start = int(state["done"]) + 1
    acts = ActivationStore(_acts_dir(state_dir, start), half, persist=True)
    for i, rec in enumerate(recorded):
        if start == 0:
            acts.put(i, rec.hidden)
        rec.hidden = torch.empty(0)                              # the hidden states live in the store only
    for bi in range(start, len(blocks)):
        tb = time.perf_counter()
        ids = {id(m) for m in blocks[bi].modules()}
        job = _BlockJob(blocks[bi], bi, f"{blocks_name}.{bi}.", {n: m for n, m in targets.items() if id(m) in ids},
                        recorded, device)
        nxt = ActivationStore(_acts_dir(state_dir, bi + 1), half, persist=True, fresh=True)
        structures = job.run(reader, writer, make_prune_block, algorithm.hessian, acts, nxt, out / MASK_DIR)
        res.masks.update(structures)
        res.spilled_batches += acts.spilled + nxt.spilled
        _write_state(state_dir, {"done": bi, "masks": res.masks, "key": key})   # block bi done: its inputs go
        acts.clear()
        acts = nxt
        res.pruned_blocks.append(bi)
        res.block_seconds.append(time.perf_counter() - tb)
        if on_block_done is not None:
            on_block_done(bi)
    _to_meta(model)                              # the embeddings are not needed for the final copy
    _finish(out, src, reader, writer, blocks_name, len(blocks), state_dir)
    res.seconds = time.perf_counter() - t0
    return res


def _acts_dir(state_dir: Path, block: int) -> Path:
    """Where the inputs of ``block`` live (the outputs of ``block - 1``)."""
    return state_dir / f"acts-{block:05d}"


def _read_state(state_dir: Path, key: dict[str, Any]) -> dict[str, Any]:
    f = state_dir / "state.json"
    if not f.is_file():
        shutil.rmtree(state_dir, ignore_errors=True)
        return {"done": -1, "masks": {}, "key": key}
    state: dict[str, Any] = json.loads(f.read_text())
    if state.get("key") != key:
        raise CheckpointError(f"{state_dir.parent} holds an unfinished offloaded run of another model, algorithm or "
                              f"calibration ({state.get('key')} vs {key}); use another output folder or resume=False")
    return state


def _write_state(state_dir: Path, state: dict[str, Any]) -> None:
    tmp = state_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, state_dir / "state.json")


@dataclass
class _BlockJob:
    """One block of :func:`prune_offloaded`: read, statistics, prune, propagate, write, back to ``meta``."""

    block: nn.Module
    index: int
    prefix: str
    mods: dict[str, nn.Module]
    recorded: list[RecordedBatch]
    device: str | torch.device

    def run(self, reader: ShardReader, writer: ShardWriter, make_prune_block: MakePruneBlock, hessian: bool,
            acts: ActivationStore, nxt: ActivationStore, mask_dir: Path) -> dict[str, str]:
        bi, dev = self.index, self.device
        _load_into(self.block, self.prefix, reader, dev)
        masks = MaskSet()
        if self.mods:
            hidden = (acts.get(i, dev) for i in range(len(self.recorded)))
            stats = block_stats(self.block, bi, self.recorded, hidden, self.mods, hessian)  # type: ignore[arg-type]
            make_prune_block(masks)(self.mods, stats)
            del stats
        for i, rec in enumerate(self.recorded):
            y = _first(_call(self.block, rec.calls[bi], acts.get(i, dev)))
            if not bool(torch.isfinite(y).all()):
                raise RecipeError(f"block {bi}: the pruned block gives non-finite outputs")
            nxt.put(i, y)
        writer.write(f"block-{bi:05d}", {self.prefix + n: t for n, t in self.block.state_dict().items()
                                         if self.prefix + n in reader.weight_map})
        mask_dir.mkdir(exist_ok=True)
        save_file({n: m.to("cpu").contiguous() for n, m in masks.items()}, str(mask_dir / f"block-{bi:05d}.safetensors"),
                  metadata={"structures": json.dumps(masks.structures)})
        _to_meta(self.block)
        return dict(masks.structures)


def _to(batch: Any, device: str | torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    return batch.to(device) if isinstance(batch, Tensor) else batch


def _finish(out: Path, src: Path, reader: ShardReader, writer: ShardWriter, blocks_name: str, n_blocks: int,
            state_dir: Path) -> None:
    """Copy the tensors outside the blocks, name the parts in the HF layout, copy config/tokenizer."""
    inside = blocks_name + "."
    rest = [n for n in reader.names() if not n.startswith(inside)]
    keys = []
    for j, n in enumerate(rest):                 # one tensor at a time: the embeddings / LM head can be large
        keys.append(f"rest-{j:05d}")
        if not writer.has(keys[-1]):
            writer.write(keys[-1], reader.load([n], "cpu"))
    writer.finish([f"block-{i:05d}" for i in range(n_blocks)] + keys)
    copy_model_files(src, out)
    shutil.rmtree(state_dir, ignore_errors=True)


def load_offload_masks(out_dir: str | os.PathLike[str]) -> MaskSet:
    """The keep-masks an offloaded run wrote (all blocks; for checks on models that fit in memory)."""
    masks = MaskSet()
    for f in sorted((Path(out_dir) / MASK_DIR).glob("block-*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            structures = json.loads((h.metadata() or {}).get("structures", "{}"))
        for n, m in load_file(str(f)).items():
            masks.set(n, m, structures.get(n))
    return masks
