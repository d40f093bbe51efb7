"""Sparse inference for ``nn.Linear`` on CPU, used only where it is measured to pay.

Fast path: the weight is a CSR tensor with int32 indices on the *left*,
``y^T = addmm(b[:, None], W_csr, x^T)`` (MKL sparse), and ``y`` is returned as the transposed
view (no copy). Measured on the project's 2-core CPU (torch 2.13 CPU), 768 -> 3072 Linear,
input (1, 128, 768), random unstructured sparsity, float32, median ms, dense vs CSR:

====== ======= ============= =============
sparse threads dense ms      CSR ms
====== ======= ============= =============
90 %   1       5.1-5.3       2.3-2.5 (2.2x)
90 %   2       3.2-4.1       1.6-1.8 (2.0-2.3x)
95 %   1       5.7-6.6       1.6-2.1 (3.2-3.6x)
95 %   2       3.4-4.1       1.1-1.5 (2.5-3.0x)
====== ======= ============= =============

Measured slower, so not used: CSR ``W^T`` on the right (``x @ W^T``: 10-20x slower than
dense), BSR 4x4 blocks on random sparsity (~2x slower than dense), int64 indices (up to ~20 %
slower), a contiguous copy of the output (+20-100 %), scipy.sparse CSR @ numpy float32
(single-threaded, 3.2-3.4 ms at 95 %, 5.9-6.3 ms at 90 %: 2-2.5x slower than torch CSR).
At many rows (8 x 128 tokens) the gain shrinks: ~2x at 95 %, ~1.1x at 90 %, hence the
per-layer, per-shape measurement in ``sparsify_linears``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from prunekit.deploy.timing import call_model, interleaved_ms

__all__ = [
    "SparseLinear",
    "LinearTiming",
    "time_linear",
    "choose_linear_impl",
    "sparsify_linears",
]

class SparseLinear(nn.Module):
    """Inference-only drop-in for a (mostly zero) ``nn.Linear``: ``y = x @ W^T + b`` for any
    leading batch dims, with ``W`` held as a ``torch.sparse_csr`` buffer.

    Built from a dense ``nn.Linear``; ``to_linear()`` gives the dense layer back (exactly).
    The forward is not differentiable with respect to the weight (it is a buffer, not a
    Parameter); gradients still flow to the input.
    """

    weight: torch.Tensor          # sparse CSR buffer
    bias: torch.Tensor | None     # (out, 1) buffer

    def __init__(self, linear: nn.Linear, *, index_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear is built from an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if w.layout != torch.strided:
            raise TypeError(f"expected a dense weight, got layout {w.layout}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = w.to_sparse_csr()
        if index_dtype is None:
            index_dtype = torch.int32 if csr.values().numel() < 2**31 else torch.int64
        csr = torch.sparse_csr_tensor(
            csr.crow_indices().to(index_dtype),
            csr.col_indices().to(index_dtype),
            csr.values(),
            size=csr.shape,
            check_invariants=False,  # built from to_sparse_csr: valid by construction
        )
        self.register_buffer("weight", csr)
        if linear.bias is not None:
            self.register_buffer("bias", linear.bias.detach().clone().unsqueeze(1))  # (out, 1)
        else:
            self.bias = None

    @property
    def nnz(self) -> int:
        return int(self.weight.values().numel())

    @property
    def sparsity(self) -> float:
        total = self.in_features * self.out_features
        return 1.0 - self.nnz / total if total else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xt = x.reshape(-1, self.in_features).t()  # (in, rows), a view
        if self.bias is not None:
            yt = torch.addmm(self.bias, self.weight, xt)
        else:
            yt = torch.mm(self.weight, xt)
        return yt.t().reshape(*lead, self.out_features)

    def to_linear(self) -> nn.Linear:
        """The equivalent dense ``nn.Linear`` (same values, dtype and device)."""
        w = self.weight.to_dense()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias.squeeze(1))
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, nnz={self.nnz}, sparsity={self.sparsity:.3f}")


@dataclass(frozen=True)
class LinearTiming:
    dense_ms: float
    sparse_ms: float
    chosen: Literal["dense", "csr"]

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms if self.sparse_ms > 0 else float("inf")


def time_linear(
    linear: nn.Linear,
    example_input: torch.Tensor,
    *,
    repeats: int = 20,
    warmup: int = 3,
    num_threads: int | None = None,
    min_speedup: float = 1.1,
) -> LinearTiming:
    """Median wall-clock ms of the dense layer and its ``SparseLinear`` on ``example_input``,
    interleaved (dense, csr, dense, ...) so background load hits both alike, under
    ``torch.inference_mode`` and ``num_threads`` (default: the current setting, restored after).
    ``chosen`` is ``"csr"`` only when it is at least ``min_speedup`` times faster, so noise
    does not swap layers that are a wash.
    """
    sparse = SparseLinear(linear)
    ms = interleaved_ms({"dense": lambda: linear(example_input), "csr": lambda: sparse(example_input)},
                        repeats=repeats, warmup=warmup, threads=num_threads)
    dense_ms, sparse_ms = ms["dense"], ms["csr"]
    chosen: Literal["dense", "csr"] = "csr" if sparse_ms * min_speedup <= dense_ms else "dense"
    return LinearTiming(dense_ms, sparse_ms, chosen)


def choose_linear_impl(
    linear: nn.Linear,
    example_input: torch.Tensor,
    repeats: int = 20,
    **kwargs: Any,
) -> Literal["dense", "csr"]:
    """``"csr"`` if ``SparseLinear`` is measured faster on this input shape and thread count,
    else ``"dense"``; keyword options as in ``time_linear``."""
    return time_linear(linear, example_input, repeats=repeats, **kwargs).chosen



def _sparsity(w: torch.Tensor) -> float:
    return float((w == 0).sum()) / w.numel() if w.numel() else 0.0


def sparsify_linears(
    model: nn.Module,
    example_inputs: Any,
    min_sparsity: float = 0.5,
    *,
    repeats: int = 10,
    warmup: int = 2,
    num_threads: int | None = None,
    min_speedup: float = 1.1,
) -> list[dict[str, Any]]:
    """Replace, in place, each ``nn.Linear`` of ``model`` for which ``SparseLinear`` is measured
    faster on the layer's real input; returns one row per Linear:
    ``{name, sparsity, dense_ms, sparse_ms, chosen, reason}``.

    ``example_inputs`` is passed as ``model(**x)`` for a dict (HF tokenizer output),
    ``model(*x)`` for a tuple/list, else ``model(x)``. One forward pass with pre-hooks captures
    each Linear's first input; each layer is then timed alone (``time_linear``). Every
    ``nn.Linear`` instance gets a row, but only those whose type is exactly ``nn.Linear`` and
    that are called as modules in that forward are candidates (subclasses may add behaviour;
    ``nn.MultiheadAttention.out_proj`` is such a subclass and is never called). The others -
    also layers below ``min_sparsity``, on a non-CPU device, or the root module - stay dense
    with ``dense_ms = sparse_ms = None`` and the reason given.
    """
    linears: dict[str, nn.Linear] = {}
    all_names: dict[int, list[str]] = {}  # a shared Linear is replaced under every name
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, nn.Linear):
            linears.setdefault(all_names.setdefault(id(m), [name])[0], m)
            if name not in all_names[id(m)]:
                all_names[id(m)].append(name)
    captured: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module, args):
            if name not in captured and args and isinstance(args[0], torch.Tensor):
                captured[name] = args[0].detach().clone()
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in linears.items()]
    try:
        with torch.inference_mode():
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()

    report = []
    for name, lin in linears.items():
        sp = _sparsity(lin.weight.detach())
        row: dict[str, Any] = {"name": name, "sparsity": sp, "dense_ms": None, "sparse_ms": None,
                               "chosen": "dense", "reason": ""}
        if type(lin) is not nn.Linear:
            row["reason"] = f"{type(lin).__name__} is a subclass of nn.Linear"
        elif name == "":
            row["reason"] = "root module"
        elif lin.weight.device.type != "cpu":
            row["reason"] = f"device {lin.weight.device}"
        elif sp < min_sparsity:
            row["reason"] = f"sparsity < {min_sparsity}"
        elif name not in captured:
            row["reason"] = "not called in the example forward"
        else:
            timing = time_linear(lin, captured[name], repeats=repeats, warmup=warmup,
                                 num_threads=num_threads, min_speedup=min_speedup)
            row.update(dense_ms=timing.dense_ms, sparse_ms=timing.sparse_ms, chosen=timing.chosen,
                       reason=f"measured {timing.speedup:.2f}x")
            if timing.chosen == "csr":
                sparse = SparseLinear(lin)
                for path in all_names[id(lin)]:
                    parent_name, _, attr = path.rpartition(".")
                    setattr(model.get_submodule(parent_name), attr, sparse)
        report.append(row)
    return report
