"""prunekit: weight pruning for PyTorch models — structures, algorithms, hard-pruned retraining,
compaction and measured size/speed.

The core API::

    import prunekit
    mask = prunekit.mask_for(weight, "block:4x4", 0.5)          # bool, True = kept
    masks = prunekit.prune(model, "nm:2:4", 0.5, targets={"include": ["encoder.*"]})
    with masks.attach(model, optimizer):                          # hard-prune while retraining
        train(...)
"""
from .masks import HardPrune, MaskSet
from .pruner import PruneSpec, compute_masks, mask_for, prune
from .structures import NM, Block, Column, Pattern, Row, Structure, Unstructured, parse_structure
from .targets import TargetSpec, find_targets

__version__ = "0.1.0"

__all__ = [
    "mask_for", "prune", "compute_masks", "PruneSpec", "MaskSet", "HardPrune", "TargetSpec", "find_targets",
    "parse_structure", "Structure", "Unstructured", "Row", "Column", "Block", "NM", "Pattern", "__version__",
]
