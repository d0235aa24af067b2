"""Helpers for the trainer / recipe / distributed tests: a tiny character tokenizer that fits the
tiny models' 128-token vocabulary, a 2:4-pruned tiny base saved to disk, and Alpaca records."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, prune_magnitude_nm_

ALPACA_SAMPLE = Path(__file__).resolve().parents[1] / "spp_hf" / "data" / "alpaca" / "alpaca_sample_500.json"
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer():
    """A character-level fast tokenizer (printable ASCII + a few specials, < 128 ids) with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "<user>", "<assistant>", "<system>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<user>", "<assistant>", "<system>"],
    )  # fmt: skip
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_pruned_base(seed: int = 0) -> torch.nn.Module:
    """Tiny llama (64 hidden, 2 layers), every linear layer 2:4-pruned by magnitude."""
    model = make_tiny_model("llama", seed=seed)
    prune_magnitude_nm_(model)
    model.config.pad_token_id = 0
    model.config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    return model


def save_tiny_base(directory: Path, seed: int = 0) -> Path:
    """Save the tiny pruned base and the character tokenizer as a plain transformers checkpoint."""
    tiny_pruned_base(seed).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


def alpaca_records(n: int = 32) -> list[dict]:
    return json.loads(ALPACA_SAMPLE.read_text())[:n]


def spp_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.spp_state_dict().items()}


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread, and far faster than on two when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
