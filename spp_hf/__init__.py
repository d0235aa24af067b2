"""spp-hf: Sparsity-Preserved Parameter-efficient fine-tuning (SPP) for the Hugging Face stack."""

from .adapters.layer import SPPLinear
from .adapters.masked_lora import MaskedLoRAConfig
from .adapters.spp import SPPConfig
from .adapters.files import SPPMismatchError
from .adapters.loading import SPPModel
from .adapters.pretrained import load_sparse_peft_model
from .adapters.model import SPPModelMixin, get_spp_model
from .adapters.sparse_peft import get_sparse_peft_model
from .sparsity import sparsity_report
from .version import __version__

__all__ = [
    "MaskedLoRAConfig",
    "SPPConfig",
    "SPPLinear",
    "SPPModel",
    "SPPModelMixin",
    "SPPMismatchError",
    "get_spp_model",
    "get_sparse_peft_model",
    "load_sparse_peft_model",
    "sparsity_report",
    "SPPSFTTrainer",
]


def __getattr__(name: str):
    # The trainer pulls in TRL, which is slow to import; load it on first use.
    if name == "SPPSFTTrainer":
        from .training.trainer import SPPSFTTrainer

        return SPPSFTTrainer
    raise AttributeError(f"module 'spp_hf' has no attribute {name!r}")
