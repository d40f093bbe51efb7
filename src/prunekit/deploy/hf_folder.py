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
  ``from_pretrained``, compare **every** output with the compacted model's (each on its own scale, on the
  example input and a second one of another batch size and length: compaction's own check,
  :func:`prunekit.deploy.surgery.check_outputs`), and only then move it into place.  Otherwise nothing is written and the returned note says why and how to
  deploy instead (:data:`DEPLOY_INSTEAD`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from .surgery import DEPLOY_INSTEAD, check_outputs, config_mismatches, is_hf_model, reference_outputs

__all__ = ["config_mismatches", "save_hf_folder", "DEPLOY_INSTEAD", "is_hf_model"]


def _reload_check(model: nn.Module, folder: Path, example_inputs: Any, rtol: float, atol: float) -> str:
    try:
        back = type(model).from_pretrained(folder).eval()     # type: ignore[attr-defined]
    except Exception as e:  # noqa: BLE001 - a folder that does not load is the failure being checked for
        return f"from_pretrained fails: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    was = model.training
    model.eval()
    try:    # compaction's own check: every output on its own scale, on the example and a second input
        bad = [c for c in check_outputs(reference_outputs(model, example_inputs), back, rtol, atol) if not c.ok]
    finally:
        model.train(was)
    return bad[0].describe() if bad else ""


def save_hf_folder(model: nn.Module, directory: str | os.PathLike, example_inputs: Any,
                   rtol: float = 1e-4, atol: float = 1e-5) -> tuple[Path | None, str]:
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
        why = _reload_check(model, tmp, example_inputs, rtol, atol)
        if why:
            return None, f"no from_pretrained folder: the reloaded model is not the compacted one ({why}); {DEPLOY_INSTEAD}"
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d, ""
