"""SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", ICML 2023): layer-wise OBS pruning with lazy batched weight updates.

For a layer ``W`` (``rows × cols``, the matrix view) and its input Hessian ``H = 2/n X Xᵀ`` the
reconstruction loss ``‖W X − Ŵ X‖²`` is minimised row by row.  Columns are visited left to right; when
column ``j`` is pruned (its weight set to 0 in every row where the mask says so), the *remaining* columns
``> j`` absorb the error by the OBS update ``δw = −w_j / [H_F⁻¹]_jj · [H_F⁻¹]_{j,:}`` (``F`` = columns not yet
visited).  All ``[H_F⁻¹]`` rows are rows of the upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``)
scaled by ``U_jj``, so one factorisation serves the whole sweep.  Updates inside a block of ``blocksize``
columns are applied immediately; those to the columns after the block are applied once per block
(``W[:, i2:] −= Err · U[i1:i2, i2:]``), which is the paper's lazy batching.

Mask selection:

* ``unstructured``: per block of columns, the lowest OBS saliencies ``w² / U_jj²`` over the block (the
  paper's adaptive mask selection); block counts are rounded cumulatively so the layer has exactly
  ``round(sparsity · rows · cols)`` zeros;
* ``nm:N:M``: at the start of every M columns, the ``M − N`` lowest saliencies of each row (with the
  weights as updated so far);
* every other structure (block, pattern, row, column): the structure's own partition and selection on the
  element score ``|w| / U_jj`` (whose grouped L2 norm is the summed saliency), chosen once before the
  sweep; the sweep then only compensates.

**Joint sparsity + quantization** (the paper's §"joint sparsification & quantization", 50 % + 4 bits; the
rounding is GPTQ's, Frantar et al. ICLR 2023): with a quantizer, each kept weight of the visited column is
rounded to the nearest level of its row's grid (fitted once on the layer's weights before the sweep,
:meth:`prunekit.core.quant.Quantizer.levels`; > 8-bit quantizers such as ``fp16`` round element-wise) instead of
being kept as is, and the rounding error is compensated by the same OBS update as the pruning error.  Kept
weights that round to 0 are counted as pruned.  The recipe's ``quant.scheme`` (ADMM-style: set on the
algorithm's ``quant``) turns it on; the pipeline's quantize stage then re-fits each layer's grid on its kept
weights (a no-op where the sweep's grid is recovered, a re-rounding where the grid's outermost level ended unused).

Dampening: ``H += percdamp · mean(diag H) · I``; inputs that never fire (``H_jj = 0``) get ``H_jj = 1`` and
a zero weight column.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from prunekit.algorithms.base import register
from prunekit.algorithms.calibration import LayerStats, PostTraining, PostTrainingParams
from prunekit.core.errors import RecipeError
from prunekit.core.quant import Quantizer, QuantSpec, parse_quantizer
from prunekit.core.structures import NM, Structure, Unstructured, parse_structure

__all__ = ["SparseGPT", "inverse_cholesky", "sparsegpt_prune"]


def inverse_cholesky(H: Tensor, percdamp: float) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``λ = percdamp · mean diag``); more dampening is
    added (×10, up to 4 times) if the damped ``H`` is not positive definite."""
    H = H.double().clone()
    n = H.shape[0]
    damp = float(percdamp) * float(H.diagonal().mean())
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    for _ in range(5):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U: Tensor
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2) == 0:
                return U.float()
        damp = max(damp * 10.0, 1e-8 * float(H.diagonal().mean()) + 1e-10)
    raise RecipeError("the calibration Hessian is not positive definite even after dampening; raise percdamp")


def _structure_keep(W: Tensor, U: Tensor, structure: Structure, sparsity: float, shape: Sequence[int]) -> Tensor:
    score = W.abs() / U.diagonal()[None, :]
    w = W.reshape(shape)
    return structure.mask(w, sparsity, score=score.reshape(shape)).reshape(W.shape)


def _block_counts(rows: int, cols: int, blocksize: int, sparsity: float) -> list[int]:
    out, prev = [], 0
    for i2 in range(blocksize, cols + blocksize, blocksize):
        cum = int(round(sparsity * rows * min(i2, cols)))
        out.append(cum - prev)
        prev = cum
    return out


def _lowest(sal: Tensor, k: int) -> Tensor:
    """Bool mask (True = pruned) of the ``k`` lowest entries of ``sal`` (lower index first on ties)."""
    flat = sal.reshape(-1)
    out = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        out[torch.argsort(flat, stable=True)[:k]] = True
    return out.reshape(sal.shape)


def _lowest_per_row(sal: Tensor, k: int) -> Tensor:
    out = torch.zeros_like(sal, dtype=torch.bool)
    if k > 0:
        out.scatter_(1, torch.argsort(sal, dim=1, stable=True)[:, :k], True)
    return out


@torch.no_grad()
def sparsegpt_prune(W: Tensor, H: Tensor, structure: str | Structure = "unstructured", sparsity: float = 0.5,
                    percdamp: float = 0.01, blocksize: int = 128, shape: Sequence[int] | None = None,
                    quant: str | Quantizer | None = None, quant_columns: bool = False) -> tuple[Tensor, Tensor]:
    """Prune the ``(rows, cols)`` matrix ``W`` with input Hessian ``H`` (``cols × cols``); returns
    ``(W_new, keep)`` — the compensated weights (zero where pruned) and the keep-mask.  ``shape`` is the
    weight's own shape (e.g. a conv's 4-D shape) that the structure sees; default ``W.shape``.  ``quant``:
    also round the kept weights onto that grid (joint mode, see the module docstring); ``quant_columns``: a
    per-channel grid per *column* of ``W`` — the stored rows of a transposed weight (HF Conv1D), whose
    quantize stage and artefact fit one scale per stored row."""
    st = parse_structure(structure)
    shape = tuple(shape or W.shape)
    st.check_shape(shape)
    if not 0.0 <= float(sparsity) < 1.0:
        raise RecipeError(f"sparsity must be in [0, 1), got {sparsity}")
    if blocksize < 1:
        raise RecipeError(f"blocksize must be >= 1, got {blocksize}")
    W = W.detach().float().clone()
    H = H.detach().float().clone().to(W.device)          # statistics may live on CPU while the block is on a GPU
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise RecipeError(f"Hessian shape {tuple(H.shape)} does not match {cols} weight columns")
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = inverse_cholesky(H, percdamp)
    keep_fixed = None
    nm_keep = 0
    if isinstance(st, NM):
        nm_keep = st.keep_per_group(sparsity)
        blocksize = max(st.m, blocksize // st.m * st.m)     # N:M groups never straddle two blocks
    elif not isinstance(st, Unstructured):
        keep_fixed = _structure_keep(W, U, st, sparsity, shape)
    rnd = _rounder(W, quant, quant_columns)
    counts = _block_counts(rows, cols, blocksize, float(sparsity))
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = U1.diagonal()
        if keep_fixed is not None:
            P1 = ~keep_fixed[:, i1:i2]
        elif isinstance(st, NM):
            P1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            P1 = _lowest(W1.pow(2) / d.pow(2)[None, :], counts[b])
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if isinstance(st, NM) and i % st.m == 0:
                k = min(st.m, i2 - i1 - i)
                sal = W1[:, i:i + k].pow(2) / d[i:i + k].pow(2)[None, :]
                P1[:, i:i + k] = _lowest_per_row(sal, k - min(nm_keep, k))
            w = W1[:, i]
            q = (w if rnd is None else rnd(w, i1 + i)).masked_fill(P1[:, i], 0.0)
            err = (w - q) / d[i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        pruned[:, i1:i2] = P1
    W[pruned] = 0.0
    return W, ~pruned & (W != 0) if rnd is not None else ~pruned


def _rounder(W: Tensor, quant: str | Quantizer | None,
             columns: bool = False) -> Callable[[Tensor, int], Tensor] | None:
    """``(column, j)`` → nearest level of each row's grid (fitted on ``W``; ``columns``: of column ``j``'s
    grid, fitted on ``W.T``), or None without a quantizer."""
    if quant is None:
        return None
    qz = parse_quantizer(quant)
    if qz.bits > 8:
        return lambda w, j: qz.project(w[:, None]).reshape(-1)
    if columns:
        by_col = qz.levels(qz.encode(W.t().contiguous()))      # (cols, n_codes), or (1, n_codes) per tensor

        def nearest_col(w: Tensor, j: int) -> Tensor:
            lv = by_col[j if by_col.shape[0] > 1 else 0]
            return lv[(w[:, None] - lv[None, :]).abs().argmin(dim=1)]
        return nearest_col
    levels = qz.levels(qz.encode(W))          # (rows, n_codes)

    def nearest(w: Tensor, j: int) -> Tensor:
        idx = (w[:, None] - levels).abs().argmin(dim=1, keepdim=True)
        return levels.gather(1, idx).reshape(-1)
    return nearest


@register
class SparseGPT(PostTraining["SparseGPT.Params"]):
    """SparseGPT post-training pruning (no search phase): ``final_masks`` runs the block-sequential
    calibration driver and prunes + compensates every target in place."""

    name = "sparsegpt"
    hessian = True
    quant: QuantSpec | None = None     # joint 50 % + K-bit mode: the recipe's quant.scheme (set by the runner)

    @dataclass
    class Params(PostTrainingParams):
        percdamp: float = 0.01
        blocksize: int = 128
        joint: bool = True      # with quant.scheme: round jointly (GPTQ); False = prune only, the quantize stage rounds

        def __post_init__(self) -> None:
            super().__post_init__()
            if not isinstance(self.joint, bool):
                raise RecipeError(f"algorithm.params.joint must be true or false, got {self.joint!r}")
            if not (0.0 <= self.percdamp < 1.0):
                raise RecipeError(f"algorithm.params.percdamp must be in [0, 1), got {self.percdamp}")
            if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
                raise RecipeError(f"algorithm.params.blocksize must be a positive integer, got {self.blocksize!r}")

    def prune_matrix(self, W: Tensor, stats: LayerStats, structure: Structure, sparsity: float,
                     shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        q = self.quant.scheme if self.quant is not None and self.params.joint else None
        return sparsegpt_prune(W, stats.H, structure, sparsity, self.params.percdamp, self.params.blocksize, shape,
                               quant=q, quant_columns=self.transposed)
