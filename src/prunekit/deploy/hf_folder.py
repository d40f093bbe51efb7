"""A compacted Hugging Face model as a ``save_pretrained`` folder — written only when it reloads.

transformers builds every layer from the config, so a compacted model reloads with ``from_pretrained``
only when its config gives every tensor its compacted shape: uniform head / KV-head counts with an
explicit ``head_dim`` (Llama, Qwen2, Mistral-style decoders read ``config.head_dim``), uniform FFN widths
through ``intermediate_size`` (``n_inner`` for GPT-2, ``hidden_dim`` for DistilBERT).  It cannot when the
widths differ across layers, or for head-pruned BERT-family encoders (and GPT-2): transformers derives their
head size from ``hidden_size / num_attention_heads`` and transformers 5 removed ``prune_heads`` /
``pruned_heads``.

* :func:`config_mismatches` (defined in :mod:`prunekit.deploy.surgery`, which sets the config) — which
  tensors a fresh model built from a config (on the ``meta`` device, no memory) would shape differently
  from the compacted model: the check that needs no files;
* :func:`save_hf_folder` — write ``save_pretrained`` into a temporary folder, reload it with
  ``from_pretrained``, compare **every** output with the compacted model's (each on its own scale), and
  only then move it into place.  Otherwise nothing is written and the returned note says why and how to
  deploy instead (:data:`DEPLOY_INSTEAD`).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..graph import call_model
from .surgery import DEPLOY_INSTEAD, config_mismatches, is_hf_model

__all__ = ["config_mismatches", "save_hf_folder", "output_mismatch", "DEPLOY_INSTEAD", "is_hf_model"]

def _tensors(out: Any) -> list[Tensor]:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def output_mismatch(ref: Any, new: Any, rtol: float = 1e-4, atol: float = 1e-6) -> str:
    """``""`` when every output tensor of ``new`` equals ``ref``'s within ``atol + rtol * max|ref_i|``
    (each output on its own scale), else what differs (count, shapes, or the worst output)."""
    a, b = _tensors(ref), _tensors(new)
    if len(a) != len(b):
        return f"{len(b)} output tensors, expected {len(a)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            return f"output {i} has shape {tuple(y.shape)}, expected {tuple(x.shape)}"
        if not x.numel():
            continue
        x, y = x.detach().float(), y.detach().float()
        diff, scale = float((x - y).abs().max()), float(x.abs().max())
        if not diff <= atol + rtol * scale:      # also catches NaN
            return f"output {i} differs by {diff:.3g} (largest value {scale:.3g}, rtol {rtol:g})"
    return ""


def _reload_check(model: nn.Module, folder: Path, example_inputs: Any, rtol: float) -> str:
    try:
        back = type(model).from_pretrained(folder).eval()     # type: ignore[attr-defined]
    except Exception as e:  # noqa: BLE001 - a folder that does not load is the failure being checked for
        return f"from_pretrained fails: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    was = model.training
    model.eval()
    try:
        return output_mismatch(call_model(model, example_inputs), call_model(back, example_inputs), rtol)
    finally:
        model.train(was)


def save_hf_folder(model: nn.Module, directory: str | os.PathLike, example_inputs: Any,
                   rtol: float = 1e-4) -> tuple[Path | None, str]:
    """Write ``model`` with ``save_pretrained`` to ``directory`` only if ``from_pretrained`` of the
    written folder gives the same outputs on ``example_inputs`` (module docstring).  Returns
    ``(directory, "")``, or ``(None, note)`` — nothing written — with why and how to deploy instead."""
    if not is_hf_model(model):
        return None, f"{type(model).__name__} is not a Hugging Face model: no from_pretrained folder"
    bad = config_mismatches(model)
    if bad:
        return None, (f"no from_pretrained folder: {type(model.config).__name__} cannot express the compacted "
                      f"sizes ({bad[0]}{'; ...' if len(bad) > 1 else ''}); {DEPLOY_INSTEAD}")
    d = Path(directory)
    tmp = d.with_name(f".{d.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)   # type: ignore[operator]
        why = _reload_check(model, tmp, example_inputs, rtol)
        if why:
            return None, f"no from_pretrained folder: the reloaded model is not the compacted one ({why}); {DEPLOY_INSTEAD}"
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d, ""
