"""`spp_hf.trainer`, where users import the trainer from; it lives in `spp_hf.training.trainer`."""

from .training.trainer import SPPSFTConfig, SPPSFTTrainer

__all__ = ["SPPSFTConfig", "SPPSFTTrainer"]
