"""``prunekit compact RUN_DIR [--out DIR]`` — physically remove the structured sparsity of a run.

Reads the checkpoint a ``prunekit run`` wrote (``manifest.json`` holds the resolved recipe: the model is
rebuilt from it, then weights and masks are loaded and the masks applied), compacts it with
:func:`prunekit.deploy.compact.compact`, and writes into ``--out`` (default ``RUN_DIR/compact``):

* ``model.safetensors`` + ``compact.json`` — the compacted model and its shape manifest
  (``prunekit.deploy.compact.load_compacted(DIR, factory)`` rebuilds it with a strict load);
* ``sparse.safetensors`` — the compacted weights with the remaining zeros encoded by
  ``prunekit.deploy.storage.encode_state_dict`` (best encoding per tensor; metadata key ``prunekit``).

Prints and returns the size table (dense / masked-sparse / compacted / compacted+sparse bytes).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from prunekit.core.errors import RecipeError
from prunekit.deploy.compact import compact, save_compacted
from prunekit.deploy.storage import encode_state_dict
from prunekit.io.checkpoint import MODEL_FILE, _atomic_replace, load_checkpoint, read_manifest
from prunekit.pipelines.recipe import parse_recipe
from prunekit.pipelines.workloads import build_workload


def add_parser(sub):
    p = sub.add_parser("compact", help="physically remove structured sparsity of a run; write compacted "
                                       "safetensors + shape manifest + sparse storage file; print sizes")
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder written by `prunekit run`")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/compact)")
    p.set_defaults(func=run)


def load_run(run_dir: str | os.PathLike, data_limit: int = 8) -> tuple[Any, Any, Any, Any]:
    """Rebuild a run's model from its recipe and load weights + masks: ``(model, masks, recipe, example_input)``.

    The workload is rebuilt with ``data.limit = data_limit`` (only the model and one example input are used)."""

    manifest = read_manifest(run_dir)
    raw = manifest.get("recipe")
    if not isinstance(raw, dict):
        raise RecipeError(f"{Path(run_dir) / 'manifest.json'} holds no recipe; is it the folder of a `prunekit run`?")
    recipe = parse_recipe(raw, [f"data.limit={data_limit}", "data.eval_limit=null", "model.checkpoint=null"])
    wl = build_workload(recipe)
    _, masks, _ = load_checkpoint(run_dir, wl.model)
    wl.model.eval()
    masks.apply(wl.model)
    return wl.model, masks, recipe, wl.example_input


def _file_bytes(path: Path) -> int:
    return path.stat().st_size


def compact_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> dict:
    """Compact a run folder; returns ``{"out": ..., "sizes": [...], "removed": ..., "params": ...}``."""



    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "compact"
    model, masks, recipe, _ = load_run(run_dir)
    masked_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    res = compact(model, masks)
    save_compacted(out, model, res.manifest, extra={"run_dir": str(run_dir), "model": recipe.model.name})
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
    return {"out": str(out), "sizes": sizes, "removed": res.removed,
            "params": {"before": res.params_before, "after": res.params_after}}


def format_sizes(sizes: list[dict]) -> str:
    lines = ["| file | bytes | vs dense |", "|---|---:|---:|"]
    lines += [f"| {s['file']} | {s['bytes']:,} | {s['ratio']:.3f} |" for s in sizes]
    return "\n".join(lines)


def run(args) -> int:
    r = compact_run(args.run_dir, args.out)
    print(f"compacted {args.run_dir} → {r['out']}: {r['params']['before']:,} → {r['params']['after']:,} parameters")
    print("removed: " + ", ".join(f"{k} {v}" for k, v in r["removed"].items() if v))
    print(format_sizes(r["sizes"]))
    return 0
