"""spp-hf: Sparsity-Preserved Parameter-efficient fine-tuning (SPP) for the Hugging Face stack."""

__version__ = "0.1.0"

from .adapters.config import MaskedLoRAConfig, SPPConfig
from .adapters.layer import SPPLinear
from .adapters import masked_lora  # noqa: F401 - registers the masked-LoRA adapter kind with SPPLinear
from .adapters.loading import SPPMismatchError, SPPModel
from .adapters.model import SPPModelMixin, get_spp_model
from .sparsity import sparsity_report

__all__ = [
    "MaskedLoRAConfig",
    "SPPConfig",
    "SPPLinear",
    "SPPModel",
    "SPPModelMixin",
    "SPPMismatchError",
    "get_spp_model",
    "sparsity_report",
    "SPPSFTTrainer",
]


def __getattr__(name: str):
    # The trainer pulls in TRL, which is slow to import; load it on first use.
    if name == "SPPSFTTrainer":
        from .training.trainer import SPPSFTTrainer

        return SPPSFTTrainer
    raise AttributeError(f"module 'spp_hf' has no attribute {name!r}")
