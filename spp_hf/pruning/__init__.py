"""Post-training pruning that makes SPP's sparse bases: magnitude, Wanda and SparseGPT, unstructured or N:M."""

from ..sparsity import PRUNING_METHODS
from .api import PruneReport, prune, select_modules
from .calibration import CalibrationData, load_calibration
from .masks import SparsitySpec, mask_from_scores, parse_sparsity
from .save import save_pruned, sparsity_record
from .sequential import find_decoder_layers

__all__ = [
    "PRUNING_METHODS",
    "PruneReport",
    "prune",
    "save_pruned",
    "sparsity_record",
    "select_modules",
    "load_calibration",
    "CalibrationData",
    "SparsitySpec",
    "parse_sparsity",
    "mask_from_scores",
    "find_decoder_layers",
]
