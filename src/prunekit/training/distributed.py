"""Data-parallel helpers (``torch.distributed``) and the resumable, shardable training sampler.

Launch several processes with ``torchrun --nproc_per_node=K -m prunekit.cli.main run RECIPE ...`` (or
``prunekit run RECIPE --nproc K``).  Every rank holds the whole model; each global batch of
``data.batch_size`` examples is split into K contiguous shards (one per rank); after ``backward`` the
gradients are averaged with **one** ``all_reduce`` per step, weighted by each rank's shard size, so
the update equals the single-process update on the same global batch (up to float summation order).
We do not wrap the model in ``DistributedDataParallel``: algorithms and masks address parameters by
their names (``conv1.weight``), which DDP would rename to ``module.conv1.weight``; one explicit,
bucketed all-reduce gives the same arithmetic.  Since every rank starts from the same seed and applies
the same averaged gradients, weights, masks and algorithm state (ADMM Z/U, ρ) stay identical; the
runner checks that at the end with a digest all-gather.  Only rank 0 writes files.
"""
from __future__ import annotations

import atexit
import hashlib
import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["is_distributed", "rank", "world_size", "local_rank", "init_from_env", "barrier", "average_gradients", "ShardedBatchSampler",
           "broadcast_state", "all_equal", "tensor_digest", "ResumableSampler"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device: torch.device | str | None = None) -> bool:
    """Initialise the default process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    Backend: follows the training ``device`` — ``nccl`` for CUDA, ``gloo`` otherwise (without a device:
    ``nccl`` when CUDA is available); override with ``$PRUNEKIT_DIST_BACKEND``.
    Returns whether the run is distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if dist.is_initialized():
        return True
    dev_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    backend = os.environ.get("PRUNEKIT_DIST_BACKEND") or ("nccl" if dev_type == "cuda" else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    atexit.register(shutdown)   # gloo's threads can abort ("terminate called ...") if the group outlives main
    return True


def shutdown() -> None:
    """Tear the default process group down (registered at exit by :func:`init_from_env`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where small collective tensors must live: the current CUDA device under nccl, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def average_gradients(params: Iterable[nn.Parameter], local_weight: float, nonfinite: bool = False) -> bool:
    """Replace each gradient by ``Σ_r w_r g_r / Σ_r w_r`` (one all-reduce over a flat buffer; ``w_r`` =
    this rank's number of examples).  Also all-reduces the ``nonfinite`` flag; returns True if any rank
    saw a non-finite loss."""
    params = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) * local_weight for g in grads] +
                     [torch.tensor([float(local_weight), 1.0 if nonfinite else 0.0], dtype=grads[0].dtype,
                                   device=grads[0].device)])
    dist.all_reduce(flat)
    total, bad = float(flat[-2]), bool(flat[-1] > 0)
    flat = flat[:-2] / total
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        new = flat[off:off + n].view_as(g)
        if p.grad is None:
            p.grad = new.clone()
        else:
            p.grad.copy_(new)
        off += n
    return bad


def broadcast_state(tensors: dict[str, torch.Tensor], src: int = 0) -> None:
    """Broadcast tensors in place from ``src`` (bool tensors via uint8)."""
    if not is_distributed():
        return
    for k in sorted(tensors):
        t = tensors[k]
        if t.dtype == torch.bool:
            u = t.to(torch.uint8)
            dist.broadcast(u, src)
            t.copy_(u.bool())
        else:
            dist.broadcast(t.data if isinstance(t, nn.Parameter) else t, src)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes (order-independent in the dict order)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def all_equal(digest: str) -> tuple[bool, list[str]]:
    """All-gather a digest string; returns (all equal, digests by rank)."""
    if not is_distributed():
        return True, [digest]
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=_comm_device())
    out = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(out, mine)           # tensors, not all_gather_object (which pickles)
    hexes = [bytes(t.cpu().tolist()).hex() for t in out]
    return len(set(hexes)) == 1, hexes


class ResumableSampler(torch.utils.data.Sampler):
    """Seeded per-epoch permutation (``seed + epoch``), sharded by global batch, with a start offset.

    With ``world`` ranks, global batch ``k`` = ``perm[k*B:(k+1)*B]`` (``B`` = ``global_batch``) and
    rank ``r`` gets the ``r``-th of ``world`` near-equal contiguous pieces of it (``np.array_split``),
    so the union over ranks of each step's batches is exactly the single-process batch.  The loader's
    ``batch_size`` must be ``ceil(B / world)`` with ``drop_last=False``; pieces are yielded per batch
    via :meth:`batches` (use as ``batch_sampler``).  ``set_epoch(e, skip_batches=k)`` replays epoch
    ``e`` from its ``k``-th batch (for the next pass only), which is how a run resumes mid-epoch."""

    def __init__(self, n: int, global_batch: int, seed: int, *, shuffle: bool = True, world: int = 1, rank: int = 0):
        if n < 1:
            raise ValueError("the training set is empty")
        if global_batch < 1:
            raise ValueError("batch size must be >= 1")
        self.n, self.global_batch, self.seed, self.shuffle = n, global_batch, int(seed), shuffle
        self.world, self.rank = world, rank
        last = n % global_batch
        if world > 1 and (global_batch < world or (last and last < world)):
            raise ValueError(f"data.batch_size={global_batch} with {n} training examples leaves a batch smaller than "
                             f"the {world} processes; pick a batch size (and data.limit) so every batch has >= {world} examples")
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip_batches)

    def __len__(self) -> int:   # batches per epoch (used as batch_sampler)
        return -(-self.n // self.global_batch)

    def permutation(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        perm = self.permutation().tolist()
        start, self.skip = self.skip, 0          # the skip applies to this one pass only
        for k in range(start, len(self)):
            batch = perm[k * self.global_batch:(k + 1) * self.global_batch]
            if self.world > 1:
                batch = np.array_split(np.asarray(batch), self.world)[self.rank].tolist()
            yield batch


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Wrap any batch sampler (e.g. GLUE's length-bucketing one): rank ``r`` gets the ``r``-th of
    ``world`` contiguous pieces of every batch, so the union over ranks is the single-process batch.
    ``set_epoch`` is passed through."""

    def __init__(self, inner, world: int, rank: int):
        self.inner, self.world, self.rank = inner, world, rank

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        for batch in self.inner:
            if len(batch) < self.world:
                raise ValueError(f"a batch of {len(batch)} examples cannot be split over {self.world} processes; "
                                 "use a larger data.batch_size or data.limit")
            yield np.array_split(np.asarray(batch), self.world)[self.rank].tolist()
