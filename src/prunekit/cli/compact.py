"""``prunekit compact RUN_DIR [--out DIR]`` — physically remove the pruned units of a run.

Reads the checkpoint a ``prunekit run`` wrote (``manifest.json`` holds the resolved recipe: the model is
rebuilt from it, then weights and masks are loaded and the masks applied) and compacts it with the
graph-driven, verified :func:`prunekit.deploy.surgery.compact` (coupled groups from a ``torch.export``
trace on the workload's example input — no hand-written chains).  A unit is removed where every coupled
weight slice is pruned, i.e. for group structures (``channels``, ``heads``, ``neurons``, …).  Writes
into ``--out`` (default ``RUN_DIR/compact``):

* ``model.safetensors`` + ``compact.json`` — the compacted model and its manifest (format
  ``prunekit-compact/2``: kept indices per cut tensor; ``prunekit.deploy.compact.load_compacted(DIR,
  factory)`` rebuilds it with a strict load);
* ``hf/`` — for a Hugging Face model whose config can express the new sizes (uniform head / KV-head
  counts with an explicit ``head_dim``, uniform FFN widths): ``save_pretrained``, written only after
  ``from_pretrained`` of it gave the compacted model's outputs
  (:func:`prunekit.deploy.hf_folder.save_hf_folder`); otherwise a note says why and how to deploy instead;
* ``sparse.safetensors`` — the compacted weights with the remaining zeros encoded by
  ``prunekit.deploy.storage.encode_state_dict`` (best encoding per tensor; metadata key ``prunekit``).

Prints per group what was removed / kept / why not removable, parameters and MACs (from the graph)
before/after, and the size table.  If verification fails (:class:`~prunekit.deploy.surgery.CompactionError`)
the error naming the group is printed, nothing is written, and the exit code is 2.  A model that does
not trace is refused the same way (no unverified fallback): the error names the model and the trace error.

Opening a run folder never runs code it names unless asked: a recipe whose model or data is an import
path (``package.module:factory``) or sets ``model.trust_remote_code`` is refused with
:class:`~prunekit.core.errors.UntrustedCodeError` (one line: what would be imported) unless
``--trust-code`` (Python: ``trust_code=True``) is given.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from prunekit.core.errors import RecipeError, UntrustedCodeError
from prunekit.deploy import surgery
from prunekit.deploy.compact import graph_manifest, save_compacted
from prunekit.deploy.hf_folder import DEPLOY_INSTEAD, is_hf_model, save_hf_folder
from prunekit.deploy.storage import encode_state_dict
from prunekit.graph import TraceError
from prunekit.io.checkpoint import MODEL_FILE, _atomic_replace, load_checkpoint, read_manifest
from prunekit.pipelines.recipe import code_to_run, parse_recipe
from prunekit.pipelines.workloads import Workload, build_workload


def add_parser(sub):
    p = sub.add_parser("compact", help="physically remove the pruned units of a run (graph-driven, verified); write "
                                       "compacted safetensors + manifest (+ HF save_pretrained) + sparse file; "
                                       "print groups, params, MACs, sizes",
                       description="Physically remove the fully pruned units of a finished run (coupled groups from "
                                   "the model's traced graph; outputs verified against the masked model) and write "
                                   "the compacted model, its manifest and a sparse storage file.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder written by `prunekit run`")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/compact)")
    add_trust_flag(p)
    p.set_defaults(func=run)


def add_trust_flag(p) -> None:
    p.add_argument("--trust-code", action="store_true",
                   help="allow importing the model/data factory named in the run's stored recipe (package.module:"
                        "factory) and Hugging Face remote code; without it such a run folder is refused")


def load_run_workload(run_dir: str | os.PathLike, overrides: Sequence[str] = (), *,
                      trust_code: bool = False) -> tuple[Workload, Any, Any]:
    """The run's workload rebuilt from its recipe (plus ``overrides``, dotted ``key=value``) with the run's
    weights and masks loaded and applied: ``(workload, masks, recipe)``.  A recipe that names code to import or
    remote code to run (:func:`prunekit.pipelines.recipe.code_to_run`) raises :class:`UntrustedCodeError`
    before anything is imported, unless ``trust_code``."""
    raw = read_manifest(run_dir).get("recipe")
    if not isinstance(raw, dict):
        raise RecipeError(f"{Path(run_dir) / 'manifest.json'} holds no recipe; is it the folder of a `prunekit run`?")
    recipe = parse_recipe(raw, [*overrides, "model.checkpoint=null"])
    needs = code_to_run(recipe)
    if needs and not trust_code:
        raise UntrustedCodeError(f"opening {run_dir} would {'; '.join(needs)} — code stored in the run folder's "
                                 "recipe; pass --trust-code (Python: trust_code=True) if you trust it")
    wl = build_workload(recipe)
    _, masks, _ = load_checkpoint(run_dir, wl.model)
    wl.model.eval()
    masks.apply(wl.model)
    return wl, masks, recipe


def load_run(run_dir: str | os.PathLike, data_limit: int = 8, *, trust_code: bool = False) -> tuple[Any, Any, Any, Any]:
    """Rebuild a run's model and load weights + masks (:func:`load_run_workload` with ``data.limit = data_limit``:
    only the model and one example input are used): ``(model, masks, recipe, example_input)``."""
    wl, masks, recipe = load_run_workload(run_dir, [f"data.limit={data_limit}", "data.eval_limit=null"],
                                          trust_code=trust_code)
    return wl.model, masks, recipe, wl.example_input


def _file_bytes(path: Path) -> int:
    return path.stat().st_size


def compact_loaded(model: Any, masks: Any, example_input: Any, name: str) -> surgery.CompactResult:
    """:func:`prunekit.deploy.surgery.compact` of a rebuilt run model; a model that does not trace is
    refused (:class:`~prunekit.deploy.surgery.CompactionError` naming the model and the trace error)."""
    try:
        return surgery.compact(model, masks, example_input)
    except TraceError as e:
        raise surgery.CompactionError(f"model {name!r} cannot be compacted: its graph does not trace, so the "
                                      f"coupled groups are unknown and nothing is removed or written ({e})") from None


def compact_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, log=print, *,
                trust_code: bool = False) -> dict:
    """Compact a run folder; returns ``{"out", "mode", "sizes", "removed", "groups", "params", "macs", ...}``.

    Raises :class:`~prunekit.deploy.surgery.CompactionError` (nothing written) when verification fails or
    the model does not trace; :class:`UntrustedCodeError` when the recipe names code and not ``trust_code``."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "compact"
    model, masks, recipe, x = load_run(run_dir, trust_code=trust_code)
    masked_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    extra = {"run_dir": str(run_dir), "model": recipe.model.name}
    result: dict = {"out": str(out)}
    res = compact_loaded(model, masks, x, recipe.model.name)
    man = graph_manifest(res, model)
    save_compacted(out, model, man, extra=extra)
    result.update(mode="graph", removed=res.removed, groups=man["groups"], notes=res.notes,
                  config_updates=res.config_updates, rel_err=res.rel_err,
                  params={"before": res.params_before, "after": res.params_after},
                  macs={"before": res.macs_before, "after": res.macs_after})
    if is_hf_model(model):   # written only when from_pretrained gives back the compacted outputs
        hf, why = save_hf_folder(model, out / "hf", x)
        if hf is not None:
            result["hf"] = str(hf)
        else:
            said = any(DEPLOY_INSTEAD in n for n in res.notes)
            result["notes"] = [*res.notes, why.replace(f"; {DEPLOY_INSTEAD}", "") if said else why]
    tensors, meta = encode_state_dict({k: v.contiguous() for k, v in model.state_dict().items()}, "best")
    _atomic_replace(out / "sparse.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"prunekit": meta}))
    sparse_masked, meta2 = encode_state_dict(masked_sd, "best")
    tmp_dir = out / ".sizes"
    tmp_dir.mkdir(exist_ok=True)
    save_file(sparse_masked, str(tmp_dir / "masked_sparse.safetensors"), metadata={"prunekit": meta2})
    sizes: list[dict[str, Any]] = [
        {"file": "dense (run checkpoint, zeros stored)", "bytes": _file_bytes(run_dir / MODEL_FILE)},
        {"file": "masked, sparse-encoded", "bytes": _file_bytes(tmp_dir / "masked_sparse.safetensors")},
        {"file": "compacted (model.safetensors)", "bytes": _file_bytes(out / "model.safetensors")},
        {"file": "compacted + sparse (sparse.safetensors)", "bytes": _file_bytes(out / "sparse.safetensors")},
    ]
    (tmp_dir / "masked_sparse.safetensors").unlink()
    tmp_dir.rmdir()
    for s in sizes:
        s["ratio"] = s["bytes"] / sizes[0]["bytes"]
    result["sizes"] = sizes
    return result


def format_sizes(sizes: list[dict]) -> str:
    lines = ["| file | bytes | vs dense |", "|---|---:|---:|"]
    lines += [f"| {s['file']} | {s['bytes']:,} | {s['ratio']:.3f} |" for s in sizes]
    return "\n".join(lines)


def format_groups(groups: list[dict]) -> str:
    lines = ["| group | kind | units | removed | kept | note |", "|---|---|---:|---:|---:|---|"]
    for g in groups:
        note = "" if g["removable"] and not g["reason"] else ("not removable: " if not g["removable"] else "") + g["reason"]
        lines.append(f"| {g['name']} | {g['kind']} | {g['count']} | {g['removed']} | {g['kept']} | {note} |")
    return "\n".join(lines)


def run(args) -> int:
    try:
        r = compact_run(args.run_dir, args.out, trust_code=args.trust_code)
    except surgery.CompactionError as e:
        print(f"error: {e}; nothing was written", file=sys.stderr)
        return 2
    p = r["params"]
    print(f"compacted {args.run_dir} → {r['out']} (graph-driven, verified): "
          f"{p['before']:,} → {p['after']:,} parameters")
    if r.get("macs") and r["macs"].get("before"):
        m = r["macs"]
        print(f"MACs (from the graph): {m['before']:,} → {m['after']:,} ({m['before'] / max(m['after'], 1):.2f}x fewer)")
    print(format_groups(r["groups"]))
    for n in r.get("notes", []):
        print(f"note: {n}")
    if r.get("hf"):
        print(f"Hugging Face model (from_pretrained): {r['hf']}")
    print(format_sizes(r["sizes"]))
    return 0
