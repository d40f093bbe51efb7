"""prunekit: weight pruning for PyTorch models — structures, algorithms, hard-pruned retraining,
compaction and measured size/speed.

The core API::

    import prunekit
    mask = prunekit.mask_for(weight, "block:4x4", 0.5)          # bool, True = kept
    masks = prunekit.prune(model, "nm:2:4", 0.5, targets={"include": ["encoder.*"]})
    masks = prunekit.prune(model, "heads+neurons", 0.3, example_inputs=x)   # coupled groups from the graph
    res = prunekit.compact(model, masks, x)                       # remove them physically, verified
    prunekit.export(model, x, "model.onnx", int8="dynamic")          # ONNX (+ int8), checked vs PyTorch
    prunekit.save_compacted("small/", model, res)                 # safetensors + JSON manifest
    small = prunekit.load_compacted("small/", lambda: MyNet())    # rebuilt from a fresh dense model
    with masks.attach(model, optimizer):                          # hard-prune while retraining
        train(...)
    prunekit.prune_offloaded("llama_dir", "out_dir", algo, batches, activation_budget="1GB")
                                            # a model larger than memory, one block at a time (docs/big_models.md)
"""
from prunekit.algorithms.offload import prune_offloaded
from prunekit.api import Pruner, compact, export, groups_of, load_compacted, prune, quantize, save_compacted
from prunekit.core.masks import HardPrune, MaskSet
from prunekit.core.plan import PruneSpec, compute_masks, mask_for
from prunekit.core.quant import ConstraintSet, QCodes, Quantizer, QuantSpec, parse_quantizer
from prunekit.core.structures import (
                                      NM,
                                      Block,
                                      Column,
                                      GroupStructure,
                                      Pattern,
                                      Row,
                                      Structure,
                                      Unstructured,
                                      parse_structure,
)
from prunekit.core.targets import TargetSpec, find_targets
from prunekit.core.version import __version__

__all__ = [
    "mask_for", "prune", "compute_masks", "PruneSpec", "MaskSet", "HardPrune", "TargetSpec", "find_targets",
    "parse_structure", "Structure", "Unstructured", "Row", "Column", "Block", "NM", "Pattern", "__version__", "Pruner",
    "GroupStructure", "compact", "groups_of", "save_compacted", "load_compacted", "prune_offloaded", "export",
    "quantize", "parse_quantizer", "Quantizer", "QuantSpec", "QCodes", "ConstraintSet",
]
