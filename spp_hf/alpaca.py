"""Alpaca instruction data: the prompt template of the paper's official code, loading, TRL row formats."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, load_dataset

BUNDLED_ALPACA = Path(__file__).resolve().parent / "data" / "alpaca" / "alpaca_sample_500.json"

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The Alpaca prompt for one example (with or without the optional input)."""
    if input:
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def load_alpaca(name: str = "bundled", split: str = "train", max_samples: int | None = None) -> Dataset:
    """Alpaca records from the Hub, a local JSON/JSONL file, or 'bundled' (500 examples shipped with spp-hf)."""
    path = Path(BUNDLED_ALPACA if name == "bundled" else name).expanduser()
    if path.is_file():
        data = load_dataset("json", data_files=str(path), split="train")
    else:
        data = load_dataset(name, split=split)
    if "output" not in data.column_names and "response" in data.column_names:
        data = data.rename_column("response", "output")
    missing = {"instruction", "output"} - set(data.column_names)
    if missing:
        raise ValueError(
            f"{name} is not in Alpaca format: missing columns {sorted(missing)} (found {data.column_names}). "
            "Expected instruction, input (optional) and output."
        )
    if max_samples is not None:
        data = data.select(range(min(max_samples, len(data))))
    return data


def to_sft_format(data: Dataset, train_on_inputs: bool = True) -> Dataset:
    """Alpaca records → TRL rows: ``text`` (loss on everything) or ``prompt``/``completion`` (response only)."""

    def convert(example: dict) -> dict:
        prompt = alpaca_prompt(example["instruction"], example.get("input"))
        if train_on_inputs:
            return {"text": prompt + example["output"]}
        return {"prompt": prompt, "completion": example["output"]}

    return data.map(convert, remove_columns=data.column_names, desc="Alpaca prompt template")
